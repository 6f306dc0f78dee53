"""The adapter's dropout mask: drawn once per forward call, kept as bits, read by backward.

Dropout(X) = X * keep / (1 - p) for the 2-D input X (tokens, n). The keep-mask is drawn once
per forward call and stored bit-packed, 1 bit per element of X:

    bits (tokens, ceil(n / 8)) uint8,   keep[t, i] = (bits[t, i // 8] >> (i % 8)) & 1

(T * n / 8 bytes: 16x less than the bf16 copy of Dropout(X) that LoRA implementations
keep for backward). The forward saves the bits for backward; every kernel and the torch
backend read bits, nothing regenerates random numbers. Padding bits (i >= n) are 0.

Who draws (`draw_keep_bits`), one rule per device, so that the same seed on the same device
gives the same mask bit for bit whatever the backend:
  CUDA: a Triton kernel (csrc_triton/dropout_bits.py), Philox-4x32-10 keyed by the seed:
        byte (t, j) takes bits 4h..4h+3 from `tl.rand4x(seed, 2 * (t * nb + j) + h)`,
        h = 0, 1, nb = ceil(n / 8); one Philox evaluation per 4 elements.
        (torch's CUDA generator when Triton is missing.)
  CPU:  torch's own generator seeded with the seed draws one uniform 16-bit integer u per
        element (int16 lanes of `torch.randint` int64 draws, row-major): keep = u >= q with
        q = round(p * 2**16). The keep rate is then 1 - q / 2**16, within 2**-17 of 1 - p
        (the scale stays 1 / (1 - p)); a float draw per element would cost 2x the time.
`philox_uniform4` reproduces the CUDA kernel's uniforms in PyTorch integer arithmetic: the
test oracle of that kernel, never used on a hot path.
"""

from __future__ import annotations

import functools
import sys

import torch

from .backends import triton_available

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
# Triton's uint_to_uniform_float scale for 32-bit draws: the largest s with (2**31-1)*s < 1.
_UNIFORM_SCALE = 4.6566127342e-10


def bits_width(n: int) -> int:
    """Bytes per row of the packed mask for rows of n elements: ceil(n / 8)."""
    return (int(n) + 7) // 8


def pack_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """bool (tokens, n) -> packed uint8 (tokens, ceil(n / 8)), bit i % 8 of byte i // 8."""
    if keep.dtype != torch.bool or keep.dim() != 2:
        raise ValueError(
            f"pack_keep_mask: expected a 2-D bool mask, got {keep.dtype} {tuple(keep.shape)}"
        )
    tokens, n = keep.shape
    nb = bits_width(n)
    if n != 8 * nb:
        keep = torch.nn.functional.pad(keep, (0, 8 * nb - n))
    return _pack_rows(keep.contiguous())


