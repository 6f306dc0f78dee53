"""2:4 semi-structured sparsity for inference: checks, packing, GPU conversion, compact storage.

After SPP training and ``merge_and_unload`` a 2:4-pruned model is still exactly 2:4 (every
zero of W stays zero). This module turns that into speed and bytes:

* ``is_2to4`` / ``check_2to4``: every group of 4 consecutive input columns of a weight
  (m, n) holds at most 2 nonzeros (zero judged by value, so -0.0 counts as zero).
* ``compress`` / ``decompress``: the 2:4 case of the N:M packed format of
  ``spp_kernels.nm``: values (m, n/2) + int32 metadata (m, ceil(n/32)), exact round trip.
* ``to_semi_structured``: swaps each qualifying nn.Linear weight for a
  ``torch.sparse.SparseSemiStructuredTensor`` so F.linear runs on the sparse tensor cores
  (cuSPARSELt or CUTLASS), leaving the rest dense and saying why in a report.
* ``save_compressed`` / ``load_compressed``: a model directory holding 2:4 weights packed
  (about 56 % of their dense fp16 bytes) and every other tensor dense, bit-exact on reload.

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
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.hf import check_finite
from ..utils.io import atomic_save_safetensors, atomic_write_text
from .nm import PACKABLE_DTYPES, check_nm, is_nm, nm_compress, nm_decompress, nm_packed_nbytes
from .report import is_adapter_layer

__all__ = [
    "SEMI_STRUCTURED_BACKENDS",
    "SemiStructuredReport",
    "check_2to4",
    "compress",
    "decompress",
    "is_2to4",
    "llama_compressed_fraction",
    "load_compressed",
    "resolve_backend",
    "semi_structured_backend",
    "save_compressed",
    "semi_structured_weight",
    "to_semi_structured",
]

SEMI_STRUCTURED_BACKENDS = ("auto", "cusparselt", "cutlass")
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
TENSORS_FILE = "model_2to4.safetensors"
MANIFEST_FILE = "model_2to4.json"
FORMAT_NAME = "spp-kernels/2:4-compressed"
FORMAT_VERSION = 1
_VALUES_SUFFIX = "::values"
_META_SUFFIX = "::meta"


# ---- pattern checks and packing ---------------------------------------------------------


def is_2to4(weight: torch.Tensor) -> bool:
    """True iff weight is 2-D (m, n), 4 divides n, and every group of 4 columns has <= 2 nonzeros."""
    return is_nm(weight, 2, 4)


def check_2to4(weight: torch.Tensor, name: str = "") -> None:
    """Raise ValueError naming ``name`` and the first offending row/group unless weight is 2:4."""
    check_nm(weight, 2, 4, name=name)


def compress(weight: torch.Tensor, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2:4 weight (m, n) into values (m, n/2) and int32 meta (m, ceil(n/32)).

    ``nm_compress(weight, 2, 4)``: meta word j of a row holds groups 8j..8j+7, 4 bits each
    (two 2-bit positions). Raises ValueError naming ``name`` if weight is not 2:4.
    """
    return nm_compress(weight, 2, 4, name=name)


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``compress``: the dense (m, 2 * values.shape[1]) weight."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError("decompress: values must be a 2-D tensor (m, n/2)")
    return nm_decompress(values, meta, 2, 4, values.shape[1] * 2)


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
        check_2to4(w.detach())
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


# ---- compressed storage -----------------------------------------------------------------


def _dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    state = {}
    for key, t in model.state_dict().items():
        if isinstance(t, torch.sparse.SparseSemiStructuredTensor):
            t = t.to_dense()
        state[key] = t.detach()
    return state


