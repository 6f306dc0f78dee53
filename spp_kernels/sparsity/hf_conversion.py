"""The weight conversion behind `hf_quantizer`: a 2:4 export's values + meta -> the dense
nn.Linear weight, while transformers loads the checkpoint (imported at load time only)."""

from __future__ import annotations

from typing import Any

from transformers.core_model_loading import ConversionOps
from transformers.quantizers.quantizers_utils import get_module_from_name

from .hf_quantizer import META, VALUES
from .nm import nm_decompress


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, list) else x


class Sparse24Decompress(ConversionOps):
    """{VALUES: [values (m, n/2)], META: [meta]} -> {layer weight: dense (m, n)}, bit-exact,
    in the model parameter's dtype."""

    def __init__(self, hf_quantizer: Any) -> None:
        self.hf_quantizer = hf_quantizer  # its presence keeps transformers from casting inputs

    def convert(self, input_dict: dict[str, Any], full_layer_name: str | None = None,
                model: Any = None, **kwargs: Any) -> dict[str, Any]:  # fmt: skip
        if VALUES not in input_dict or META not in input_dict:
            raise ValueError(
                f"{full_layer_name}: a 2:4 weight needs both {VALUES} and {META}, got {sorted(input_dict)}"
            )
        values, meta = _first(input_dict[VALUES]), _first(input_dict[META])
        dense = nm_decompress(values, meta, 2, 4, values.shape[1] * 2)
        module, name = get_module_from_name(model, full_layer_name)
        target = getattr(module, name, None)
        if target is not None and target.dtype != dense.dtype:
            dense = dense.to(target.dtype)  # from_pretrained(dtype=...) other than the stored one
        # Ops are deep-copied per weight: mark the module, not this op or the quantizer.
        module._spp_sparse24 = True
        return {full_layer_name: dense}
