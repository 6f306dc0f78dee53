"""spp-kernels: sparsity-preserved parameter-efficient fine-tuning (SPP) of pruned LLMs.

Tiers, each importing only from the ones below it:
    cli -> training / pruning / evaluate -> adapters -> ops -> sparsity -> utils, compat
(ops also calls the device code in the top-level package csrc_triton).

The public names below are imported on first use (PEP 562), so `import spp_kernels.ops`
or `import spp_kernels.sparsity` does not load peft, transformers or accelerate.
"""

from __future__ import annotations

import _spp_kernels_hook

from . import compat
from ._version import __version__
from .utils.lazy import by_module, lazy_getattr

_LAZY = by_module(
    {
        ".adapters": (
            "SPPConfig",
            "SPPLinear",
            "SPPModel",
            "get_spp_model",
            "load_authors_checkpoint",
        ),
        ".ops": ("dropout_mask", "spp_linear", "spp_linear_packed"),
        ".sparsity": ("PackedWeight",),
    }
)
__all__ = [*sorted(_LAZY), "__version__"]

compat.install()
# `import spp_kernels` registers SPP with peft and the 2:4 format with transformers (now if
# they are imported, else when they are), even where the start-up hook is turned off.
_spp_kernels_hook.install(force=True)


__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