def _storage_key(t: torch.Tensor) -> tuple:
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
        t.dtype,
    )


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """key -> first key viewing the same memory (tied weights are stored once)."""
    first: dict[tuple, str] = {}
    aliases = {}
    for key, t in state.items():
        if t.device.type == "meta":
            raise ValueError(
                f"save_compressed: {key} is on the meta device; materialise the model first"
            )
        ident = _storage_key(t)
        if ident in first:
            aliases[key] = first[ident]
        else:
            first[ident] = key
    return aliases


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_compressed(
    model: nn.Module,
    directory: str | os.PathLike,
    modules: Iterable[str | nn.Module] | None = None,
) -> dict[str, Any]:
    """Write ``model`` with its 2:4 linear weights packed (values + meta) and the rest dense.

    Files in ``directory`` (created if needed), each written atomically:
      model_2to4.safetensors  for a packed weight "<key>": "<key>::values" (m, n/2) and
                              "<key>::meta" int32 (m, ceil(n/32)); every other state_dict
                              tensor under its own key; tied tensors once. The manifest is
                              also in the file's metadata (key "manifest").
      model_2to4.json         the manifest: format, version, which keys are packed (shape,
                              dtype), dense keys, aliases, byte counts. Written last.

    ``modules`` = None packs every nn.Linear weight that is 2:4; listed modules (names or
    objects) must all be 2:4, else ValueError naming each offender before anything is written.
    Returns the manifest (with "bytes_on_disk" and "fraction_of_dense" measured).
    """
    what = "save_compressed"
    _refuse_unmerged(model, what)
    explicit = modules is not None
    linears = _selected_linears(model, modules, what)
    state = _dense_state(model)
    aliases = _aliases(state)
    for key, tensor in state.items():
        check_finite(tensor, key, what)

    packed_keys: list[str] = []
    offenders: list[str] = []
    for name in linears:
        key = f"{name}.weight" if name else "weight"
        if key not in state or key in aliases:
            continue  # tied to an earlier tensor: stored (and packed or not) under that key
        w = state[key]
        if w.dtype in PACKABLE_DTYPES and is_2to4(w):
            packed_keys.append(key)
        elif explicit:
            try:
                check_2to4(w, name=name)
                offenders.append(f"{name}: dtype {w.dtype} cannot be packed")
            except ValueError as err:
                offenders.append(str(err))
    if offenders:
        raise ValueError(
            f"{what}: {len(offenders)} listed layer(s) are not 2:4 sparse and cannot be "
            "compressed:\n  " + "\n  ".join(offenders)
        )

    tensors: dict[str, torch.Tensor] = {}
    packed_info: dict[str, dict[str, Any]] = {}
    for key in packed_keys:
        values, meta = compress(state[key], name=key)
        tensors[key + _VALUES_SUFFIX] = values
        tensors[key + _META_SUFFIX] = meta
        packed_info[key] = {"shape": list(state[key].shape), "dtype": str(state[key].dtype)}
    dense_keys = [k for k in state if k not in packed_info and k not in aliases]
    for key in dense_keys:
        tensors[key] = state[key]

    unique = [state[k] for k in state if k not in aliases]
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "n": 2,
        "m": 4,
        "packed": packed_info,
        "dense": dense_keys,
        "aliases": aliases,
        "dense_bytes": sum(_nbytes(t) for t in unique),
        "dense_fp16_bytes": sum(t.numel() * 2 for t in unique),
        "tensor_bytes": sum(_nbytes(t) for t in tensors.values()),
    }
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=1, sort_keys=True)
    atomic_save_safetensors(tensors, path / TENSORS_FILE, metadata={"manifest": text})
    atomic_write_text(path / MANIFEST_FILE, text + "\n")
    on_disk = (path / TENSORS_FILE).stat().st_size
    return {
        **manifest,
        "bytes_on_disk": on_disk,
        "fraction_of_dense": on_disk / manifest["dense_bytes"],
    }


