"""SPP adapters on a bitsandbytes base (Linear4bit NF4 / FP4, Linear8bitLt): QLoRA's setting
for SPP. See `spp_kernels.adapters.layer` for the math and the shared logic.

    Y = base_layer(X) + sum_k scale_k * Dropout_k(X) W'_k^T,   W'_k = W * alpha_k[g] * beta_k

The frozen term is the base layer's own quantized matmul (its bias included); each adapter
term is the SPP op with with_base=False on the layer's `BnbWeight`, whose rows are
dequantized per chunk (never the whole (m, n) per step). Merging replaces the base by a
plain nn.Linear (a `DequantizedLinear`, which takes any input dtype as the quantized layer
did) holding W * (1 + sum_k scale_k alpha_k[g] beta_k) with W dequantized (zeros
kept bitwise), the quantized layer kept aside: `unmerge()` puts it back unchanged, and
`merge_and_unload()` gives the dequantized merged model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..ops import spp_linear
from ..ops.chunked import CHUNK_BYTES
from ..ops.groups import row_chunks
from ..ops.quantized import BnbWeight, standard_layout
from .layer import SPPLinear, _linear


class DequantizedLinear(nn.Linear):
    """A plain nn.Linear holding a dequantized (merged) weight that, like the bitsandbytes
    layer it replaces, takes any floating input: computed in the weight's dtype, returned
    in the input's (after peft's prepare_model_for_kbit_training the activations around a
    quantized layer are float32 while its weight was bfloat16). Its state dict is an
    nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)

    @classmethod
    def holding(cls, weight: torch.Tensor, bias: torch.Tensor | None, training: bool):
        """A frozen layer holding `weight` (m, n) itself and a copy of `bias`."""
        plain = _linear(weight, bias, training)
        plain.__class__ = cls
        return plain


class SPPBnbLinear(SPPLinear):
    """SPP adapters on a bitsandbytes Linear4bit / Linear8bitLt base (kept quantized).

    `quantization` names the base's format ("nf4", "fp4" or "int8"). alpha and beta default
    to float32 (as QLoRA keeps its adapters), or SPPConfig.adapter_dtype.
    """

    _repr_sparsity = False

    @staticmethod
    def _check_base(base_layer: nn.Module) -> None:
        BnbWeight.of_layer(base_layer)  # ValueError naming what is unsupported
        if type(base_layer.weight).__name__ == "Params4bit":
            standard_layout(base_layer)  # one layout for the base's matmul and the operand

    @property
    def quantization(self) -> str:
        return self.frozen_operand().kind

    def frozen_operand(self, dtype: torch.dtype | None = None) -> BnbWeight:
        """The quantized W as the op's operand, decoding to `dtype` (default: the weight's
        dtype before quantization); while merged, that of the quantized layer kept aside."""
        quantized = self._unmerged if isinstance(self._unmerged, nn.Module) else self.base_layer
        return BnbWeight.of_layer(quantized, dtype)

    def _default_adapter_dtype(self, frozen: Any) -> torch.dtype:
        return torch.float32

    def _forward_adapters(self, x: torch.Tensor, active: list[str], *args: Any,
                          **kwargs: Any) -> torch.Tensor:  # fmt: skip
        y = self.base_layer(x, *args, **kwargs)
        weight = self.frozen_operand(x.dtype if x.is_floating_point() else None)
        for name in active:
            y = y + spp_linear(
                x, weight, self.spp_alpha[name], self.spp_beta[name], None,
                scale=self.spp_scale[name], dropout_p=self.spp_dropout[name],
                training=self.training, backend=self.spp_backend[name], with_base=False,
            ).to(y.dtype)  # fmt: skip
        return y

    # ---- the frozen storage: the quantized layer, or (merged) a dense nn.Linear -------

    def dense_weight(self) -> torch.Tensor:
        """W (m, n) dequantized (a new tensor)."""
        return self.frozen_operand().dense()

    def _frozen_storage(self) -> nn.Module:
        return self.base_layer

    def _set_frozen_storage(self, value: nn.Module | torch.Tensor) -> None:
        if isinstance(value, nn.Module):
            self.base_layer = value
        else:
            self.base_layer = DequantizedLinear.holding(value, self.base_layer.bias, self.training)

    def _merged_storage(self, merged_dense: torch.Tensor) -> torch.Tensor:
        return merged_dense

    def _dense_of(self, storage: nn.Module) -> torch.Tensor:
        return BnbWeight.of_layer(storage).dense()

    def _unloaded_base(self) -> nn.Module:
        return self.base_layer

    def sparsity(self) -> float:
        """Fraction of exact zeros in the dequantized frozen weight (counted chunk by chunk)."""
        if self.merged:
            w = self.base_layer.weight
            return 1.0 - int(torch.count_nonzero(w)) / w.numel()
        weight = self.frozen_operand()
        m, n = weight.shape
        nonzero = sum(
            int(torch.count_nonzero(weight.rows(row0, rows)))
            for row0, rows in row_chunks(m, n, 1, weight.dtype.itemsize, CHUNK_BYTES)
        )
        return 1.0 - nonzero / (m * n)
