"""Lazy package attributes (PEP 562): a package's public names are imported on first use,
so importing a package (e.g. `spp_kernels.ops`) does not pay for peft or transformers."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def by_module(names: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """{".module": (name, ...)} -> {name: ".module"} (the table `lazy_getattr` reads)."""
    return {name: module for module, some in names.items() for name in some}


def lazy_getattr(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: name -> getattr(import of `where[name]`,
    relative to `package`), cached on the package after the first use."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