def _read_manifest(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    tensors_path = path / TENSORS_FILE
    if not tensors_path.is_file():
        raise FileNotFoundError(
            f"load_compressed: {tensors_path} not found (not a save_compressed directory?)"
        )
    with safe_open(str(tensors_path), framework="pt") as f:
        text = (f.metadata() or {}).get("manifest")
    if text is None:
        raise ValueError(f"load_compressed: {tensors_path} carries no manifest metadata")
    manifest = json.loads(text)
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"load_compressed: {tensors_path} has format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}; expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    json_path = path / MANIFEST_FILE
    if json_path.is_file() and json.loads(json_path.read_text()) != manifest:
        raise ValueError(
            f"load_compressed: {json_path} does not match the manifest inside {tensors_path} "
            "(an interrupted save?); save again"
        )
    return manifest


def load_compressed(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a ``save_compressed`` directory into ``model`` (same architecture), in place.

    Packed weights are unpacked on the parameter's device and copied in; values are
    bit-exact when the model has the saved dtypes (otherwise ``copy_`` casts). Key, shape
    and semi-structured mismatches raise ValueError before any parameter changes.
    Returns the model.
    """
    from safetensors import safe_open

    path = Path(directory)
    manifest = _read_manifest(path)
    state = model.state_dict()
    saved = set(manifest["packed"]) | set(manifest["dense"]) | set(manifest["aliases"])
    missing, unexpected = sorted(set(state) - saved), sorted(saved - set(state))
    if missing or unexpected:
        raise ValueError(
            f"load_compressed: the model does not match {path}: missing in the file "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, not in the model "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    with safe_open(str(path / TENSORS_FILE), framework="pt") as f:
        shapes = {key: info["shape"] for key, info in manifest["packed"].items()}
        shapes.update({key: list(f.get_slice(key).get_shape()) for key in manifest["dense"]})
        for key, target in state.items():
            if isinstance(target, torch.sparse.SparseSemiStructuredTensor):
                raise ValueError(
                    f"load_compressed: {key} is semi-structured; load into a dense model, then "
                    "call to_semi_structured"
                )
            if target.device.type == "meta":
                raise ValueError(
                    f"load_compressed: {key} is on the meta device; materialise the model first"
                )
            source = manifest["aliases"].get(key, key)
            if list(target.shape) != shapes[source]:
                raise ValueError(
                    f"load_compressed: {key} has shape {tuple(target.shape)} in the model but "
                    f"{tuple(shapes[source])} in {path}"
                )
        # Two passes over the (memory-mapped) file: every tensor is checked before any
        # parameter changes, without holding a second copy of the model.
        for key in (*manifest["packed"], *manifest["dense"]):
            stored = key + _VALUES_SUFFIX if key in manifest["packed"] else key
            check_finite(f.get_tensor(stored), key, "load_compressed")
        with torch.no_grad():
            for key, target in state.items():
                source = manifest["aliases"].get(key, key)
                if source in manifest["packed"]:
                    values = f.get_tensor(source + _VALUES_SUFFIX).to(target.device)
                    meta = f.get_tensor(source + _META_SUFFIX).to(target.device)
                    tensor = decompress(values, meta)
                else:
                    tensor = f.get_tensor(source).to(target.device)
                target.copy_(tensor)
    return model


def llama_compressed_fraction(config: Any, dtype: torch.dtype = torch.float16) -> float:
    """Expected size of a ``save_compressed`` LLaMA checkpoint over its dense size.

    All decoder linears (q, k, v, o, gate, up, down) packed 2:4; embeddings, lm_head and
    norms dense; ``config`` is a transformers LlamaConfig (or anything with its fields).
    File headers are ignored (a few kB). LLaMA-7B: about 0.58 (the linears alone: 0.5625).
    """
    hidden = config.hidden_size
    inter = config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    shapes = [(q_out, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, q_out)]
    shapes += [(inter, hidden), (inter, hidden), (hidden, inter)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    layers = config.num_hidden_layers
    linear_dense = layers * sum(r * c for r, c in shapes) * itemsize
    linear_packed = layers * sum(nm_packed_nbytes(r, c, 2, 4, dtype) for r, c in shapes)
    embed = config.vocab_size * hidden * itemsize
    heads = embed if getattr(config, "tie_word_embeddings", False) else 2 * embed
    norms = (2 * layers + 1) * hidden * itemsize
    other = heads + norms
    return (linear_packed + other) / (linear_dense + other)


# Deprecated aliases (spp-kernels 0.1.0 names, which collided with spp_kernels.ops'):
resolve_backend = semi_structured_backend
BACKENDS = SEMI_STRUCTURED_BACKENDS
