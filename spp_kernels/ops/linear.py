"""`spp_linear` and `spp_linear_packed`: the SPP linear op, one torch.library op family.

    Y = X W^T + scale * Dropout(X) W'^T + bias,   W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o]

Both public functions share one prelude (`_call`: autocast, checks, backend, seed, mask)
and two custom ops with registered autograd and fake implementations, so torch.compile
traces each call as one node without graph breaks:

  spp_kernels::spp_linear_fwd(x, weight, meta?, alpha, beta, bias?, n_keep, group, scale,
                              dropout_p, seed, keep?, backend) -> (Y, keep bits)
  spp_kernels::spp_linear_bwd(dy, x, weight, meta?, alpha, beta, n_keep, group, scale,
                              dropout_p, keep, backend, need_dx, need_dalpha_dbeta)

`meta` None means a dense W (m, n); otherwise `weight` holds the N:M packed values and
`meta` their metadata (spp_kernels.sparsity.nm), with (n_keep, group) the pattern.

Dropout: the forward draws the keep-mask once, from `seed` on x's device
(spp_kernels.ops.dropout.draw_keep_bits), or takes a caller's mask; it is saved for
backward as bits (T * n / 8 bytes) and every kernel reads those bits.

Backends: "triton" (csrc_triton/, CUDA, or CPU under TRITON_INTERPRET=1), "torch"
(spp_kernels.ops.torch_backend, any device, float64 too), "auto" (triton for CUDA tensors
when Triton is importable, torch otherwise).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch

from ..sparsity.packed import PackedWeight
from . import torch_backend
from .dropout import bits_width, check_keep_bits, draw_keep_bits, new_seed, pack_keep_mask
from .frozen import Frozen
from .validation import (
    DEFAULT_SCALE,
    FLOAT_DTYPES,
    TORCH_DTYPES,
    check_backend,
    check_spp_args,
)

Tensor = torch.Tensor


@functools.cache
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("triton" or "torch") that `backend` means for tensors on `device`."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("spp_linear: backend='triton' needs the triton package installed")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"spp_linear: backend='triton' needs CUDA tensors (got {device}); "
                "set TRITON_INTERPRET=1 to run the kernels on CPU, or use backend='torch'"
            )
    return backend


def _impl(backend: str) -> ModuleType:
    if backend == "triton":
        from . import triton_backend

        return triton_backend
    return torch_backend


def _frozen(weight: Tensor, meta: Tensor | None, n_keep: int, group: int, n: int) -> Frozen:
    return Frozen(weight, meta, None if meta is None else (n_keep, group), n)


def _no_bits(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.uint8)


@torch.library.custom_op("spp_kernels::spp_linear_fwd", mutates_args=())
def spp_linear_fwd(
    x: Tensor,
    weight: Tensor,
    meta: Tensor | None,
    alpha: Tensor,
    beta: Tensor,
    bias: Tensor | None,
    n_keep: int,
    group: int,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    keep: Tensor | None,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(Y (tokens, m), keep bits drawn here or empty) for 2-D x; `backend` already resolved.

    `keep` (the caller's packed mask) is used as given and not returned (an op output may
    not alias an input); the autograd context saves whichever mask was used.
    """
    drawn = None
    if dropout_p > 0.0 and keep is None:
        drawn = draw_keep_bits(x.shape[0], x.shape[1], dropout_p, int(seed), x.device)
    frozen = _frozen(weight, meta, n_keep, group, x.shape[1])
    bits = keep if drawn is None else drawn
    y = _impl(backend).forward(x, frozen, alpha, beta, bias, scale, dropout_p, bits)
    return y, (_no_bits(x) if drawn is None else drawn)


@spp_linear_fwd.register_fake
def _(x, weight, meta, alpha, beta, bias, n_keep, group, scale, dropout_p, seed, keep, backend):
    y = x.new_empty(x.shape[0], weight.shape[0])
    if dropout_p > 0.0 and keep is None:
        return y, x.new_empty(x.shape[0], bits_width(x.shape[1]), dtype=torch.uint8)
    return y, _no_bits(x)


