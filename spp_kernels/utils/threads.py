"""torch's CPU thread count for the length of a block, given back afterwards."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Inside the block torch uses `count` CPU threads (None: leave it as it is, so that the
    block may set it); on exit, however the block ends, the caller's count is restored."""
    import torch

    saved = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
