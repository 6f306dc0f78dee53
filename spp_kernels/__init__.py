"""spp-kernels: sparsity-preserved parameter-efficient fine-tuning (SPP) of pruned LLMs."""

from .dropout import dropout_mask
from .layer import SPPLinear
from .ops import spp_linear

__all__ = ["SPPLinear", "dropout_mask", "spp_linear"]
__version__ = "0.1.0"
