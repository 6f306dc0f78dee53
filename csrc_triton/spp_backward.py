"""SPP backward: dX with the effective weight built on the fly; dalpha, dbeta from dY^T X tiles.

Math
----
Same notation as spp_forward.py: X (T, n), W (m, n), alpha (r, n), beta (m,), scale s,
keep(t, i) = tl.rand(seed, t * n + i) >= p, D(X) = X * keep / (1 - p), g(o) = floor(o*r/m).
Given dY (T, m):

    dX         = dY W + s / (1 - p) * keep * ((dY * beta) (W * alpha[g]))
               = dY W_eff                                          when p == 0
    G          = dY^T D(X)                                          (m, n), never stored
    dbeta[o]     = s * sum_i alpha[g(o), i] W[o, i] G[o, i]
    dalpha[j, i] = s * sum_{o : g(o) = j} beta[o] W[o, i] G[o, i]

1. dX pass (_spp_dx_kernel). Program (pid_t, pid_i) owns dX[t0:t0+BLOCK_T, i0:i0+BLOCK_N]
   and walks the m rows of W in steps of BLOCK_M. Each step loads the dY tile and the W
   tile once; p == 0: one tl.dot with the W_eff tile built in registers (exactly as in the
   forward); p > 0: dY @ W and dY @ W' from the same W tile, W' = s * W * alpha[g] * beta
   built in registers (the same product as (s * beta * dY) @ (W * alpha[g])), and the
   epilogue applies keep / (1 - p), regenerated from (seed, t, i), to the adapter part.
   The product is accumulated transposed, dX^T = W_eff^T dY^T, so the rebuilt weight tile
   is the first MMA operand, which Hopper's wgmma takes from registers. Nothing but dX is
   written.

2. G contraction (_spp_dalpha_dbeta_kernel). Program (pid_o, pid_i) accumulates the tile
   G[o0:o0+BLOCK_M, i0:i0+BLOCK_N] = sum over token blocks of dY_tile^T @ (keep * X_tile)
   in float32 registers (1/(1-p) folded into the epilogue), then contracts it at once with
   the W, alpha[g] and beta tiles into P = s * W * G and writes two small partials:
       dbeta_part[pid_i, o]       = sum_i alpha[g(o), i] P[o, i]       buffer (n_tiles, m)
       dalpha_part[pid_o, k, i]   = sum_{o in tile, g(o) = g0 + k} beta[o] P[o, i]
   where g0 = g(o0) is the tile's first group and k < SLOTS = (BLOCK_M-1)*r // m + 2, the
   most groups BLOCK_M consecutive rows can touch: buffer (m_tiles, SLOTS, n), about
   (r + 2 m / BLOCK_M) * n floats, never (m, n) (unless r ~ m, when it is alpha-sized).
   G itself, P, W * alpha and every (m, n) product stay in registers.

3. Reductions, deterministic (no atomics; same bits on every run): dbeta = dbeta_part.sum(0)
   on the host (a torch reduction, deterministic), and _spp_dalpha_reduce_kernel sums, for
   each group j, the slots of the (at most a few) row tiles that touch j, in tile order.

N:M packed weights (constexpr NM_M > 0): both kernels read W through
_tiles.frozen_weight_tile, which decodes each tile from the packed values and int32
metadata in registers (see spp_forward.py); nothing else changes and W is never densified.

Recomputed in backward rather than saved by the forward: W_eff and W * alpha[g] (per tile),
the dropout mask (from the seed) and G. Saved for backward by the caller: X, W, alpha,
beta and the seed only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    INTERPRET,
    MIN_DOT,
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
    adapter_tile,
    alpha_rows_tile,
    effective_tile,
    frozen_weight_tile,
    grouped_tile,
    keep_tile,
    mma,
    row_groups,
)


def _dx_config(bt: int, bn: int, bm: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_T": bt, "BLOCK_N": bn, "BLOCK_M": bm, "GROUP_T": group},
        num_warps=warps,
        num_stages=stages,
    )


DX_CONFIGS = [
    _dx_config(128, 128, 64, 8, 3),
    _dx_config(256, 128, 64, 8, 3),
    _dx_config(128, 128, 32, 4, 4),
    _dx_config(128, 256, 64, 8, 3),
    _dx_config(64, 128, 64, 4, 4),
    _dx_config(128, 64, 64, 4, 4),
]
DX_INTERPRETER_CONFIG = _dx_config(16, 16, 16, 4, 1, group=2)


@autotune(
    DX_CONFIGS,
    DX_INTERPRETER_CONFIG,
    key=["tokens_bucket", "m", "n", "r", "DROPOUT", "NM_N", "NM_M"],
    dot_blocks=("BLOCK_T", "BLOCK_N", "BLOCK_M"),
)
@triton.heuristics({"NUM_GROUPS": alpha_groups_heuristic})
@triton.jit
def _spp_dx_kernel(
    dy_ptr,
    w_ptr,
    meta_ptr,
    alpha_ptr,
    beta_ptr,
    dx_ptr,
    tokens,
    m,
    n,
    r,
    stride_dyt,
    stride_dym,
    stride_wm,
    stride_wn,
    stride_meta,
    stride_ar,
    stride_an,
    stride_beta,
    stride_dxt,
    stride_dxn,
    scale,
    keep_scale,
    dropout_p,
    seed,
    tokens_bucket,  # autotuning key only
    DROPOUT: tl.constexpr,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_T: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
):
    pid_t, pid_n = grouped_tile(tl.program_id(0), tokens, n, BLOCK_T, BLOCK_N, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = offs_t < tokens
    n_ok = cols < n
    dy_rows = dy_ptr + offs_t.to(tl.int64)[:, None] * stride_dyt

    # Accumulate dX^T (BLOCK_N, BLOCK_T): the weight tile, rebuilt in registers, is the first
    # MMA operand (Hopper's wgmma reads it from registers) and dY^T comes from shared memory.
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    acc_ad = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    # int64 zero: o0 * r may pass 2**31 for m > 46340, and the loop index is int32 on the
    # GPU (a Python int under the interpreter, which has no .to()).
    zero64 = tl.program_id(0).to(tl.int64) * 0
    for o0 in range(0, m, BLOCK_M):
        rows = o0 + tl.arange(0, BLOCK_M)
        m_ok = rows < m
        dy = tl.load(
            dy_rows + rows.to(tl.int64)[None, :] * stride_dym,
            mask=t_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        w_mask = m_ok[:, None] & n_ok[None, :]
        w = frozen_weight_tile(
            w_ptr, meta_ptr, rows, cols, w_mask, stride_wm, stride_wn, stride_meta, NM_N, NM_M
        )
        alpha_g = alpha_rows_tile(
            alpha_ptr,
            row_groups(rows, r, m),
            ((zero64 + o0) * r) // m,
            m_ok,
            cols,
            n_ok,
            r,
            stride_ar,
            stride_an,
            NUM_GROUPS,
        )
        beta = tl.load(beta_ptr + rows * stride_beta, mask=m_ok, other=0.0).to(tl.float32)
        if DROPOUT:
            # (dY * beta) (W * alpha[g]) = dY W' with W' = W * alpha[g] * beta in registers.
            acc = mma(tl.trans(w), tl.trans(dy), acc, UPCAST, PRECISION)
            w_prime = adapter_tile(w, alpha_g, scale * beta)
            acc_ad = mma(tl.trans(w_prime), tl.trans(dy), acc_ad, UPCAST, PRECISION)
        else:
            w_eff = effective_tile(w, alpha_g, scale * beta)
            acc = mma(tl.trans(w_eff), tl.trans(dy), acc, UPCAST, PRECISION)

    if DROPOUT:
        keep = tl.trans(keep_tile(seed, offs_t, cols, n, dropout_p))
        acc += tl.where(keep, acc_ad * keep_scale, 0.0)
    dx_ptrs = (
        dx_ptr + offs_t.to(tl.int64)[None, :] * stride_dxt + cols.to(tl.int64)[:, None] * stride_dxn
    )
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=n_ok[:, None] & t_ok[None, :])


# The G kernel's BLOCK_M and BLOCK_N size the partial buffers, so the host fixes them and
# only the token block, warps and stages are tuned. Small tiles under the interpreter so
# that tests cross tile and group boundaries.
DAB_BLOCK_M, DAB_BLOCK_N, DAB_GROUP_M = (16, 16, 2) if INTERPRET else (128, 128, 8)
REDUCE_BLOCK_N = 32 if INTERPRET else 256
assert min(DAB_BLOCK_M, DAB_BLOCK_N) >= MIN_DOT, "tl.dot blocks must be >= 16 on the GPU"


def _dab_config(bt: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_T": bt}, num_warps=warps, num_stages=stages)


DAB_CONFIGS = [
    _dab_config(64, 8, 3),
    _dab_config(32, 4, 4),
    _dab_config(64, 4, 4),
    _dab_config(32, 8, 3),
]
DAB_INTERPRETER_CONFIG = _dab_config(16, 4, 1)


def dalpha_slots(m: int, r: int, block_m: int = DAB_BLOCK_M) -> int:
    """Most distinct groups g(o) among block_m consecutive rows: (block_m - 1) * r // m + 2.

    floor(a + b) <= floor(a) + floor(b) + 1 bounds g(o0 + block_m - 1) - g(o0) by
    floor((block_m - 1) * r / m) + 1, hence the +2 for the count.
    """
    return min((block_m - 1) * r // m + 2, block_m, r)


@autotune(
    DAB_CONFIGS,
    DAB_INTERPRETER_CONFIG,
    key=["tokens_bucket", "m", "n", "r", "DROPOUT", "NM_N", "NM_M"],
    dot_blocks=("BLOCK_T",),
)
@triton.heuristics({"NUM_GROUPS": alpha_groups_heuristic})
@triton.jit
def _spp_dalpha_dbeta_kernel(
    dy_ptr,
    x_ptr,
    w_ptr,
    meta_ptr,
    alpha_ptr,
    beta_ptr,
    dbeta_part_ptr,
    dalpha_part_ptr,
    tokens,
    m,
    n,
    r,
    slots,
    stride_dyt,
    stride_dym,
    stride_xt,
    stride_xn,
    stride_wm,
    stride_wn,
    stride_meta,
    stride_ar,
    stride_an,
    stride_beta,
    grad_scale,
    dropout_p,
    seed,
    tokens_bucket,  # autotuning key only
    DROPOUT: tl.constexpr,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), m, n, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rows < m
    n_ok = cols < n
    dy_cols = dy_ptr + rows.to(tl.int64)[:, None] * stride_dym  # int64: dy, x may be transposed
    x_cols = x_ptr + cols.to(tl.int64)[None, :] * stride_xn

    # G tile = dY[:, rows]^T @ (keep * X)[:, cols], float32, over all token blocks.
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < tokens
        ts64 = ts.to(tl.int64)
        dy_t = tl.load(
            dy_cols + ts64[None, :] * stride_dyt, mask=m_ok[:, None] & t_ok[None, :], other=0.0
        )
        x = tl.load(
            x_cols + ts64[:, None] * stride_xt, mask=t_ok[:, None] & n_ok[None, :], other=0.0
        )
        if DROPOUT:
            x = tl.where(keep_tile(seed, ts, cols, n, dropout_p), x, tl.zeros_like(x))
        g = mma(dy_t, x, g, UPCAST, PRECISION)

    # Epilogue: P = scale/(1-p) * W * G, contracted with alpha[g(o)] (dbeta) and beta (dalpha).
    w_mask = m_ok[:, None] & n_ok[None, :]
    w = frozen_weight_tile(
        w_ptr, meta_ptr, rows, cols, w_mask, stride_wm, stride_wn, stride_meta, NM_N, NM_M
    ).to(tl.float32)
    groups = row_groups(rows, r, m)
    first_group = (pid_m.to(tl.int64) * BLOCK_M * r) // m
    alpha_g = alpha_rows_tile(
        alpha_ptr, groups, first_group, m_ok, cols, n_ok, r, stride_ar, stride_an, NUM_GROUPS
    )
    beta = tl.load(beta_ptr + rows * stride_beta, mask=m_ok, other=0.0).to(tl.float32)
    p = g * w * grad_scale
    dbeta_part = tl.sum(p * alpha_g, axis=1)
    tl.store(dbeta_part_ptr + pid_n.to(tl.int64) * m + rows, dbeta_part, mask=m_ok)

    p = p * beta[:, None]
    part_row = dalpha_part_ptr + (pid_m.to(tl.int64) * slots) * n + cols
    for k in range(0, slots):
        in_group = (groups == first_group + k) & m_ok
        dalpha_part = tl.sum(tl.where(in_group[:, None], p, 0.0), axis=0)
        tl.store(part_row + k * n, dalpha_part, mask=n_ok)


@triton.jit
def _spp_dalpha_reduce_kernel(
    part_ptr,
    dalpha_ptr,
    m,
    n,
    r,
    slots,
    stride_dar,
    stride_dan,
    TILE_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dalpha[j, cols] = sum over the row tiles that touch group j of their slot for j."""
    j = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = cols < n
    first_row = (j * m + r - 1) // r  # smallest o with g(o) = j
    last_row = ((j + 1) * m + r - 1) // r - 1
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for tile in range(first_row // TILE_M, last_row // TILE_M + 1):  # int64 bounds and index
        slot = j - (tile * TILE_M * r) // m
        acc += tl.load(part_ptr + (tile * slots + slot) * n + cols, mask=n_ok, other=0.0)
    tl.store(
        dalpha_ptr + j * stride_dar + cols * stride_dan,
        acc.to(dalpha_ptr.dtype.element_ty),
        mask=n_ok,
    )


def spp_linear_dx(
    dy: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    out: torch.Tensor | None = None,
    *,
    meta: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """dX (tokens, n) in dy's dtype for dy (tokens, m), weight (m, n), alpha (r, n), beta (m,).

    `out` (tokens, n), dy's dtype, any strides: written instead of a new tensor.
    meta/nm: `weight` is N:M packed, as in spp_linear_forward.
    """
    dense_like, meta_arg, stride_meta, nm_n, nm_m = frozen_weight_args(weight, meta, nm)
    check_operands(dense_like, alpha, beta, dy=dy)
    check_dropout(dropout_p)
    tokens, m = dy.shape
    n, r = dense_like.shape[1], alpha.shape[0]
    if out is None:
        out = torch.empty((tokens, n), dtype=dy.dtype, device=dy.device)
    else:
        check_out(out, (tokens, n), dy, "out")
    if tokens == 0 or n == 0:
        return out
    upcast, precision = dot_flags(dy.dtype)

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_T"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _spp_dx_kernel[grid](
        dy,
        weight,
        meta_arg,
        alpha,
        beta,
        out,
        tokens,
        m,
        n,
        r,
        dy.stride(0),
        dy.stride(1),
        weight.stride(0),
        weight.stride(1),
        stride_meta,
        alpha.stride(0),
        alpha.stride(1),
        beta.stride(0),
        out.stride(0),
        out.stride(1),
        float(scale),
        1.0 / (1.0 - dropout_p),
        float(dropout_p),
        int(seed),
        tokens_bucket(tokens),
        DROPOUT=dropout_p > 0.0,
        NM_N=nm_n,
        NM_M=nm_m,
        UPCAST=upcast,
        PRECISION=precision,
    )
    return out


def spp_linear_dalpha_dbeta(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    dropout_p: float,
    seed: int,
    *,
    meta: torch.Tensor | None = None,
    nm: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dalpha (r, n) in alpha's dtype, dbeta (m,) float32) for dy (tokens, m), x (tokens, n).

    dbeta comes back in float32 (the host sum of the per-column-tile partials); the caller
    casts it to beta's dtype. Workspace: (cdiv(n, 128), m) + (cdiv(m, 128), SLOTS, n) fp32.
    meta/nm: `weight` is N:M packed, as in spp_linear_forward.
    """
    dense_like, meta_arg, stride_meta, nm_n, nm_m = frozen_weight_args(weight, meta, nm)
    check_operands(dense_like, alpha, beta, x=x, dy=dy)
    check_dropout(dropout_p)
    tokens, m = dy.shape
    n, r = dense_like.shape[1], alpha.shape[0]
    slots = dalpha_slots(m, r)
    m_tiles, n_tiles = triton.cdiv(m, DAB_BLOCK_M), triton.cdiv(n, DAB_BLOCK_N)
    dbeta_part = torch.empty((n_tiles, m), dtype=torch.float32, device=dy.device)
    dalpha_part = torch.empty((m_tiles, slots, n), dtype=torch.float32, device=dy.device)
    dalpha = torch.empty((r, n), dtype=alpha.dtype, device=dy.device)
    if n == 0:
        return dalpha, dbeta_part.sum(0)
    upcast, precision = dot_flags(dy.dtype)
    _spp_dalpha_dbeta_kernel[(m_tiles * n_tiles,)](
        dy,
        x,
        weight,
        meta_arg,
        alpha,
        beta,
        dbeta_part,
        dalpha_part,
        tokens,
        m,
        n,
        r,
        slots,
        dy.stride(0),
        dy.stride(1),
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        stride_meta,
        alpha.stride(0),
        alpha.stride(1),
        beta.stride(0),
        float(scale) / (1.0 - dropout_p),
        float(dropout_p),
        int(seed),
        tokens_bucket(tokens),
        DROPOUT=dropout_p > 0.0,
        NM_N=nm_n,
        NM_M=nm_m,
        UPCAST=upcast,
        PRECISION=precision,
        BLOCK_M=DAB_BLOCK_M,
        BLOCK_N=DAB_BLOCK_N,
        GROUP_M=DAB_GROUP_M,
    )
    _spp_dalpha_reduce_kernel[(r, triton.cdiv(n, REDUCE_BLOCK_N))](
        dalpha_part,
        dalpha,
        m,
        n,
        r,
        slots,
        dalpha.stride(0),
        dalpha.stride(1),
        TILE_M=DAB_BLOCK_M,
        BLOCK_N=REDUCE_BLOCK_N,
    )
    return dalpha, dbeta_part.sum(0)
