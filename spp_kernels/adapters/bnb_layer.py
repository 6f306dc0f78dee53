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

import logging
from typing import Any

import torch
from torch import nn

from ..ops import spp_linear
from ..ops.operand import zero_fraction
from ..ops.quantized import BnbWeight, standard_layout
from .layer import SPPLinear, _linear

logger = logging.getLogger(__name__)


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
        """A frozen layer holding `weight` (m, n) itself and a copy of `bias` in its dtype
        (peft's kbit preparation and bitsandbytes' forward both recast a quantized layer's
        bias)."""
        bias = None if bias is None else bias.detach().to(weight.dtype)
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
        BnbWeight.check_layer(base_layer)  # ValueError naming what is unsupported
        if type(base_layer.weight).__name__ == "Params4bit":
            standard_layout(base_layer)  # one layout for the base's matmul and the operand

    @property
    def quantization(self) -> str:
        return self.frozen_operand().kind

    def frozen_operand(self, dtype: torch.dtype | None = None) -> BnbWeight:
        """The quantized W as the op's operand, decoding to `dtype` (default: the weight's
        dtype before quantization); while merged, that of the quantized layer kept aside."""
        quantized = self._unmerged[0] if self._unmerged is not None else self.base_layer
        return BnbWeight.of_layer(quantized, dtype)

    def _default_adapter_dtype(self, frozen: Any) -> torch.dtype:
        return torch.float32

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """peft's move casts adapters to a 4-bit layer's compute dtype: the float32 default
        is kept, as an explicit adapter_dtype is."""
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        if self.spp_adapter_dtype.get(adapter_name) is None:
            for params in (self.spp_alpha, self.spp_beta):
                p = params[adapter_name] if adapter_name in params else None  # noqa: SIM401
                if p is not None and p.dtype != torch.float32:
                    params[adapter_name] = nn.Parameter(p.detach().float(), p.requires_grad)

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

    def _frozen_storage(self) -> tuple[nn.Module]:
        # in a tuple: kept aside while merged, the quantized layer must not become a
        # registered submodule (its tensors would join the merged layer's state dict)
        return (self.base_layer,)

    def _set_frozen_storage(self, value: tuple[nn.Module] | torch.Tensor) -> None:
        if isinstance(value, tuple):
            self.base_layer = value[0]
        else:
            self.base_layer = DequantizedLinear.holding(value, self.base_layer.bias, self.training)

    def _merged_storage(self, merged_dense: torch.Tensor) -> torch.Tensor:
        return merged_dense

    def _dense_of(self, storage: tuple[nn.Module]) -> torch.Tensor:
        return BnbWeight.of_layer(storage[0]).dense()

    def _unloaded_base(self) -> nn.Module:
        return self.base_layer

    def sparsity(self) -> float:
        """Fraction of exact zeros in the dequantized frozen weight (counted chunk by chunk)."""
        if self.merged:
            w = self.base_layer.weight
            return 1.0 - int(torch.count_nonzero(w)) / w.numel()
        return zero_fraction(self.frozen_operand())


def finish_dequantized(model: nn.Module) -> None:
    """After merge_and_unload: the merged DequantizedLinear layers in the model's load dtype
    (`config.dtype`), and, when no bitsandbytes layer is left, the model no longer marked
    quantized (transformers' own `remove_quantization_config`), so that save_pretrained
    writes a plain model that from_pretrained loads unquantized."""
    from ..ops.quantized import is_bnb_layer

    merged = [m for m in model.modules() if isinstance(m, DequantizedLinear)]
    if not merged:
        return
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        for layer in merged:
            layer.to(dtype)
    if any(is_bnb_layer(m) for m in model.modules()):
        logger.warning(
            "SPP: merged %d layers into dequantized weights; other layers are still quantized, "
            "so save_pretrained keeps the quantization config and from_pretrained will "
            "quantize the merged layers again",
            len(merged),
        )
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
