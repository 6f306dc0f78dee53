"""`spp_linear`: the SPP linear op, one torch.library op family for every frozen-weight kind.

    Y = X W^T + scale * Dropout(X) W'^T + bias,   W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o]

The frozen weight W (m, n) is one operand (`spp_kernels.ops.operand.FrozenWeight`: a dense
tensor, a `PackedWeight`, a `QuantizedPackedWeight` or a `BnbWeight`). A call is checked once (`_call`: autocast, operands, backend,
seed, mask), the operand is flattened into the custom op's arguments in one place
(`operand.flatten`), and two custom ops with registered autograd and fake
implementations carry it, so torch.compile traces each call as one node:

  spp_kernels::spp_linear_fwd(x, w, w_meta?, alpha, beta, bias?, n_keep, group, scale,
                              dropout_p, seed, keep?, backend, with_base) -> (Y, keep bits)
  spp_kernels::spp_linear_bwd(dy, x, w, w_meta?, alpha, beta, n_keep, group, scale,
                              dropout_p, keep, backend, with_base, need_dx, need_dalpha_dbeta)

with_base=False computes the adapter term alone (scale * Dropout(X) W'^T): the second and
later adapters of a layer with several active ones.

Eager calls on plain tensors run the same two bodies through one autograd.Function
(`_EagerSPPLinear`), skipping torch.library's per-call dispatch; traced calls (torch.compile,
export, fake or meta tensors) and tensor subclasses go through the custom ops.

Dropout: the forward draws the keep-mask once, from `seed` on x's device
(spp_kernels.ops.dropout.draw_keep_bits), or takes a caller's mask; it is saved for
backward as bits (T * n / 8 bytes) and every kernel reads those bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..sparsity.packed import PackedWeight
from .backends import implementation, resolve_backend
from .dropout import bits_width, draw_keep_bits, keep_bits_of, new_seed
from .operand import FrozenWeight, cast_values, flatten, travels_whole, unflatten
from .quantized import BnbWeight
from .validation import DEFAULT_SCALE, FLOAT_DTYPES, TORCH_DTYPES, check_backend, check_spp_args

Tensor = torch.Tensor

__all__ = ["resolve_backend", "spp_linear", "spp_linear_packed"]


def _no_bits(x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.uint8)


def _forward_impl(
    x: Tensor,
    w: Tensor,
    w_meta: Tensor | None,
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
    with_base: bool,
) -> tuple[Tensor, Tensor]:
    """(Y (tokens, m), keep bits drawn here or empty) for 2-D x; `backend` already resolved.

    `keep` (the caller's packed mask) is used as given and not returned (an op output may
    not alias an input); the autograd context saves whichever mask was used.
    """
    drawn = None
    if dropout_p > 0.0 and keep is None:
        drawn = draw_keep_bits(x.shape[0], x.shape[1], dropout_p, int(seed), x.device)
    weight = unflatten(w, w_meta, n_keep, group, x.shape[1])
    y = implementation(backend).forward(
        x, weight, alpha, beta, bias, scale=scale, dropout_p=dropout_p,
        bits=keep if drawn is None else drawn, with_base=with_base,
    )  # fmt: skip
    return y, (_no_bits(x) if drawn is None else drawn)


spp_linear_fwd = torch.library.custom_op("spp_kernels::spp_linear_fwd", mutates_args=())(
    _forward_impl
)


@spp_linear_fwd.register_fake
def _(x, w, w_meta, alpha, beta, bias, n_keep, group, scale, dropout_p, seed, keep, backend,
      with_base):  # fmt: skip
    y = x.new_empty(x.shape[0], w.shape[0])
    if dropout_p > 0.0 and keep is None:
        return y, x.new_empty(x.shape[0], bits_width(x.shape[1]), dtype=torch.uint8)
    return y, _no_bits(x)


def _backward_impl(
    dy: Tensor,
    x: Tensor,
    w: Tensor,
    w_meta: Tensor | None,
    alpha: Tensor,
    beta: Tensor,
    n_keep: int,
    group: int,
    scale: float,
    dropout_p: float,
    keep: Tensor,
    backend: str,
    with_base: bool,
    need_dx: bool,
    need_dalpha_dbeta: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dalpha, dbeta); an empty tensor stands for a gradient that was not requested."""
    weight = unflatten(w, w_meta, n_keep, group, x.shape[1])
    dx, dalpha, dbeta = implementation(backend).backward(
        dy, x, weight, alpha, beta, scale=scale, dropout_p=dropout_p,
        bits=keep if dropout_p > 0.0 else None, with_base=with_base, need_dx=need_dx,
        need_dalpha_dbeta=need_dalpha_dbeta,
    )  # fmt: skip
    empty = x.new_empty(0)
    return (
        empty if dx is None else dx,
        empty.to(alpha.dtype) if dalpha is None else dalpha,
        empty.to(beta.dtype) if dbeta is None else dbeta,
    )


