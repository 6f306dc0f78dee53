"""`spp_linear`: the SPP linear op, registered with torch.library, and backend dispatch.

    Y = X W^T + scale * Dropout(X) W'^T + bias,   W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o]

The op is a torch.library custom op with a registered autograd formula and fake (meta)
implementations, so torch.compile traces it as one node without graph breaks. Its
gradients are a second custom op. Both dispatch to one backend:
  "triton": the fused kernels in csrc_triton/ (CUDA tensors, or CPU under TRITON_INTERPRET=1)
  "torch":  spp_kernels.torch_backend, the same math in PyTorch (any device, float64 too)
  "auto":   triton for CUDA tensors when Triton is importable, torch otherwise.
The dropout mask is never stored: a 0-d int64 seed tensor is saved and the mask is
regenerated in backward (see spp_kernels.dropout).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch

from ..sparsity.nm import nm_decompress
from ..sparsity.packed import PackedWeight
from . import torch_backend
from .dropout import new_seed
from .validation import FLOAT_DTYPES, TORCH_DTYPES, check_backend, check_spp_args

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


@torch.library.custom_op("spp_kernels::spp_linear_fwd", mutates_args=())
def spp_linear_fwd(
    x: Tensor,
    weight: Tensor,
    alpha: Tensor,
    beta: Tensor,
    bias: Tensor | None,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    backend: str,
) -> Tensor:
    """Y (tokens, m) for 2-D x (tokens, n); `backend` already resolved."""
    return _impl(backend).forward(x, weight, alpha, beta, bias, scale, dropout_p, int(seed))


@spp_linear_fwd.register_fake
def _(x, weight, alpha, beta, bias, scale, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("spp_kernels::spp_linear_bwd", mutates_args=())
def spp_linear_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    alpha: Tensor,
    beta: Tensor,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    backend: str,
    need_dx: bool,
    need_dalpha_dbeta: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dalpha, dbeta); an empty tensor stands for a gradient that was not requested."""
    dx, dalpha, dbeta = _impl(backend).backward(
        dy, x, weight, alpha, beta, scale, dropout_p, int(seed), need_dx, need_dalpha_dbeta
    )
    empty = x.new_empty(0)
    return (
        empty if dx is None else dx,
        empty.to(alpha.dtype) if dalpha is None else dalpha,
        empty.to(beta.dtype) if dbeta is None else dbeta,
    )


@spp_linear_bwd.register_fake
def _(dy, x, weight, alpha, beta, scale, dropout_p, seed, backend, need_dx, need_dalpha_dbeta):
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty(0),
        alpha.new_empty(alpha.shape) if need_dalpha_dbeta else alpha.new_empty(0),
        beta.new_empty(beta.shape) if need_dalpha_dbeta else beta.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, alpha, beta, bias, scale, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, alpha, beta, seed)
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
    x, weight, alpha, beta, seed = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dab = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    dx = dalpha = dbeta = dbias = None
    if need_dx or need_dab:
        dx, dalpha, dbeta = spp_linear_bwd(
            dy,
            x,
            weight,
            alpha,
            beta,
            ctx.scale,
            ctx.dropout_p,
            seed,
            ctx.backend,
            need_dx,
            need_dab,
        )
        dx = dx if need_dx else None
        dalpha, dbeta = (dalpha, dbeta) if need_dab else (None, None)
    if ctx.needs_input_grad[4]:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dbias = dy.sum(0, dtype=acc).to(ctx.bias_dtype)
    return dx, None, dalpha, dbeta, dbias, None, None, None, None


