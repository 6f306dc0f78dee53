"""`Frozen`: the frozen weight W (m, n) as the backends receive it, dense or N:M packed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sparsity.nm import nm_decompress


@dataclass(frozen=True)
class Frozen:
    """W (m, n): `weight` is W itself (meta None) or, with `meta` and nm = (n_keep, group),
    the packed values (m, n // group * n_keep) of spp_kernels.sparsity.nm's format."""

    weight: torch.Tensor
    meta: torch.Tensor | None
    nm: tuple[int, int] | None
    n: int

    @property
    def m(self) -> int:
        return self.weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def dense(self) -> torch.Tensor | None:
        """W when it is stored dense, else None."""
        return self.weight if self.meta is None else None

    def rows(self, row0: int, rows: int) -> torch.Tensor:
        """Dense rows [row0, row0 + rows) of W: a view when dense, decompressed when packed."""
        if self.meta is None:
            return self.weight[row0 : row0 + rows]
        values = self.weight[row0 : row0 + rows]
        meta = self.meta[row0 : row0 + rows]
        return nm_decompress(values, meta, self.nm[0], self.nm[1], self.n)
