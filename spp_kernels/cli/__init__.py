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

import logging
import os
import sys
from collections.abc import Sequence

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `spp` and `python -m spp_kernels`; returns the exit status."""
    from ..training.data import DataError

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
        print(f"spp {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"spp {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        # main() can be called in-process: leave the caller's logging and threads as they were.
        _restore_logging(saved_logging)
        torch.set_num_threads(saved_threads)
