"""`spp train`: SPP adapters on a pruned model, with checkpoints that resume bit-exactly."""

from __future__ import annotations

import argparse
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .models import load_model, prepare_out_dir, resolve_device
from .output import UserError, emit, first_line, format_table

log = logging.getLogger("spp_kernels.cli")


def _config(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """factory(**kwargs), with its ValueError (a bad option value) as a UserError."""
    try:
        return factory(**kwargs)
    except ValueError as e:
        raise UserError(first_line(e)) from None


def _spp_config_from_args(args: argparse.Namespace) -> Any:
    from ..adapters import SPPConfig

    return _config(
        SPPConfig,
        r=args.r,
        scale=args.scale,
        dropout=args.dropout,
        init=args.init,
        backend=args.backend,
        adapter_dtype="float32" if args.bf16 else None,
        weight_format=args.weight_format,
    )


def _train_config_from_args(args: argparse.Namespace) -> Any:
    from ..training.train import TrainConfig

    return _config(
        TrainConfig,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        max_steps=args.max_steps,
        seed=args.seed,
        kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature,
        save_every=args.save_every,
        stop_after=args.stop_after,
    )


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ..adapters import get_spp_model
    from ..training.data import check_vocab, file_digest, load_dataset
    from ..training.train import latest_checkpoint, train

    out = Path(args.out)
    if args.resume:
        if latest_checkpoint(out) is None:
            raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    else:
        prepare_out_dir(out, args.force)
    spp_config = _spp_config_from_args(args)
    if not args.resume and args.force:
        from ..training.train import checkpoint_root

        # A fresh run must never resume from (or be confused with) an older run's state.
        shutil.rmtree(checkpoint_root(out), ignore_errors=True)
    config = _train_config_from_args(args)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model, tokenizer = load_model(args.model, dtype=dtype, device=device)
    examples = load_dataset(
        args.data, tokenizer, max_len=args.max_len, mask_prompt=args.mask_prompt
    )
    check_vocab(examples, model.config.vocab_size, str(args.data))
    teacher = None
    if args.teacher is not None:
        teacher, _ = load_model(args.teacher, dtype=dtype, device=device)
        if teacher.config.vocab_size != model.config.vocab_size:
            raise UserError(
                f"--teacher {args.teacher}: vocabulary {teacher.config.vocab_size} differs from "
                f"the model's {model.config.vocab_size}"
            )
    torch.manual_seed(args.seed)
    spp = get_spp_model(model, spp_config)
    count = spp.trainable_parameters()
    log.info(
        "SPP adapters: %s trainable of %s parameters (%.3f%%)",
        f"{count.trainable:,d}",
        f"{count.total:,d}",
        count.percent,
    )
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = {
        "data_sha256": file_digest(args.data),
        "max_len": args.max_len,
        "mask_prompt": args.mask_prompt,
        "spp_config": spp_config.to_dict(),
        "teacher": args.teacher is not None,
    }
    pad_id = _pad_id(tokenizer)
    try:
        result = train(
            spp,
            examples,
            config,
            out,
            teacher=teacher,
            resume=args.resume,
            pad_id=pad_id,
            fingerprint=fingerprint,
            progress=not args.quiet,
        )
    except ValueError as e:
        if str(e).startswith("resume:"):
            raise UserError(f"{first_line(e)} (use the original options)") from None
        raise
    spp.save_pretrained(out)
    info = {
        "steps": result.step,
        "total_steps": result.total_steps,
        "final_loss": result.final_loss,
        "tokens": result.tokens,
        "seconds": result.seconds,
        "interrupted": result.interrupted,
        "trainable_params": count.trainable,
        "examples": len(examples),
        "adapter": str(out),
    }
    rows = [
        ["steps", f"{result.step} / {result.total_steps}"],
        ["final loss", result.final_loss],
        ["tokens", result.tokens],
        ["seconds (this run)", f"{result.seconds:.1f}"],
        ["trainable params", count.trainable],
        ["adapter saved to", str(out)],
    ]
    if result.interrupted:
        rows.append(["stopped early", "resume with --resume"])
    emit(args, info, format_table(rows, ["train", "value"]))
    return 130 if result.interrupted else 0


def _pad_id(tokenizer: Any) -> int:
    if tokenizer is None:
        return 0
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0
