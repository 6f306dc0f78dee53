"""Data options shared by the commands: `--data wikipedia` (the offline corpus) and window
lengths bounded by the model's maximum."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .output import UserError

log = logging.getLogger(__name__)

# --data / --calib name of the built-in offline corpus (spp_kernels.datasets).
WIKIPEDIA = "wikipedia"


def wikipedia(option: str, tokenizer: Any, split: str, seqlen: int | None = None,
              max_tokens: int | None = None) -> Any:  # fmt: skip
    """`split` of the offline Wikipedia corpus for `option`: (windows, seqlen) token ids
    when seqlen is given, else the first max_tokens ids of its stream; UserErrors when the
    model has no tokenizer or the corpus is not installed."""
    from ..datasets import DatasetUnavailable, wikipedia_tokens, wikipedia_windows

    if Path(WIKIPEDIA).exists():
        log.warning(
            "%s %s: using the built-in Wikipedia corpus, not the file %r in the current "
            "directory (pass %s ./%s to use that file)",
            option, WIKIPEDIA, WIKIPEDIA, option, WIKIPEDIA,
        )  # fmt: skip
    if tokenizer is None:
        raise UserError(f"{option} {WIKIPEDIA} needs a model with a tokenizer")
    try:
        if seqlen is not None:
            return wikipedia_windows(tokenizer, split, seqlen)
        return wikipedia_tokens(tokenizer, split, max_tokens=max_tokens)
    except DatasetUnavailable as e:
        raise UserError(str(e)) from None


DEFAULT_SEQLEN = 2048


def window_length(
    model: Any, requested: int | None, default: int = DEFAULT_SEQLEN, option: str = "--seqlen"
) -> int:
    """The sequence length of prune/eval (--seqlen) and train (--max-len), one rule: the
    requested value, refused when longer than the model's maximum (naming it); None gives
    min(default, that maximum)."""
    from ..utils.hf import max_positions

    limit = max_positions(model)
    if requested is None:
        return default if limit is None else min(default, limit)
    if limit is not None and requested > limit:
        raise UserError(f"{option} {requested} exceeds the model's maximum of {limit} positions")
    return requested
