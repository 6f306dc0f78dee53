"""The merge rule, defined once: W_merged = W + scale * W' = W * (1 + scale * alpha[g] * beta).

Used by SPPLinear.merge / merge_and_unload (through the adapters tier), by the torch
backend (the merged weight is also the p == 0 effective weight of the forward and dX) and
by the tests. Shapes: W (m, n) or a block of its rows, alpha (r, n), beta (m,).
"""

from __future__ import annotations

import torch

from .groups import times_alpha_rows


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for operands of `dtype`: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_factor(
    alpha: torch.Tensor,
    beta_rows: torch.Tensor,
    scale: float,
    m: int,
    row0: int = 0,
    acc: torch.dtype = torch.float32,
) -> torch.Tensor:
    """1 + scale * alpha[g(o), i] * beta[o] for rows o = row0 .. row0 + len(beta_rows) - 1
    of an m-row weight, in `acc`: (rows, n)."""
    coef = beta_rows.to(acc).mul(scale)[:, None]
    return times_alpha_rows(coef, alpha.to(acc), m, row0).add_(1.0)


def merged_weight(
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    row0: int = 0,
    m: int | None = None,
) -> torch.Tensor:
    """W * (1 + scale * alpha[g(o)] * beta[o]) in the accumulation dtype, every zero of W kept
    bitwise (including -0.0) even if the factor is not finite.

    weight: W (m, n), or the rows [row0, row0 + len(weight)) of an m-row W; beta: (m,).
    """
    return merged_weight_many(weight, [(alpha, beta, scale)], row0, m)


def merged_weight_many(
    weight: torch.Tensor,
    adapters: list[tuple[torch.Tensor, torch.Tensor, float]],
    row0: int = 0,
    m: int | None = None,
) -> torch.Tensor:
    """W * (1 + sum_k scale_k * alpha_k[g_k(o)] * beta_k[o]) for several adapters (alpha_k,
    beta_k, scale_k), each defined on the same frozen W (so merging them together equals the
    sum of their unmerged terms); zeros of W kept bitwise. Accumulation dtype."""
    m = weight.shape[0] if m is None else m
    rows = weight.shape[0]
    acc = acc_dtype(weight.dtype)
    w = weight.to(acc)
    factor = None
    for alpha, beta, scale in adapters:
        term = merge_factor(alpha, beta[row0 : row0 + rows], scale, m, row0, acc)
        factor = term if factor is None else factor.add_(term).sub_(1.0)
    if factor is None:
        return w.clone()
    return torch.where(weight == 0, w, factor.mul_(w))
