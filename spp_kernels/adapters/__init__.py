"""SPP as a peft method: `SPPConfig` (a peft.PeftConfig), the `SPPLinear` tuner layer, the
`SPPTuner` (peft BaseTuner), adapter files (`checkpoint`), the authors' checkpoint import
(`authors`) and the spp-kernels 0.1 entry points `SPPModel` / `get_spp_model`.

Importing this package registers the method "SPP" (prefix "spp_") with peft, so
`peft.get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and
transformers' `load_adapter` handle SPP adapters.
"""

from .authors import load_authors_checkpoint
from .config import LLAMA_TARGET_MODULES, SPPConfig
from .layer import SPPLinear
from .model import SPPModel, get_spp_model
from .registration import SPP_PEFT_TYPE, register
from .tuner import SPPTuner, find_targets

register(SPPConfig, SPPTuner)

__all__ = [
    "LLAMA_TARGET_MODULES",
    "SPPConfig",
    "SPPLinear",
    "SPPModel",
    "SPPTuner",
    "SPP_PEFT_TYPE",
    "find_targets",
    "get_spp_model",
    "load_authors_checkpoint",
]
