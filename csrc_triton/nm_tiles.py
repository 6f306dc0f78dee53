"""Device-side decoding of N:M packed weights: a packed tile becomes a dense tile in registers.

The packed format is the one of `spp_kernels.nm` (the single definition; this file only
reads it). For a weight W (rows, cols) where each group of M consecutive columns holds at
most N nonzeros, M in {4, 8}, M dividing cols:

    values (rows, cols // M * N)   group k's kept entries at columns [k*N, (k+1)*N),
                                   ascending position order, zero-padded
    meta   (rows, ceil((cols // M) / G)) int32, G = 32 // (N * B), B = log2(M)
           group k's code sits in word k // G at bit offset (k % G) * N * B;
           code = sum_j pos_j << (j * B), pos_j in [0, M) the column of entry j in its group

Dense entry W[o, c] with k = c // M, p = c % M equals values[o, k*N + j] for the j with
pos_j == p, and 0 when no j matches. The kept positions of a group are distinct, so at
most one j matches and the tile is selected, never summed: every value (and every zero)
comes out bit-exact. The meta word may have its top bit set (2:4 packs 8 four-bit codes
per word); the arithmetic right shift then fills with ones, which the code mask removes.

Nothing here ever writes a dense weight to memory: the tile lives in registers and is fed
straight to `tl.dot` by the fused SPP kernels (spp_forward.py, spp_backward.py), which read
the frozen weight only through `_tiles.frozen_weight_tile` (constexpr NM_N, NM_M).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nm_dense_tile(
    values_ptr,
    meta_ptr,
    rows,
    cols,
    mask,
    stride_values,
    stride_meta,
    N: tl.constexpr,
    M: tl.constexpr,
):
    """Dense tile W[rows, cols] of shape (len(rows), len(cols)) in the values' dtype.

    rows (BLOCK_R,) and cols (BLOCK_C,) are integer offsets into W (m, n); mask
    (BLOCK_R, BLOCK_C) marks the in-bounds entries (masked entries are 0). stride_values
    and stride_meta are the row strides of values and meta (both have unit column stride).
    Each entry reads one meta word and N candidate values; neighbouring entries share
    them, so the loads hit the same cache lines and global traffic is the packed bytes.
    """
    tl.static_assert(M == 4 or M == 8, "N:M tiles support M in {4, 8}")
    tl.static_assert(N >= 1 and N <= M, "N:M tiles need 1 <= N <= M")
    B: tl.constexpr = 2 + M // 8  # log2(M) for M in {4, 8}
    CODE_BITS: tl.constexpr = N * B
    GROUPS_PER_WORD: tl.constexpr = 32 // CODE_BITS
    rows64 = rows.to(tl.int64)
    group = cols // M
    pos = (cols % M)[None, :]
    shift = ((group % GROUPS_PER_WORD) * CODE_BITS)[None, :]
    word = tl.load(
        meta_ptr + rows64[:, None] * stride_meta + (group // GROUPS_PER_WORD)[None, :],
        mask=mask,
        other=0,
    )
    code = (word >> shift) & ((1 << CODE_BITS) - 1)
    value_row = values_ptr + rows64[:, None] * stride_values
    tile = tl.zeros(word.shape, dtype=values_ptr.dtype.element_ty)
    for j in tl.static_range(N):
        kept_pos = (code >> (j * B)) & (M - 1)
        value = tl.load(value_row + (group * N + j)[None, :], mask=mask, other=0.0)
        tile = tl.where(kept_pos == pos, value, tile)
    return tile
