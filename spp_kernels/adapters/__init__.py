"""SPP adapters on Hugging Face models: `SPPConfig`, the `SPPLinear` layer, `SPPModel` /
`get_spp_model`, adapter files (`checkpoint`) and the authors' checkpoint import (`authors`)."""

from .authors import load_authors_checkpoint
from .config import LLAMA_TARGET_MODULES, SPPConfig
from .layer import SPPLinear
from .model import SPPModel, find_targets, get_spp_model

__all__ = [
    "LLAMA_TARGET_MODULES",
    "SPPConfig",
    "SPPLinear",
    "SPPModel",
    "find_targets",
    "get_spp_model",
    "load_authors_checkpoint",
]
