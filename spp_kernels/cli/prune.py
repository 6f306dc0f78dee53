"""`spp prune`: magnitude, Wanda or SparseGPT on a local model, saved atomically to --out."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from . import checks, inputs, models, outdir
from .output import UserError, emit, first_line, format_table

log = logging.getLogger(__name__)


def cmd_prune(args: argparse.Namespace) -> int:
    from ..pruning import parse_sparsity

    sparsity = _parse_sparsity(parse_sparsity, args.sparsity)
    sources = {
        "--model": args.model,
        "--calib": None if args.calib == inputs.WIKIPEDIA else args.calib,
    }
    with outdir.owned_output(args.out, args.force, sources) as out:
        device = models.resolve_device(args.device)
        model, tokenizer = models.load_model(args.model, device=device)
        checks.check_float_weights(model, "prune", args.model)
        calibration, nsamples, seqlen = _calibration(args, model, tokenizer)
        t0 = time.perf_counter()
        try:
            _prune(args, model, sparsity, calibration, nsamples, seqlen)
        except ValueError as e:  # a sparsity or shape the model cannot take: nothing changed
            raise UserError(first_line(e)) from None
        seconds = time.perf_counter() - t0
        checks.check_rows_kept(model, "prune")
        masks = models.zero_masks(model)
        info = {
            "method": args.method,
            "sparsity_target": str(args.sparsity),
            "sparsity": models.sparsity_of(masks),
            "sparsegpt_mask": args.sparsegpt_mask if args.method == "sparsegpt" else None,
            "refine": args.refine,
            "calibration": _calibration_name(args),
            "calibration_samples": nsamples,
            "calibration_seqlen": seqlen,
            "seconds": seconds,
            "out": str(out),
            "source_model": str(args.model),
        }
        extra = {"spp_prune.json": json.dumps(info, indent=2)}
        outdir.save_model_atomically(model, tokenizer, out, extra)
    rows = [
        ["method", args.method + (f" + {args.refine}" if args.refine else "")],
        ["target", str(args.sparsity)],
        ["sparsity (targeted layers)", f"{info['sparsity']:.4f}"],
        ["calibration", f"{nsamples} x {seqlen} tokens ({info['calibration']})" if nsamples
         else "none"],
        ["seconds", f"{seconds:.1f}"],
        ["saved to", str(out)],
    ]  # fmt: skip
    emit(args, info, format_table(rows, ["prune", "value"]))
    return 0


def _calibration_name(args: argparse.Namespace) -> str | None:
    if args.method == "magnitude":
        return None
    if args.calib == inputs.WIKIPEDIA:
        return "Wikipedia calibration split"
    return str(args.calib) if args.calib else "built-in demo prompts"


def _calibration(args: argparse.Namespace, model: Any, tokenizer: Any) -> tuple[Any, int, int]:
    """(calibration ids (nsamples, seqlen) or None, nsamples, seqlen)."""
    from ..training.data import load_token_stream

    if args.method == "magnitude":
        if args.calib is not None:
            log.warning("--calib is not used by --method magnitude")
        return None, 0, 0
    seqlen = inputs.window_length(model, args.seqlen)
    if args.calib == inputs.WIKIPEDIA:
        stream = inputs.wikipedia("--calib", tokenizer, "calibration",
                                  max_tokens=args.nsamples * seqlen)  # fmt: skip
    elif args.calib is None:
        stream = builtin_calibration(tokenizer, args.model)
        log.warning(
            "no --calib given: calibrating on the built-in demo prompts (%d tokens); "
            "pass --calib wikipedia or a file with representative text for best results",
            stream.numel(),
        )
    else:
        stream = load_token_stream(args.calib, tokenizer)
    nsamples, seqlen = calibration_shape(stream.numel(), args.nsamples, seqlen)
    return stream[: nsamples * seqlen].reshape(nsamples, seqlen), nsamples, seqlen


def _prune(args, model, sparsity, calibration, nsamples, seqlen) -> None:
    from ..pruning import prune

    prune(
        model,
        args.method,
        sparsity,
        calibration=calibration,
        nsamples=max(1, nsamples),
        seqlen=seqlen or None,
        progress=not args.quiet,
        sparsegpt_mask=args.sparsegpt_mask,
        refine=args.refine,
    )


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
    """Token ids of the built-in prompts joined with blank lines (a fallback calibration)."""
    import torch

    from .demo_prompts import PROMPTS

    if tokenizer is None:
        raise UserError(f"model {model_path} has no tokenizer: pass --calib with 'input_ids' data")
    text = "\n\n".join(PROMPTS)
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)
