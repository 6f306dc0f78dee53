"""Models with low-bit N:M values open with transformers' own `from_pretrained`.

`spp quantize` (`quantize_model` + `save_pretrained`) writes an ordinary transformers
checkpoint in which each quantized projection "<name>" is a `QuantizedPackedLinear`
(spp_kernels.sparsity.lowbit): tensors "<name>.weight_codes", "<name>.weight_scales",
"<name>.weight_meta" (and "<name>.bias"), and config.json carries

    "quantization_config": {"quant_method": "spp_nm_lowbit", "format_version": 1,
                            "weight_dtype": "int4", "group_size": 128,
                            "modules": {"<name>": [N, M], ...}}

This module registers that quant_method through transformers' extension point
(`register_quantization_config` / `register_quantizer`); spp_kernels.sparsity.hf_quantizer
imports it, so the start-up hook makes `AutoModelForCausalLM.from_pretrained(dir)` work
with no import. Loading replaces each listed nn.Linear by an empty QuantizedPackedLinear
(meta device) before the weights load, so the codes go straight into its buffers in their
own dtypes: the float weights never exist. The model then computes with its weights
decoded per call (SPP adapters decode tiles or row chunks; a bare layer decodes W per
forward), trains SPP adapters, and saves the same way. A transformers without spp-kernels
stops at the unknown quant_method instead of loading random projections.

Imports here stay within transformers' quantizer modules and torch at import time.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "spp_nm_lowbit"
FORMAT_VERSIONS = (1,)
VALUE_FORMATS = ("int8", "int4", "fp8")  # = lowbit.VALUE_FORMATS (not imported: see above)


class SppLowbitConfig(QuantizationConfigMixin):
    """The `quantization_config` of a model with low-bit N:M values (module docstring)."""

    def __init__(
        self,
        format_version: int = 1,
        weight_dtype: str = "int4",
        group_size: int = 128,
        modules: dict[str, list[int]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        if format_version not in FORMAT_VERSIONS:
            raise ValueError(
                f"{QUANT_METHOD}: format_version {format_version!r} is not supported by this "
                f"spp-kernels (it reads {FORMAT_VERSIONS}); upgrade spp-kernels"
            )
        if weight_dtype not in VALUE_FORMATS:
            raise ValueError(
                f"{QUANT_METHOD}: weight_dtype must be one of {VALUE_FORMATS}, got {weight_dtype!r}"
            )
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(
                f"{QUANT_METHOD}: group_size must be a positive int, got {group_size!r}"
            )
        modules = modules or {}
        if not isinstance(modules, dict) or not all(
            isinstance(k, str)
            and isinstance(v, (list, tuple))
            and len(v) == 2
            and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            and v[1] in (4, 8)
            and 1 <= v[0] < v[1]
            for k, v in modules.items()
        ):
            raise ValueError(
                f"{QUANT_METHOD}: modules must map module names to [N, M] with M in (4, 8) "
                "and 1 <= N < M"
            )
        self.format_version = format_version
        self.weight_dtype = weight_dtype
        self.group_size = group_size
        self.modules = {k: [int(v[0]), int(v[1])] for k, v in modules.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                "weight_dtype": self.weight_dtype, "group_size": self.group_size,
                "modules": dict(self.modules)}  # fmt: skip


class SppLowbitQuantizer(HfQuantizer):
    """transformers' loader of models with low-bit N:M values (module docstring)."""

    requires_calibration = True  # only checkpoints written by `spp quantize`

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        from .lowbit import QuantizedPackedLinear, check_value_format

        config = self.quantization_config
        for name, (n_keep, group) in config.modules.items():
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{QUANT_METHOD}: the model has no module {name}") from None
            if not isinstance(linear, torch.nn.Linear):
                raise ValueError(
                    f"{QUANT_METHOD}: {name} is a {type(linear).__name__}, not an nn.Linear"
                )
            kept = linear.in_features // group * n_keep
            check_value_format(config.weight_dtype, config.group_size, n_keep, kept,
                               f"{QUANT_METHOD}: {name}")  # fmt: skip
            layer = QuantizedPackedLinear.empty(
                linear.in_features, linear.out_features, linear.bias is not None, n_keep, group,
                config.weight_dtype, config.group_size, dtype=linear.weight.dtype,
                device=linear.weight.device,
            )  # fmt: skip
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        # A scale that is not finite would turn every output of its layer into NaN or inf:
        # name the file's layer now (codes cannot be out of range; the metadata is checked
        # where rows are decoded).
        source = getattr(getattr(model, "config", None), "_name_or_path", "") or "checkpoint"
        fp8 = self.quantization_config.weight_dtype == "fp8"
        for name in self.quantization_config.modules:
            layer = model.get_submodule(name)
            if layer.weight_scales.device.type == "meta":
                continue
            if not bool(torch.isfinite(layer.weight_scales).all()):
                raise ValueError(f"{source}: {name}.weight_scales holds non-finite values")
            # e4m3's NaN codes (0x7F, 0xFF) are never written by spp quantize; the kernels
            # would read them as numbers
            if fp8 and bool(((layer.weight_codes & 0x7F) == 0x7F).any()):
                raise ValueError(f"{source}: {name}.weight_codes holds fp8 NaN codes")
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # SPP adapters train on it; the codes themselves are buffers


def register() -> None:
    """Register quant_method "spp_nm_lowbit" (once)."""
    from .hf_quantizer import register_quant_method  # that module imports this one last

    register_quant_method(QUANT_METHOD, SppLowbitConfig, SppLowbitQuantizer)


register()
