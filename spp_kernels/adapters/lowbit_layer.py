"""SPP adapters on an N:M packed frozen weight with low-bit values (a `QuantizedPackedLinear`
base: int8, int4 or fp8 codes + scales + N:M metadata). See `spp_kernels.adapters.layer`
for the math and the shared logic.

The op takes the layer's `QuantizedPackedWeight` as its operand: the fused Triton kernels
decode its tiles in registers, the torch backend and the chunked path bounded row chunks.
Merging replaces the base by a float `PackedLinear` (same metadata) holding
W * (1 + sum_k scale_k alpha_k[g] beta_k) with W decoded in the compute dtype (zeros kept
bitwise); the quantized base is kept aside, so `unmerge()` restores the same object, and
unloading gives a plain nn.Linear with the decoded (merged) weight (unmerged, a base loaded
with its codes is given back as it is).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.operand import zero_fraction
from ..sparsity.lowbit import QuantizedPackedLinear, QuantizedPackedWeight, stored_value_format
from ..sparsity.nm import nm_gather_values
from ..sparsity.packed import PackedLinear, PackedWeight
from .layer import SPPLinear, _linear


class SPPQuantizedPackedLinear(SPPLinear):
    """SPP adapters on a QuantizedPackedLinear base (kept quantized while unmerged)."""

    weight_format = "nm"
    _repr_sparsity = False

    @staticmethod
    def _check_base(base_layer: nn.Module) -> None:
        if not isinstance(base_layer, QuantizedPackedLinear):
            raise TypeError(
                "SPPQuantizedPackedLinear wraps a QuantizedPackedLinear, got "
                f"{type(base_layer).__name__}"
            )

    def _quantized_base(self) -> QuantizedPackedLinear:
        """The quantized base: the base layer, or (merged) the one kept aside."""
        return self._unmerged[0] if self._unmerged is not None else self.base_layer

    @property
    def nm(self) -> tuple[int, int]:
        return self._quantized_base().nm

    @property
    def weight_dtype(self) -> str:
        """The base's value format: "int8", "int4" or "fp8"."""
        return self._quantized_base().value_format

    def frozen_operand(self) -> QuantizedPackedWeight | PackedWeight:
        if self._unmerged is not None:
            return self.base_layer.packed_weight()
        return self.base_layer.quantized_weight()

    def dense_weight(self) -> torch.Tensor:
        """The frozen weight W (m, n), decoded in the compute dtype (a new tensor)."""
        return self._quantized_base().dense_weight()

    def _default_adapter_dtype(self, frozen: QuantizedPackedWeight) -> torch.dtype:
        return frozen.dtype

    # ---- the frozen storage: the quantized base, or (merged) a float PackedLinear ------

    def _frozen_storage(self) -> tuple[nn.Module]:
        # in a tuple: kept aside while merged, the quantized base must not become a
        # registered submodule (its buffers would join the merged layer's state dict)
        return (self.base_layer,)

    def _set_frozen_storage(self, value: tuple[nn.Module] | torch.Tensor) -> None:
        if isinstance(value, tuple):
            self.base_layer = value[0]
            return
        base = self._quantized_base()
        packed = PackedWeight(value, base.weight_meta, *base.nm, base.in_features)
        self.base_layer = PackedLinear(packed, base.bias).train(self.training)

    def _merged_storage(self, merged_dense: torch.Tensor) -> torch.Tensor:
        return nm_gather_values(merged_dense, self._quantized_base().weight_meta, *self.nm)

    def _dense_of(self, storage: tuple[nn.Module]) -> torch.Tensor:
        return storage[0].dense_weight()

    # True for a layer over a base loaded with its codes (spp quantize: dispatch_lowbit):
    # unloading unmerged gives that base back, as the checkpoint's config still describes it.
    # A base quantized while wrapping a float layer unloads to the decoded nn.Linear instead.
    loaded_quantized = False

    def _unloaded_base(self) -> nn.Module:
        if self.loaded_quantized and not self.merged:
            return self.base_layer
        return _linear(self.base_layer.dense_weight(), self.base_layer.bias, self.training)

    def sparsity(self) -> float:
        """Fraction of exact zeros in the decoded frozen weight (counted chunk by chunk)."""
        return zero_fraction(self._quantized_base().quantized_weight())


def finish_decoded(model: nn.Module) -> None:
    """After merge_and_unload of a model loaded with its low-bit codes (quant_method
    "spp_nm_lowbit", `spp quantize`): once no QuantizedPackedLinear is left, the model is
    no longer marked quantized (transformers' `remove_quantization_config`), so
    save_pretrained writes a plain model."""
    config = getattr(model, "config", None)
    if stored_value_format(config) is None:
        return
    if any(isinstance(m, QuantizedPackedLinear) for m in model.modules()):
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(config, "quantization_config"):
        del config.quantization_config
