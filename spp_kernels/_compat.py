"""Module paths from before the tiered layout (spp-kernels 0.1.0, flat `spp_kernels/*.py`).

`import spp_kernels.reference` (and the other names in MOVED) still works: a proxy module
forwards every attribute to the module's new home and warns once with DeprecationWarning.
New code should import from the new paths (see README, "Layout").
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

MOVED = {
    "spp_kernels.authors": "spp_kernels.adapters.authors",
    "spp_kernels.data": "spp_kernels.training.data",
    "spp_kernels.demo": "spp_kernels.cli.demo",
    "spp_kernels.demo_prompts": "spp_kernels.cli.demo_prompts",
    "spp_kernels.dropout": "spp_kernels.ops.dropout",
    "spp_kernels.groups": "spp_kernels.ops.groups",
    "spp_kernels.io": "spp_kernels.utils.io",
    "spp_kernels.layer": "spp_kernels.adapters.layer",
    "spp_kernels.model": "spp_kernels.adapters.model",
    "spp_kernels.nm": "spp_kernels.sparsity.nm",
    "spp_kernels.packed": "spp_kernels.sparsity.packed",
    "spp_kernels.pruning.report": "spp_kernels.sparsity.report",
    "spp_kernels.reference": "spp_kernels.ops.reference",
    "spp_kernels.sparse24": "spp_kernels.sparsity.sparse24",
    "spp_kernels.torch_backend": "spp_kernels.ops.torch_backend",
    "spp_kernels.train": "spp_kernels.training.train",
    "spp_kernels.triton_backend": "spp_kernels.ops.triton_backend",
    "spp_kernels.validation": "spp_kernels.ops.validation",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old names and loads each as a proxy of its new module."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib API
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):  # noqa: ANN001
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} has moved to {new}; the old path is a deprecated alias",
            DeprecationWarning,
            stacklevel=2,
        )
        target = importlib.import_module(new)
        proxy = types.ModuleType(spec.name, f"Deprecated alias of {new}.")
        proxy.__getattr__ = lambda name: getattr(target, name)  # PEP 562
        proxy.__dir__ = lambda: dir(target)
        return proxy

    def exec_module(self, module):  # noqa: ANN001
        pass


def install() -> None:
    """Put the alias finder on sys.meta_path (once)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
