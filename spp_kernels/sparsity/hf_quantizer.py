"""`spp export-2to4` directories open with transformers' own `from_pretrained`.

An export (`spp_kernels.sparsity.compressed`, written by `spp export-2to4`) holds
config.json with

    "quantization_config": {"quant_method": "spp_sparse24", "format_version": 1}

and model_2to4.safetensors: each 2:4 linear weight "<key>" as "<key>::values" (m, n/2) +
"<key>::meta" int32 (m, ceil(n/32)), every other tensor dense (and no model.safetensors, so
a transformers that does not know the format stops with "no file named model.safetensors"
instead of loading random projections). This module registers that quant_method through
transformers' extension point for weight formats (`register_quantization_config` /
`register_quantizer`); the start-up hook imports it whenever transformers' quantizer table
is imported, so `AutoModelForCausalLM.from_pretrained(export_dir)` works with no import.

Loading: a WeightConverter gathers each weight's values and meta and decompresses them into
the plain nn.Linear weight (`hf_conversion.Sparse24Decompress`), bit-exact. On CPU the
result is an ordinary dense model (the quantization config is dropped, as transformers does
for `dequantize`); on a CUDA GPU with sparse tensor cores the 2:4 linears are then held as
torch semi-structured tensors (cuSPARSELt or CUTLASS, `to_semi_structured`), for inference
(such a model is not re-saved: export again from the merged dense model).

Imports here stay within transformers' quantizer modules and torch: the hook runs this
while transformers is still being imported.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "spp_sparse24"
FORMAT_VERSIONS = (1,)
TENSORS_FILE = "model_2to4.safetensors"  # = compressed.TENSORS_FILE (not imported: see above)
VALUES, META = "weight::values", "weight::meta"


class SppSparse24Config(QuantizationConfigMixin):
    """The `quantization_config` of a 2:4 export: format_version (1), semi_structured
    ("auto": sparse tensor cores where the GPU has them; "never": always dense)."""

    def __init__(self, format_version: int = 1, semi_structured: str = "auto", **kwargs: Any):
        self.quant_method = QUANT_METHOD
        if format_version not in FORMAT_VERSIONS:
            raise ValueError(
                f"spp_sparse24: export format_version {format_version!r} is not supported by this "
                f"spp-kernels (it reads {FORMAT_VERSIONS}); upgrade spp-kernels"
            )
        if semi_structured not in ("auto", "never"):
            raise ValueError(
                f"spp_sparse24: semi_structured must be 'auto' or 'never', got {semi_structured!r}"
            )
        self.format_version = format_version
        self.semi_structured = semi_structured
        self.dequantize = bool(kwargs.get("dequantize", False))

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version}


class SppSparse24Quantizer(HfQuantizer):
    """transformers' loader of 2:4 exports (see the module docstring)."""

    requires_calibration = True  # only exports: a dense model is never "quantized" on the fly

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        cuda = torch.cuda.is_available() and _device_map_uses_cuda(device_map)
        if not cuda or self.quantization_config.semi_structured == "never":
            self.quantization_config.dequantize = True  # an ordinary dense model

    def update_attn_implementation(self, config: Any) -> Any:
        # Runs before transformers resolves the checkpoint files: point it at the export's
        # file (only this quantizer knows the name; see the module docstring).
        source = getattr(config, "_name_or_path", "") or ""
        if getattr(config, "transformers_weights", None) is None and os.path.isfile(
            os.path.join(source, TENSORS_FILE)
        ):
            config.transformers_weights = TENSORS_FILE
        return config

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        for path in kwargs.get("checkpoint_files") or []:
            _check_export_file(path)
        return model

    def get_weight_conversions(self) -> list:
        from transformers.core_model_loading import WeightConverter

        from .hf_conversion import Sparse24Decompress

        return [WeightConverter([VALUES, META], "weight", [Sparse24Decompress(self)])]

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        packed = [n for n, m in model.named_modules() if getattr(m, "_spp_sparse24", False)]
        for name in packed:
            del model.get_submodule(name)._spp_sparse24
        # Saving must not try to reverse the decompression (it has no inverse op): like
        # transformers' GGUF loader, keep only the model's own conversions. A dense model
        # (CPU) then saves as an ordinary checkpoint; a semi-structured one is not saved.
        own = [c for c in getattr(model, "_weight_conversions", None) or [] if not _is_ours(c)]
        model._weight_conversions = own or None
        if not self.quantization_config.dequantize:
            from .semi_structured import to_semi_structured

            to_semi_structured(model, modules=packed)
        return model

    def is_serializable(self) -> bool:
        return bool(self.quantization_config.dequantize)

    @property
    def is_trainable(self) -> bool:
        return bool(self.quantization_config.dequantize)


def _is_ours(conversion: Any) -> bool:
    from .hf_conversion import Sparse24Decompress

    return any(isinstance(op, Sparse24Decompress) for op in getattr(conversion, "operations", []))


def _device_map_uses_cuda(device_map: Any) -> bool:
    if device_map is None:
        return False
    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    return any(str(v).startswith("cuda") or isinstance(v, int) for v in values)


def _check_export_file(path: str) -> None:
    """ValueError naming the file unless it is a readable 2:4 export of a known version whose
    packed weights all have their values and meta."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get("manifest")
            keys = set(f.keys())
    except (OSError, SafetensorError) as e:
        raise ValueError(
            f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})"
        ) from None
    if text is None:
        raise ValueError(f"{path}: no spp-kernels 2:4 manifest in its metadata (not an export)")
    try:
        manifest = json.loads(text)
        packed = manifest["packed"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: its 2:4 manifest is unreadable") from None
    for key in packed:
        for part in ("::values", "::meta"):
            if key + part not in keys:
                raise ValueError(f"{path}: packed weight {key} has no {key + part} tensor")


def register_quant_method(method: str, config_cls: type, quantizer_cls: type) -> None:
    """Register a quant_method's config and quantizer with transformers (once each)."""
    if method not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(method)(config_cls)
    if method not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(method)(quantizer_cls)


def register() -> None:
    """Register quant_method "spp_sparse24" (once)."""
    register_quant_method(QUANT_METHOD, SppSparse24Config, SppSparse24Quantizer)


register()
# The low-bit N:M format's quant_method ("spp_nm_lowbit"): registered with this one, so the
# start-up hook opens both kinds of directory.
from . import lowbit_hf  # noqa: E402, F401
