"""spp-kernels: sparsity-preserved parameter-efficient fine-tuning (SPP) of pruned LLMs.

Tiers, each importing only from the ones below it:
    cli -> training / pruning / evaluate -> adapters -> ops -> sparsity -> utils
(ops also calls the device code in the top-level package csrc_triton).
"""

from . import _compat
from ._version import __version__
from .adapters import SPPConfig, SPPLinear, SPPModel, get_spp_model, load_authors_checkpoint
from .ops import dropout_mask, spp_linear, spp_linear_packed
from .sparsity import PackedWeight

_compat.install()

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
    "__version__",
]
