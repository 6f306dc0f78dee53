"""The `spp` argument parser: one sub-command per pipeline step."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

from .models import EMBEDDED

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


def _adapter_options(p: argparse.ArgumentParser) -> None:
    # --spp-r, not --r: torchrun's parser takes a bare --r as an abbreviation of its --rdzv-*.
    p.add_argument("--spp-r", "--r", dest="r", type=_positive_int, default=16,
                   help="rows r of each alpha (r, n) (16); --r is an alias that torchrun refuses")  # fmt: skip
    p.add_argument("--scale", type=float, default=2.0, help="adapter scale (2)")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter input dropout (0.05)")
    p.add_argument("--init", default="paper", help="adapter init: paper, both_random, alpha_zero")
    p.add_argument("--backend", default="auto", help="SPP kernels: auto, triton or torch")
    p.add_argument(
        "--weight-format",
        choices=("dense", "nm", "auto"),
        default="dense",
        help="frozen weights: dense, nm (packed N:M values + metadata), or auto (pack where "
        "a layer is N:M sparse and packing saves bytes) (dense)",
    )


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train SPP adapters on a pruned model (one process, or torchrun / accelerate launch)",
        description="Train SPP adapters. Several processes: torchrun --nproc_per_node N -m "
        "spp_kernels train ... (or accelerate launch -m spp_kernels train ...): data-parallel "
        "by default, FSDP2 with --fsdp; --batch-size is per process.",
    )
    p.add_argument("--model", required=True, help="pruned HF model directory")
    p.add_argument(
        "--data", required=True, help="Alpaca JSON/JSONL, text, input_ids JSONL, or wikipedia"
    )
    p.add_argument("--out", required=True, help="adapter + checkpoint directory")
    _adapter_options(p)
    p.add_argument("--lr", type=float, default=4e-3, help="peak learning rate (4e-3)")
    p.add_argument("--epochs", type=_positive_int, default=3, help="epochs (3)")
    p.add_argument(
        "--batch-size", type=_positive_int, default=4, help="micro-batch size per process (4)"
    )
    p.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per step (1)")
    p.add_argument("--max-len", type=_positive_int, default=None,
                   help="max tokens per example (512, or the model's maximum if shorter; a "
                   "longer explicit value is refused)")  # fmt: skip
    p.add_argument("--max-steps", type=_positive_int, default=None, help="cap on optimizer steps")
    p.add_argument("--warmup-ratio", type=float, default=0.03, help="warm-up fraction (0.03)")
    p.add_argument("--weight-decay", type=float, default=0.001, help="AdamW weight decay (0.001)")
    p.add_argument("--mask-prompt", action="store_true", help="no loss on Alpaca prompts")
    p.add_argument(
        "--group-by-length", action="store_true", help="batch examples of similar length"
    )
    p.add_argument(
        "--teacher", help="dense model to distil from (KL on logits; replicated per process)"
    )
    p.add_argument(
        "--kd-weight", type=float, default=1.0, help="weight of KL vs. CE with --teacher (1)"
    )
    p.add_argument("--kd-temperature", type=float, default=1.0, help="distillation temperature (1)")
    p.add_argument("--bf16", action="store_true", help="bf16 frozen weights, fp32 adapters")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (several processes)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward (less memory)")  # fmt: skip
    p.add_argument(
        "--save-every", type=_positive_int, default=200, help="checkpoint every N steps (200)"
    )
    p.add_argument("--keep-checkpoints", type=_positive_int, default=2,
                   help="checkpoints kept on disk; a corrupt latest one falls back (2)")  # fmt: skip
    p.add_argument("--skip-nonfinite", type=_nonnegative_int, default=0,
                   help="steps with a non-finite loss or gradient to skip before failing (0)")  # fmt: skip
    p.add_argument(
        "--stop-after",
        type=_positive_int,
        default=None,
        help="stop (with a checkpoint, exit 0) at step N of the run (counting resumed steps)",
    )
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
