"""One rule for deriving the seed of a sub-stream (an epoch, a micro-batch on one process)
from a run's seed, so that every such stream depends only on its position."""

from __future__ import annotations

# A prime larger than any epoch or batch count: (seed, index) pairs never collide in practice.
SEED_STRIDE = 1_000_003


def derive_seed(seed: int, index: int) -> int:
    """The seed of sub-stream `index` of a run seeded with `seed`: seed * 1_000_003 + index."""
    return int(seed) * SEED_STRIDE + int(index)
