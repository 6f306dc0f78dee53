"""Triton SPP forward and backward: host glue around csrc_triton/, two paths chosen per call.

Same functions, calling convention and math as spp_kernels.ops.torch_backend (the oracle),
on 2-D inputs X (tokens, n) with any strides, the frozen-weight operand W (dense, or N:M
packed: the kernels decode its tiles in registers), alpha (r, n), beta (m,) and the
forward's dropout bits. Supported: x/weight float32, float16, bfloat16; alpha/beta x's
dtype or float32. The operands were checked where the op was called: each function
prepares its launch arguments once, unchecked (`_launch`), and shares them between the
kernels it launches.

Paths (`choose_path`):
  "fused"   few tokens: the one-pass kernels (csrc_triton/spp_forward.py, _spp_dx_kernel)
            rebuild W_eff (or W and W'') tile by tile in registers, reading W once per
            token tile. Best while W_eff is built about once anyway.
  "chunked" many tokens, or the adapter term alone (with_base=False): an elementwise
            Triton kernel writes W_eff / W'' in row chunks of at most CHUNK_BYTES, cuBLAS
            (torch.mm) does Y and dX (spp_kernels.ops.chunked): the elementwise work is paid
            once per call instead of once per token tile.
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

from csrc_triton._launch import Launch, prepare
from csrc_triton.dropout_bits import apply_keep_bits, masked_add_
from csrc_triton.spp_backward import spp_linear_dalpha_dbeta, spp_linear_dx
from csrc_triton.spp_forward import spp_linear_forward
from csrc_triton.weight_chunks import weight_chunk

from . import chunked
from .operand import FrozenWeight, dense_or_none

CHUNKED_MIN_TOKENS = int(os.environ.get("SPP_CHUNKED_MIN_TOKENS", 512))
PATHS = ("auto", "fused", "chunked")


def choose_path(tokens: int, path: str = "auto", with_base: bool = True) -> str:
    """ "fused" or "chunked" for a call with `tokens` rows of X (see the module docstring)."""
    if path not in PATHS:
        raise ValueError(f"triton backend: path must be one of {PATHS}, got {path!r}")
    if not with_base:
        return "chunked"
    if path != "auto":
        return path
    return "chunked" if tokens >= CHUNKED_MIN_TOKENS else "fused"


def _builder(
    weight: FrozenWeight, alpha: torch.Tensor, beta: torch.Tensor, launch: Launch | None = None
):
    dense = dense_or_none(weight)
    launch = launch or prepare(weight, alpha, beta, check=False)

    def build(row0: int, rows: int, mode: str, scale: float) -> torch.Tensor:
        if mode == "weight" and dense is not None:
            return dense[row0 : row0 + rows]
        return weight_chunk(weight, alpha, beta, scale, row0, rows, mode, launch=launch)

    return build


def forward(
    x: torch.Tensor,
    weight: FrozenWeight,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    bits: torch.Tensor | None,
    *,
    with_base: bool = True,
    path: str = "auto",
) -> torch.Tensor:
    """Y (tokens, m) in x's dtype: X W^T + scale * Dropout(X) W'^T + bias."""
    launch = prepare(
        weight, alpha, beta, x=x, bias=bias, keep=bits, dropout_p=dropout_p, check=False
    )
    if choose_path(x.shape[0], path, with_base) == "fused":
        return spp_linear_forward(
            x, weight, alpha, beta, bias, scale, dropout_p, bits, launch=launch
        )
    return chunked.forward(
        x, launch.m, launch.r, bias, scale, dropout_p, _builder(weight, alpha, beta, launch),
        dense_or_none(weight), lambda: apply_keep_bits(x, bits), with_base,
    )  # fmt: skip


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: FrozenWeight,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    dropout_p: float,
    bits: torch.Tensor | None,
    need_dx: bool = True,
    need_dalpha_dbeta: bool = True,
    *,
    with_base: bool = True,
    path: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX in x's dtype, dalpha in alpha's dtype, dbeta in beta's dtype); None where not needed.

    dy (tokens, m) may arrive in another floating dtype (e.g. from a mixed-precision loss);
    it is cast to x's dtype, the dtype the kernels multiply in.
    """
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    launch = prepare(weight, alpha, beta, x=x, dy=dy, keep=bits, dropout_p=dropout_p, check=False)
    dx = dalpha = dbeta = None
    if need_dx:
        if choose_path(x.shape[0], path, with_base) == "fused":
            dx = spp_linear_dx(dy, weight, alpha, beta, scale, dropout_p, bits, launch=launch)
        else:
            dx = chunked.backward_dx(
                dy, launch.m, launch.r, launch.n, scale, dropout_p,
                _builder(weight, alpha, beta, launch), dense_or_none(weight),
                lambda out, a: masked_add_(out, a, bits), with_base,
            )  # fmt: skip
    if need_dalpha_dbeta:
        dalpha, dbeta = spp_linear_dalpha_dbeta(
            dy, x, weight, alpha, beta, scale, dropout_p, bits, launch=launch
        )
        dbeta = dbeta.to(beta.dtype)
    return dx, dalpha, dbeta
