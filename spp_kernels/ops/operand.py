"""The frozen weight W (m, n) as the op takes it: one operand, dense or packed.

    FrozenWeight = torch.Tensor (W itself, (m, n))
                 | PackedWeight (N:M packed values + metadata, spp_kernels.sparsity.packed)
                 | QuantizedPackedWeight (N:M packed int8 / int4 / fp8 codes + scales +
                              metadata, spp_kernels.sparsity.lowbit: decoded per tile by
                              the Triton kernels, per chunk on the host; eager calls only)
                 | BnbWeight (a bitsandbytes NF4 / FP4 / int8 weight, spp_kernels.ops.quantized:
                              rows dequantized per chunk; torch backend, eager calls only)

Both are tensor-like (`shape` (m, n), `dtype`, `device`), so the backends read W's size
and type the same way for every kind; where they need dense rows they call `weight_rows`
(the host chunk decoder of each kind) and where a kind is stored dense they use it as it
is (`dense_or_none`). The Triton launchers take the operand as it is too (csrc_triton
decodes each kind's tiles in registers). A new storage format is a new kind here, with its
own `rows` and its tile decoder in csrc_triton; nothing above this module changes.

`flatten` / `unflatten` turn an operand into the custom op's tensor and int arguments and
back: the one place where the operand is taken apart.
"""

from __future__ import annotations

from typing import Union

import torch

from ..sparsity.lowbit import QuantizedPackedWeight
from ..sparsity.packed import PackedWeight
from .quantized import BnbWeight

Tensor = torch.Tensor
FrozenWeight = Union[Tensor, PackedWeight, QuantizedPackedWeight, BnbWeight]  # noqa: UP007 - a runtime alias


def weight_rows(weight: FrozenWeight, row0: int, rows: int) -> Tensor:
    """Dense rows [row0, row0 + rows) of W (rows, n): a view when W is dense, decoded when
    packed."""
    if isinstance(weight, Tensor):
        return weight[row0 : row0 + rows]
    return weight.rows(row0, rows)


def dense_or_none(weight: FrozenWeight) -> Tensor | None:
    """W itself when it is stored dense, else None."""
    return weight if isinstance(weight, Tensor) else None


def travels_whole(weight: FrozenWeight) -> bool:
    """Whether `weight` is a kind the custom op's tensor arguments cannot carry (a
    BnbWeight, a QuantizedPackedWeight): such calls run through the eager path only."""
    return isinstance(weight, (BnbWeight, QuantizedPackedWeight))


def flatten(weight: FrozenWeight) -> tuple[Tensor | object, Tensor | None, int, int]:
    """(values, meta or None, n_keep, group): the custom op's arguments for `weight`
    (a dense W: (W, None, 0, 0); a kind that `travels_whole` is passed as it is,
    (W, None, 0, 0), through the eager path only)."""
    if isinstance(weight, Tensor) or travels_whole(weight):
        return weight, None, 0, 0
    return weight.values, weight.meta, weight.n_keep, weight.group


def unflatten(
    values: Tensor | object, meta: Tensor | None, n_keep: int, group: int, n: int
) -> FrozenWeight:
    """The operand back from `flatten`'s arguments; `n` is W's column count."""
    if meta is None:
        return values
    return PackedWeight(values, meta, n_keep, group, n)


def cast_values(weight: FrozenWeight, dtype: torch.dtype) -> FrozenWeight:
    """W in `dtype` (autocast): a packed weight casts its values only, never densified; a
    quantized one decodes to `dtype`."""
    return weight.to(dtype)


def zero_fraction(weight: FrozenWeight) -> float:
    """Fraction of exact zeros in W (m, n), counted over bounded row chunks: a packed or
    quantized W is never decoded whole."""
    from .chunked import CHUNK_BYTES
    from .groups import row_chunks

    m, n = weight.shape
    nonzero = sum(
        int(torch.count_nonzero(weight_rows(weight, row0, rows)))
        for row0, rows in row_chunks(m, n, 1, weight.dtype.itemsize, CHUNK_BYTES)
    )
    return 1.0 - nonzero / (m * n)