spp_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def spp_linear(
    x: Tensor,
    weight: Tensor,
    alpha: Tensor,
    beta: Tensor,
    bias: Tensor | None = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    seed: int | Tensor | None = None,
) -> Tensor:
    """SPP linear layer: Y = X W^T + scale * Dropout(X) W'^T + bias.

    Shapes: x (..., n) with any leading dimensions and strides, weight (m, n) frozen (no
    gradient), alpha (r, n) with 1 <= r <= m, beta (m,), bias (m,) or None; returns
    (..., m) in x's dtype. W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o], g(o) = floor(o*r/m).
    Dropout (rate `dropout_p`, only when `training`) uses the counter-based mask of
    `spp_kernels.dropout_mask` for `seed` (drawn from torch's generator when None).
    Gradients flow to x, alpha, beta and bias; alpha/beta/bias may be float32 while x is
    half precision, and their gradients come back in their own dtypes. Under torch.autocast
    x and weight are cast to the autocast dtype first, as F.linear would.
    """
    check_backend(backend)
    if (
        isinstance(x, Tensor)
        and isinstance(weight, Tensor)
        and torch.is_autocast_enabled(x.device.type)
        and x.is_floating_point()
    ):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    check_spp_args(x, weight, alpha, beta, bias, scale, dropout_p)
    resolved = resolve_backend(backend, x.device)
    allowed = FLOAT_DTYPES if resolved == "triton" else TORCH_DTYPES
    if x.dtype not in allowed:
        raise TypeError(f"spp_linear: dtype {x.dtype} is not supported by the {resolved} backend")
    p = float(dropout_p) if training else 0.0
    if p > 0.0:
        seed_t = new_seed() if seed is None else torch.as_tensor(seed, dtype=torch.int64)
    else:
        seed_t = torch.zeros((), dtype=torch.int64)
    lead = x.shape[:-1]
    y = spp_linear_fwd(
        x.reshape(-1, x.shape[-1]),
        weight.detach(),
        alpha,
        beta,
        bias,
        float(scale),
        p,
        seed_t,
        resolved,
    )
    return y.view(*lead, weight.shape[0])


# ---- packed N:M frozen weights -------------------------------------------------------


@torch.library.custom_op("spp_kernels::spp_linear_nm_fwd", mutates_args=())
def spp_linear_nm_fwd(
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    alpha: Tensor,
    beta: Tensor,
    bias: Tensor | None,
    n_keep: int,
    m_group: int,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    backend: str,
) -> Tensor:
    """Y (tokens, m) for 2-D x (tokens, n) and a packed W; `backend` already resolved."""
    if backend == "triton":
        from . import triton_backend

        return triton_backend.forward(
            x,
            values,
            alpha,
            beta,
            bias,
            scale,
            dropout_p,
            int(seed),
            meta=meta,
            nm=(n_keep, m_group),
        )
    weight = nm_decompress(values, meta, n_keep, m_group, x.shape[1])
    return torch_backend.forward(x, weight, alpha, beta, bias, scale, dropout_p, int(seed))


@spp_linear_nm_fwd.register_fake
def _(x, values, meta, alpha, beta, bias, n_keep, m_group, scale, dropout_p, seed, backend):
    return x.new_empty(x.shape[0], values.shape[0])


