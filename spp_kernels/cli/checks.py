"""Checks a command runs on a model before it writes anything: rows kept, finite weights, a
finite probe batch."""

from __future__ import annotations

from typing import Any

from .models import target_linears
from .output import UserError


def check_rows_kept(model: Any, what: str) -> None:
    """UserError naming the first targeted layer with an output row of only zeros (a row
    the adapter cannot train: SPP only rescales existing weights)."""
    for name, module in target_linears(model).items():
        empty = int((module.weight.detach() != 0).sum(1).eq(0).sum())
        if empty:
            raise UserError(
                f"{what}: layer {name} has {empty} output row(s) with no weight left; use a "
                "lower sparsity; nothing was written"
            )


def check_float_weights(model: Any, what: str, path: Any) -> None:
    """UserError when the model's projections hold low-bit N:M codes (a `spp quantize`
    directory): `what` needs the float weights."""
    from ..sparsity.lowbit import stored_value_format

    value_format = stored_value_format(getattr(model, "config", None))
    if value_format is not None:
        raise UserError(
            f"{what}: model {path} holds {value_format} N:M codes (written by spp "
            "quantize); give the float pruned model (or one merged by spp merge)"
        )


def check_finite_model(model: Any, what: str) -> None:
    """UserError naming the first parameter with non-finite values (and the count)."""
    from ..utils.hf import check_finite_parameters

    try:
        check_finite_parameters(model, what, outcome="nothing was written")
    except ValueError as e:
        raise UserError(str(e)) from None


PROBE_TOKENS = 16


def check_probe_output(model: Any, what: str) -> None:
    """UserError when the model's logits on one probe batch (token ids 0..15, seeded) are not
    all finite: merged weights can be finite and still overflow the activations (an absurd
    adapter scale, a diverged run)."""
    import torch

    from ..utils.hf import input_device

    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab <= 0:
        return
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=ids.to(input_device(model))).logits
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise UserError(
            f"{what}: the merged model gives {bad} non-finite logits on a probe batch of "
            f"{PROBE_TOKENS} tokens (the adapter's scale or values are out of range); "
            "nothing was written"
        )
