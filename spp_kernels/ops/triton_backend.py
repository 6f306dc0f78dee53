"""Triton SPP forward and backward: host glue around the fused kernels of csrc_triton/.

Same functions, calling convention and math as spp_kernels.torch_backend (the oracle), on
2-D inputs X (tokens, n) with any strides, W (m, n), alpha (r, n), beta (m,). This module
only allocates outputs and applies dtype rules; the kernels check shapes, strides and
devices. Supported: x/weight float32, float16, bfloat16; alpha/beta x's dtype or float32.
With `meta` and `nm` = (N, M) the weight argument is an N:M packed weight's values
(spp_kernels.nm's format) and the kernels decode its tiles in registers.
"""

from __future__ import annotations

import torch

# Submodule imports: they work whether or not the editable install registered csrc_triton
# as a regular package or a namespace package.
from csrc_triton.spp_backward import spp_linear_dalpha_dbeta, spp_linear_dx
from csrc_triton.spp_forward import spp_linear_forward


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: int,
    *,
    meta: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Y (tokens, m) in x's dtype: X W^T + scale * Dropout(X) W'^T + bias, fused."""
    return spp_linear_forward(
        x, weight, alpha, beta, bias, scale, dropout_p, seed, meta=meta, nm=nm
    )


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
    *,
    meta: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX in x's dtype, dalpha in alpha's dtype, dbeta in beta's dtype); None where not needed.

    dy (tokens, m) may arrive in another floating dtype (e.g. from a mixed-precision loss);
    it is cast to x's dtype, the dtype the kernels multiply in.
    """
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    dx = dalpha = dbeta = None
    if need_dx:
        dx = spp_linear_dx(dy, weight, alpha, beta, scale, dropout_p, seed, meta=meta, nm=nm)
    if need_dalpha_dbeta:
        dalpha, dbeta = spp_linear_dalpha_dbeta(
            dy, x, weight, alpha, beta, scale, dropout_p, seed, meta=meta, nm=nm
        )
        dbeta = dbeta.to(beta.dtype)
    return dx, dalpha, dbeta