@torch.library.custom_op("spp_kernels::spp_linear_nm_bwd", mutates_args=())
def spp_linear_nm_bwd(
    dy: Tensor,
    x: Tensor,
    values: Tensor,
    meta: Tensor,
    alpha: Tensor,
    beta: Tensor,
    n_keep: int,
    m_group: int,
    scale: float,
    dropout_p: float,
    seed: Tensor,
    backend: str,
    need_dx: bool,
    need_dalpha_dbeta: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dalpha, dbeta); an empty tensor stands for a gradient that was not requested."""
    args = (scale, dropout_p, int(seed), need_dx, need_dalpha_dbeta)
    if backend == "triton":
        from . import triton_backend

        nm = (n_keep, m_group)
        grads = triton_backend.backward(dy, x, values, alpha, beta, *args, meta=meta, nm=nm)
    else:
        weight = nm_decompress(values, meta, n_keep, m_group, x.shape[1])
        grads = torch_backend.backward(dy, x, weight, alpha, beta, *args)
    dx, dalpha, dbeta = grads
    empty = x.new_empty(0)
    return (
        empty if dx is None else dx,
        empty.to(alpha.dtype) if dalpha is None else dalpha,
        empty.to(beta.dtype) if dbeta is None else dbeta,
    )


@spp_linear_nm_bwd.register_fake
def _(
    dy,
    x,
    values,
    meta,
    alpha,
    beta,
    n_keep,
    m_group,
    scale,
    dropout_p,
    seed,
    backend,
    need_dx,
    need_dalpha_dbeta,
):
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty(0),
        alpha.new_empty(alpha.shape) if need_dalpha_dbeta else alpha.new_empty(0),
        beta.new_empty(beta.shape) if need_dalpha_dbeta else beta.new_empty(0),
    )


def _setup_context_nm(ctx, inputs, output):
    x, values, meta, alpha, beta, bias, n_keep, m_group, scale, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, values, meta, alpha, beta, seed)
    ctx.n_keep, ctx.m_group = n_keep, m_group
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_nm(ctx, dy):
    x, values, meta, alpha, beta, seed = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dab = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
    dx = dalpha = dbeta = dbias = None
    if need_dx or need_dab:
        dx, dalpha, dbeta = spp_linear_nm_bwd(
            dy,
            x,
            values,
            meta,
            alpha,
            beta,
            ctx.n_keep,
            ctx.m_group,
            ctx.scale,
            ctx.dropout_p,
            seed,
            ctx.backend,
            need_dx,
            need_dab,
        )
        dx = dx if need_dx else None
        dalpha, dbeta = (dalpha, dbeta) if need_dab else (None, None)
    if ctx.needs_input_grad[5]:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dbias = dy.sum(0, dtype=acc).to(ctx.bias_dtype)
    return dx, None, None, dalpha, dbeta, dbias, None, None, None, None, None, None


spp_linear_nm_fwd.register_autograd(_backward_nm, setup_context=_setup_context_nm)


def spp_linear_packed(
    x: Tensor,
    weight: PackedWeight,
    alpha: Tensor,
    beta: Tensor,
    bias: Tensor | None = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    seed: int | Tensor | None = None,
) -> Tensor:
    """`spp_linear` with the frozen weight given packed: Y = X W^T + scale * D(X) W'^T + bias.

    Shapes: x (..., n), weight a PackedWeight of dense shape (m, n), alpha (r, n), beta (m,),
    bias (m,) or None; returns (..., m) in x's dtype. Gradients flow to x, alpha, beta and
    bias exactly as in `spp_linear` (the weight is frozen). The dropout mask for `seed` is
    the one of `spp_kernels.dropout_mask`, so packed and dense calls with one seed agree.
    """
    check_backend(backend)
    if not isinstance(weight, PackedWeight):
        raise TypeError(
            f"spp_linear_packed: weight must be a PackedWeight, got {type(weight).__name__}"
        )
    values = weight.values
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        # The packed values are cast (a packed-size copy), never a dense weight.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, values = x.to(dtype), values.to(dtype)
    # A zero-stride stand-in carries W's shape, dtype and device into the shared checks.
    stand_in = values.new_empty(()).expand(weight.shape)
    check_spp_args(x, stand_in, alpha, beta, bias, scale, dropout_p)
    resolved = resolve_backend(backend, x.device)
    allowed = FLOAT_DTYPES if resolved == "triton" else TORCH_DTYPES
    if x.dtype not in allowed:
        raise TypeError(
            f"spp_linear_packed: dtype {x.dtype} is not supported by the {resolved} backend"
        )
    p = float(dropout_p) if training else 0.0
    if p > 0.0:
        seed_t = new_seed() if seed is None else torch.as_tensor(seed, dtype=torch.int64)
    else:
        seed_t = torch.zeros((), dtype=torch.int64)
    lead = x.shape[:-1]
    y = spp_linear_nm_fwd(
        x.reshape(-1, x.shape[-1]),
        values.detach(),
        weight.meta,
        alpha,
        beta,
        bias,
        weight.n_keep,
        weight.m_group,
        float(scale),
        p,
        seed_t,
        resolved,
    )
    return y.view(*lead, weight.shape[0])
