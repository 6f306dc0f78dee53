"""SPP adapters on an N:M packed frozen weight (a `PackedLinear` base): the layer class of
that base kind. See `spp_kernels.adapters.layer` for the math and the shared logic."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.operand import FrozenWeight
from ..sparsity.nm import nm_gather_values
from ..sparsity.packed import PackedLinear, PackedWeight
from .layer import SPPLinear, _linear


class SPPPackedLinear(SPPLinear):
    """SPP adapters on a PackedLinear base: W stays N:M packed (values (m, n/M*N) + int32
    metadata, `weight_values` / `weight_meta`); the fused kernels decode its tiles, the
    torch backend bounded row chunks. Merging packs the merged weight under the same
    metadata; unloading gives a plain dense nn.Linear with the same zeros."""

    weight_format = "nm"

    @staticmethod
    def _check_base(base_layer: nn.Module) -> None:
        if not isinstance(base_layer, PackedLinear):
            raise TypeError(
                f"SPPPackedLinear wraps a PackedLinear, got {type(base_layer).__name__}"
            )

    @property
    def nm(self) -> tuple[int, int]:
        return self.base_layer.nm

    @property
    def weight_values(self) -> torch.Tensor:
        return self.base_layer.weight_values

    @property
    def weight_meta(self) -> torch.Tensor:
        return self.base_layer.weight_meta

    def packed_weight(self) -> PackedWeight:
        """The frozen weight as a PackedWeight (views of the buffers)."""
        return self.base_layer.packed_weight()

    def frozen_operand(self) -> FrozenWeight:
        return self.base_layer.packed_weight()

    def dense_weight(self) -> torch.Tensor:
        """The frozen weight W (m, n), decompressed (a new tensor)."""
        return self.base_layer.dense_weight()

    def _frozen_storage(self) -> torch.Tensor:
        return self.base_layer.weight_values

    def _set_frozen_storage(self, value: torch.Tensor) -> None:
        self.base_layer.weight_values = value

    def _merged_storage(self, merged_dense: torch.Tensor) -> torch.Tensor:
        return nm_gather_values(merged_dense, self.base_layer.weight_meta, *self.nm)

    def _dense_of(self, storage: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return PackedWeight(storage, base.weight_meta, *base.nm, base.in_features).dense()

    def _unloaded_base(self) -> nn.Module:
        return _linear(self.base_layer.dense_weight(), self.base_layer.bias, self.training)
