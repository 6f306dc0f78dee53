"""The `spp` command: prune, train, merge, eval, export-2to4 and demo.

Logs and progress bars go to stderr; results (a table, or one JSON object with --json) go
to stdout. A user mistake (missing or malformed file, bad option value, an adapter for
another model, a full disk, a garbage file) ends with one line ``spp <command>: error: ...``
and exit status 1; --debug (or SPP_DEBUG=1) shows the traceback instead. Ctrl-C, SIGTERM
or SIGUSR1 during training save a checkpoint and exit with 128 + the signal (130, 143).

Nothing is downloaded: models are read from local Hugging Face directories (config.json
plus weights, optionally a tokenizer) or from a local .gguf file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from ..utils.threads import torch_threads
from .output import UserError, first_line
from .parser import build_parser

__all__ = ["main"]


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


# How gloo / NCCL report a collective whose peer process has already exited.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "Connection refused", "DistNetworkError")  # fmt: skip


def peer_failure(e: BaseException) -> str | None:
    """For a process of a multi-process run (torchrun / accelerate set RANK and WORLD_SIZE)
    whose error is a collective losing a peer: one line saying that another process failed
    first (its own error is the cause), instead of the transport's misleading message."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    text = f"{type(e).__name__}: {e}"
    if world <= 1 or not any(words in text for words in PEER_GONE):
        return None
    rank = os.environ.get("RANK", "?")
    return (
        f"process {rank} of {world} stopped because another process ended first (that "
        "process's error is the cause)"
    )


def describe_error(e: BaseException) -> str:
    """One line naming the file and the cause of an error that reached the command boundary."""
    import errno

    if isinstance(e, OSError) and e.errno is not None:
        where = f"{e.filename}: " if e.filename else ""
        name = errno.errorcode.get(e.errno, "")
        cause = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
                 errno.EFBIG: "file too large"}.get(e.errno, e.strerror or str(e))  # fmt: skip
        return f"{where}{cause} ({name})" if name else f"{where}{cause}"
    if isinstance(e, (UserError, ValueError, FileNotFoundError, TypeError)):
        return first_line(e)
    return f"{type(e).__name__}: {first_line(e)}"


def _quiet_deepspeed_on_cpu() -> bool:
    """DeepSpeed, when installed, is imported by accelerate and warns on stdout that it fell
    back to the CPU on every command of a GPU-less machine (even with --quiet); naming the
    accelerator it would pick anyway silences it. Nothing changes where a GPU is present."""
    if "DS_ACCELERATOR" in os.environ:
        return False
    import torch

    if torch.cuda.is_available():
        return False
    os.environ["DS_ACCELERATOR"] = "cpu"
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `spp` and `python -m spp_kernels`; returns the exit status.

    A user mistake or a failure (a garbage file, a full disk, ...) ends with one line
    `spp <command>: error: ...` and status 1; --debug (or SPP_DEBUG=1) shows the traceback.
    A signal that stopped training gives 128 + its number (130 Ctrl-C, 143 SIGTERM).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False) or os.environ.get("SPP_DEBUG"))
    saved_logging = _setup_logging(args.quiet)
    set_accelerator = _quiet_deepspeed_on_cpu()
    # main() can be called in-process: leave the caller's logging and threads as they were.
    # stdout carries the command's result only (a table, or JSON with --json): anything a
    # library prints while the command runs (DeepSpeed logs to stdout) goes to stderr.
    args.result_stream = sys.stdout
    with torch_threads(args.threads), contextlib.redirect_stdout(sys.stderr):
        try:
            return int(args.func(args))
        except KeyboardInterrupt:
            print(f"spp {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if debug:
                raise
            peer = peer_failure(e)
            if peer is not None:
                print(f"spp {args.command}: {peer}", file=sys.stderr)
                return 1
            print(f"spp {args.command}: error: {describe_error(e)}", file=sys.stderr)
            return 1
        finally:
            _restore_logging(saved_logging)
            if set_accelerator:
                os.environ.pop("DS_ACCELERATOR", None)