@torch.library.custom_op("spp_kernels::spp_linear_bwd", mutates_args=())
def spp_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    meta: Tensor | None,
    alpha: Tensor,
    beta: Tensor,
    n_keep: int,
    group: int,
    scale: float,
    dropout_p: float,
    keep: Tensor,
    backend: str,
    need_dx: bool,
    need_dalpha_dbeta: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dalpha, dbeta); an empty tensor stands for a gradient that was not requested."""
    frozen = _frozen(weight, meta, n_keep, group, x.shape[1])
    bits = keep if dropout_p > 0.0 else None
    dx, dalpha, dbeta = _impl(backend).backward(
        dy, x, frozen, alpha, beta, scale, dropout_p, bits, need_dx, need_dalpha_dbeta
    )
    empty = x.new_empty(0)
    return (
        empty if dx is None else dx,
        empty.to(alpha.dtype) if dalpha is None else dalpha,
        empty.to(beta.dtype) if dbeta is None else dbeta,
    )


@spp_linear_bwd.register_fake
def _(dy, x, weight, meta, alpha, beta, n_keep, group, scale, dropout_p, keep, backend,
      need_dx, need_dalpha_dbeta):  # fmt: skip
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty(0),
        alpha.new_empty(alpha.shape) if need_dalpha_dbeta else alpha.new_empty(0),
        beta.new_empty(beta.shape) if need_dalpha_dbeta else beta.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, meta, alpha, beta, bias, n_keep, group, scale, dropout_p, _, keep, backend = inputs
    bits = None if dropout_p == 0.0 else (keep if keep is not None else output[1])
    ctx.save_for_backward(x, weight, meta, alpha, beta, bits)
    ctx.n_keep, ctx.group = n_keep, group
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dbits):
    x, weight, meta, alpha, beta, bits = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dx, need_dab = need[0], need[3] or need[4]
    dx = dalpha = dbeta = dbias = None
    if need_dx or need_dab:
        dx, dalpha, dbeta = spp_linear_bwd(
            dy, x, weight, meta, alpha, beta, ctx.n_keep, ctx.group, ctx.scale, ctx.dropout_p,
            bits, ctx.backend, need_dx, need_dab,
        )  # fmt: skip
        dx = dx if need_dx else None
        dalpha, dbeta = (dalpha, dbeta) if need_dab else (None, None)
    if need[5]:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dbias = dy.sum(0, dtype=acc).to(ctx.bias_dtype)
    return dx, None, None, dalpha, dbeta, dbias, None, None, None, None, None, None, None


spp_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def _keep_bits_arg(
    keep_mask: Tensor | None, tokens: int, n: int, lead: torch.Size
) -> Tensor | None:
    """The caller's mask as packed bits: bool (..., n) matching x, or uint8 bits (tokens, nb)."""
    if keep_mask is None:
        return None
    if not isinstance(keep_mask, Tensor):
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


def _call(
    x: Tensor,
    weight: Tensor,
    meta: Tensor | None,
    pattern: tuple[int, int],
    alpha: Tensor,
    beta: Tensor,
    bias: Tensor | None,
    scale: float,
    dropout_p: float,
    training: bool,
    backend: str,
    seed: int | Tensor | None,
    keep_mask: Tensor | None,
    what: str,
    m: int,
) -> Tensor:
    """The shared prelude: autocast, checks, backend, seed and mask; then the op."""
    check_backend(backend)
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        # A packed weight is cast as its values (a packed-size copy), never made dense.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    n = x.shape[-1] if isinstance(x, Tensor) and x.dim() else 0
    # A zero-stride stand-in carries a packed W's dense shape, dtype and device into the checks.
    dense_like = weight if meta is None else weight.new_empty(()).expand(m, n)
    check_spp_args(x, dense_like, alpha, beta, bias, scale, dropout_p)
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{what}: the frozen weight requires grad, but SPP never trains W (it gets no "
            "gradient): freeze it with weight.requires_grad_(False)"
        )
    resolved = resolve_backend(backend, x.device)
    allowed = FLOAT_DTYPES if resolved == "triton" else TORCH_DTYPES
    if x.dtype not in allowed:
        raise TypeError(f"{what}: dtype {x.dtype} is not supported by the {resolved} backend")
    p = float(dropout_p) if training else 0.0
    lead = x.shape[:-1]
    x2d = x.reshape(-1, n)
    keep = _keep_bits_arg(keep_mask, x2d.shape[0], n, lead) if p > 0.0 else None
    if keep is not None and keep.device != x.device:
        raise ValueError(f"{what}: keep_mask is on {keep.device}, x on {x.device}")
    if p > 0.0 and keep is None:
        seed_t = new_seed() if seed is None else torch.as_tensor(seed, dtype=torch.int64)
    else:
        seed_t = torch.zeros((), dtype=torch.int64)
    y, _ = spp_linear_fwd(
        x2d, weight.detach(), meta, alpha, beta, bias, pattern[0], pattern[1], float(scale), p,
        seed_t, keep, resolved,
    )  # fmt: skip
    return y.view(*lead, m)


