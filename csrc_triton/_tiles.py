"""Tile-level @triton.jit helpers shared by the SPP forward and backward kernels.

Each helper builds one small piece of the SPP math in registers, for a tile of rows
o (output features, of W (m, n)) and columns i (input features):

    weight_tile         W[o, i]                                   (the only read of W)
    alpha_rows_tile     alpha[g(o), i],  g(o) = (o * r) // m      (gathered, never Repeat-ed)
    effective_tile      W[o, i] * (1 + s[o] * alpha[g(o), i])     (s = scale * beta, merged weight)
    keep_tile           tl.rand(seed, t * n + i) >= p             (dropout mask, never stored)
    mma                 acc + a @ b with fp32 accumulation

`weight_tile` is the single place a kernel reads the frozen weight, so a variant that reads
N:M-packed weights (csrc_triton/nm_tiles.py) swaps in there behind a constexpr flag.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def weight_tile(w_ptr, rows, cols, mask, stride_wm, stride_wn):
    """W[rows, cols] (len(rows), len(cols)) in W's dtype; 0 where `mask` is False."""
    rows64 = rows.to(tl.int64)
    return tl.load(
        w_ptr + rows64[:, None] * stride_wm + cols[None, :] * stride_wn, mask=mask, other=0.0
    )


@triton.jit
def row_groups(rows, r, m):
    """g(o) = floor(o * r / m) for the row indices `rows`, in int64 (o * r may exceed 2**31)."""
    return (rows.to(tl.int64) * r) // m


@triton.jit
def alpha_rows_tile(alpha_ptr, groups, cols, mask, stride_ar, stride_an):
    """alpha[groups, cols] as float32, a (len(groups), len(cols)) gather from alpha (r, n).

    Neighbouring rows share a group, so the gather reads the same few alpha rows from
    L1/L2; Repeat(alpha) (m, n) is never formed.
    """
    ptrs = alpha_ptr + groups[:, None] * stride_ar + cols[None, :] * stride_an
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def effective_tile(w, alpha_rows, row_scale):
    """W * (1 + row_scale[:, None] * alpha_rows) in W's dtype, computed in float32.

    row_scale = scale * beta (float32, per row). Zeros of W stay zeros bitwise (even if
    the factor is not finite), like spp_kernels.torch_backend.effective_weight.
    """
    w32 = w.to(tl.float32)
    merged = w32 * (1.0 + row_scale[:, None] * alpha_rows)
    return tl.where(w32 == 0.0, w32, merged).to(w.dtype)


@triton.jit
def alpha_scaled_tile(w, alpha_rows):
    """W * alpha[g(o), i] in W's dtype (the adapter weight without beta), computed in float32."""
    return (w.to(tl.float32) * alpha_rows).to(w.dtype)


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
