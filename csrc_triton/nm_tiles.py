"""Device-side decoding of N:M packed weights: a packed tile becomes a dense tile in registers.

The packed format is the one of `spp_kernels.sparsity.nm` (the single definition; this
file only reads it). For a weight W (rows, cols) where each group of M consecutive columns
holds at most N nonzeros, M in {4, 8}, M dividing cols:

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

Two decoders, chosen by the constexpr N:
* N in {1, 2, 4} (2:4, 1:4, 2:8, 4:8, 1:8): the values of a tile are one contiguous
  (rows, BLOCK_C // M * N) load per row (vectorised, coalesced) and each group's meta word
  one load per group; the N kept values are split apart and placed in registers.
* other N (3:8, ...; a tile width of 3 is not a Triton shape): per element, one meta word
  and N candidate values (neighbouring entries share cache lines).

Nothing here ever writes a dense weight to memory: the tile lives in registers and is fed
straight to `tl.dot` by the fused SPP kernels, which read the frozen weight only through
`_tiles.frozen_weight_tile` (constexpr N_KEEP, NM_GROUP).

Low-bit values (constexpr VALUES, spp_kernels.sparsity.lowbit's format): the values may
be codes instead of the weight's own numbers, decoded in registers after the selection
(pruned positions and padding read as code 0, which decodes to +0.0):

    VALUES 0  float values, the weight's dtype (no scale)
           1  int8 codes (m, K), scale float32 per row
           2  float8_e4m3fn bit patterns as uint8 (m, K), scale float32 per row
           3  int4 codes, two per byte (even index low nibble), scale bfloat16 per group of
              SCALE_GROUP consecutive kept values (m, K // SCALE_GROUP)

W = float32(code) * float32(scale), rounded once to OUT_DTYPE: the host decoder's formula,
so both give the same bits. fp8 decodes without fp8 hardware (sm_80 has none, nor the
interpreter): e4m3's bits shifted into a float16's are the value times 2**-8, exactly, for
normal and subnormal codes alike (NaN codes are never written by the quantizer).

Status (2026-12-01): both decoders tested under the Triton 3.6 interpreter against
`spp_kernels.sparsity.nm` (tests/ops/test_nm_kernels.py); compiled for sm_90a and sm_80
inside the packed kernel variants (benchmarks/kernel_report.py); not yet run on a GPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _split_values(vals, rows: tl.constexpr, groups: tl.constexpr, N: tl.constexpr, j: tl.constexpr):
    """Column j of every group from a (rows, groups * N) values tile: (rows, groups)."""
    if N == 1:
        return vals
    elif N == 2:
        a, b = tl.split(tl.reshape(vals, (rows, groups, 2)))
        if j == 0:
            return a
        else:
            return b
    else:
        tl.static_assert(N == 4, "vectorised N:M decode supports N in {1, 2, 4}")
        # Value j sits at [..., j // 2, j % 2]: tl.split takes the last axis first.
        even, odd = tl.split(tl.reshape(vals, (rows, groups, 2, 2)))
        a, b = tl.split(even if j % 2 == 0 else odd)
        if j // 2 == 0:
            return a
        else:
            return b


@triton.jit
def _load_values(values_ptr, row_offsets, value_cols, mask, VALUES: tl.constexpr):
    """Kept entries at packed columns `value_cols`, as stored: the values themselves
    (VALUES 0) or their raw codes (1 int8, 2 fp8 e4m3 bits as uint8, 3 an int4 pair's
    nibble, sign-extended to int8). 0 where `mask` is False."""
    # one return statement: the compiler requires one return type across all of them
    if VALUES == 3:
        byte = tl.load(values_ptr + row_offsets + value_cols // 2, mask=mask, other=0)
        nibble = (byte.to(tl.int32) >> ((value_cols % 2) * 4)) & 0xF
        entries = (nibble - ((nibble & 8) << 1)).to(tl.int8)
    else:
        entries = tl.load(values_ptr + row_offsets + value_cols, mask=mask, other=0)
    return entries


@triton.jit
def _code_values(codes, VALUES: tl.constexpr):
    """float32 values of raw codes (without their scale): int8 and int4 as integers; fp8
    e4m3 bits shifted into a float16's bits give the value times 2**-8, exactly."""
    if VALUES == 2:
        bits = codes.to(tl.int32)
        half = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.int16)
        values = half.to(tl.float16, bitcast=True).to(tl.float32) * 256.0
    else:
        values = codes.to(tl.float32)
    return values