spp_linear_bwd = torch.library.custom_op("spp_kernels::spp_linear_bwd", mutates_args=())(
    _backward_impl
)


@spp_linear_bwd.register_fake
def _(dy, x, w, w_meta, alpha, beta, n_keep, group, scale, dropout_p, keep, backend, with_base,
      need_dx, need_dalpha_dbeta):  # fmt: skip
    return (
        x.new_empty(x.shape) if need_dx else x.new_empty(0),
        alpha.new_empty(alpha.shape) if need_dalpha_dbeta else alpha.new_empty(0),
        beta.new_empty(beta.shape) if need_dalpha_dbeta else beta.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, w, w_meta, alpha, beta, bias, n_keep, group, scale, dropout_p, _, keep, backend, base = (
        inputs
    )
    bits = None if dropout_p == 0.0 else (keep if keep is not None else output[1])
    # A kind that travels whole (eager calls only) is not a tensor: the context holds it.
    ctx.operand = None if isinstance(w, Tensor) else w
    ctx.save_for_backward(x, w if ctx.operand is None else None, w_meta, alpha, beta, bits)
    ctx.n_keep, ctx.group = n_keep, group
    ctx.scale, ctx.dropout_p, ctx.backend, ctx.with_base = scale, dropout_p, backend, base
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dy, _dbits, bwd=spp_linear_bwd):
    """Gradients of spp_linear_fwd's inputs; `bwd` computes (dX, dalpha, dbeta): the custom
    op (what torch.compile traces) or its body (`_EagerSPPLinear`)."""
    x, w, w_meta, alpha, beta, bits = ctx.saved_tensors
    w = w if ctx.operand is None else ctx.operand
    need = ctx.needs_input_grad
    need_dx, need_dab = need[0], need[3] or need[4]
    dx = dalpha = dbeta = dbias = None
    if need_dx or need_dab:
        dx, dalpha, dbeta = bwd(
            dy, x, w, w_meta, alpha, beta, ctx.n_keep, ctx.group, ctx.scale, ctx.dropout_p,
            bits, ctx.backend, ctx.with_base, need_dx, need_dab,
        )  # fmt: skip
        dx = dx if need_dx else None
        dalpha, dbeta = (dalpha, dbeta) if need_dab else (None, None)
    if need[5]:
        acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dbias = dy.sum(0, dtype=acc).to(ctx.bias_dtype)
    return dx, None, None, dalpha, dbeta, dbias, None, None, None, None, None, None, None, None


spp_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerSPPLinear(torch.autograd.Function):
    """The custom op pair's autograd without torch.library's dispatch: the same bodies,
    `_setup_context` and `_backward`, for eager calls on plain tensors. The dispatch costs
    about 0.15 ms of Python per layer call (torch.library's argument normalisation and
    redispatch, forward and backward): a visible share of a step at small shapes on a CPU
    (benchmarks/NOTES.md, issue 24 part 2). Traced calls use the custom ops. Like the op
    (whose backward has no autograd formula), it is differentiable once."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dbits):
        return _backward(ctx, dy, dbits, bwd=_backward_impl)


_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(*tensors: Tensor | None) -> bool:
    """Whether a call may skip the custom op: nothing traces or transforms it (torch.compile,
    export, make_fx and other dispatch modes, jit tracing, torch.func), no fake or meta
    tensor and no tensor subclass (DTensor and the like dispatch through the op)."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or _get_current_dispatch_mode() is not None
    ):
        return False
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or t.device.type == "meta"):
            return False
    return True


@dataclass(frozen=True)
class AdapterTerm:
    """How one call applies the adapter: `scale`, dropout (`dropout_p`, only when
    `training`; from `keep_mask`, else drawn from `seed`), and whether the frozen product
    X W^T is included (`with_base`)."""

    scale: float = DEFAULT_SCALE
    dropout_p: float = 0.0
    training: bool = True
    seed: int | Tensor | None = None
    keep_mask: Tensor | None = None
    with_base: bool = True


