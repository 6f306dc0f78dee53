"""Every compatibility name of spp-kernels, in one place, each removed in `REMOVAL`.

* `MOVED_MODULES`: module paths of spp-kernels 0.1 (flat `spp_kernels/*.py`) and 0.2
  (`spp_kernels.adapters.tuner`). `import spp_kernels.layer` still works: a proxy forwards
  every attribute to the module's new home and warns once (DeprecationWarning). The finder
  that serves them is put on sys.meta_path by `import spp_kernels` and answers only these
  names.
* `RENAMED_ATTRIBUTES`: (class name, old attribute) -> new attribute, served by the
  classes' `__getattr__` (`renamed_attribute`).
* `RENAMED_FUNCTIONS`: (module, old name) -> new name, served by the modules' PEP 562
  `__getattr__` (`renamed_function`).

This module imports nothing from spp_kernels (it sits in the lowest tier).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

REMOVAL = "0.4"

MOVED_MODULES = {
    "spp_kernels.authors": "spp_kernels.adapters.authors",
    "spp_kernels.data": "spp_kernels.training.data",
    "spp_kernels.demo": "spp_kernels.cli.demo",
    "spp_kernels.demo_prompts": "spp_kernels.cli.demo_prompts",
    "spp_kernels.dropout": "spp_kernels.ops.dropout",
    "spp_kernels.groups": "spp_kernels.ops.groups",
    "spp_kernels.io": "spp_kernels.utils.io",
    "spp_kernels.layer": "spp_kernels.adapters.layer",
    "spp_kernels.model": "spp_kernels.adapters.peft_model",
    "spp_kernels.nm": "spp_kernels.sparsity.nm",
    "spp_kernels.packed": "spp_kernels.sparsity.packed",
    "spp_kernels.pruning.report": "spp_kernels.sparsity.report",
    "spp_kernels.reference": "spp_kernels.ops.reference",
    "spp_kernels.sparse24": "spp_kernels.sparsity.sparse24",
    "spp_kernels.torch_backend": "spp_kernels.ops.torch_backend",
    "spp_kernels.train": "spp_kernels.training.train",
    "spp_kernels.triton_backend": "spp_kernels.ops.triton_backend",
    "spp_kernels.validation": "spp_kernels.ops.validation",
    "spp_kernels.adapters.tuner": "spp_kernels.adapters.model",
}

RENAMED_ATTRIBUTES = {
    ("PackedWeight", "m_group"): "group",
    ("PackedLinear", "m_group"): "group",
}

RENAMED_FUNCTIONS = {  # also plain module attributes
    ("spp_kernels.sparsity.sparse24", "resolve_backend"): "semi_structured_backend",
    ("spp_kernels.sparsity.sparse24", "BACKENDS"): "SEMI_STRUCTURED_BACKENDS",
}


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated and will be removed in spp-kernels {REMOVAL}: use {new}",
        DeprecationWarning,
        stacklevel=3,
    )


def renamed_attribute(obj: Any, name: str) -> Any:
    """The value of a renamed attribute of `obj` (with a warning); AttributeError otherwise.
    For a class's `__getattr__`."""
    new = RENAMED_ATTRIBUTES.get((type(obj).__name__, name))
    if new is None:
        raise AttributeError(f"{type(obj).__name__!r} object has no attribute {name!r}")
    _warn(f"{type(obj).__name__}.{name}", f".{new}")
    return getattr(obj, new)


def renamed_function(module: str, name: str) -> Any:
    """A renamed function of `module` (with a warning); AttributeError otherwise. For a
    module's PEP 562 `__getattr__`."""
    new = RENAMED_FUNCTIONS.get((module, name))
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    _warn(f"{module}.{name}", f"{module}.{new}")
    return getattr(sys.modules[module], new)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths and loads each as a proxy of its new module."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: ANN001 - importlib API
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):  # noqa: ANN001
        new = MOVED_MODULES[spec.name]
        _warn(spec.name, new)
        target = importlib.import_module(new)
        proxy = types.ModuleType(spec.name, f"Deprecated alias of {new}.")
        proxy.__getattr__ = lambda name: getattr(target, name)  # PEP 562
        proxy.__dir__ = lambda: dir(target)
        return proxy

    def exec_module(self, module):  # noqa: ANN001
        pass


def install() -> None:
    """Put the finder of MOVED_MODULES on sys.meta_path (once)."""
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.append(_MovedModules())
