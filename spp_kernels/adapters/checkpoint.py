"""Adapter files: `adapter_model.safetensors` (+ `spp_config.json`), read and checked.

adapter_model.safetensors  tensors "<module name>.alpha" (r, n) and "<module name>.beta" (m,),
                           module names as in the base model (e.g.
                           "model.layers.0.self_attn.q_proj"); metadata "spp_config" holds
                           the config JSON. Written last: it is the commit point.
spp_config.json            the same config JSON, human readable.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..utils.io import atomic_save_safetensors, atomic_write_text
from .config import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, FORMAT_VERSION, SPPConfig
from .layer import SPPLinear


def write_adapter(
    directory: str | os.PathLike, config: SPPConfig, state: dict[str, torch.Tensor]
) -> Path:
    """Write `state` and `config` to `directory`: the config JSON first, then the weights
    file (the commit point, carrying the config in its metadata), each atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config_json = config.to_json()
    metadata = {"format": "spp-kernels", "format_version": FORMAT_VERSION}
    metadata["spp_config"] = config_json
    atomic_write_text(directory / ADAPTER_CONFIG_NAME, config_json)
    atomic_save_safetensors(state, directory / ADAPTER_WEIGHTS_NAME, metadata)
    return directory


def check_adapter_state(
    layers: dict[str, SPPLinear] | dict[str, tuple[int, int]],
    state: dict[str, torch.Tensor],
    *,
    where: str,
    r: int | None = None,
) -> None:
    """Check `state` against layers (name -> SPPLinear or (m, n)); first mismatch raises."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: value of {key!r} is {type(value).__name__}, not a tensor")
    for name, layer in layers.items():
        m, n = (layer.out_features, layer.in_features) if isinstance(layer, nn.Module) else layer
        alpha, beta = state.get(f"{name}.alpha"), state.get(f"{name}.beta")
        if alpha is None or beta is None:
            raise ValueError(
                f"base model layer {name} (in_features={n}, out_features={m}) has no adapter "
                f"weights in {where}; the adapter was trained for a different model"
            )
        want_r = layer.r if isinstance(layer, nn.Module) else (r or alpha.shape[0])
        if alpha.shape != (want_r, n) or beta.shape != (m,):
            raise ValueError(
                f"layer {name}: {where} has alpha {tuple(alpha.shape)} and beta "
                f"{tuple(beta.shape)}, but the base model's layer (out_features={m}, "
                f"in_features={n}) with r={want_r} needs alpha ({want_r}, {n}) and beta ({m},)"
            )
    expected = {f"{name}.{part}" for name in layers for part in ("alpha", "beta")}
    extra = sorted({k.rsplit(".", 1)[0] for k in state if k not in expected}, key=_natural)
    if extra:
        raise ValueError(
            f"{where} has weights for layer {extra[0]}, which is not a targeted nn.Linear of "
            f"the base model ({len(extra)} such layers); the adapter was trained for a "
            "different model"
        )


def _natural(name: str) -> list:
    # "layers.2" before "layers.10".
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_adapter(adapter_directory: str | os.PathLike) -> tuple[SPPConfig, dict[str, torch.Tensor]]:
    """(config, tensors) of an adapter directory written by SPPModel.save_pretrained."""
    from safetensors import safe_open

    directory = Path(adapter_directory)
    weights = directory / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"SPPModel.from_pretrained: {weights} not found")
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    config_path = directory / ADAPTER_CONFIG_NAME
    file_json = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    meta_json = metadata.get("spp_config")
    if meta_json is None and file_json is None:
        raise FileNotFoundError(
            f"SPPModel.from_pretrained: no {ADAPTER_CONFIG_NAME} in {directory} and no config "
            f"in {ADAPTER_WEIGHTS_NAME}'s metadata"
        )
    config = SPPConfig.from_json(meta_json if meta_json is not None else file_json)
    if meta_json is not None and file_json is not None and not _same_config(file_json, config):
        warnings.warn(
            f"{config_path} differs from the config stored with the weights (an interrupted "
            "save?); using the weights file's config",
            stacklevel=3,
        )
    return config, state


def _same_config(text: str, config: SPPConfig) -> bool:
    try:
        return SPPConfig.from_json(text) == config
    except (ValueError, TypeError):  # json.JSONDecodeError is a ValueError
        return False
