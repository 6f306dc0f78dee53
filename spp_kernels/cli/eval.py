"""`spp eval`: perplexity on a data file and lm-eval zero-shot tasks."""

from __future__ import annotations

import argparse
import time
from typing import Any

from .inputs import WIKIPEDIA, wikipedia, window_length
from .models import load_adapter, load_model, resolve_device, sparsity_of, zero_masks
from .output import UserError, emit, first_line, format_table


def _data_name(args: argparse.Namespace) -> str:
    return "Wikipedia held-out split" if args.data == WIKIPEDIA else str(args.data)


def _eval_tokens(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The token stream of --data: a file, or the held-out Wikipedia split."""
    from ..training.data import load_token_stream

    if args.data != WIKIPEDIA:
        if args.max_tokens is not None:
            raise UserError("--max-tokens goes with --data wikipedia; cut the file instead")
        return load_token_stream(args.data, tokenizer)
    return wikipedia("--data", tokenizer, "heldout", max_tokens=args.max_tokens)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluate import perplexity
    from ..training.data import check_vocab

    if args.data is None and not args.tasks:
        raise UserError("give --data FILE (perplexity) and/or --tasks (zero-shot)")
    model, tokenizer = load_model(args.model, device=resolve_device(args.device))
    sparsity = sparsity_of(zero_masks(model))
    if args.adapter is not None:
        model = load_adapter(model, args.adapter, allow_other_base=args.allow_other_base)
    info: dict[str, Any] = {"model": str(args.model), "sparsity": sparsity}
    rows: list[list[Any]] = [["sparsity (targeted layers)", f"{sparsity:.4f}"]]
    if args.data is not None:
        seqlen = window_length(model, args.seqlen)
        tokens = _eval_tokens(args, tokenizer)
        check_vocab(tokens, model.config.vocab_size, str(args.data))
        seqlen = min(seqlen, tokens.numel())
        t0 = time.perf_counter()
        ppl = float(
            perplexity(
                model, tokens, seqlen=seqlen, batch_size=args.batch_size, progress=not args.quiet
            )
        )
        info.update(
            perplexity=ppl, tokens=int(tokens.numel()), seqlen=seqlen, data=_data_name(args)
        )
        info["seconds"] = time.perf_counter() - t0
        rows += [["perplexity", ppl], ["data", info["data"]], ["tokens", int(tokens.numel())],
                 ["seqlen", seqlen]]  # fmt: skip
    if args.tasks:
        from ..evaluate import zero_shot

        if tokenizer is None:
            raise UserError(f"--tasks needs a tokenizer, but {args.model} has none")
        tasks = [t for t in args.tasks.split(",") if t]
        try:
            scores = zero_shot(model, tokenizer, tasks, limit=args.limit)
        except (ImportError, RuntimeError) as e:  # no eval extra; task data missing offline
            raise UserError(first_line(e)) from None
        info["zero_shot"] = scores
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append([f"{task} {metric}", float(value)])
    emit(args, info, format_table(rows, ["eval", "value"]))
    return 0
