"""`PackedWeight`: a frozen N:M sparse weight (m, n) held as packed values and metadata.

The (values, meta) pair is the format of `spp_kernels.sparsity.nm` (its one definition):
values (m, n // M * N) in the weight's dtype and int32 position metadata. A 2:4 fp16
weight then takes 56.25 % of its dense bytes, a 2:8 one about 30 %. The SPP op takes a
PackedWeight directly (`spp_kernels.spp_linear_packed`): the fused kernels decode its
tiles in registers, so no dense copy of W is ever allocated on that path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nm import nm_compress, nm_decompress, nm_meta_shape, nm_packed_nbytes

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


class PackedLinear(torch.nn.Module):
    """A frozen linear layer whose N:M sparse weight (m, n) is held packed: the base layer
    that an SPP adapter wraps when the frozen weights stay packed (weight_format "nm").

    Buffers `weight_values` and `weight_meta` (spp_kernels.sparsity.nm's format), optional
    frozen `bias`; `weight` is None. Its own forward (used with adapters disabled)
    decompresses W per call; SPP layers pass the packed weight to the fused op instead.
    """

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.shape[0]
        self.n_keep, self.m_group = packed.n_keep, packed.m_group
        self.register_buffer("weight_values", packed.values)
        self.register_buffer("weight_meta", packed.meta)
        self.weight = None
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, n_keep: int, m_group: int) -> PackedLinear:
        """Pack `linear`'s weight (ValueError naming the first group that is not N:M)."""
        packed = PackedWeight.from_dense(linear.weight.detach(), n_keep, m_group)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(packed, bias)

    @property
    def nm(self) -> tuple[int, int]:
        return self.n_keep, self.m_group

    def packed_weight(self) -> PackedWeight:
        """The frozen weight as a PackedWeight (views of the buffers)."""
        return PackedWeight(
            self.weight_values, self.weight_meta, self.n_keep, self.m_group, self.in_features
        )

    def dense_weight(self) -> Tensor:
        """The dense (m, n) weight, decompressed (a new tensor)."""
        return self.packed_weight().dense()

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nm={self.n_keep}:{self.m_group}"
        )
