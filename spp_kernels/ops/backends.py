"""Which backend computes an SPP call: "triton" (csrc_triton/, CUDA, or CPU under
TRITON_INTERPRET=1), "torch" (spp_kernels.ops.torch_backend, any device, float64 too) or
"auto" (triton for CUDA tensors when Triton is importable, torch otherwise)."""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch

from .validation import check_backend


@functools.cache
def triton_available() -> bool:
    """Whether the triton package is installed (looked up once, never imported here)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run under its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ("triton" or "torch") that `backend` means for tensors on `device`."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("spp_linear: backend='triton' needs the triton package installed")
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"spp_linear: backend='triton' needs CUDA tensors (got {device}); "
                "set TRITON_INTERPRET=1 to run the kernels on CPU, or use backend='torch'"
            )
    return backend


def implementation(backend: str) -> ModuleType:
    """The module computing a resolved backend (the Triton one is imported on first use)."""
    if backend == "triton":
        from . import triton_backend

        return triton_backend
    from . import torch_backend

    return torch_backend
