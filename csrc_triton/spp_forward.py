"""SPP forward: Y in one pass over the frozen weight W.

Math
----
Inputs X (T, n) (any strides), W (m, n), alpha (r, n), beta (m,), bias (m,), scale s,
dropout rate p with keep(t, i) = tl.rand(seed, t * n + i) >= p, g(o) = floor(o * r / m):

    Y[t, o] = sum_i X[t, i] W[o, i]
            + s * beta[o] / (1 - p) * sum_i keep(t, i) X[t, i] W[o, i] alpha[g(o), i]
            + bias[o]

When p == 0 both sums share X and collapse into one product with the merged weight

    Y = X W_eff^T + bias,   W_eff[o, i] = W[o, i] * (1 + s * alpha[g(o), i] * beta[o]).

Tiling
------
Program (pid_t, pid_o) owns the output tile Y[t0:t0+BLOCK_T, o0:o0+BLOCK_M] and walks the
reduction dimension i in steps of BLOCK_K. At each step it loads the X tile and the W tile
once and forms alpha[g(o), i] for the tile's rows in registers (g computed in-kernel; the
at most NUM_GROUPS alpha rows a row tile touches are loaded as vectors and selected per
row, or gathered when r is close to m). Then:

* p == 0: W_eff tile = W * (1 + s*beta*alpha[g]) in float32 registers, rounded to the
  input dtype, one tl.dot:  acc += X_tile @ W_eff_tile^T.
* p > 0:  acc += X_tile @ W_tile^T and acc_ad += (keep * X_tile) @ (W * alpha[g])_tile^T,
  the same W tile feeding both products; the mask is regenerated from (seed, t, i).

The tiles are accumulated transposed, Y^T = W_eff X^T, so the weight tile rebuilt in
registers is the first MMA operand, which Hopper's wgmma reads straight from registers
(its second operand, the X tile, is pipelined through shared memory).
Epilogue: Y = acc (+ s/(1-p) * beta[o] * acc_ad) + bias[o], accumulators in float32, one
store in X's dtype. Programs are launched in grouped order so a W panel is reused from L2.

N:M packed weights (constexpr NM_M > 0): W arrives as values (m, n/M*N) and int32
metadata (spp_kernels.nm's format) and each W tile is decoded in registers by
_tiles.frozen_weight_tile; everything after the tile load is the same code, so packed
and dense weights give the same results, and W's global traffic drops to the packed bytes.

Never written to memory: Repeat(alpha), W', W_eff, W * alpha, X * alpha (for any of the
r blocks), the dropout mask or Dropout(X). The only global writes are Y's elements.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    alpha_groups_heuristic,
    autotune,
    check_dropout,
    check_operands,
    check_out,
    dot_flags,
    frozen_weight_args,
    tokens_bucket,
)
from ._tiles import (
    alpha_rows_tile,
    alpha_scaled_tile,
    effective_tile,
    frozen_weight_tile,
    grouped_tile,
    keep_tile,
    mma,
    row_groups,
)


def _config(bt: int, bm: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_T": bt, "BLOCK_M": bm, "BLOCK_K": bk, "GROUP_T": group},
        num_warps=warps,
        num_stages=stages,
    )


FORWARD_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(256, 128, 64, 8, 3),
    _config(128, 128, 32, 4, 4),
    _config(128, 256, 64, 8, 3),
    _config(64, 128, 64, 4, 4),
    _config(128, 64, 64, 4, 4),
]
# Small tiles under the interpreter: tests then cross many tile and group boundaries.
FORWARD_INTERPRETER_CONFIG = _config(16, 16, 16, 4, 1, group=2)


@autotune(
    FORWARD_CONFIGS,
    FORWARD_INTERPRETER_CONFIG,
    key=["tokens_bucket", "m", "n", "r", "DROPOUT", "NM_N", "NM_M"],
    dot_blocks=("BLOCK_T", "BLOCK_M", "BLOCK_K"),
)
@triton.heuristics({"NUM_GROUPS": alpha_groups_heuristic})
@triton.jit
def _spp_forward_kernel(
    x_ptr,
    w_ptr,
    meta_ptr,
    alpha_ptr,
    beta_ptr,
    bias_ptr,
    y_ptr,
    tokens,
    m,
    n,
    r,
    stride_xt,
    stride_xn,
    stride_wm,
    stride_wn,
    stride_meta,
    stride_ar,
    stride_an,
    stride_beta,
    stride_bias,
    stride_yt,
    stride_ym,
    scale,
    keep_scale,
    dropout_p,
    seed,
    tokens_bucket,  # autotuning key only
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
):
    pid_t, pid_m = grouped_tile(tl.program_id(0), tokens, m, BLOCK_T, BLOCK_M, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = offs_t < tokens
    m_ok = offs_m < m
    # int64 offsets wherever a token index or a strided token axis enters: tokens * n
    # may pass 2**31 (x, y, dy, dx may be transposed views).
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    groups = row_groups(offs_m, r, m)
    first_group = (pid_m.to(tl.int64) * BLOCK_M * r) // m
    beta = tl.load(beta_ptr + offs_m * stride_beta, mask=m_ok, other=0.0).to(tl.float32)
    row_scale = scale * beta

    # Accumulate Y^T (BLOCK_M, BLOCK_T): the weight tile, rebuilt in registers, is the
    # first MMA operand, which Hopper's wgmma can read from registers (the second operand
    # must come from shared memory, where the pipelined X tile already is).
    acc = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    acc_ad = tl.zeros((BLOCK_M, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < n
        x = tl.load(
            x_rows + cols.to(tl.int64)[None, :] * stride_xn,
            mask=t_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = m_ok[:, None] & k_ok[None, :]
        w = frozen_weight_tile(
            w_ptr, meta_ptr, offs_m, cols, w_mask, stride_wm, stride_wn, stride_meta, NM_N, NM_M
        )
        alpha_g = alpha_rows_tile(
            alpha_ptr, groups, first_group, m_ok, cols, k_ok, r, stride_ar, stride_an, NUM_GROUPS
        )
        if DROPOUT:
            acc = mma(w, tl.trans(x), acc, UPCAST, PRECISION)
            keep = keep_tile(seed, offs_t, cols, n, dropout_p)
            x_kept = tl.where(keep, x, tl.zeros_like(x))
            w_alpha = alpha_scaled_tile(w, alpha_g)
            acc_ad = mma(w_alpha, tl.trans(x_kept), acc_ad, UPCAST, PRECISION)
        else:
            w_eff = effective_tile(w, alpha_g, row_scale)
            acc = mma(w_eff, tl.trans(x), acc, UPCAST, PRECISION)

    if DROPOUT:
        acc += acc_ad * (row_scale * keep_scale)[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_m * stride_bias, mask=m_ok, other=0.0).to(tl.float32)
        acc += bias[:, None]
    y_ptrs = (
        y_ptr + offs_t.to(tl.int64)[None, :] * stride_yt + offs_m.to(tl.int64)[:, None] * stride_ym
    )
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & t_ok[None, :])


def spp_linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    seed: int,
    out: torch.Tensor | None = None,
    *,
    meta: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Y (tokens, m) in x's dtype for x (tokens, n) with any strides, weight (m, n),
    alpha (r, n), beta (m,), bias (m,) or None; see the module docstring for the math.

    `out` (tokens, m), x's dtype, any strides: written instead of a new tensor.
    N:M packed weight: `weight` = values (m, n // M * N), `meta` its int32 metadata and
    nm = (N, M) (spp_kernels.nm's format); tiles are decoded in registers, never densified.
    """
    dense_like, meta_arg, stride_meta, nm_n, nm_m = frozen_weight_args(weight, meta, nm)
    check_operands(dense_like, alpha, beta, x=x, bias=bias)
    check_dropout(dropout_p)
    tokens, n = x.shape
    m, r = dense_like.shape[0], alpha.shape[0]
    if out is None:
        out = torch.empty((tokens, m), dtype=x.dtype, device=x.device)
    else:
        check_out(out, (tokens, m), x, "out")
    if tokens == 0 or m == 0:
        return out
    upcast, precision = dot_flags(x.dtype)

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_T"]) * triton.cdiv(m, meta["BLOCK_M"]),)

    _spp_forward_kernel[grid](
        x,
        weight,
        meta_arg,
        alpha,
        beta,
        bias if bias is not None else beta,  # never read when HAS_BIAS is False
        out,
        tokens,
        m,
        n,
        r,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        stride_meta,
        alpha.stride(0),
        alpha.stride(1),
        beta.stride(0),
        bias.stride(0) if bias is not None else 0,
        out.stride(0),
        out.stride(1),
        float(scale),
        1.0 / (1.0 - dropout_p),
        float(dropout_p),
        int(seed),
        tokens_bucket(tokens),
        HAS_BIAS=bias is not None,
        DROPOUT=dropout_p > 0.0,
        NM_N=nm_n,
        NM_M=nm_m,
        UPCAST=upcast,
        PRECISION=precision,
    )
    return out