@triton.jit
def nm_dense_tile(
    values_ptr,
    meta_ptr,
    scale_ptr,
    rows,
    rows_ok,
    col0,
    n,
    stride_values,
    stride_meta,
    stride_scale,
    BLOCK_C: tl.constexpr,
    N: tl.constexpr,
    M: tl.constexpr,
    VALUES: tl.constexpr,
    SCALE_GROUP: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """Dense tile W[rows, col0 : col0 + BLOCK_C] (len(rows), BLOCK_C): in the values' dtype
    (VALUES 0), else decoded from low-bit codes to OUT_DTYPE (module docstring).

    rows (BLOCK_R,) are row offsets into W (m, n) with rows_ok marking the valid ones; col0
    is a multiple of BLOCK_C (every kernel tile starts at a multiple of its width); columns
    at or past n read as 0, as do invalid rows. stride_values, stride_meta and stride_scale
    are the row strides of values (or codes), meta and scales (all unit column stride).
    """
    tl.static_assert(M == 4 or M == 8, "N:M tiles support M in {4, 8}")
    tl.static_assert(N >= 1 and N <= M, "N:M tiles need 1 <= N <= M")
    B: tl.constexpr = 2 + M // 8  # log2(M) for M in {4, 8}
    CODE_BITS: tl.constexpr = N * B
    GROUPS_PER_WORD: tl.constexpr = 32 // CODE_BITS
    BLOCK_R: tl.constexpr = rows.shape[0]
    rows64 = rows.to(tl.int64)
    if N == 1 or N == 2 or N == 4:
        GROUPS: tl.constexpr = BLOCK_C // M
        tl.static_assert(GROUPS * M == BLOCK_C, "tile width must be a multiple of M")
        group = col0 // M + tl.arange(0, GROUPS)
        group_ok = rows_ok[:, None] & (group * M < n)[None, :]
        # 2:4-style int4 (N == 2): a group's two kept codes are exactly one byte
        PAIRED: tl.constexpr = VALUES == 3 and N == 2
        if PAIRED:
            vals = tl.load(
                values_ptr + rows64[:, None] * stride_values + group[None, :],
                mask=group_ok,
                other=0,
            ).to(tl.int32)
        else:
            value_cols = col0 // M * N + tl.arange(0, GROUPS * N)
            value_ok = rows_ok[:, None] & (value_cols < n // M * N)[None, :]
            vals = _load_values(
                values_ptr, rows64[:, None] * stride_values, value_cols[None, :], value_ok, VALUES
            )
        word = tl.load(
            meta_ptr + rows64[:, None] * stride_meta + (group // GROUPS_PER_WORD)[None, :],
            mask=group_ok,
            other=0,
        )
        shift = ((group % GROUPS_PER_WORD) * CODE_BITS)[None, :]
        code = (word >> shift) & ((1 << CODE_BITS) - 1)
        positions = tl.arange(0, M)[None, None, :]
        tile = tl.zeros((BLOCK_R, GROUPS, M), dtype=tl.int8 if VALUES == 3 else vals.dtype)
        for j in tl.static_range(N):
            kept_pos = (code >> (j * B)) & (M - 1)
            if PAIRED:
                nibble = (vals >> (4 * j)) & 0xF
                value = (nibble - ((nibble & 8) << 1)).to(tl.int8)
            else:
                value = _split_values(vals, BLOCK_R, GROUPS, N, j)
            tile = tl.where(kept_pos[:, :, None] == positions, value[:, :, None], tile)
        if VALUES != 0:
            values = _code_values(tile, VALUES)
            if VALUES != 3 or SCALE_GROUP % (GROUPS * N) == 0:
                # one scale per row: int8 / fp8, or an int4 tile inside one scale group
                first = 0 if VALUES != 3 else col0 // M * N // SCALE_GROUP
                scale = tl.load(scale_ptr + rows64 * stride_scale + first, mask=rows_ok, other=0.0)
                values = values * scale.to(tl.float32)[:, None, None]
            else:
                scale = tl.load(
                    scale_ptr
                    + rows64[:, None] * stride_scale
                    + (group * N // SCALE_GROUP)[None, :],
                    mask=group_ok,
                    other=0.0,
                )
                values = values * scale.to(tl.float32)[:, :, None]
            tile = values.to(OUT_DTYPE)
        return tl.reshape(tile, (BLOCK_R, BLOCK_C))
    else:
        cols = col0 + tl.arange(0, BLOCK_C)
        mask = rows_ok[:, None] & (cols < n)[None, :]
        group = cols // M
        pos = (cols % M)[None, :]
        shift = ((group % GROUPS_PER_WORD) * CODE_BITS)[None, :]
        word = tl.load(
            meta_ptr + rows64[:, None] * stride_meta + (group // GROUPS_PER_WORD)[None, :],
            mask=mask,
            other=0,
        )
        code = (word >> shift) & ((1 << CODE_BITS) - 1)
        row_offsets = rows64[:, None] * stride_values
        tile = tl.zeros(word.shape, dtype=values_ptr.dtype.element_ty if VALUES != 3 else tl.int8)
        for j in tl.static_range(N):
            kept_pos = (code >> (j * B)) & (M - 1)
            value = _load_values(values_ptr, row_offsets, (group * N + j)[None, :], mask, VALUES)
            tile = tl.where(kept_pos == pos, value, tile)
        if VALUES == 3:
            scale = tl.load(
                scale_ptr + rows64[:, None] * stride_scale + (group * N // SCALE_GROUP)[None, :],
                mask=mask,
                other=0.0,
            )
            tile = (_code_values(tile, VALUES) * scale.to(tl.float32)).to(OUT_DTYPE)
        elif VALUES != 0:
            scale = tl.load(scale_ptr + rows64 * stride_scale, mask=rows_ok, other=0.0)
            tile = (_code_values(tile, VALUES) * scale[:, None]).to(OUT_DTYPE)
        return tile
