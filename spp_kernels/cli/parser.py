"""The `spp` argument parser: one sub-command per pipeline step."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable

from .embedded import EMBEDDED

METHODS = ("wanda", "sparsegpt", "magnitude")


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The command function `name` of `spp_kernels.cli.<module>`, imported when it runs,
    so that `spp --help` and argument errors do not pay for importing torch."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)(args)

    return run


def _int_at_least(minimum: int, words: str):
    """An argparse type: an integer >= `minimum`; `words` names the expectation in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _common(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.add_argument(
        "--seed", type=int, default=0, help="seed for data order, init, dropout (default 0)"
    )
    if device:
        p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:i]")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice; the demo uses 2)",
    )


NM_HELP = (
    "fraction (0.5) or N:M (2:4, 4:8, 2:8) where N is how many of every M consecutive "
    "weights are KEPT (2:8 = 75%% sparse, as in the SPP paper; upstream Wanda's --prune_n "
    "counts the pruned ones)"
)


def _dataclass_options(p: argparse.ArgumentParser, cls: type, names: tuple[str, ...]) -> None:
    """One option per field of `cls` in `names`: `--field-name` (or the field's "flags"),
    dest = the field name, default and help from the field (one default per setting)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        meta, flags = f.metadata, f.metadata.get("flags", ("--" + name.replace("_", "-"),))
        shown = (
            "" if f.default is None or isinstance(f.default, bool)
            else f" ({f.default:g})" if isinstance(f.default, float) else f" ({f.default})"
        )  # fmt: skip
        text = meta["help"].rstrip(".").replace("%", "%%") + shown
        if isinstance(f.default, bool):
            p.add_argument(*flags, dest=name, action="store_true", help=text)
            continue
        kind = str(f.type)
        parse = (
            _int_at_least(meta["minimum"], _BOUND_WORDS[meta["minimum"]]) if "minimum" in meta
            else float if "float" in kind else int if "int" in kind else str
        )  # fmt: skip
        p.add_argument(*flags, dest=name, type=parse, default=f.default,
                       choices=meta.get("choices"), help=text)  # fmt: skip


_BOUND_WORDS = {0: "an integer >= 0", 1: "a positive integer"}
# Adapter options of `spp train` (SPPConfig's fields, defaults shared through AdapterOptions).
ADAPTER_OPTIONS = (
    "r", "scale", "dropout", "init", "backend", "weight_format", "weight_dtype", "weight_group_size",
)  # fmt: skip
TRAIN_OPTIONS = (
    "lr", "epochs", "batch_size", "grad_accum", "max_steps", "warmup_ratio", "weight_decay",
    "kd_weight", "kd_temperature", "save_every", "keep_checkpoints", "skip_nonfinite",
    "stop_after", "group_by_length", "logging_steps", "report_to",
)  # fmt: skip


def _adapter_options(p: argparse.ArgumentParser) -> None:
    from ..utils.hyperparameters import AdapterOptions

    _dataclass_options(p, AdapterOptions, ADAPTER_OPTIONS)


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train SPP adapters on a pruned model (one process, or torchrun / accelerate launch)",
        description="Train SPP adapters with transformers' Trainer. Several processes: "
        "torchrun --nproc_per_node N -m spp_kernels train ... (or accelerate launch -m "
        "spp_kernels train ..., with an accelerate config file choosing DDP, FSDP2 or "
        "DeepSpeed): data-parallel by default, FSDP2 with --fsdp, DeepSpeed with --deepspeed "
        "CONFIG.json; --batch-size is per process. Checkpoints are Trainer's (--out/checkpoint-N, "
        "openable by peft).",
    )
    p.add_argument("--model", required=True, help="pruned HF model directory")
    p.add_argument(
        "--data", required=True, help="Alpaca JSON/JSONL, text, input_ids JSONL, or wikipedia"
    )
    p.add_argument("--out", required=True, help="adapter + checkpoint directory")
    _adapter_options(p)
    from ..training.config import TrainConfig

    _dataclass_options(p, TrainConfig, TRAIN_OPTIONS)
    p.add_argument("--max-len", type=_positive_int, default=None,
                   help="max tokens per example (512, or the model's maximum if shorter; a "
                   "longer explicit value is refused)")  # fmt: skip
    p.add_argument("--mask-prompt", action="store_true", help="no loss on Alpaca prompts")
    p.add_argument(
        "--teacher", help="dense model to distil from (KL on logits; replicated per process)"
    )
    p.add_argument("--bf16", action="store_true", help="bf16 frozen weights, fp32 adapters")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (several processes)")
    p.add_argument("--deepspeed", metavar="CONFIG.json",
                   help="DeepSpeed config file (ZeRO-2/3, offload), as Trainer's --deepspeed")  # fmt: skip
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory)")  # fmt: skip
    low_bit = p.add_mutually_exclusive_group()
    low_bit.add_argument("--load-in-4bit", action="store_true",
                         help="frozen base in 4 bits with bitsandbytes (QLoRA's NF4 with "
                         "double quantization; --quant-type fp4 for FP4)")  # fmt: skip
    low_bit.add_argument("--load-in-8bit", action="store_true",
                         help="frozen base in 8 bits with bitsandbytes (LLM.int8())")  # fmt: skip
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default=None,
                   help="4-bit data type with --load-in-4bit (default nf4)")  # fmt: skip
    p.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in --out"
    )
    p.add_argument("--force", action="store_true", help="start over in a non-empty --out")
    _common(p)
    p.set_defaults(func=_command("train", "cmd_train"))


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    parser = argparse.ArgumentParser(
        prog="spp",
        description="SPP: fine-tune pruned LLMs without losing their sparsity.",
        epilog="Run `spp demo` for the whole pipeline on the embedded SmolLM2-135M model.",
    )
    parser.add_argument("--version", action="version", version=f"spp-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prune", help="prune a model (Wanda, SparseGPT or magnitude)")
    p.add_argument("--model", required=True, help=f"HF model directory, .gguf file or {EMBEDDED}")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--sparsity", required=True, help=NM_HELP)
    p.add_argument("--calib", help="calibration data: text, Alpaca JSON/JSONL, input_ids JSONL, "
                   "or wikipedia (the offline Wikipedia calibration split)")  # fmt: skip
    p.add_argument("--nsamples", type=_positive_int, default=128, help="calibration samples (128)")
    p.add_argument(
        "--seqlen",
        type=_positive_int,
        default=None,
        help="calibration sample length (default: 2048, or the model's maximum if shorter; "
        "a longer explicit value is refused)",
    )
    p.add_argument("--sparsegpt-mask", choices=("block", "row"), default="block",
                   help="SparseGPT unstructured masks per 128-column block across rows (the "
                   "paper's Algorithm 1) or per row (block)")  # fmt: skip
    p.add_argument("--refine", choices=("dsnot",), default=None,
                   help="refine the Wanda mask without training: DSnoT (Zhang et al., 2023) "
                   "on the attention projections, as the authors' default")  # fmt: skip
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _common(p)
    p.set_defaults(func=_command("prune", "cmd_prune"))

    _train_parser(sub)

    p = sub.add_parser("merge", help="merge adapters into the weights (sparsity kept)")
    p.add_argument("--model", required=True, help="pruned HF model directory")
    p.add_argument("--adapter", required=True, help="adapter directory from `spp train`")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--allow-other-base", action="store_true",
                   help="load an adapter whose base fingerprint differs from --model")  # fmt: skip
    _common(p)
    p.set_defaults(func=_command("merge", "cmd_merge"))

    p = sub.add_parser("eval", help="perplexity (and lm-eval zero-shot with --tasks)")
    p.add_argument("--model", required=True, help=f"HF model directory, .gguf file or {EMBEDDED}")
    p.add_argument("--adapter", help="adapter directory to apply first")
    p.add_argument("--allow-other-base", action="store_true",
                   help="load an adapter whose base fingerprint differs from --model")  # fmt: skip
    p.add_argument("--data", help="text, Alpaca JSON/JSONL, input_ids JSONL, or wikipedia "
                   "(the held-out Wikipedia articles)")  # fmt: skip
    p.add_argument("--seqlen", type=_positive_int, default=None,
                   help="window length (default: 2048, or the model's maximum if shorter; "
                   "a longer explicit value is refused)")  # fmt: skip
    p.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="with --data wikipedia: the first N held-out tokens (default: all)")  # fmt: skip
    p.add_argument("--batch-size", type=_positive_int, default=1, help="windows per forward (1)")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (needs the eval extra); "
                   "wiki_title_mc is the offline task shipped with spp-kernels")  # fmt: skip
    p.add_argument("--limit", type=_positive_int, default=None, help="lm-eval examples per task")
    _common(p)
    p.set_defaults(func=_command("eval", "cmd_eval"))

    p = sub.add_parser("export-2to4", help="write a compressed 2:4 checkpoint")
    p.add_argument("--model", required=True, help="2:4-pruned (merged) HF model directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _common(p, device=False)
    p.set_defaults(func=_command("merge", "cmd_export"))

    p = sub.add_parser("quantize", help="store a pruned model's N:M values as low-bit codes",
                       description="Round-to-nearest int8 / fp8 / int4 codes for the kept "
                       "values of every N:M projection (spp_kernels.sparsity.lowbit); the "
                       "directory opens with from_pretrained, `spp train` trains SPP adapters "
                       "on it and `spp merge` merges into its decoded weights.")  # fmt: skip
    p.add_argument("--model", required=True, help="N:M-pruned HF model directory")
    p.add_argument("--out", required=True, help="output model directory")
    from ..utils.hyperparameters import AdapterOptions, default

    dtypes = next(f for f in dataclasses.fields(AdapterOptions) if f.name == "weight_dtype")
    p.add_argument("--weight-dtype", required=True, choices=dtypes.metadata["choices"],
                   help="int8 / fp8: one scale per row; int4: one per --weight-group-size")  # fmt: skip

    p.add_argument("--weight-group-size", type=_positive_int,
                   default=default(AdapterOptions, "weight_group_size"),
                   help="kept values per int4 scale (must divide every packed row) (128)")  # fmt: skip
    p.add_argument("--bf16", action="store_true",
                   help="quantize from the bfloat16 weights (default: float32)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    _common(p, device=False)
    p.set_defaults(func=_command("quantize", "cmd_quantize"))

    p = sub.add_parser("demo", help="the whole pipeline on the embedded SmolLM2-135M")
    p.add_argument("--quick", action="store_true", help="smaller run (< 2 minutes on 2 cores)")
    p.add_argument("--train-seconds", type=float, default=None,
                   help="optional SPP training time budget (default: none, fixed steps)")  # fmt: skip
    p.add_argument(
        "--cache-dir", help="keep the tokenized Wikipedia slices here (default: not kept)"
    )
    _common(p)
    p.set_defaults(func=_command("demo", "cmd_demo"))
    return parser
