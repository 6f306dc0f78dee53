"""Magnitude pruning: keep the largest |W| of each row (or of each N:M group)."""

from __future__ import annotations

import torch

from .masks import Sparsity, keep_mask


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32, (m, n)."""
    return weight.detach().float().abs()


def magnitude_prune_weight(weight: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """The pruned copy of weight (m, n), same dtype: W * keep_mask(|W|)."""
    keep = keep_mask(magnitude_scores(weight), sparsity)
    return weight.detach().masked_fill(~keep, 0)
