"""`PackedWeight`: a frozen N:M sparse weight (m, n) held as packed values and metadata.

The (values, meta) pair is the format of `spp_kernels.sparsity.nm` (its one definition):
values (m, n // group * n_keep) in the weight's dtype and int32 position metadata. A 2:4
fp16 weight then takes 56.25 % of its dense bytes, a 2:8 one about 30 %.

A PackedWeight is one kind of the op's frozen-weight operand (the other is a dense
tensor): `spp_kernels.spp_linear` takes it directly, the fused Triton kernels decode its
tiles in registers (csrc_triton/nm_tiles.py) and the host paths decode bounded row chunks
(`rows`), so no dense copy of W is ever allocated. Its operands are checked once, where
the op is called (`check`); building one checks nothing, so a layer can hand its buffers
to the op at every call for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compat import renamed_attribute
from .nm import nm_compress, nm_decompress, nm_meta_shape, nm_packed_nbytes

Tensor = torch.Tensor


@dataclass(frozen=True)
class PackedWeight:
    """A frozen N:M sparse weight (m, n) as `values` and `meta` (see spp_kernels.sparsity.nm).

    Attributes:
        values: (m, n // group * n_keep) in the weight's dtype.
        meta: int32 (m, ceil((n // group) / G)), G = 32 // (n_keep * log2(group)).
        n_keep: N, the most nonzeros per group.  group: M, the group width (4 or 8).
        in_features: n, the dense column count.
    Tensor-like: `shape` (m, n), `dtype`, `device`.
    """

    values: Tensor
    meta: Tensor
    n_keep: int
    group: int
    in_features: int

    __getattr__ = renamed_attribute  # m_group (spp_kernels.compat)

    @classmethod
    def from_dense(cls, weight: Tensor, n_keep: int, group: int, *, name: str = "") -> PackedWeight:
        """Pack an N:M sparse (m, n) weight; ValueError naming the first bad group otherwise."""
        values, meta = nm_compress(weight, n_keep, group, name=name)
        return cls(values, meta, n_keep, group, weight.shape[1])

    def check(self) -> PackedWeight:
        """Validate the (values, meta) pair against (n_keep, group, in_features); returns self."""
        check_packed(self.values, self.meta, self.n_keep, self.group, self.in_features)
        return self

    @property
    def nm(self) -> tuple[int, int]:
        """(n_keep, group)."""
        return self.n_keep, self.group

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
        return nm_decompress(self.values, self.meta, self.n_keep, self.group, self.in_features)

    def rows(self, row0: int, rows: int) -> Tensor:
        """Dense rows [row0, row0 + rows) of W (rows, n): the host chunk decoder."""
        sl = slice(row0, row0 + rows)
        return nm_decompress(
            self.values[sl], self.meta[sl], self.n_keep, self.group, self.in_features
        )

    def to(self, *args, **kwargs) -> PackedWeight:
        """`values` converted like Tensor.to (dtype and/or device); meta follows the device."""
        values = self.values.to(*args, **kwargs)
        return PackedWeight(
            values, self.meta.to(values.device), self.n_keep, self.group, self.in_features
        )


def check_packed(values: Tensor, meta: Tensor, n_keep: int, group: int, in_features: int) -> None:
    """Validate a (values, meta) pair for an N:M weight with `in_features` columns."""
    for what, t in (("values", values), ("meta", meta)):
        if not isinstance(t, Tensor):
            raise TypeError(f"packed weight: {what} must be a torch.Tensor, got {type(t).__name__}")
    nm_meta_shape(1, group, n_keep, group)  # raises nm's ValueError for a bad N:M
    if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
        raise ValueError(f"packed weight: in_features must be a positive int, got {in_features!r}")
    if in_features % group:
        raise ValueError(f"packed weight: in_features={in_features} is not a multiple of M={group}")
    if values.dim() != 2 or values.shape[1] != in_features // group * n_keep:
        raise ValueError(
            f"packed weight: values must have shape (m, {in_features // group * n_keep}) for "
            f"{n_keep}:{group} and in_features={in_features}, got {tuple(values.shape)}"
        )
    if meta.dtype != torch.int32:
        raise TypeError(f"packed weight: meta must be torch.int32, got {meta.dtype}")
    expected = nm_meta_shape(values.shape[0], in_features, n_keep, group)
    if tuple(meta.shape) != expected:
        raise ValueError(f"packed weight: meta must have shape {expected}, got {tuple(meta.shape)}")
    if meta.device != values.device:
        raise ValueError(
            f"packed weight: values on {values.device} but meta on {meta.device}; "
            "move both to one device"
        )


def packed_fraction(n_keep: int, group: int, dtype: torch.dtype = torch.float16) -> float:
    """Packed bytes / dense bytes of an N:M weight of `dtype` (per row, large n)."""
    cols = 1920  # cols // M is a multiple of every codes-per-word count G, so no padding
    itemsize = torch.empty((), dtype=dtype).element_size()
    return nm_packed_nbytes(1, cols, n_keep, group, dtype) / (cols * itemsize)


class PackedLinear(torch.nn.Module):
    """A frozen linear layer whose N:M sparse weight (m, n) is held packed: the base layer
    that an SPP adapter wraps when the frozen weights stay packed (weight_format "nm").

    Buffers `weight_values` and `weight_meta` (spp_kernels.sparsity.nm's format), optional
    frozen `bias`; `weight` is None. Its own forward (used with adapters disabled)
    decompresses W per call; SPP layers pass the packed weight to the fused op instead.
    """

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None) -> None:
        super().__init__()
        packed.check()
        self.in_features, self.out_features = packed.in_features, packed.shape[0]
        self.n_keep, self.group = packed.n_keep, packed.group
        self.register_buffer("weight_values", packed.values)
        self.register_buffer("weight_meta", packed.meta)
        self.weight = None
        # Set directly: accelerate's init_empty_weights (peft's low_cpu_mem_usage loads)
        # patches register_parameter and would move the real bias to the meta device.
        self._parameters["bias"] = (
            None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        )

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, n_keep: int, group: int) -> PackedLinear:
        """Pack `linear`'s weight (ValueError naming the first group that is not N:M)."""
        packed = PackedWeight.from_dense(linear.weight.detach(), n_keep, group)
        return cls(packed, linear.bias)

    @property
    def nm(self) -> tuple[int, int]:
        return self.n_keep, self.group

    def __getattr__(self, name: str):  # noqa: ANN204 - nn.Module's lookup, then m_group
        try:
            return super().__getattr__(name)
        except AttributeError:
            return renamed_attribute(self, name)

    def packed_weight(self) -> PackedWeight:
        """The frozen weight as a PackedWeight (views of the buffers; not re-checked)."""
        return PackedWeight(
            self.weight_values, self.weight_meta, self.n_keep, self.group, self.in_features
        )

    def dense_weight(self) -> Tensor:
        """The dense (m, n) weight, decompressed (a new tensor)."""
        return self.packed_weight().dense()

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.linear(x, self.dense_weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, nm={self.n_keep}:{self.group}"
        )
