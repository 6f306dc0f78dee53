"""Wanda (Sun et al., 2023): prune by |W| times the input's per-channel L2 norm.

    score[o, i] = |W[o, i]| * ||X[:, i]||_2        X: (tokens, n) calibration inputs

compared within each output row (unstructured) or each N:M group. Only the ranking
matters, so the norm is accumulated as a plain float32 sum of squares over all tokens
(Wanda's running mean differs from it by a constant factor per layer).
"""

from __future__ import annotations

import torch

from .masks import Sparsity, keep_mask


class InputNorms:
    """Accumulates sum_t X[t, i]^2 over calibration tokens for a layer with n inputs."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.sq_norms = torch.zeros(n, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (..., n) inputs of the layer."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.sq_norms += x.square().sum(0)
        self.tokens += x.shape[0]


def wanda_scores(weight: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """|W| * sqrt(sq_norms) in float32: weight (m, n), sq_norms (n,) -> (m, n)."""
    return weight.detach().float().abs() * sq_norms.float().sqrt().unsqueeze(0)


def wanda_prune_weight(
    weight: torch.Tensor, sq_norms: torch.Tensor, sparsity: Sparsity
) -> torch.Tensor:
    """The pruned copy of weight (m, n), same dtype: W * keep_mask(wanda_scores)."""
    keep = keep_mask(wanda_scores(weight, sq_norms), sparsity)
    return weight.detach().masked_fill(~keep, 0)
