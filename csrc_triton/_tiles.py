"""Tile-level @triton.jit helpers shared by the SPP kernels.

Each helper builds one small piece of the SPP math in registers, for a tile of rows
o (output features, of W (m, n)) and columns i (input features):

    frozen_weight_tile  W[o, i] from W itself or from its N:M packed values/meta
    group_offsets       o * r - g(o0) * m for the tile's rows: the position of each row in
                        "group space", from which g(o) = g(o0) + offset // m (no division
                        per K-step: the dX kernel walks rows and updates it incrementally)
    alpha_rows_tile     alpha[g(o), i]                            (selected, never Repeat-ed)
    effective_tile      W[o, i] * (1 + s[o] * alpha[g(o), i])     (s = scale * beta, merged weight)
    adapter_tile        W[o, i] * alpha[g(o), i] * c[o]           (scaled W')
    keep_tile           the dropout keep-mask of an X tile, read from its packed bits
    mma                 acc + a @ b with fp32 accumulation
    grouped_tile        program id -> (row tile, column tile) in grouped (L2-friendly) order

The kernels read the frozen weight only through `frozen_weight_tile`: a plain load for a
dense W, or (constexpr NM_GROUP > 0) `nm_tiles.nm_dense_tile`, which expands the tile from the
N:M packed values and metadata in registers, so a packed weight is never made dense.

Status (2026-12-01): exercised through every kernel under the Triton 3.6 interpreter
(tests/ops) and compiled for sm_90a and sm_80 (benchmarks/kernel_report.py); not yet run on
a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .nm_tiles import nm_dense_tile


@triton.jit
def frozen_weight_tile(
    w_ptr,
    meta_ptr,
    scale_ptr,
    rows,
    rows_ok,
    col0,
    n,
    stride_wm,
    stride_wn,
    stride_meta,
    stride_scale,
    BLOCK_C: tl.constexpr,
    N_KEEP: tl.constexpr,
    NM_GROUP: tl.constexpr,
    VALUES: tl.constexpr,
    SCALE_GROUP: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """W[rows, col0 : col0 + BLOCK_C] in the compute dtype OUT_DTYPE; 0 for invalid rows
    and columns >= n.

    NM_GROUP == 0: w_ptr is the dense W (m, n) and meta_ptr, scale_ptr are not read. NM_GROUP
    in {4, 8}: w_ptr is the packed values (m, n // NM_GROUP * N_KEEP, unit column stride;
    stride_wm its row stride) and meta_ptr the int32 metadata (row stride stride_meta) of
    spp_kernels.sparsity.nm's format; the tile is decoded bit-exactly in registers
    (nm_tiles.nm_dense_tile). VALUES > 0: w_ptr holds low-bit codes and scale_ptr their
    scales (nm_tiles' docstring), decoded in registers too.
    """
    if NM_GROUP == 0:
        cols = col0 + tl.arange(0, BLOCK_C)
        mask = rows_ok[:, None] & (cols < n)[None, :]
        w = tl.load(
            w_ptr + rows.to(tl.int64)[:, None] * stride_wm + cols[None, :] * stride_wn,
            mask=mask,
            other=0.0,
        )
    else:
        w = nm_dense_tile(w_ptr, meta_ptr, scale_ptr, rows, rows_ok, col0, n, stride_wm,
                          stride_meta, stride_scale, BLOCK_C, N_KEEP, NM_GROUP, VALUES,
                          SCALE_GROUP, OUT_DTYPE)  # fmt: skip
    return w


@triton.jit
def group_offsets(row0, lanes, r, m):
    """(g(row0), offsets) for the rows row0 + lanes: offsets[l] = (row0 + l) * r - g(row0) * m,
    so that g(row0 + l) = g(row0) + offsets[l] // m and offsets[l] in [0, (lanes + 1) * r + m).

    One int64 division per call; the kernels call it once per program (or update the pair
    incrementally, see `advance_groups`), never once per element.
    """
    start = row0.to(tl.int64) * r
    first = start // m
    rem = (start - first * m).to(tl.int32)
    return first, rem + lanes * r


@triton.jit
def advance_groups(first, rem, step_rem, step_groups, m):
    """(first, rem) of the next row block, `step` rows further: first + step_groups and
    rem + step_rem, renormalised so that 0 <= rem < m (step_groups = step * r // m and
    step_rem = step * r % m, computed once per program)."""
    rem = rem + step_rem
    carry = rem >= m
    return first + step_groups + carry.to(first.dtype), rem - tl.where(carry, m, 0)


@triton.jit
def alpha_rows_tile(
    alpha_ptr,
    first_group,
    offsets,
    m,
    rows_ok,
    cols,
    cols_ok,
    r,
    stride_ar,
    stride_an,
    NUM_GROUPS: tl.constexpr,
):
    """alpha[g(o), i] as float32 for a tile of consecutive rows with g(o) = first_group +
    offsets // m (see group_offsets) and columns i = `cols`: a (len(offsets), len(cols)) tile.

    The rows touch at most NUM_GROUPS groups (host bound: _launch.alpha_groups). When
    NUM_GROUPS > 0 those few alpha rows are loaded as vectors and each row selects its own by
    comparisons (offsets in [k*m, (k+1)*m)): load traffic NUM_GROUPS * len(cols), no
    division. NUM_GROUPS == 0 (r close to m) falls back to a 2-D gather. Either way
    Repeat(alpha) (m, n) is never formed.
    """
    if NUM_GROUPS > 0:
        col_ptrs = alpha_ptr + cols * stride_an
        tile = tl.zeros((offsets.shape[0], cols.shape[0]), dtype=tl.float32)
        for k in tl.static_range(NUM_GROUPS):
            row = tl.minimum(first_group + k, r - 1)
            alpha_k = tl.load(col_ptrs + row * stride_ar, mask=cols_ok, other=0.0)
            in_k = (offsets >= k * m) & (offsets < (k + 1) * m)
            tile = tl.where(in_k[:, None], alpha_k.to(tl.float32)[None, :], tile)
        return tile
    else:
        groups = first_group + (offsets // m).to(tl.int64)
        ptrs = alpha_ptr + groups[:, None] * stride_ar + cols[None, :] * stride_an
        return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def effective_tile(w, alpha_rows, row_scale):
    """W * (1 + row_scale[:, None] * alpha_rows) in W's dtype, computed in float32.

    row_scale = scale * beta (float32, per row). A zero of W stays zero for finite alpha
    and beta; unlike spp_kernels.ops.merge.merged_weight (whose output is a merged weight
    that must keep zeros bitwise) this tile only feeds a product, so the select that would
    guard non-finite factors is left out of the inner loop.
    """
    return (w.to(tl.float32) * (1.0 + row_scale[:, None] * alpha_rows)).to(w.dtype)


@triton.jit
def adapter_tile(w, alpha_rows, row_scale):
    """W * alpha[g(o), i] * row_scale[o] in W's dtype, computed in float32 (row_scale a
    per-row float32 vector: the scaled SPP adapter weight, registers only)."""
    return (w.to(tl.float32) * alpha_rows * row_scale[:, None]).to(w.dtype)


@triton.jit
def keep_tile(keep_ptr, tokens_idx, cols, stride_keep, mask):
    """Dropout keep-mask of the X elements (tokens_idx, cols), read from the packed bits
    (tokens, ceil(n / 8)) uint8: keep[t, i] = bit i % 8 of byte (t, i // 8); False where
    `mask` is False. Neighbouring columns share a byte, so the loads hit one cache line."""
    byte = tl.load(
        keep_ptr + tokens_idx.to(tl.int64)[:, None] * stride_keep + (cols // 8)[None, :],
        mask=mask,
        other=0,
    )
    return ((byte >> (cols % 8).to(tl.uint8)[None, :]) & 1) != 0


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
