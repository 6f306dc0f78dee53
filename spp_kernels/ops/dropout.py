"""Counter-based dropout masks that the Triton kernels regenerate instead of storing.

Element (t, i) of the 2-D input X (tokens, n) is kept when u(seed, t * n + i) >= p, where
u is Triton's `tl.rand`: Philox-4x32 with 10 rounds, counter (offset_lo, offset_hi, 0, 0)
and key (seed_lo, seed_hi), first output mapped to [0, 1). This module reproduces it
bit-exactly in PyTorch integer arithmetic, so the torch backend, the references and the
tests build the very mask the kernels use, on any device.
Dropout(X) = X * keep / (1 - p).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
# Triton's uint_to_uniform_float scale for 32-bit draws: the largest s with (2**31-1)*s < 1.
_UNIFORM_SCALE = 4.6566127342e-10


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b for uint32 values held in int64.

    int64 multiplication wraps modulo 2**64, which keeps the low 64 bits exact; the
    masks turn the arithmetic shift into the logical one Philox needs.
    """
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in [0, 1) equal to `tl.rand(seed, offsets)` for int64 offsets."""
    offsets = offsets.to(torch.int64)
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    seed &= (1 << 64) - 1
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def dropout_mask(
    shape: tuple[int, int] | torch.Size,
    p: float,
    seed: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Keep-mask (bool, `shape` = (tokens, n)) that the kernels use for dropout rate p."""
    tokens, n = shape
    offsets = torch.arange(tokens * n, device=device, dtype=torch.int64).view(tokens, n)
    return philox_uniform(seed, offsets) >= p


def apply_dropout(x2d: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Dropout(X) = X * keep / (1 - p) with the kernels' mask; identity when p == 0."""
    if p == 0.0:
        return x2d
    keep = dropout_mask(x2d.shape, p, seed, x2d.device)
    return x2d * keep.to(x2d.dtype) * (1.0 / (1.0 - p))


def new_seed() -> torch.Tensor:
    """A fresh dropout seed from torch's default generator: a 0-d int64 CPU tensor.

    A tensor rather than an int so that torch.compile traces it as data instead of
    specialising the graph on its value.
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64)
