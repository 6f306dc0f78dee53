"""SPP as a peft method: `SPPConfig` (a peft.PeftConfig, `config`), the tuner layers
(`layer`: SPPLinear, SPPPackedLinear), the `SPPTuner` (peft BaseTuner, `model`), adapter
files (`checkpoint`), the authors' checkpoint import (`authors`) and the spp-kernels 0.1
entry points `SPPModel` / `get_spp_model` (`peft_model`).

Importing this package registers the method "SPP" (prefix "spp_") with peft, so
`peft.get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and
transformers' `load_adapter` handle SPP adapters; the start-up hook installed with the
package does the same whenever peft is imported. The other names are imported on first
use (the tuner and layers load the op).
"""

from __future__ import annotations

from ..utils.lazy import by_module, lazy_getattr
from .config import LLAMA_TARGET_MODULES, SPPConfig
from .registration import SPP_PEFT_TYPE, register_config

register_config(SPPConfig)

_LAZY = by_module(
    {
        ".layer": ("SPPLinear",),
        ".packed_layer": ("SPPPackedLinear",),
        ".peft_model": ("SPPModel", "get_spp_model"),
        ".model": ("SPPTuner", "find_targets"),
        ".authors": ("load_authors_checkpoint",),
    }
)
__all__ = ["LLAMA_TARGET_MODULES", "SPPConfig", "SPP_PEFT_TYPE", *sorted(_LAZY)]


__getattr__ = lazy_getattr(__name__, _LAZY)
