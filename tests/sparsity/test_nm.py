"""N:M pattern checks and the packed (values, meta) format of spp_kernels.nm."""

from __future__ import annotations

import math

import pytest
import torch

from spp_kernels.sparsity.nm import (
    check_nm,
    is_nm,
    nm_compress,
    nm_decompress,
    nm_group_counts,
    nm_meta_shape,
    nm_packed_nbytes,
    nm_pattern,
)

PATTERNS = [(2, 4), (4, 8), (2, 8), (1, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def random_nm(
    rows: int, cols: int, n: int, m: int, dtype=torch.float32, device="cpu", signed_zeros=False
):
    """A random weight with a random count in [0, n] of kept entries at random positions per
    group; with signed_zeros about a quarter of the kept entries are -0.0 (so every group has
    at most n entries of nonzero bit pattern and the round trip must be bit-exact)."""
    groups = cols // m
    keep_count = torch.randint(0, n + 1, (rows, groups, 1), device=device)
    rank = torch.rand(rows, groups, m, device=device).argsort(dim=-1).argsort(dim=-1)
    mask = (rank < keep_count).reshape(rows, cols)
    dense = torch.randn(rows, cols, device=device).to(dtype)
    # A nonzero draw everywhere, so the mask alone decides the pattern.
    dense = torch.where(dense == 0, torch.ones_like(dense), dense)
    if signed_zeros:
        neg_zero = torch.full_like(dense, -0.0)
        dense = torch.where(torch.rand(rows, cols, device=device) < 0.25, neg_zero, dense)
    # torch.where, not dense * mask: a product leaves -0.0 at cut negative entries.
    return torch.where(mask, dense, torch.zeros_like(dense))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_VIEW[t.dtype])


def reference_compress(weight: torch.Tensor, n: int, m: int):
    """Loop-per-group oracle of the documented format (slow; small inputs only)."""
    rows, cols = weight.shape
    b, g = int(math.log2(m)), 32 // (n * int(math.log2(m)))
    k_groups = cols // m
    values = torch.zeros(rows, k_groups * n, dtype=weight.dtype)
    words = [[0] * (-(-k_groups // g)) for _ in range(rows)]
    wb = bits(weight)
    for r in range(rows):
        for k in range(k_groups):
            grp = weight[r, k * m : (k + 1) * m]
            nz = [j for j in range(m) if grp[j] != 0]
            signed_zero = [j for j in range(m) if grp[j] == 0 and wb[r, k * m + j] != 0]
            rest = [j for j in range(m) if j not in nz and j not in signed_zero]
            pos = sorted((nz + signed_zero + rest)[:n])
            values[r, k * n : (k + 1) * n] = grp[pos]
            code = sum(p << (j * b) for j, p in enumerate(pos))
            words[r][k // g] |= code << ((k % g) * n * b)
    meta = torch.tensor(
        [[w - 2**32 if w >= 2**31 else w for w in row] for row in words], dtype=torch.int64
    ).to(torch.int32)
    return values, meta


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "m"), PATTERNS, ids=lambda v: str(v))
def test_round_trip_bit_exact(n, m, dtype):
    rows, cols = 37, m * 13  # ragged: 13 groups, not a multiple of any G
    w = random_nm(rows, cols, n, m, dtype, signed_zeros=True)
    assert bool((bits(w) == bits(torch.tensor(-0.0, dtype=dtype))).any())
    values, meta = nm_compress(w, n, m)
    assert values.shape == (rows, cols // m * n) and values.dtype == dtype
    assert meta.dtype == torch.int32 and tuple(meta.shape) == nm_meta_shape(rows, cols, n, m)
    back = nm_decompress(values, meta, n, m, cols)
    assert back.dtype == dtype and back.shape == w.shape
    assert torch.equal(bits(back), bits(w))


@pytest.mark.parametrize(("n", "m"), PATTERNS, ids=lambda v: str(v))
def test_matches_loop_reference(n, m):
    w = random_nm(5, m * 11, n, m, torch.float16)
    w[0, 1] = -0.0  # a signed zero in a group that may have room for it
    values, meta = nm_compress(w, n, m)
    ref_values, ref_meta = reference_compress(w, n, m)
    assert torch.equal(bits(values), bits(ref_values))
    assert torch.equal(meta, ref_meta)


def test_top_bit_of_meta_word_can_be_set():
    # 2:4, 8 groups per word: the last group at bit 28 with positions (2, 3) -> code 0b1110.
    w = torch.zeros(1, 32)
    w[0, 30:32] = 1.0
    _, meta = nm_compress(w, 2, 4)
    assert int(meta[0, 0]) < 0
    assert (int(meta[0, 0]) & 0xFFFFFFFF) >> 28 == 0b1110


def test_known_layout_2to4():
    w = torch.tensor([[0.0, 5.0, 0.0, 7.0, 1.0, 0.0, 0.0, 2.0]])
    values, meta = nm_compress(w, 2, 4)
    assert values.tolist() == [[5.0, 7.0, 1.0, 2.0]]
    # group 0: positions (1, 3) -> 1 | 3 << 2 = 13; group 1: (0, 3) -> 0 | 3 << 2 = 12 at bit 4
    assert int(meta[0, 0]) == 13 | (12 << 4)


def test_few_nonzeros_pad_at_lowest_unused_positions():
    w = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    values, meta = nm_compress(w, 2, 4)
    # group 0 keeps position 2 and pads with position 0; group 1 is all padding (0, 1)
    assert values.tolist() == [[0.0, 3.0, 0.0, 0.0]]
    assert int(meta[0, 0]) == (0 | 2 << 2) | ((0 | 1 << 2) << 4)


def test_signed_zeros_and_special_values_preserved_bitwise():
    w = torch.zeros(4, 8, dtype=torch.float16)
    w[0, :2] = torch.tensor([-0.0, float("inf")])
    w[1, 4:6] = torch.tensor([float("-inf"), 6e-8])  # -inf and a subnormal
    w[2, 1] = -0.0
    w[2, 3] = -0.0
    w[3, 7] = float("nan")
    nan_payload = torch.tensor([0x7E01], dtype=torch.int16).view(torch.float16)
    w[3, 0] = nan_payload[0]
    values, meta = nm_compress(w, 2, 4)
    back = nm_decompress(values, meta, 2, 4, 8)
    assert torch.equal(bits(back), bits(w))


def test_surplus_signed_zeros_come_back_value_equal():
    # Three -0.0 and one nonzero in a 2:4 group: only one signed zero fits.
    w = torch.tensor([[-0.0, -0.0, 1.0, -0.0]])
    back = nm_decompress(*nm_compress(w, 2, 4), 2, 4, 4)
    assert torch.equal(back, w)  # values equal
    assert int((bits(back) != 0).sum()) == 2  # 1.0 and the first -0.0 kept bitwise
    assert bits(back)[0, 0] == bits(w)[0, 0]


def test_pruned_by_multiplication_with_negative_zeros_is_2to4():
    w = torch.randn(8, 16)
    mask = torch.zeros(8, 16)
    mask[:, 0::4] = 1
    mask[:, 2::4] = 1
    pruned = w * mask  # negative entries times 0 give -0.0
    assert bool((bits(pruned) == int(bits(torch.tensor(-0.0)))).any())
    assert is_nm(pruned, 2, 4)
    back = nm_decompress(*nm_compress(pruned, 2, 4), 2, 4, 16)
    # Two kept nonzeros per group leave no room for the -0.0s: value-exact, not bit-exact.
    assert torch.equal(back, pruned)
    assert torch.equal(bits(back)[pruned != 0], bits(pruned)[pruned != 0])


@pytest.mark.parametrize(
    ("n", "m", "dtype", "fraction"),
    [(2, 4, torch.float16, 0.5625), (2, 8, torch.float16, 0.30), (4, 8, torch.float16, 0.625)],
)
def test_byte_fraction(n, m, dtype, fraction):
    rows, cols = 4096, 4096
    dense_bytes = rows * cols * 2
    got = nm_packed_nbytes(rows, cols, n, m, dtype) / dense_bytes
    assert got == pytest.approx(fraction, abs=0.002)
    w = random_nm(64, 320, n, m, dtype)
    values, meta = nm_compress(w, n, m)
    measured = values.numel() * values.element_size() + meta.numel() * 4
    assert measured == nm_packed_nbytes(64, 320, n, m, dtype)


def test_violation_names_first_offending_row_and_group():
    w = random_nm(6, 16, 2, 4)
    w[3, 8:12] = torch.tensor([1.0, 1.0, 1.0, 0.0])  # row 3, group 2: three nonzeros
    w[5, 0:4] = 1.0
    with pytest.raises(
        ValueError, match=r"layers\.0\.q_proj: .*row 3, group 2 \(columns 8\.\.11\)"
    ):
        nm_compress(w, 2, 4, name="layers.0.q_proj")
    with pytest.raises(ValueError, match="2 offending groups"):
        check_nm(w, 2, 4)
    assert not is_nm(w, 2, 4)
    assert int(nm_group_counts(w, 4)[3, 2]) == 3


def test_nan_counts_as_nonzero():
    w = torch.tensor([[float("nan"), 1.0, 2.0, 0.0]])
    assert not is_nm(w, 2, 4)
    with pytest.raises(ValueError, match="row 0, group 0"):
        nm_compress(w, 2, 4)


def test_bad_arguments():
    w = torch.zeros(4, 10)
    with pytest.raises(ValueError, match="not a multiple of M=4"):
        nm_compress(w, 2, 4)
    assert not is_nm(w, 2, 4)
    with pytest.raises(ValueError, match="unsupported M=16"):
        nm_compress(torch.zeros(4, 16), 2, 16)
    with pytest.raises(ValueError, match="N must be"):
        nm_compress(torch.zeros(4, 16), 4, 4)
    with pytest.raises(ValueError, match="2-D"):
        nm_compress(torch.zeros(2, 4, 8), 2, 4)
    with pytest.raises(TypeError, match="unsupported dtype"):
        nm_compress(torch.zeros(4, 8, dtype=torch.int32), 2, 4)
    values, meta = nm_compress(torch.zeros(4, 8), 2, 4)
    with pytest.raises(ValueError, match="values must have shape"):
        nm_decompress(values, meta, 2, 4, 16)
    with pytest.raises(TypeError, match="int32"):
        nm_decompress(values, meta.to(torch.int64), 2, 4, 8)
    with pytest.raises(ValueError, match="cols must be"):
        nm_decompress(values, meta, 2, 4, 6)


def test_corrupt_meta_is_rejected():
    values, meta = nm_compress(torch.zeros(2, 8), 2, 4)
    with pytest.raises(ValueError, match="strictly ascending"):
        nm_decompress(values, torch.zeros_like(meta), 2, 4, 8)  # positions (0, 0)


def test_nm_pattern():
    w = torch.zeros(4, 16)
    w[:, 0::4] = 1.0
    w[:, 3::4] = 1.0
    assert nm_pattern(w) == (2, 4)  # 4:8 holds too, same density: the smaller M wins
    w = torch.zeros(4, 16)
    w[:, 0:4:2] = 1.0
    assert nm_pattern(w) == (2, 8)  # sparsest pattern: only 2 of the first 8 columns
    w = torch.zeros(4, 16)
    w[:, 0:4] = 1.0  # 4 in a group of 4, but 4:8 holds
    assert nm_pattern(w) == (4, 8)
    assert nm_pattern(torch.ones(4, 16)) is None
    assert nm_pattern(torch.ones(4, 6)) is None
    w = torch.zeros(4, 16)
    w[:, 0] = 1.0
    w[:, 9] = 1.0
    assert nm_pattern(w) == (1, 8)
    w[:, 5] = 1.0
    assert nm_pattern(w) == (1, 4)


@pytest.mark.cuda
@pytest.mark.parametrize(("n", "m"), PATTERNS, ids=lambda v: str(v))
def test_round_trip_cuda_matches_cpu(n, m):
    w = random_nm(64, m * 40, n, m, torch.bfloat16)
    values, meta = nm_compress(w.cuda(), n, m)
    cpu_values, cpu_meta = nm_compress(w, n, m)
    assert torch.equal(meta.cpu(), cpu_meta)
    assert torch.equal(bits(values.cpu()), bits(cpu_values))
    back = nm_decompress(values, meta, n, m, w.shape[1])
    assert torch.equal(bits(back.cpu()), bits(w))
