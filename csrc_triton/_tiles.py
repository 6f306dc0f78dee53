"""Tile-level @triton.jit helpers shared by the SPP forward and backward kernels.

Each helper builds one small piece of the SPP math in registers, for a tile of rows
o (output features, of W (m, n)) and columns i (input features):

    weight_tile         W[o, i]                                   (the only read of W)
    frozen_weight_tile  W[o, i] from W itself or from its N:M packed values/meta
    alpha_rows_tile     alpha[g(o), i],  g(o) = (o * r) // m      (selected, never Repeat-ed)
    effective_tile      W[o, i] * (1 + s[o] * alpha[g(o), i])     (s = scale * beta, merged weight)
    adapter_tile        W[o, i] * alpha[g(o), i] * s[o]           (scaled W', dropout backward)
    keep_tile           tl.rand(seed, t * n + i) >= p             (dropout mask, never stored)
    mma                 acc + a @ b with fp32 accumulation

The kernels read the frozen weight only through `frozen_weight_tile`: `weight_tile` for a
dense W, or (constexpr NM_M > 0) `nm_tiles.nm_dense_tile`, which expands the tile from the
N:M packed values and metadata in registers, so a packed weight is never made dense.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .nm_tiles import nm_dense_tile


@triton.jit
def weight_tile(w_ptr, rows, cols, mask, stride_wm, stride_wn):
    """W[rows, cols] (len(rows), len(cols)) in W's dtype; 0 where `mask` is False."""
    rows64 = rows.to(tl.int64)
    return tl.load(
        w_ptr + rows64[:, None] * stride_wm + cols[None, :] * stride_wn, mask=mask, other=0.0
    )


@triton.jit
def frozen_weight_tile(
    w_ptr,
    meta_ptr,
    rows,
    cols,
    mask,
    stride_wm,
    stride_wn,
    stride_meta,
    NM_N: tl.constexpr,
    NM_M: tl.constexpr,
):
    """W[rows, cols] in W's dtype, 0 where `mask` is False.

    NM_M == 0: w_ptr is the dense W (m, n) and meta_ptr is not read. NM_M in {4, 8}: w_ptr
    is the packed values (m, n // NM_M * NM_N, unit column stride; stride_wm its row stride)
    and meta_ptr the int32 metadata (row stride stride_meta) of spp_kernels.nm's format;
    the tile is decoded bit-exactly in registers (nm_tiles.nm_dense_tile).
    """
    if NM_M == 0:
        w = weight_tile(w_ptr, rows, cols, mask, stride_wm, stride_wn)
    else:
        w = nm_dense_tile(w_ptr, meta_ptr, rows, cols, mask, stride_wm, stride_meta, NM_N, NM_M)
    return w


@triton.jit
def row_groups(rows, r, m):
    """g(o) = floor(o * r / m) for the row indices `rows`, in int64 (o * r may exceed 2**31)."""
    return (rows.to(tl.int64) * r) // m


@triton.jit
def alpha_rows_tile(
    alpha_ptr,
    groups,
    first_group,
    rows_ok,
    cols,
    cols_ok,
    r,
    stride_ar,
    stride_an,
    NUM_GROUPS: tl.constexpr,
):
    """alpha[g(o), i] as float32 for a tile of consecutive rows o with groups g(o) =
    `groups` (from row_groups) and columns i = `cols`: a (len(groups), len(cols)) tile.

    The rows touch at most NUM_GROUPS groups starting at `first_group` = g(first row) (host
    bound: (BLOCK_M - 1) * r // m + 2, see _launch.alpha_groups). When
    NUM_GROUPS > 0 those few alpha rows are loaded as vectors and selected per row: the
    load traffic is NUM_GROUPS * len(cols), not len(rows) * len(cols). NUM_GROUPS == 0 (r
    close to m) falls back to a 2-D gather. Either way Repeat(alpha) (m, n) is never formed.
    """
    if NUM_GROUPS > 0:
        first = first_group
        col_ptrs = alpha_ptr + cols * stride_an
        tile = tl.where(
            (groups == first)[:, None],
            tl.load(col_ptrs + first * stride_ar, mask=cols_ok, other=0.0).to(tl.float32)[None, :],
            0.0,
        )
        for k in tl.static_range(1, NUM_GROUPS):
            row = tl.minimum(first + k, r - 1)
            alpha_k = tl.load(col_ptrs + row * stride_ar, mask=cols_ok, other=0.0)
            tile = tl.where((groups == first + k)[:, None], alpha_k.to(tl.float32)[None, :], tile)
        return tile
    else:
        ptrs = alpha_ptr + groups[:, None] * stride_ar + cols[None, :] * stride_an
        return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def effective_tile(w, alpha_rows, row_scale):
    """W * (1 + row_scale[:, None] * alpha_rows) in W's dtype, computed in float32.

    row_scale = scale * beta (float32, per row). A zero of W stays zero for finite alpha
    and beta; unlike torch_backend.effective_weight (whose output is a merged weight that
    must keep zeros bitwise) this tile only feeds a product, so the select that would guard
    non-finite factors is left out of the inner loop.
    """
    return (w.to(tl.float32) * (1.0 + row_scale[:, None] * alpha_rows)).to(w.dtype)


@triton.jit
def alpha_scaled_tile(w, alpha_rows):
    """W * alpha[g(o), i] in W's dtype (the adapter weight without beta), computed in float32."""
    return (w.to(tl.float32) * alpha_rows).to(w.dtype)


@triton.jit
def adapter_tile(w, alpha_rows, row_scale):
    """W' tile = W * alpha[g(o), i] * row_scale[o] in W's dtype, computed in float32
    (row_scale = scale * beta: the scaled SPP adapter weight, registers only)."""
    return (w.to(tl.float32) * alpha_rows * row_scale[:, None]).to(w.dtype)


@triton.jit
def keep_tile(seed, tokens_idx, cols, n, p):
    """Dropout keep-mask for X elements (tokens_idx, cols) of X (tokens, n).

    keep(t, i) = tl.rand(seed, t * n + i) >= p, the offset in int64 so that tokens * n may
    exceed 2**31; spp_kernels.dropout.dropout_mask reproduces it bit-exactly.
    """
    offsets = tokens_idx.to(tl.int64)[:, None] * n + cols[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with float32 accumulation.

    UPCAST (interpreter only, triton 3.6): the CPU interpreter's bf16 tl.dot returns
    garbage, so the operands, already rounded to bf16, are widened to float32 first; the
    products are then the exact same numbers the GPU's bf16 MMA multiplies. PRECISION is
    "ieee" for float32 operands (no TF32), "tf32" (the default, ignored) for fp16/bf16.
    """
    tl.static_assert(a.shape[0] >= 16 and a.shape[1] >= 16 and b.shape[1] >= 16)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def grouped_tile(
    pid, rows, cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr
):
    """(pid_r, pid_c) for program `pid` in grouped ordering (Triton matmul tutorial).

    GROUP consecutive row tiles sweep the column tiles together, so the column operand
    (a W panel) is reused from L2 by neighbouring programs.
    """
    num_r = tl.cdiv(rows, BLOCK_R)
    num_c = tl.cdiv(cols, BLOCK_C)
    per_group = GROUP * num_c
    first_r = (pid // per_group) * GROUP
    group_rows = min(num_r - first_r, GROUP)
    pid_r = first_r + (pid % per_group) % group_rows
    pid_c = (pid % per_group) // group_rows
    return pid_r, pid_c
