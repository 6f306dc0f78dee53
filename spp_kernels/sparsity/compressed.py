"""Compact storage of 2:4 models: packed 2:4 linear weights, everything else dense.

``save_compressed`` writes model_2to4.safetensors (+ its manifest model_2to4.json, and for
a transformers model config.json naming the format, see sparsity.hf_quantizer, so that
``AutoModelForCausalLM.from_pretrained`` opens the directory); ``load_compressed`` reads it
back into a model of the same architecture, bit-exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..utils.hf import check_finite
from ..utils.io import atomic_save_safetensors, atomic_write_text
from .nm import PACKABLE_DTYPES, check_nm, is_nm, nm_compress, nm_decompress
from .semi_structured import _refuse_unmerged, _selected_linears

TENSORS_FILE = "model_2to4.safetensors"
MANIFEST_FILE = "model_2to4.json"
FORMAT_NAME = "spp-kernels/2:4-compressed"
FORMAT_VERSION = 1
_VALUES_SUFFIX = "::values"
_META_SUFFIX = "::meta"


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
        if w.dtype in PACKABLE_DTYPES and is_nm(w, 2, 4):
            packed_keys.append(key)
        elif explicit:
            try:
                check_nm(w, 2, 4, name=name)
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
        values, meta = nm_compress(state[key], 2, 4, name=key)
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
    _write_hf_config(model, path)
    on_disk = (path / TENSORS_FILE).stat().st_size
    return {
        **manifest,
        "bytes_on_disk": on_disk,
        "fraction_of_dense": on_disk / manifest["dense_bytes"],
    }


# config.json's entry that makes transformers load the directory (sparsity.hf_quantizer).
QUANTIZATION_CONFIG = {"quant_method": "spp_sparse24", "format_version": 1}


def _write_hf_config(model: nn.Module, path: Path) -> None:
    """config.json (with QUANTIZATION_CONFIG) and generation_config.json of a transformers
    model, so `AutoModelForCausalLM.from_pretrained(path)` loads the export; nothing for
    other modules."""
    config = getattr(model, "config", None)
    if not callable(getattr(config, "to_json_string", None)):
        return
    data = json.loads(config.to_json_string(use_diff=False))
    data["quantization_config"] = dict(QUANTIZATION_CONFIG)
    data.pop("transformers_weights", None)  # only the registered loader may name our file
    atomic_write_text(path / "config.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None and callable(getattr(generation, "to_json_string", None)):
        atomic_write_text(path / "generation_config.json", generation.to_json_string())


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
                    tensor = nm_decompress(values, meta, 2, 4, values.shape[1] * 2)
                else:
                    tensor = f.get_tensor(source).to(target.device)
                target.copy_(tensor)
    return model
