"""Dropout keep-masks as bits: drawn once per forward call, applied from the bits.

Layout (spp_kernels.ops.dropout defines it for the whole package): bits (T, nb) uint8,
nb = ceil(n / 8); keep[t, i] = bit i % 8 of byte (t, i // 8); padding bits are 0.

* `draw_keep_bits`: one Philox-4x32-10 evaluation per 4 elements. Byte (t, j) takes its
  bits 4h .. 4h + 3 from the four uniforms of tl.rand4x(seed, 2 * (t * nb + j) + h),
  h = 0, 1; bit = uniform >= p. spp_kernels.ops.dropout.philox_keep_bits is its oracle.
* `apply_keep_bits`: out = x * keep (the kept input, 1/(1-p) folded elsewhere), the
  transient Dropout(X) operand of the chunked cuBLAS forward.
* `masked_add_`: out += keep * a, the dropout epilogue of the chunked cuBLAS dX.

Status (2026-12-01): tested under the Triton 3.6 interpreter on CPU against the PyTorch
oracle (tests/ops/test_dropout.py); compiled for sm_90a (benchmarks/kernel_report.py);
not yet run on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import INTERPRET

BLOCK_T = 16 if INTERPRET else 32
BLOCK_BYTES = 16 if INTERPRET else 64


@triton.jit
def _draw_keep_bits_kernel(
    # pointers: the packed mask (tokens, nb)
    bits_ptr,
    # sizes
    tokens,
    n,
    nb,
    # scalars: Philox seed, dropout rate
    seed,
    p,
    # meta-parameters: tile of (tokens, bytes)
    BLOCK_T: tl.constexpr,
    BLOCK_BYTES: tl.constexpr,
):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    js = tl.program_id(1) * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)
    ok = (ts < tokens)[:, None] & (js < nb)[None, :]
    counter = 2 * (ts.to(tl.int64)[:, None] * nb + js[None, :])
    byte = tl.zeros((BLOCK_T, BLOCK_BYTES), dtype=tl.int32)
    for h in tl.static_range(2):
        u0, u1, u2, u3 = tl.rand4x(seed, counter + h)
        col = js[None, :] * 8 + 4 * h
        byte |= ((u0 >= p) & (col < n)).to(tl.int32) << (4 * h)
        byte |= ((u1 >= p) & (col + 1 < n)).to(tl.int32) << (4 * h + 1)
        byte |= ((u2 >= p) & (col + 2 < n)).to(tl.int32) << (4 * h + 2)
        byte |= ((u3 >= p) & (col + 3 < n)).to(tl.int32) << (4 * h + 3)
    tl.store(bits_ptr + ts.to(tl.int64)[:, None] * nb + js[None, :], byte.to(tl.uint8), mask=ok)


def draw_keep_bits(
    tokens: int, n: int, p: float, seed: int, device: torch.device | str
) -> torch.Tensor:
    """Packed keep-mask (tokens, ceil(n/8)) uint8 for rate p drawn with Philox from `seed`."""
    nb = (n + 7) // 8
    bits = torch.empty((tokens, nb), dtype=torch.uint8, device=device)
    if tokens == 0 or nb == 0:
        return bits
    grid = (triton.cdiv(tokens, BLOCK_T), triton.cdiv(nb, BLOCK_BYTES))
    _draw_keep_bits_kernel[grid](
        bits_ptr=bits,
        tokens=tokens,
        n=n,
        nb=nb,
        seed=int(seed) & ((1 << 63) - 1),
        p=float(p),
        BLOCK_T=BLOCK_T,
        BLOCK_BYTES=BLOCK_BYTES,
    )
    return bits


@triton.jit
def _keep_bits_elementwise_kernel(
    # pointers: x (tokens, n), a (tokens, n) or unused, bits (tokens, nb), out (tokens, n)
    x_ptr,
    a_ptr,
    bits_ptr,
    out_ptr,
    # sizes
    tokens,
    n,
    # strides (elements)
    stride_xt,
    stride_xn,
    stride_at,
    stride_an,
    stride_bits,
    stride_ot,
    stride_on,
    # meta-parameters: ADD (out = x + keep*a) or not (out = keep*x); tile
    ADD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (ts < tokens)[:, None] & (cols < n)[None, :]
    ts64 = ts.to(tl.int64)[:, None]
    byte = tl.load(bits_ptr + ts64 * stride_bits + (cols // 8)[None, :], mask=ok, other=0)
    keep = ((byte >> (cols % 8).to(tl.uint8)[None, :]) & 1) != 0
    x = tl.load(x_ptr + ts64 * stride_xt + cols[None, :] * stride_xn, mask=ok, other=0.0)
    if ADD:
        a = tl.load(a_ptr + ts64 * stride_at + cols[None, :] * stride_an, mask=ok, other=0.0)
        out = x.to(tl.float32) + tl.where(keep, a.to(tl.float32), 0.0)
    else:
        out = tl.where(keep, x, 0.0)
    tl.store(
        out_ptr + ts64 * stride_ot + cols[None, :] * stride_on,
        out.to(out_ptr.dtype.element_ty),
        mask=ok,
    )


def _elementwise(x, a, bits, out, add: bool) -> torch.Tensor:
    tokens, n = x.shape
    if tokens == 0 or n == 0:
        return out
    block_t, block_n = (16, 16) if INTERPRET else (32, 128)
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(n, block_n))
    a_arg = a if a is not None else x
    _keep_bits_elementwise_kernel[grid](
        x_ptr=x,
        a_ptr=a_arg,
        bits_ptr=bits,
        out_ptr=out,
        tokens=tokens,
        n=n,
        stride_xt=x.stride(0),
        stride_xn=x.stride(1),
        stride_at=a_arg.stride(0),
        stride_an=a_arg.stride(1),
        stride_bits=bits.stride(0),
        stride_ot=out.stride(0),
        stride_on=out.stride(1),
        ADD=add,
        BLOCK_T=block_t,
        BLOCK_N=block_n,
    )
    return out


def apply_keep_bits(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """keep * x (tokens, n) in x's dtype, a new tensor (x may have any strides)."""
    return _elementwise(
        x, None, bits, torch.empty_like(x, memory_format=torch.contiguous_format), False
    )


def masked_add_(out: torch.Tensor, a: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """out += keep * a in place (float32 arithmetic, one rounding to out's dtype)."""
    return _elementwise(out, a, bits, out, True)
