"""`spp prune`: magnitude, Wanda or SparseGPT on a local model, saved atomically to --out."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from .models import (
    load_model,
    prepare_out_dir,
    resolve_device,
    save_model_atomically,
    sparsity_of,
    zero_masks,
)
from .output import UserError, emit, first_line, format_table

log = logging.getLogger("spp_kernels.cli")


def cmd_prune(args: argparse.Namespace) -> int:
    from ..pruning import parse_sparsity, prune
    from ..training.data import load_token_stream

    sparsity = _parse_sparsity(parse_sparsity, args.sparsity)
    out = prepare_out_dir(args.out, args.force)
    device = resolve_device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    calibration = None
    if args.method != "magnitude":
        if args.calib is None:
            calibration = builtin_calibration(tokenizer, args.model)
            log.warning(
                "no --calib given: calibrating on the built-in demo prompts (%d tokens); "
                "pass --calib FILE with representative text for best results",
                calibration.numel(),
            )
        else:
            calibration = load_token_stream(args.calib, tokenizer)
        nsamples, seqlen = calibration_shape(calibration.numel(), args.nsamples, args.seqlen)
        calibration = calibration[: nsamples * seqlen].reshape(nsamples, seqlen)
    else:
        nsamples, seqlen = 0, 0
    t0 = time.perf_counter()
    prune(
        model,
        args.method,
        sparsity,
        calibration=calibration,
        nsamples=max(1, nsamples),
        seqlen=seqlen or None,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - t0
    masks = zero_masks(model)
    info = {
        "method": args.method,
        "sparsity_target": str(args.sparsity),
        "sparsity": sparsity_of(masks),
        "calibration_samples": nsamples,
        "calibration_seqlen": seqlen,
        "seconds": seconds,
        "out": str(out),
        "source_model": str(args.model),
    }
    save_model_atomically(model, tokenizer, out, {"spp_prune.json": json.dumps(info, indent=2)})
    rows = [
        ["method", args.method],
        ["target", str(args.sparsity)],
        ["sparsity (targeted layers)", f"{info['sparsity']:.4f}"],
        ["calibration", f"{nsamples} x {seqlen} tokens" if nsamples else "none"],
        ["seconds", f"{seconds:.1f}"],
        ["saved to", str(out)],
    ]
    emit(args, info, format_table(rows, ["prune", "value"]))
    return 0


def _parse_sparsity(parse: Callable[[str], Any], text: str) -> Any:
    try:
        return parse(text)
    except (ValueError, TypeError) as e:
        raise UserError(f"--sparsity {text!r}: {first_line(e)}") from None


def calibration_shape(tokens: int, nsamples: int, seqlen: int) -> tuple[int, int]:
    """(nsamples, seqlen) that fit in `tokens`: fewer samples first, then shorter ones."""
    if tokens < 2:
        raise UserError("calibration data has fewer than 2 tokens")
    seqlen = min(seqlen, tokens)
    available = tokens // seqlen
    if available < nsamples:
        log.warning(
            "calibration data holds %d samples of %d tokens, fewer than --nsamples %d",
            available,
            seqlen,
            nsamples,
        )
    return min(nsamples, available), seqlen


def builtin_calibration(tokenizer: Any, model_path: Any) -> Any:
    """Token ids of the built-in demo prompts in the model's chat format (a fallback)."""
    import torch

    from .demo_prompts import PROMPTS

    if tokenizer is None:
        raise UserError(f"model {model_path} has no tokenizer: pass --calib with 'input_ids' data")
    text = "\n\n".join(PROMPTS)
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
