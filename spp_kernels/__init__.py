"""spp-kernels: sparsity-preserved parameter-efficient fine-tuning (SPP) of pruned LLMs."""

from .authors import load_authors_checkpoint
from .dropout import dropout_mask
from .layer import SPPLinear
from .model import SPPConfig, SPPModel, get_spp_model
from .ops import spp_linear
from .packed import PackedWeight, spp_linear_packed

__all__ = [
    "SPPConfig",
    "SPPLinear",
    "SPPModel",
    "PackedWeight",
    "dropout_mask",
    "get_spp_model",
    "load_authors_checkpoint",
    "spp_linear",
    "spp_linear_packed",
]
__version__ = "0.1.0"
