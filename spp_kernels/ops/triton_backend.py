"""Triton SPP forward and backward: host glue around csrc_triton/, two paths chosen per call.

Same functions, calling convention and math as spp_kernels.ops.torch_backend (the oracle),
on 2-D inputs X (tokens, n) with any strides, W (`Frozen`: dense, or N:M packed whose tiles
the kernels decode in registers), alpha (r, n), beta (m,) and the forward's dropout bits.
Supported: x/weight float32, float16, bfloat16; alpha/beta x's dtype or float32.

Paths (`choose_path`):
  "fused"   few tokens: the one-pass kernels (csrc_triton/spp_forward.py, _spp_dx_kernel)
            rebuild W_eff (or W and W'') tile by tile in registers, reading W once per
            token tile. Best while W_eff is built about once anyway.
  "chunked" many tokens: an elementwise Triton kernel writes W_eff / W'' in row chunks of
            at most CHUNK_BYTES, cuBLAS (torch.mm) does Y and dX (spp_kernels.ops.chunked):
            the elementwise work is paid once per call instead of once per token tile.
  dalpha and dbeta always come from the fused G = dY^T D(X) contraction, G never stored.
CHUNKED_MIN_TOKENS is the switch-over token count. It is an ESTIMATE (no GPU run yet): the
fused kernels rebuild W_eff about tokens / 64 times, and at 512 tokens that rebuild costs
about as much as writing and re-reading one W_eff chunk; benchmarks/gpu_check.sh measures
both paths ("fused vs chunked" rows) to set it. Environment override:
SPP_CHUNKED_MIN_TOKENS.
"""

from __future__ import annotations

import os

import torch

from csrc_triton.dropout_bits import apply_keep_bits, masked_add_
from csrc_triton.spp_backward import spp_linear_dalpha_dbeta, spp_linear_dx
from csrc_triton.spp_forward import spp_linear_forward
from csrc_triton.weight_chunks import weight_chunk

from . import chunked
from .frozen import Frozen

CHUNKED_MIN_TOKENS = int(os.environ.get("SPP_CHUNKED_MIN_TOKENS", 512))
PATHS = ("auto", "fused", "chunked")


def choose_path(tokens: int, path: str = "auto") -> str:
    """ "fused" or "chunked" for a call with `tokens` rows of X (see the module docstring)."""
    if path not in PATHS:
        raise ValueError(f"triton backend: path must be one of {PATHS}, got {path!r}")
    if path != "auto":
        return path
    return "chunked" if tokens >= CHUNKED_MIN_TOKENS else "fused"


def _packed_kwargs(frozen: Frozen) -> dict:
    return {"meta": frozen.meta, "nm": frozen.nm}


def _builder(frozen: Frozen, alpha: torch.Tensor, beta: torch.Tensor):
    def build(row0: int, rows: int, mode: str, scale: float) -> torch.Tensor:
        if mode == "weight" and frozen.dense is not None:
            return frozen.dense[row0 : row0 + rows]
        return weight_chunk(
            frozen.weight, alpha, beta, scale, row0, rows, mode, **_packed_kwargs(frozen)
        )

    return build


def forward(
    x: torch.Tensor,
    frozen: Frozen,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    bits: torch.Tensor | None,
    path: str = "auto",
) -> torch.Tensor:
    """Y (tokens, m) in x's dtype: X W^T + scale * Dropout(X) W'^T + bias."""
    if choose_path(x.shape[0], path) == "fused":
        return spp_linear_forward(
            x, frozen.weight, alpha, beta, bias, scale, dropout_p, bits, **_packed_kwargs(frozen)
        )
    return chunked.forward(
        x,
        frozen.m,
        alpha.shape[0],
        bias,
        scale,
        dropout_p,
        _builder(frozen, alpha, beta),
        frozen.dense,
        lambda: apply_keep_bits(x, bits),
    )


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    frozen: Frozen,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    dropout_p: float,
    bits: torch.Tensor | None,
    need_dx: bool = True,
    need_dalpha_dbeta: bool = True,
    path: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX in x's dtype, dalpha in alpha's dtype, dbeta in beta's dtype); None where not needed.

    dy (tokens, m) may arrive in another floating dtype (e.g. from a mixed-precision loss);
    it is cast to x's dtype, the dtype the kernels multiply in.
    """
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    dx = dalpha = dbeta = None
    if need_dx:
        if choose_path(x.shape[0], path) == "fused":
            dx = spp_linear_dx(
                dy, frozen.weight, alpha, beta, scale, dropout_p, bits, **_packed_kwargs(frozen)
            )
        else:
            dx = chunked.backward_dx(
                dy,
                frozen.m,
                alpha.shape[0],
                frozen.n,
                scale,
                dropout_p,
                _builder(frozen, alpha, beta),
                frozen.dense,
                lambda out, a: masked_add_(out, a, bits),
            )
    if need_dalpha_dbeta:
        dalpha, dbeta = spp_linear_dalpha_dbeta(
            dy, x, frozen.weight, alpha, beta, scale, dropout_p, bits, **_packed_kwargs(frozen)
        )
        dbeta = dbeta.to(beta.dtype)
    return dx, dalpha, dbeta