def _call(
    x: Tensor,
    weight: FrozenWeight,
    alpha: Tensor,
    beta: Tensor,
    bias: Tensor | None,
    term: AdapterTerm,
    backend: str,
    what: str,
) -> Tensor:
    """The one prelude of every call: autocast, checks, backend, seed and mask; then the op."""
    check_backend(backend)
    if isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        # A packed weight is cast as its values (a packed-size copy), never made dense.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), cast_values(weight, dtype)
    check_spp_args(x, weight, alpha, beta, bias, term.scale, term.dropout_p, what=what)
    if isinstance(weight, Tensor) and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{what}: the frozen weight requires grad, but SPP never trains W (it gets no "
            "gradient): freeze it with weight.requires_grad_(False)"
        )
    quantized = isinstance(weight, BnbWeight)
    if quantized and backend == "triton":
        raise ValueError(
            f"{what}: a bitsandbytes ({weight.kind}) weight runs on the torch backend (its rows "
            "are dequantized per chunk); use backend='auto' or 'torch'"
        )
    resolved = "torch" if quantized else resolve_backend(backend, x.device)
    allowed = FLOAT_DTYPES if resolved == "triton" else TORCH_DTYPES
    if x.dtype not in allowed:
        raise TypeError(f"{what}: dtype {x.dtype} is not supported by the {resolved} backend")
    p = float(term.dropout_p) if term.training else 0.0
    n, m = x.shape[-1], weight.shape[0]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, n)
    keep = keep_bits_of(term.keep_mask, x2d.shape[0], n, lead) if p > 0.0 else None
    if keep is not None and keep.device != x.device:
        raise ValueError(f"{what}: keep_mask is on {keep.device}, x on {x.device}")
    if p > 0.0 and keep is None:
        seed = new_seed() if term.seed is None else torch.as_tensor(term.seed, dtype=torch.int64)
    else:
        seed = torch.zeros((), dtype=torch.int64)
    w, w_meta, n_keep, group = flatten(weight)
    whole = travels_whole(weight)
    if not _eager(x2d, None if whole else w, alpha, beta, bias):
        if whole:
            kind = weight.kind if quantized else f"{weight.value_format} N:M packed"
            raise TypeError(
                f"{what}: a {kind} weight runs in eager mode only (not under torch.compile, "
                "export, torch.func or with tensor subclasses)"
            )
        op = spp_linear_fwd
    elif torch.is_grad_enabled():
        op = _EagerSPPLinear.apply
    else:
        op = _forward_impl  # nothing to save for a backward
    y, _ = op(
        x2d, w if whole else w.detach(), w_meta, alpha, beta, bias, n_keep, group,
        float(term.scale), p, seed, keep, resolved, bool(term.with_base),
    )  # fmt: skip
    return y.view(*lead, m)


def spp_linear(
    x: Tensor,
    weight: FrozenWeight,
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
    with_base: bool = True,
) -> Tensor:
    """SPP linear layer: Y = X W^T + scale * Dropout(X) W'^T + bias.

    Shapes: x (..., n) with any leading dimensions and strides; weight W (m, n), frozen (no
    gradient): a dense tensor, a `PackedWeight` (N:M packed; the fused kernels decode its
    tiles in registers, the torch backend bounded row chunks), a `QuantizedPackedWeight`
    (N:M packed int8 / fp8 / int4 codes, decoded the same ways; eager mode) or a `BnbWeight` (a
    bitsandbytes NF4 / FP4 / int8 weight: torch backend, eager mode, rows dequantized per
    chunk; usually with with_base=False beside the layer's own quantized matmul); alpha (r, n) with
    1 <= r <= m, beta (m,), bias (m,) or None; returns (..., m) in x's dtype.
    W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o], g(o) = floor(o*r/m).
    Dropout (rate `dropout_p`, only when `training`) uses the mask `keep_mask` (bool of x's
    shape, or packed bits (tokens, ceil(n/8)) uint8) or, when None, the one drawn from
    `seed` on x's device (`spp_kernels.dropout_mask`; seed from torch's generator when None).
    with_base=False leaves out X W^T (and the bias): the adapter term alone.
    Gradients flow to x, alpha, beta and bias; alpha/beta/bias may be float32 while x is
    half precision, and their gradients come back in their own dtypes. Under torch.autocast
    x and weight are cast to the autocast dtype first, as F.linear would.

    Defaults: scale 2 is the paper's (as for SPPLinear and SPPConfig); dropout_p defaults to
    0 here because a functional op should be deterministic unless asked, while the layer
    and the config default to the paper's 0.05.
    """
    term = AdapterTerm(scale, dropout_p, training, seed, keep_mask, with_base)
    return _call(x, weight, alpha, beta, bias, term, backend, "spp_linear")


def spp_linear_packed(
    x: Tensor,
    weight: PackedWeight,
    alpha: Tensor,
    beta: Tensor,
    bias: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """`spp_linear` with a `PackedWeight` (the same op and keywords; refuses any other
    weight)."""
    if not isinstance(weight, PackedWeight):
        raise TypeError(
            f"spp_linear_packed: weight must be a PackedWeight, got {type(weight).__name__}"
        )
    return spp_linear(x, weight, alpha, beta, bias, **kwargs)