def spp_linear(
    x: Tensor,
    weight: Tensor,
    alpha: Tensor,
    beta: Tensor,
    bias: Tensor | None = None,
    *,
    scale: float = DEFAULT_SCALE,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    seed: int | Tensor | None = None,
    keep_mask: Tensor | None = None,
) -> Tensor:
    """SPP linear layer: Y = X W^T + scale * Dropout(X) W'^T + bias.

    Shapes: x (..., n) with any leading dimensions and strides, weight (m, n) frozen (no
    gradient), alpha (r, n) with 1 <= r <= m, beta (m,), bias (m,) or None; returns
    (..., m) in x's dtype. W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o], g(o) = floor(o*r/m).
    Dropout (rate `dropout_p`, only when `training`) uses the mask `keep_mask` (bool of x's
    shape, or packed bits (tokens, ceil(n/8)) uint8) or, when None, the one drawn from
    `seed` on x's device (`spp_kernels.dropout_mask`; seed from torch's generator when None).
    Gradients flow to x, alpha, beta and bias; alpha/beta/bias may be float32 while x is
    half precision, and their gradients come back in their own dtypes. Under torch.autocast
    x and weight are cast to the autocast dtype first, as F.linear would.

    Defaults: scale 2 is the paper's (as for SPPLinear and SPPConfig); dropout_p defaults to
    0 here because a functional op should be deterministic unless asked, while the layer
    and the config default to the paper's 0.05.
    """
    m = weight.shape[0] if isinstance(weight, Tensor) and weight.dim() == 2 else 0
    return _call(
        x, weight, None, (0, 0), alpha, beta, bias, scale, dropout_p, training, backend, seed,
        keep_mask, "spp_linear", m,
    )  # fmt: skip


def spp_linear_packed(
    x: Tensor,
    weight: PackedWeight,
    alpha: Tensor,
    beta: Tensor,
    bias: Tensor | None = None,
    *,
    scale: float = DEFAULT_SCALE,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    seed: int | Tensor | None = None,
    keep_mask: Tensor | None = None,
) -> Tensor:
    """`spp_linear` with the frozen weight given packed: Y = X W^T + scale * D(X) W'^T + bias.

    Shapes: x (..., n), weight a PackedWeight of dense shape (m, n), alpha (r, n), beta (m,),
    bias (m,) or None; returns (..., m) in x's dtype. Gradients, dropout and defaults as in
    `spp_linear`: packed and dense calls with one seed (or one mask) agree. The triton
    backend decodes W's tiles in registers; the torch backend decompresses row chunks.
    """
    if not isinstance(weight, PackedWeight):
        raise TypeError(
            f"spp_linear_packed: weight must be a PackedWeight, got {type(weight).__name__}"
        )
    if isinstance(x, Tensor) and x.dim() and x.shape[-1] != weight.in_features:
        raise ValueError(
            f"spp_linear_packed: x's last dimension must equal the weight's in_features "
            f"n={weight.in_features}, got x shape {tuple(x.shape)}"
        )
    return _call(
        x, weight.values, weight.meta, (weight.n_keep, weight.m_group), alpha, beta, bias, scale,
        dropout_p, training, backend, seed, keep_mask, "spp_linear_packed", weight.shape[0],
    )  # fmt: skip
