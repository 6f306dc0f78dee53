"""2:4 inference on the sparse tensor cores: backend choice and model conversion.

Backends (PyTorch's, chosen explicitly rather than by the library default, which changed
between PyTorch versions): cuSPARSELt is used where the build has it (the only PyTorch 2:4
backend on compute capability 9.x, H100/H200); PyTorch's CUTLASS 2:4 kernels are built for
8.x (A100, A10, L4...) only. Shape minimums come from the backend class's
``_DTYPE_SHAPE_CONSTRAINTS`` (e.g. cuSPARSELt fp16/bf16: rows and cols multiples of 16;
CUTLASS fp16/bf16: rows multiple of 32, cols multiple of 64 in torch 2.13).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .nm import check_nm
from .report import is_adapter_layer

SEMI_STRUCTURED_BACKENDS = ("auto", "cusparselt", "cutlass")
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)


# ---- backend choice ---------------------------------------------------------------------


def semi_structured_backend(
    device: torch.device | str, backend: str = "auto"
) -> tuple[str | None, str | None]:
    """The semi-structured backend for weights on ``device``: (name, None) or (None, reason).

    "auto": cuSPARSELt when this PyTorch build has it (compute capability >= 8.0), else
    CUTLASS on 8.x. An explicit "cutlass" on a 9.x GPU is refused: PyTorch builds its CUTLASS
    2:4 kernels for 8.x only.
    """
    if backend not in SEMI_STRUCTURED_BACKENDS:
        raise ValueError(f"backend must be one of {SEMI_STRUCTURED_BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"weights are on {device}; 2:4 sparse tensor cores need a CUDA GPU"
    if not torch.cuda.is_available():
        return None, "CUDA is not available"
    major, minor = torch.cuda.get_device_capability(device)
    cc = f"{major}.{minor}"
    if major < 8:
        return None, f"compute capability {cc} has no sparse tensor cores (needs >= 8.0)"
    has_cusparselt = torch.backends.cusparselt.is_available()
    cutlass_ok = major == 8
    if backend in ("auto", "cusparselt") and has_cusparselt:
        return "cusparselt", None
    if backend in ("auto", "cutlass") and cutlass_ok:
        return "cutlass", None
    if backend == "cutlass":
        return None, (
            f"PyTorch's CUTLASS 2:4 kernels support compute capability 8.x only, this GPU is "
            f"{cc}; use backend='cusparselt'"
        )
    return None, f"this PyTorch build has no cuSPARSELt (needed on compute capability {cc})"


def _backend_class(backend: str) -> type:
    return (
        torch.sparse.SparseSemiStructuredTensorCUTLASS
        if backend == "cutlass"
        else torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    )


@contextlib.contextmanager
def _force_cutlass(value: bool) -> Iterator[None]:
    # to_sparse_semi_structured reads this class flag to pick the subclass; set it for the
    # chosen backend and restore the caller's value afterwards.
    cls = torch.sparse.SparseSemiStructuredTensor
    previous = cls._FORCE_CUTLASS
    cls._FORCE_CUTLASS = value
    try:
        yield
    finally:
        cls._FORCE_CUTLASS = previous


# ---- conversion to SparseSemiStructuredTensor -------------------------------------------


def semi_structured_weight(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """``weight`` (m, n), 2:4, on a CUDA device, as a SparseSemiStructuredTensor of ``backend``.

    backend: "cusparselt" or "cutlass" (resolve "auto" with ``semi_structured_backend`` first). The
    class flag ``_FORCE_CUTLASS`` is set for the call and restored afterwards; the result's
    class is checked, so a PyTorch that ignored the flag would fail loudly rather than
    silently use the other backend.
    """
    if backend not in ("cusparselt", "cutlass"):
        raise ValueError(
            f"semi_structured_weight: backend must be 'cusparselt' or 'cutlass', got {backend!r}"
        )
    with _force_cutlass(backend == "cutlass"), torch.no_grad():
        sparse = torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())
    expected = _backend_class(backend)
    if isinstance(sparse, torch.sparse.SparseSemiStructuredTensor) and not isinstance(
        sparse, expected
    ):
        raise RuntimeError(
            f"semi_structured_weight: asked for {backend}, PyTorch returned {type(sparse).__name__}"
        )
    return sparse


@dataclasses.dataclass
class SemiStructuredReport:
    """What ``to_semi_structured`` did.

    backend: backend of the converted layers ("cusparselt", "cutlass") or None;
    converted: names of layers whose weight is now semi-structured; skipped: name -> reason
    for each candidate left dense; warning: set when nothing could be converted because of
    the device or the PyTorch build.
    """

    backend: str | None = None
    converted: list[str] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    warning: str | None = None
    torch_version: str = torch.__version__

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "backend": self.backend,
            "converted": list(self.converted),
            "skipped": dict(self.skipped),
            "warning": self.warning,
            "torch_version": self.torch_version,
            "num_converted": len(self.converted),
            "num_skipped": len(self.skipped),
        }


def _refuse_unmerged(model: nn.Module, what: str) -> None:
    unmerged = [name or "<root>" for name, mod in model.named_modules() if is_adapter_layer(mod)]
    if unmerged:
        shown = ", ".join(unmerged[:5]) + (
            f" and {len(unmerged) - 5} more" if len(unmerged) > 5 else ""
        )
        raise ValueError(
            f"{what}: {len(unmerged)} SPPLinear layer(s) are not merged ({shown}); call "
            "merge_and_unload() on the SPP model (or SPPLinear.merge()) first, so each layer "
            "is a plain nn.Linear holding W * (1 + scale * alpha[g] * beta)"
        )


def _selected_linears(
    model: nn.Module, modules: Iterable[str | nn.Module] | None, what: str
) -> dict[str, nn.Linear]:
    """Name -> nn.Linear for ``modules`` (names or module objects), or every nn.Linear."""
    names = {mod: name for name, mod in model.named_modules()}
    if modules is None:
        return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    if isinstance(modules, (str, nn.Module)):
        modules = [modules]
    selected: dict[str, nn.Linear] = {}
    for item in modules:
        if isinstance(item, str):
            try:
                mod, name = model.get_submodule(item), item
            except AttributeError:
                raise ValueError(f"{what}: the model has no submodule named {item!r}") from None
        elif isinstance(item, nn.Module):
            if item not in names:
                raise ValueError(f"{what}: a listed {type(item).__name__} is not part of the model")
            mod, name = item, names[item]
        else:
            raise TypeError(
                f"{what}: modules must hold names or nn.Modules, got {type(item).__name__}"
            )
        if is_adapter_layer(mod):
            raise ValueError(
                f"{what}: {name} is an SPPLinear that is not merged; call merge_and_unload() "
                "on the SPP model (or SPPLinear.merge()) first"
            )
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"{what}: {name} is a {type(mod).__name__}, not an nn.Linear")
        selected[name] = mod
    return selected


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters registered by more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def _skip_reason(linear: nn.Linear, backend: str, shared: set[int]) -> str | None:
    w = linear.weight
    if isinstance(w, torch.sparse.SparseSemiStructuredTensor):
        return "weight is already semi-structured"
    if id(w) in shared:
        return "weight is tied to another module (e.g. embeddings); converting would break it"
    if w.dtype not in SEMI_STRUCTURED_DTYPES:
        return f"dtype {w.dtype} (semi-structured inference here needs float16 or bfloat16)"
    limits = _backend_class(backend)._DTYPE_SHAPE_CONSTRAINTS[w.dtype]
    rows, cols = w.shape
    if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
        return (
            f"shape {tuple(w.shape)}: {backend} needs rows a multiple of "
            f"{limits.sparse_min_rows} and cols a multiple of {limits.sparse_min_cols}"
        )
    try:
        check_nm(w.detach(), 2, 4)
    except ValueError as err:
        return f"not 2:4 sparse ({err})"
    return None


def to_semi_structured(
    model: nn.Module,
    modules: Iterable[str | nn.Module] | None = None,
    backend: str = "auto",
) -> tuple[nn.Module, SemiStructuredReport]:
    """Hold each qualifying 2:4 nn.Linear weight as a SparseSemiStructuredTensor (in place).

    Args:
        model: a merged model (no SPPLinear left; call ``merge_and_unload()`` first).
        modules: names or nn.Linear objects to convert; None = every nn.Linear of the model.
        backend: "auto", "cusparselt" or "cutlass" (see ``semi_structured_backend``).

    Returns (model, report). A layer is converted when its weight is on a supported GPU,
    float16/bfloat16, its shape is a multiple of the backend's tile and it is 2:4; every
    other candidate stays dense and appears in ``report.skipped`` with the reason. On CPU or
    an unsupported GPU nothing changes: a UserWarning is issued and the report says why.
    The converted layers are for inference (no gradient through the sparse weight).

    Raises ValueError (before changing anything) if the model holds unmerged SPPLinear
    layers or ``backend`` is unknown; TypeError for a listed module that is not nn.Linear.
    """
    if backend not in SEMI_STRUCTURED_BACKENDS:
        raise ValueError(
            f"to_semi_structured: backend must be one of {SEMI_STRUCTURED_BACKENDS}, got {backend!r}"
        )
    what = "to_semi_structured"
    _refuse_unmerged(model, what)
    linears = _selected_linears(model, modules, what)
    shared = _shared_weights(model)
    report = SemiStructuredReport()
    resolved: dict[torch.device, tuple[str | None, str | None]] = {}
    used: set[str] = set()
    device_reasons: set[str] = set()
    for name, linear in linears.items():
        device = linear.weight.device
        if device not in resolved:
            resolved[device] = semi_structured_backend(device, backend)
        chosen, unsupported = resolved[device]
        if chosen is None:
            report.skipped[name] = unsupported
            device_reasons.add(unsupported)
            continue
        reason = _skip_reason(linear, chosen, shared)
        if reason is not None:
            report.skipped[name] = reason
            continue
        try:
            sparse = semi_structured_weight(linear.weight, chosen)
        except (RuntimeError, NotImplementedError) as err:  # e.g. a cuSPARSELt/arch mismatch
            report.skipped[name] = f"{chosen} conversion failed: {err}"
            continue
        linear.weight = nn.Parameter(sparse, requires_grad=False)
        report.converted.append(name)
        used.add(chosen)
    report.backend = "+".join(sorted(used)) if used else None
    if not report.converted and device_reasons:
        report.warning = (
            "to_semi_structured: no layer converted, the model stays dense: "
            + "; ".join(sorted(device_reasons))
        )
        warnings.warn(report.warning, UserWarning, stacklevel=2)
    return model, report
