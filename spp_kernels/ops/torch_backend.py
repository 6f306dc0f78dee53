"""Pure-PyTorch SPP forward and backward: the CPU path and the fallback.

Same math as the Triton kernels (csrc_triton/), and the same calling convention, on 2-D
inputs X (tokens, n), W (m, n), alpha (r, n), beta (m,). Nothing of size (m, n) is saved
for backward: the effective weight and G = dY^T D(X) are rebuilt as temporaries.

Forward, no dropout:  Y = X W_eff^T + b,  W_eff = W * (1 + scale * alpha[g] * beta)
Forward, dropout:     Y = X W^T + scale * (D(X) (W * alpha[g])^T) * beta + b
Backward:             dX = dY W + scale * D'((dY * beta) (W * alpha[g]))   (D' = same mask)
                      G  = dY^T D(X)                         (m, n), fp32 accumulation
                      dbeta[o]     = scale * sum_i alpha[g(o), i] W[o, i] G[o, i]
                      dalpha[j, i] = scale * sum_{g(o)=j} beta[o] W[o, i] G[o, i]
"""

from __future__ import annotations

import torch

from .dropout import apply_dropout
from .groups import group_sum, times_alpha_rows


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def effective_weight(
    weight: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, scale: float
) -> torch.Tensor:
    """W * (1 + scale * alpha[g(o)] * beta[o]) in the accumulation dtype, zeros kept bitwise.

    This is the merged weight W + scale * W'; the `where` keeps every zero of W (including
    -0.0) even if the factor is not finite.
    """
    acc = _acc_dtype(weight.dtype)
    factor = times_alpha_rows(beta.to(acc)[:, None] * scale, alpha.to(acc)) + 1.0
    w = weight.to(acc)
    return torch.where(weight == 0, w, w * factor)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: int,
) -> torch.Tensor:
    """Y (tokens, m) in x's dtype."""
    if dropout_p == 0.0:
        y = x @ effective_weight(weight, alpha, beta, scale).to(x.dtype).t()
    else:
        acc = _acc_dtype(x.dtype)
        w_alpha = times_alpha_rows(weight.to(acc), alpha.to(acc)).to(x.dtype)
        adapter = (apply_dropout(x, dropout_p, seed) @ w_alpha.t()).to(acc)
        y = ((x @ weight.t()).to(acc) + adapter * (scale * beta.to(acc))).to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    need_dx: bool = True,
    need_dalpha_dbeta: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX in x's dtype, dalpha in alpha's dtype, dbeta in beta's dtype); None where not needed."""
    acc = _acc_dtype(x.dtype)
    dx = dalpha = dbeta = None
    if need_dx:
        if dropout_p == 0.0:
            dx = dy @ effective_weight(weight, alpha, beta, scale).to(dy.dtype)
        else:
            w_alpha = times_alpha_rows(weight.to(acc), alpha.to(acc)).to(dy.dtype)
            dy_beta = (dy.to(acc) * (scale * beta.to(acc))).to(dy.dtype)
            adapter = apply_dropout(dy_beta @ w_alpha, dropout_p, seed)
            dx = ((dy @ weight).to(acc) + adapter.to(acc)).to(x.dtype)
    if need_dalpha_dbeta:
        g = dy.to(acc).t() @ apply_dropout(x, dropout_p, seed).to(acc)  # (m, n)
        p = g.mul_(weight.to(acc)).mul_(scale)
        dbeta = times_alpha_rows(p, alpha.to(acc)).sum(1).to(beta.dtype)
        dalpha = group_sum(p.mul_(beta.to(acc)[:, None]), alpha.shape[0]).to(alpha.dtype)
    return dx, dalpha, dbeta