def unpack_keep_mask(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Packed uint8 (tokens, ceil(n / 8)) -> bool (tokens, n)."""
    return keep_values(bits, n, torch.bool)


def check_keep_bits(bits: torch.Tensor, tokens: int, n: int) -> None:
    """ValueError unless `bits` is a contiguous uint8 (tokens, ceil(n / 8)) mask."""
    shape = (tokens, bits_width(n))
    if (
        not isinstance(bits, torch.Tensor)
        or bits.dtype != torch.uint8
        or tuple(bits.shape) != shape
        or not bits.is_contiguous()
    ):
        got = f"{bits.dtype} {tuple(bits.shape)}" if isinstance(bits, torch.Tensor) else bits
        raise ValueError(
            f"dropout keep bits must be a contiguous uint8 tensor of shape {shape} "
            f"(tokens, ceil(n / 8)) for {tokens} tokens of n={n}; got {got}"
        )


def keep_bits_of(
    keep_mask: torch.Tensor | None, tokens: int, n: int, lead: torch.Size
) -> torch.Tensor | None:
    """spp_linear's `keep_mask` as packed bits: a bool (..., n) mask with x's shape `(*lead, n)`
    is packed; uint8 bits (tokens, ceil(n/8)) are checked and returned."""
    if keep_mask is None:
        return None
    if not isinstance(keep_mask, torch.Tensor):
        raise TypeError(f"spp_linear: keep_mask must be a tensor, got {type(keep_mask).__name__}")
    if keep_mask.dtype == torch.bool:
        if tuple(keep_mask.shape) != (*lead, n):
            raise ValueError(
                f"spp_linear: a bool keep_mask must have x's shape {(*lead, n)}, got "
                f"{tuple(keep_mask.shape)}"
            )
        return pack_keep_mask(keep_mask.reshape(tokens, n))
    check_keep_bits(keep_mask, tokens, n)
    return keep_mask


# Multiplying a word of eight 0/1 bytes b_k (b_k at bit 8k) by sum_k 2**(56 - 7k) puts
# b_k at bit 56 + k, and no two partial products share a bit (8k - 7j = 8k' - 7j' only for
# k = k', j = j'), so the top byte is sum_k b_k 2**k with no carry from below.
_GATHER_BYTES = 0x0102040810204080


def _pack_rows(keep: torch.Tensor) -> torch.Tensor:
    """bool (tokens, 8 * nb) -> uint8 (tokens, nb): each run of eight bools read as one int64
    word and its eight low bits gathered by one multiplication."""
    tokens, width = keep.shape
    if width == 0:
        return keep.new_zeros((tokens, 0), dtype=torch.uint8)
    if keep.stride(-1) != 1 or keep.storage_offset() % 8 or keep.stride(0) % 8:
        keep = keep.clone(memory_format=torch.contiguous_format)  # the int64 view needs it
    if sys.byteorder != "little":  # the word view assumes lane k at bits 8k .. 8k + 7
        lanes = keep.view(tokens, width // 8, 8).view(torch.uint8)
        out = lanes[..., 0].clone()
        for b in range(1, 8):
            out |= lanes[..., b] << b
        return out
    words = keep.view(torch.uint8).view(torch.int64)
    return words.mul(_GATHER_BYTES).bitwise_right_shift_(56).bitwise_and_(0xFF).to(torch.uint8)


def _cpu_keep_bits(tokens: int, n: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(seed) & ((1 << 63) - 1))
    nb = bits_width(n)
    words = torch.randint(-(2**63), 2**63 - 1, (tokens * nb * 2,), generator=g, dtype=torch.int64)
    # u = lane + 2**15 is uniform on [0, 2**16); keep when u >= round(p * 2**16).
    keep = words.view(torch.int16).view(tokens, 8 * nb) >= round(p * 65536) - 32768
    if n != 8 * nb:
        keep[:, n:] = False
    return _pack_rows(keep)


@functools.cache
def _unpack_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    bits = (torch.arange(256, dtype=torch.uint8)[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.to(device=device, dtype=dtype)


def keep_values(bits: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The keep-mask as 0/1 values of `dtype`, (tokens, n): one table lookup per byte."""
    check_keep_bits(bits, bits.shape[0], n)
    table = _unpack_table(dtype, bits.device)
    flat = table.index_select(0, bits.reshape(-1).to(torch.int32))
    return flat.view(bits.shape[0], 8 * bits.shape[1])[:, :n]


def draw_keep_bits(
    tokens: int, n: int, p: float, seed: int, device: torch.device | str
) -> torch.Tensor:
    """The packed keep-mask (tokens, ceil(n / 8)) uint8 for dropout rate p, drawn on `device`
    with that device's generator (see the module docstring); all ones when p == 0."""
    device = torch.device(device)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {p!r}")
    if p == 0.0:
        mask = torch.full((tokens, bits_width(n)), 0xFF, dtype=torch.uint8, device=device)
        if n % 8:
            mask[:, -1] = (1 << (n % 8)) - 1
        return mask
    if device.type == "cuda" and triton_available():
        from csrc_triton.dropout_bits import draw_keep_bits as triton_draw

        return triton_draw(tokens, n, p, seed, device)
    if device.type == "cuda":
        g = torch.Generator(device=device).manual_seed(int(seed) & ((1 << 63) - 1))
        keep = torch.rand((tokens, 8 * bits_width(n)), generator=g, device=device) >= p
        keep[:, n:] = False
        return pack_keep_mask(keep)
    return _cpu_keep_bits(tokens, n, p, seed).to(device)


def dropout_mask(
    shape: tuple[int, int] | torch.Size,
    p: float,
    seed: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Keep-mask (bool, `shape` = (tokens, n)) that the op draws on `device` for rate p and
    `seed` (the unpacked `draw_keep_bits`)."""
    tokens, n = shape
    bits = draw_keep_bits(tokens, n, p, seed, device or "cpu")
    return unpack_keep_mask(bits, n)


def apply_keep_mask(x2d: torch.Tensor, bits: torch.Tensor | None, p: float) -> torch.Tensor:
    """Dropout(X) = X * keep / (1 - p) with the packed mask; X itself when p == 0."""
    if p == 0.0 or bits is None:
        return x2d
    keep = unpack_keep_mask(bits, x2d.shape[1])
    return x2d * keep.to(x2d.dtype) * (1.0 / (1.0 - p))


def new_seed() -> torch.Tensor:
    """A fresh dropout seed from torch's default generator: a 0-d int64 CPU tensor.

    A tensor rather than an int so that torch.compile traces it as data instead of
    specialising the graph on its value.
    """
    return torch.randint(0, 2**62, (), dtype=torch.int64)


# ---- test oracle of the CUDA kernel -----------------------------------------------------


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * b for uint32 values held in int64.

    int64 multiplication wraps modulo 2**64, which keeps the low 64 bits exact; the
    masks turn the arithmetic shift into the logical one Philox needs.
    """
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox_uniform4(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 (..., 4): the four uniforms of `tl.rand4x(seed, offsets)` for int64 offsets."""
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
    words = torch.stack((c0, c1, c2, c3), dim=-1)
    signed = torch.where(words >= 2**31, words - 2**32, words)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def philox_keep_bits(tokens: int, n: int, p: float, seed: int) -> torch.Tensor:
    """The packed mask the CUDA kernel draws, computed on the CPU in PyTorch (test oracle)."""
    nb = bits_width(n)
    byte = torch.arange(tokens * nb, dtype=torch.int64).view(tokens, nb)
    u = philox_uniform4(seed, torch.stack((2 * byte, 2 * byte + 1), dim=-1))  # (t, nb, 2, 4)
    keep = (u >= p).reshape(tokens, 8 * nb)
    keep[:, n:] = False
    return pack_keep_mask(keep)
