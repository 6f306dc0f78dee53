"""The dropout keep-mask: drawn once per forward, stored as bits, the same bits everywhere.

Oracles: pack/unpack against plain boolean masks; the CUDA Philox kernel (run here under the
Triton interpreter) against `philox_keep_bits`, the PyTorch integer re-implementation of
Triton's Philox, bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch

from spp_kernels import dropout_mask, spp_linear
from spp_kernels.ops.dropout import (
    bits_width,
    check_keep_bits,
    draw_keep_bits,
    pack_keep_mask,
    philox_keep_bits,
    unpack_keep_mask,
)
from tests.helpers import DEVICE, HAS_CUDA

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.filterwarnings(
    "ignore:Conversion of an array with ndim:DeprecationWarning"
)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 37, 64])
def test_pack_and_unpack_are_inverse_with_zero_padding(n):
    keep = torch.rand(13, n) > 0.5
    bits = pack_keep_mask(keep)
    assert bits.dtype == torch.uint8 and bits.shape == (13, bits_width(n))
    assert torch.equal(unpack_keep_mask(bits, n), keep)
    # bit i % 8 of byte i // 8, little-endian within the byte; padding bits are 0
    i = n - 1
    assert torch.equal((bits[:, i // 8] >> (i % 8)) & 1, keep[:, i].to(torch.uint8))
    if n % 8:
        assert int((bits[:, -1] >> (n % 8)).max()) == 0


def test_every_byte_and_every_layout_packs_by_the_per_bit_definition():
    """The packing (eight bools read as one word, bits gathered by one multiplication,
    issue 24 part 2) against bit i % 8 of byte i // 8: all 256 bytes, a real CPU draw
    repacked, and bool masks whose storage offset or row stride is not a multiple of 8."""

    def per_bit(keep):
        lanes = keep.contiguous().view(keep.shape[0], -1, 8).to(torch.uint8)
        return (lanes << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)

    lanes = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool()
    assert torch.equal(pack_keep_mask(lanes), torch.arange(256).to(torch.uint8)[:, None])
    bits = draw_keep_bits(300, 203, 0.05, 42, "cpu")
    keep = torch.nn.functional.pad(unpack_keep_mask(bits, 203), (0, 5))
    assert torch.equal(per_bit(keep), bits)
    big = torch.rand(4 * 40 + 4) > 0.5
    offset = big[4:].view(4, 40)  # storage offset 4
    strided = (torch.rand(1, 100) > 0.5)[:, :16]  # row stride 100
    for mask in (offset, strided):
        assert torch.equal(pack_keep_mask(mask), per_bit(mask))
    assert pack_keep_mask(torch.ones(3, 0, dtype=torch.bool)).shape == (3, 0)


def test_cpu_draws_are_deterministic_per_seed_and_have_the_right_rate():
    a = draw_keep_bits(300, 203, 0.25, 42, "cpu")
    assert torch.equal(a, draw_keep_bits(300, 203, 0.25, 42, "cpu"))
    assert not torch.equal(a, draw_keep_bits(300, 203, 0.25, 43, "cpu"))
    keep = unpack_keep_mask(a, 203)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert torch.equal(dropout_mask((300, 203), 0.25, 42, "cpu"), keep)
    assert int((a[:, -1] >> 3).max()) == 0  # 203 = 25 * 8 + 3: padding bits stay 0


def test_no_dropout_keeps_everything():
    assert bool(unpack_keep_mask(draw_keep_bits(5, 13, 0.0, 1, "cpu"), 13).all())
    assert int((draw_keep_bits(5, 13, 0.0, 1, "cpu")[:, -1] >> 5).max()) == 0


@pytest.mark.skipif(not (HAS_CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("tokens,n", [(1, 1), (19, 37), (70, 130)])
@pytest.mark.parametrize("seed", [0, 12345, 2**40 + 7, -3])
def test_philox_kernel_matches_its_pytorch_oracle_bitwise(tokens, n, seed):
    from csrc_triton.dropout_bits import draw_keep_bits as kernel_draw

    p = 0.3
    got = kernel_draw(tokens, n, p, seed, DEVICE).cpu()
    ref = philox_keep_bits(tokens, n, p, seed & ((1 << 63) - 1))
    assert torch.equal(got, ref)


@pytest.mark.cuda
def test_cuda_masks_come_from_the_philox_kernel():
    bits = draw_keep_bits(40, 77, 0.1, 9, "cuda")
    assert torch.equal(bits.cpu(), philox_keep_bits(40, 77, 0.1, 9))


@pytest.mark.skipif(not (HAS_CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_kernels_apply_the_mask(dtype):
    from csrc_triton.dropout_bits import apply_keep_bits, masked_add_

    tokens, n = 21, 45
    bits = draw_keep_bits(tokens, n, 0.4, 5, DEVICE)
    keep = unpack_keep_mask(bits, n)
    x = torch.randn(tokens, 2 * n, device=DEVICE, dtype=dtype)[:, ::2]  # strided input
    assert torch.equal(apply_keep_bits(x, bits), torch.where(keep, x, 0.0).to(dtype))
    out = torch.randn(tokens, n, device=DEVICE, dtype=dtype)
    a = torch.randn(tokens, n, device=DEVICE, dtype=dtype)
    expected = out.float() + torch.where(keep, a.float(), 0.0)
    got = masked_add_(out, a, bits)
    assert got is out and got.dtype == dtype
    # One rounding to out's dtype (the interpreter's float32 -> bf16 conversion truncates).
    tol = 0.0 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got.float(), expected, rtol=tol, atol=tol)


def test_bad_bits_are_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        check_keep_bits(torch.zeros(4, 3, dtype=torch.uint8), 4, 13)
    with pytest.raises(ValueError, match="uint8"):
        check_keep_bits(torch.zeros(4, 2, dtype=torch.int32), 4, 13)
    x = torch.randn(4, 13)
    w, alpha, beta = torch.randn(6, 13), torch.randn(2, 13), torch.randn(6)
    with pytest.raises(ValueError, match="keep_mask must have x's shape"):
        spp_linear(x, w, alpha, beta, dropout_p=0.1, keep_mask=torch.ones(4, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="keep bits"):
        spp_linear(x, w, alpha, beta, dropout_p=0.1, keep_mask=torch.zeros(4, 1, dtype=torch.uint8))


def test_one_draw_per_forward_and_the_backward_reads_it():
    """The forward draws the mask once (a seed gives the same Y twice); backward uses the
    saved bits: gradients equal those with the mask given explicitly."""
    torch.manual_seed(0)
    x = torch.randn(9, 16, requires_grad=True)
    w, beta = torch.randn(8, 16), torch.randn(8, requires_grad=True)
    alpha = torch.randn(2, 16, requires_grad=True)
    y = spp_linear(x, w, alpha, beta, dropout_p=0.5, seed=77, backend="torch")
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, alpha, beta)]
    for t in (x, alpha, beta):
        t.grad = None
    bits = draw_keep_bits(9, 16, 0.5, 77, "cpu")
    y2 = spp_linear(x, w, alpha, beta, dropout_p=0.5, keep_mask=bits, backend="torch")
    y2.sum().backward()
    assert torch.equal(y, y2)
    assert all(torch.equal(g, t.grad) for g, t in zip(grads, (x, alpha, beta)))
