"""SPP backward: dX with the effective weight built on the fly; dalpha, dbeta from dY^T X tiles.

Math
----
Same notation as spp_forward.py: X (T, n), W (m, n), alpha (r, n), beta (m,), scale s,
keep(t, i) the packed dropout bits of the forward call, D(X) = X * keep / (1 - p),
g(o) = floor(o*r/m). Given dY (T, m):

    dX         = dY W + keep * (dY W''),   W'' = W * alpha[g] * s * beta / (1 - p)
               = dY W_eff                                          when p == 0
    G          = dY^T D(X)                                          (m, n), never stored
    dbeta[o]     = s * sum_i alpha[g(o), i] W[o, i] G[o, i]
    dalpha[j, i] = s * sum_{o : g(o) = j} beta[o] W[o, i] G[o, i]

1. dX (_spp_dx_kernel, the small-token path; many tokens use cuBLAS on W_eff chunks, see
   spp_kernels.ops.triton_backend). Program (pid_t, pid_n) owns dX[t0:t0+BLOCK_T,
   i0:i0+BLOCK_N] and walks the m rows of W in steps of BLOCK_K (the reduction axis). Each
   step loads the dY tile and the W tile once; p == 0: one tl.dot with the W_eff tile
   built in registers (exactly as in the forward); p > 0: dY @ W and dY @ W'' from the same
   W tile into two accumulators, and the epilogue applies keep (read from the bits) to the
   second. The row groups of each step are advanced incrementally (no division in the
   loop). The rebuilt weight tile is the second MMA operand, which Hopper's wgmma reads
   from shared memory (a register operand serialised the wgmma pipeline).

2. G contraction (_spp_dalpha_dbeta_kernel, both paths). Program (pid_o, pid_i) accumulates
   the tile G[o0:o0+BLOCK_M, i0:i0+BLOCK_N] = sum over token blocks (BLOCK_K, the reduction
   axis) of dY_tile^T @ (keep * X_tile) in float32 registers (1/(1-p) folded into the
   epilogue), then contracts it at once with the W, alpha[g] and beta tiles into
   P = s * W * G and writes two small partials:
       dbeta_part[pid_i, o]       = sum_i alpha[g(o), i] P[o, i]       buffer (n_tiles, m)
       dalpha_part[pid_o, k, i]   = sum_{o in tile, g(o) = g0 + k} beta[o] P[o, i]
   where g0 = g(o0) and k < SLOTS = (BLOCK_M-1)*r // m + 2, the most groups BLOCK_M
   consecutive rows can touch: buffer (m_tiles, SLOTS, n), about (r + 2 m / BLOCK_M) * n
   floats, never (m, n) (unless r ~ m, when it is alpha-sized). G, P, W * alpha and every
   (m, n) product stay in registers.

3. Reductions, deterministic (no atomics; same bits on every run): dbeta = dbeta_part.sum(0)
   on the host, and _spp_dalpha_reduce_kernel sums, for each group j, the slots of the (at
   most a few) row tiles that touch j, in tile order.

N:M packed weights (constexpr NM_GROUP > 0): both kernels read W through
_tiles.frozen_weight_tile, which decodes each tile in registers; W is never densified.

Recomputed in backward rather than saved by the forward: W_eff and W * alpha[g] (per
tile) and G. Saved for backward by the caller: X, W, alpha, beta and the dropout bits.

Status (2026-12-01): tested under the Triton 3.6 interpreter on CPU against float64
oracles (tests/ops); compiled for sm_90a and sm_80 with triton 3.6's ptxas, every shipped
config spill-free (python -m benchmarks.kernel_report); not yet run on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._launch import (
    INTERPRET,
    MIN_DOT,
    Launch,
    alpha_groups,
    autotune,
    check_out,
    prepare,
    tokens_bucket,
    without,
)
from ._tiles import (
    adapter_tile,
    advance_groups,
    alpha_rows_tile,
    effective_tile,
    frozen_weight_tile,
    group_offsets,
    grouped_tile,
    keep_tile,
    mma,
)


def _dx_config(bt: int, bn: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_T": bt, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_T": group},
        num_warps=warps,
        num_stages=stages,
    )


# By architecture; first = the pinned config (SPP_TRITON_CONFIGS=first); every config
# spill-free for its architecture in every variant (benchmarks/kernel_report.py --arch).
# sm_80 (A100: no wgmma, mma.sync accumulators live in registers): BLOCK_K 32 or 2 stages,
# as each of the sm_90a tiles spills there with dropout on a packed weight (12-14,024 B).
DX_CONFIGS = {
    "sm_90a": [
        _dx_config(64, 128, 64, 8, 3),
        _dx_config(128, 128, 64, 8, 3),
        _dx_config(64, 64, 64, 4, 4),
        _dx_config(128, 128, 32, 8, 4),
    ],
    "sm_80": [
        _dx_config(128, 64, 32, 8, 3),
        _dx_config(64, 128, 32, 8, 3),
        _dx_config(64, 128, 64, 8, 2),
        _dx_config(64, 64, 32, 4, 4),
    ],
}
# Low-bit weights (nm_tiles VALUES > 0) leave out the dX configs that spill with their
# decode (8-836 B with dropout, 8 B without on sm_80; kernel-report-*.md).
DX_LOW_BIT_CONFIGS = without(
    DX_CONFIGS, {"sm_90a": ["128x128x64 w8 s3"], "sm_80": ["64x128x64 w8 s2", "64x64x32 w4 s4"]}
)
DX_INTERPRETER_CONFIG = _dx_config(16, 16, 16, 4, 1, group=2)


def _num_groups_rows(args: dict) -> int:
    return alpha_groups(args["BLOCK_M"], args["r"], args["m"])


def _num_groups_k(args: dict) -> int:
    return alpha_groups(args["BLOCK_K"], args["r"], args["m"])


@autotune(
    DX_CONFIGS,
    DX_INTERPRETER_CONFIG,
    key=["tokens_bucket", "m", "n", "r", "DROPOUT", "N_KEEP", "NM_GROUP", "VALUES"],
    dot_blocks=("BLOCK_T", "BLOCK_N", "BLOCK_K"),
    low_bit_configs=DX_LOW_BIT_CONFIGS,
)
@triton.heuristics({"NUM_GROUPS": _num_groups_k})
@triton.jit
def _spp_dx_kernel(
    # pointers: output gradient, frozen weight (+ N:M metadata), adapters, dropout bits, dX
    dy_ptr,
    w_ptr,
    meta_ptr,
    scale_ptr,
    alpha_ptr,
    beta_ptr,
    keep_ptr,
    dx_ptr,
    # sizes: dY (tokens, m), W (m, n), alpha (r, n)
    tokens,
    m,
    n,
    r,
    # strides (elements)
    stride_dyt,
    stride_dym,
    stride_wm,
    stride_wn,
    stride_meta,
    stride_scale,
    stride_ar,
    stride_an,
    stride_beta,
    stride_keep,
    stride_dxt,
    stride_dxn,
    # scalars: the adapter scale s and 1 / (1 - p)
    scale,
    keep_scale,
    tokens_bucket,  # autotuning key only
    # meta-parameters: variant switches, dot flags, tile sizes
    DROPOUT: tl.constexpr,
    N_KEEP: tl.constexpr,
    NM_GROUP: tl.constexpr,
    VALUES: tl.constexpr,
    SCALE_GROUP: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
):
    pid_t, pid_n = grouped_tile(tl.program_id(0), tokens, n, BLOCK_T, BLOCK_N, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = offs_t < tokens
    n_ok = cols < n
    dy_rows = dy_ptr + offs_t.to(tl.int64)[:, None] * stride_dyt
    lanes = tl.arange(0, BLOCK_K)
    # Row groups of the current row block: g(o0 + l) = first + (rem + l*r) // m, advanced by
    # BLOCK_K rows per step with one precomputed quotient and remainder.
    first = tl.program_id(0).to(tl.int64) * 0
    rem = tl.program_id(0) * 0
    step_groups = (BLOCK_K * r) // m
    step_rem = (BLOCK_K * r) % m

    # dX tile (BLOCK_T, BLOCK_N) = dY tile (BLOCK_T, BLOCK_K) @ W_eff tile (BLOCK_K, BLOCK_N):
    # the rebuilt weight tile is the second MMA operand, which Hopper's wgmma reads from
    # shared memory, so no non-wgmma instruction touches the accumulators inside the
    # wgmma pipeline (a register operand serialised every wgmma: benchmarks/NOTES.md).
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    acc_ad = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for o0 in range(0, m, BLOCK_K):
        rows = o0 + lanes
        m_ok = rows < m
        dy = tl.load(
            dy_rows + rows.to(tl.int64)[None, :] * stride_dym,
            mask=t_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        w = frozen_weight_tile(
            w_ptr, meta_ptr, scale_ptr, rows, m_ok, pid_n * BLOCK_N, n, stride_wm, stride_wn,
            stride_meta, stride_scale, BLOCK_N, N_KEEP, NM_GROUP, VALUES, SCALE_GROUP,
            dy_ptr.dtype.element_ty,
        )  # fmt: skip
        alpha_g = alpha_rows_tile(
            alpha_ptr, first, rem + lanes * r, m, m_ok, cols, n_ok, r, stride_ar, stride_an,
            NUM_GROUPS,
        )  # fmt: skip
        beta = tl.load(beta_ptr + rows * stride_beta, mask=m_ok, other=0.0).to(tl.float32)
        if DROPOUT:
            acc = mma(dy, w, acc, UPCAST, PRECISION)
            w_ad = adapter_tile(w, alpha_g, scale * keep_scale * beta)
            acc_ad = mma(dy, w_ad, acc_ad, UPCAST, PRECISION)
        else:
            acc = mma(dy, effective_tile(w, alpha_g, scale * beta), acc, UPCAST, PRECISION)
        first, rem = advance_groups(first, rem, step_rem, step_groups, m)

    out_mask = t_ok[:, None] & n_ok[None, :]
    if DROPOUT:
        acc += tl.where(keep_tile(keep_ptr, offs_t, cols, stride_keep, out_mask), acc_ad, 0.0)
    dx_ptrs = (
        dx_ptr + offs_t.to(tl.int64)[:, None] * stride_dxt + cols.to(tl.int64)[None, :] * stride_dxn
    )
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=out_mask)


# The G kernel's BLOCK_M and BLOCK_N size the partial buffers, so the host fixes them and
# only the token block (BLOCK_K), warps and stages are tuned. Small tiles under the
# interpreter so that tests cross tile and group boundaries.
DAB_BLOCK_M, DAB_BLOCK_N, DAB_GROUP_M = (16, 16, 2) if INTERPRET else (64, 128, 8)
REDUCE_BLOCK_N = 32 if INTERPRET else 256
assert min(DAB_BLOCK_M, DAB_BLOCK_N) >= MIN_DOT, "tl.dot blocks must be >= 16 on the GPU"


def _dab_config(bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# (64, 4 warps, 3 stages) spills at sm_80 with dropout (24 B dense, 152 B packed).
DAB_CONFIGS = {
    "sm_90a": [_dab_config(64, 8, 3), _dab_config(32, 4, 4), _dab_config(64, 4, 3)],
    "sm_80": [_dab_config(64, 8, 3), _dab_config(32, 4, 4)],
}
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
    key=["tokens_bucket", "m", "n", "r", "DROPOUT", "N_KEEP", "NM_GROUP", "VALUES"],
    dot_blocks=("BLOCK_K",),
)
@triton.heuristics({"NUM_GROUPS": _num_groups_rows})
@triton.jit
def _spp_dalpha_dbeta_kernel(
    # pointers: output gradient, input, frozen weight (+ metadata), adapters, bits, partials
    dy_ptr,
    x_ptr,
    w_ptr,
    meta_ptr,
    scale_ptr,
    alpha_ptr,
    beta_ptr,
    keep_ptr,
    dbeta_part_ptr,
    dalpha_part_ptr,
    # sizes: dY (tokens, m), X (tokens, n), W (m, n), alpha (r, n); slots per row tile
    tokens,
    m,
    n,
    r,
    slots,
    # strides (elements)
    stride_dyt,
    stride_dym,
    stride_xt,
    stride_xn,
    stride_wm,
    stride_wn,
    stride_meta,
    stride_scale,
    stride_ar,
    stride_an,
    stride_beta,
    stride_keep,
    # scalars: s / (1 - p)
    grad_scale,
    tokens_bucket,  # autotuning key only
    # meta-parameters: variant switches, dot flags, tile sizes
    DROPOUT: tl.constexpr,
    N_KEEP: tl.constexpr,
    NM_GROUP: tl.constexpr,
    VALUES: tl.constexpr,
    SCALE_GROUP: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
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
    for t0 in range(0, tokens, BLOCK_K):
        ts = t0 + tl.arange(0, BLOCK_K)
        t_ok = ts < tokens
        ts64 = ts.to(tl.int64)
        dy_t = tl.load(
            dy_cols + ts64[None, :] * stride_dyt, mask=m_ok[:, None] & t_ok[None, :], other=0.0
        )
        x_mask = t_ok[:, None] & n_ok[None, :]
        x = tl.load(x_cols + ts64[:, None] * stride_xt, mask=x_mask, other=0.0)
        if DROPOUT:
            x = tl.where(keep_tile(keep_ptr, ts, cols, stride_keep, x_mask), x, 0.0).to(x.dtype)
        g = mma(dy_t, x, g, UPCAST, PRECISION)

    # Epilogue: P = s/(1-p) * W * G, contracted with alpha[g(o)] (dbeta) and beta (dalpha).
    w = frozen_weight_tile(
        w_ptr, meta_ptr, scale_ptr, rows, m_ok, pid_n * BLOCK_N, n, stride_wm, stride_wn,
        stride_meta, stride_scale, BLOCK_N, N_KEEP, NM_GROUP, VALUES, SCALE_GROUP,
        x_ptr.dtype.element_ty,
    )  # fmt: skip
    first_group, offsets = group_offsets(pid_m * BLOCK_M, tl.arange(0, BLOCK_M), r, m)
    p = g * w.to(tl.float32) * grad_scale
    alpha_g = alpha_rows_tile(
        alpha_ptr, first_group, offsets, m, m_ok, cols, n_ok, r, stride_ar, stride_an, NUM_GROUPS
    )
    dbeta_part = tl.sum(p * alpha_g, axis=1)
    tl.store(dbeta_part_ptr + pid_n.to(tl.int64) * m + rows, dbeta_part, mask=m_ok)

    beta = tl.load(beta_ptr + rows * stride_beta, mask=m_ok, other=0.0).to(tl.float32)
    p = p * beta[:, None]
    part_row = dalpha_part_ptr + (pid_m.to(tl.int64) * slots) * n + cols
    for k in range(0, slots):
        in_group = (offsets >= k * m) & (offsets < (k + 1) * m) & m_ok
        dalpha_part = tl.sum(tl.where(in_group[:, None], p, 0.0), axis=0)
        tl.store(part_row + k * n, dalpha_part, mask=n_ok)


@triton.jit
def _spp_dalpha_reduce_kernel(
    # pointers: the partials (m_tiles, slots, n) and dalpha (r, n)
    part_ptr,
    dalpha_ptr,
    # sizes
    m,
    n,
    r,
    slots,
    # strides of dalpha
    stride_dar,
    stride_dan,
    # meta-parameters: the G kernel's row tile, the column block
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
    weight: Any,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    dropout_p: float,
    keep: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    launch: Launch | None = None,
) -> torch.Tensor:
    """dX (tokens, n) in dy's dtype for dy (tokens, m), the frozen weight W (m, n) (dense or
    N:M packed, as in spp_linear_forward), alpha (r, n), beta (m,).

    keep: the forward's packed dropout bits, required when dropout_p > 0. `out` (tokens, n),
    dy's dtype, any strides: written instead of a new tensor. `launch`: the backward's
    prepared launch (shared with spp_linear_dalpha_dbeta), else `prepare` checks here.
    """
    if launch is None:
        launch = prepare(weight, alpha, beta, dy=dy, keep=keep, dropout_p=dropout_p)
    tokens, n = launch.tokens, launch.n
    if out is None:
        out = torch.empty((tokens, n), dtype=dy.dtype, device=dy.device)
    else:
        check_out(out, (tokens, n), dy, "out")
    if tokens == 0 or n == 0:
        return out

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_T"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _spp_dx_kernel[grid](
        dy_ptr=dy,
        w_ptr=launch.w,
        meta_ptr=launch.meta,
        scale_ptr=launch.scales,
        alpha_ptr=alpha,
        beta_ptr=beta,
        keep_ptr=launch.keep,
        dx_ptr=out,
        tokens=tokens,
        m=launch.m,
        n=n,
        r=launch.r,
        stride_dyt=dy.stride(0),
        stride_dym=dy.stride(1),
        stride_wm=launch.stride_wm,
        stride_wn=launch.stride_wn,
        stride_meta=launch.stride_meta,
        stride_scale=launch.stride_scale,
        stride_ar=alpha.stride(0),
        stride_an=alpha.stride(1),
        stride_beta=beta.stride(0),
        stride_keep=launch.stride_keep,
        stride_dxt=out.stride(0),
        stride_dxn=out.stride(1),
        scale=float(scale),
        keep_scale=1.0 / (1.0 - dropout_p),
        tokens_bucket=tokens_bucket(tokens),
        DROPOUT=dropout_p > 0.0,
        N_KEEP=launch.n_keep,
        NM_GROUP=launch.group,
        VALUES=launch.values_kind,
        SCALE_GROUP=launch.scale_group,
        UPCAST=launch.upcast,
        PRECISION=launch.precision,
    )
    return out


def spp_linear_dalpha_dbeta(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: Any,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    dropout_p: float,
    keep: torch.Tensor | None = None,
    *,
    launch: Launch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dalpha (r, n) in alpha's dtype, dbeta (m,) float32) for dy (tokens, m), x (tokens, n).

    dbeta comes back in float32 (the host sum of the per-column-tile partials); the caller
    casts it to beta's dtype. Workspace: (cdiv(n, BLOCK_N), m) + (cdiv(m, BLOCK_M), SLOTS, n)
    float32. keep: the forward's dropout bits (dropout_p > 0). The frozen weight is dense or
    N:M packed, as in spp_linear_forward; `launch` as in spp_linear_dx.
    """
    if launch is None:
        launch = prepare(weight, alpha, beta, x=x, dy=dy, keep=keep, dropout_p=dropout_p)
    tokens, m, n, r = launch.tokens, launch.m, launch.n, launch.r
    slots = dalpha_slots(m, r)
    m_tiles, n_tiles = triton.cdiv(m, DAB_BLOCK_M), triton.cdiv(n, DAB_BLOCK_N)
    dbeta_part = torch.empty((n_tiles, m), dtype=torch.float32, device=dy.device)
    dalpha_part = torch.empty((m_tiles, slots, n), dtype=torch.float32, device=dy.device)
    dalpha = torch.empty((r, n), dtype=alpha.dtype, device=dy.device)
    if n == 0:
        return dalpha, dbeta_part.sum(0)
    _spp_dalpha_dbeta_kernel[(m_tiles * n_tiles,)](
        dy_ptr=dy,
        x_ptr=x,
        w_ptr=launch.w,
        meta_ptr=launch.meta,
        scale_ptr=launch.scales,
        alpha_ptr=alpha,
        beta_ptr=beta,
        keep_ptr=launch.keep,
        dbeta_part_ptr=dbeta_part,
        dalpha_part_ptr=dalpha_part,
        tokens=tokens,
        m=m,
        n=n,
        r=r,
        slots=slots,
        stride_dyt=dy.stride(0),
        stride_dym=dy.stride(1),
        stride_xt=x.stride(0),
        stride_xn=x.stride(1),
        stride_wm=launch.stride_wm,
        stride_wn=launch.stride_wn,
        stride_meta=launch.stride_meta,
        stride_scale=launch.stride_scale,
        stride_ar=alpha.stride(0),
        stride_an=alpha.stride(1),
        stride_beta=beta.stride(0),
        stride_keep=launch.stride_keep,
        grad_scale=float(scale) / (1.0 - dropout_p),
        tokens_bucket=tokens_bucket(tokens),
        DROPOUT=dropout_p > 0.0,
        N_KEEP=launch.n_keep,
        NM_GROUP=launch.group,
        VALUES=launch.values_kind,
        SCALE_GROUP=launch.scale_group,
        UPCAST=launch.upcast,
        PRECISION=launch.precision,
        BLOCK_M=DAB_BLOCK_M,
        BLOCK_N=DAB_BLOCK_N,
        GROUP_M=DAB_GROUP_M,
    )
    _spp_dalpha_reduce_kernel[(r, triton.cdiv(n, REDUCE_BLOCK_N))](
        part_ptr=dalpha_part,
        dalpha_ptr=dalpha,
        m=m,
        n=n,
        r=r,
        slots=slots,
        stride_dar=dalpha.stride(0),
        stride_dan=dalpha.stride(1),
        TILE_M=DAB_BLOCK_M,
        BLOCK_N=REDUCE_BLOCK_N,
    )
    return dalpha, dbeta_part.sum(0)
