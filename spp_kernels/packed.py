"""SPP linear on an N:M packed frozen weight: `PackedWeight` and `spp_linear_packed`.

Same math as `spp_kernels.spp_linear`,

    Y = X W^T + scale * Dropout(X) W'^T + bias,   W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o]

but W (m, n) is held as the (values, meta) pair of `spp_kernels.nm` (the one definition of
the format): values (m, n // M * N) in W's dtype and int32 position metadata. A 2:4 fp16
weight then takes 56.25 % of its dense bytes, a 2:8 one about 30 %.

Backends:
  "triton": the fused kernels of csrc_triton/ (spp_kernels.triton_backend with the packed
            metadata): every kernel expands the weight tiles it needs in registers
            (_tiles.frozen_weight_tile), so no dense (m, n) copy of W is ever allocated.
  "torch":  decompresses W with `nm_decompress` (an (m, n) temporary per call) and runs
            spp_kernels.torch_backend: the CPU path, the float64 path, the oracle.
  "auto":   triton for CUDA tensors, torch otherwise (as for spp_linear).
The op is registered with torch.library (fake impls included) like spp_linear, so
torch.compile sees one node per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import torch_backend
from .dropout import new_seed
from .nm import nm_compress, nm_decompress, nm_meta_shape, nm_packed_nbytes
from .ops import resolve_backend
from .validation import FLOAT_DTYPES, TORCH_DTYPES, check_backend, check_spp_args

Tensor = torch.Tensor


@dataclass(frozen=True)
class PackedWeight:
    """A frozen N:M sparse weight (m, n) as `values` and `meta` (see spp_kernels.nm).

    Attributes:
        values: (m, n // M * N) in the weight's dtype.
        meta: int32 (m, ceil((n // M) / G)), G = 32 // (N * log2(M)).
        n_keep: N, the most nonzeros per group.  m_group: M, the group width (4 or 8).
        in_features: n, the dense column count.
    """

    values: Tensor
    meta: Tensor
    n_keep: int
    m_group: int
    in_features: int

    def __post_init__(self) -> None:
        check_packed(self.values, self.meta, self.n_keep, self.m_group, self.in_features)

    @classmethod
    def from_dense(
        cls, weight: Tensor, n_keep: int, m_group: int, *, name: str = ""
    ) -> PackedWeight:
        """Pack an N:M sparse (m, n) weight; ValueError naming the first bad group otherwise."""
        values, meta = nm_compress(weight, n_keep, m_group, name=name)
        return cls(values, meta, n_keep, m_group, weight.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) of the dense weight."""
        return self.values.shape[0], self.in_features

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of values + meta."""
        return self.values.nbytes + self.meta.nbytes

    def dense(self) -> Tensor:
        """The dense (m, n) weight (a new tensor; exact round trip of `from_dense`)."""
        return nm_decompress(self.values, self.meta, self.n_keep, self.m_group, self.in_features)


def check_packed(values: Tensor, meta: Tensor, n_keep: int, m_group: int, in_features: int) -> None:
    """Validate a (values, meta) pair for an N:M weight with `in_features` columns."""
    for what, t in (("values", values), ("meta", meta)):
        if not isinstance(t, Tensor):
            raise TypeError(f"packed weight: {what} must be a torch.Tensor, got {type(t).__name__}")
    nm_meta_shape(1, m_group, n_keep, m_group)  # raises nm's ValueError for a bad N:M
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
        raise ValueError(f"packed weight: in_features must be a positive int, got {in_features!r}")
    if in_features % m_group:
        raise ValueError(
            f"packed weight: in_features={in_features} is not a multiple of M={m_group}"
        )
    if values.dim() != 2 or values.shape[1] != in_features // m_group * n_keep:
        raise ValueError(
            f"packed weight: values must have shape (m, {in_features // m_group * n_keep}) for "
            f"{n_keep}:{m_group} and in_features={in_features}, got {tuple(values.shape)}"
        )
    if meta.dtype != torch.int32:
        raise TypeError(f"packed weight: meta must be torch.int32, got {meta.dtype}")
    expected = nm_meta_shape(values.shape[0], in_features, n_keep, m_group)
    if tuple(meta.shape) != expected:
        raise ValueError(f"packed weight: meta must have shape {expected}, got {tuple(meta.shape)}")
    if meta.device != values.device:
        raise ValueError(
            f"packed weight: values on {values.device} but meta on {meta.device}; "
            "move both to one device"
        )


def packed_fraction(n_keep: int, m_group: int, dtype: torch.dtype = torch.float16) -> float:
    """Packed bytes / dense bytes of an N:M weight of `dtype` (per row, large n)."""
    cols = 1920  # cols // M is a multiple of every codes-per-word count G, so no padding
    itemsize = torch.empty((), dtype=dtype).element_size()
    return nm_packed_nbytes(1, cols, n_keep, m_group, dtype) / (cols * itemsize)


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


def _setup_context(ctx, inputs, output):
    x, values, meta, alpha, beta, bias, n_keep, m_group, scale, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, values, meta, alpha, beta, seed)
    ctx.n_keep, ctx.m_group = n_keep, m_group
    ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, dy):
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


spp_linear_nm_fwd.register_autograd(_backward, setup_context=_setup_context)


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
