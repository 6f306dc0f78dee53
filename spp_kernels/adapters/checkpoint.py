"""Adapter files: peft's own writer made atomic, spp-kernels 0.1's read, states checked.

peft layout (what peft's `save_pretrained` writes, through `save_adapter`, and peft reads):
  adapter_config.json        SPPConfig as JSON, "peft_type": "SPP", with `wrapped_modules`
                             (the exact module names) and `base_fingerprint`
  adapter_model.safetensors  "base_model.model.<module>.spp_alpha" (r, n) and ".spp_beta" (m,);
                             written last: the commit point
spp-kernels 0.1 layout (read only):
  spp_config.json + adapter_model.safetensors with "<module>.alpha" / "<module>.beta"; the
  module names come from the tensor keys, so a pattern in the old config is never compiled.
Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..utils.hf import check_finite
from ..utils.io import apply_umask, fsync_dir, naming_errors, parse_json
from .config import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, LEGACY_CONFIG_NAME, SPPConfig

PEFT_KEY_PREFIX = "base_model.model."


def _natural(name: str) -> list:
    # "layers.2" before "layers.10".
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def check_finite_state(state: dict[str, torch.Tensor], what: str) -> None:
    """ValueError naming the first tensor with non-finite values and their count."""
    for key in sorted(state, key=_natural):
        check_finite(state[key], f"{key} (layer {key.rsplit('.', 1)[0]})", what,
                     "; training diverged? nothing was written")  # fmt: skip


def check_adapter_state(
    layers: dict[str, tuple[int, int, int]],
    state: dict[str, torch.Tensor],
    *,
    where: str,
) -> None:
    """Check `state` ("<layer>.alpha" / ".beta") against layers (name -> (m, n, r)); the
    first mismatch raises ValueError naming the layer."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{where}: value of {key!r} is {type(value).__name__}, not a tensor")
        if key.endswith((".alpha", ".beta")) and not value.is_floating_point():
            raise ValueError(
                f"{where}: {key} has dtype {value.dtype}; SPP adapters must be floating point"
            )
    for name, (m, n, r) in layers.items():
        alpha, beta = state.get(f"{name}.alpha"), state.get(f"{name}.beta")
        if alpha is None or beta is None:
            raise ValueError(
                f"base model layer {name} (in_features={n}, out_features={m}) has no adapter "
                f"weights in {where}; the adapter was trained for a different model"
            )
        if alpha.shape != (r, n) or beta.shape != (m,):
            raise ValueError(
                f"layer {name}: {where} has alpha {tuple(alpha.shape)} and beta "
                f"{tuple(beta.shape)}, but the base model's layer (out_features={m}, "
                f"in_features={n}) with r={r} needs alpha ({r}, {n}) and beta ({m},)"
            )
    expected = {f"{name}.{part}" for name in layers for part in ("alpha", "beta")}
    extra = sorted({k.rsplit(".", 1)[0] for k in state if k not in expected}, key=_natural)
    if extra:
        raise ValueError(
            f"{where} has weights for layer {extra[0]}, which is not a targeted nn.Linear of "
            f"the base model ({len(extra)} such layers); the adapter was trained for a "
            "different model"
        )


def save_adapter(model: Any, directory: str | os.PathLike, **kwargs: Any) -> Path:
    """peft's own `PeftModel.save_pretrained` (the one writer of adapter files), made atomic
    around it: peft writes into a staging directory beside `directory`, then each file is
    renamed over its destination (the weights files last: the commit point), following the
    umask. A crash leaves every file either old or new, never half-written. `kwargs` go to
    peft (selected_adapters, state_dict, is_main_process, ...; safetensors always). Under
    torch.distributed every rank calls it (sharded adapters are gathered); rank 0 writes."""
    from peft import PeftModel

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_pretrained: {directory} exists and is not a directory")
    kwargs["safe_serialization"] = True
    writer = kwargs.get("is_main_process", True) and _is_writer()
    kwargs["is_main_process"] = writer
    parent = directory.parent if str(directory.parent) else Path(".")
    if writer:
        parent.mkdir(parents=True, exist_ok=True)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{directory.name}.save-", dir=parent if writer else None)
    )
    try:
        with naming_errors(directory):
            PeftModel.save_pretrained(model, str(staging), **kwargs)
            if writer:
                files = [f for f in staging.rglob("*") if f.is_file()]
                for f in sorted(files, key=lambda f: f.name == ADAPTER_WEIGHTS_NAME):
                    dest = directory / f.relative_to(staging)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    apply_umask(f)
                    os.replace(f, dest)
                fsync_dir(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def read_adapter_config(directory: str | os.PathLike) -> SPPConfig:
    """The SPPConfig saved in `directory` (peft's layout), checked: ValueError naming the file
    and the problem (not a directory, no or garbage adapter_config.json, no peft_type,
    another peft method, no adapter_model.safetensors). A file's patterns and
    allow_other_base are never used (see SPPConfig)."""
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG_NAME
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    if not path.is_file():
        raise ValueError(f"{directory}: no {ADAPTER_CONFIG_NAME} (not a peft adapter directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0]
        raise ValueError(f"{path}: not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ValueError(f"{path}: no peft_type (not a peft adapter config)")
    if peft_type != "SPP":
        raise ValueError(
            f"{path}: a {peft_type} adapter, not SPP; spp merges and evaluates SPP adapters only "
            "(use peft's own merge_and_unload for other methods)"
        )
    weights = directory / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        other = [p.name for p in directory.glob("adapter_model.*")]
        hint = f" (found {other[0]}: only safetensors files are read)" if other else ""
        raise ValueError(f"{directory}: no {ADAPTER_WEIGHTS_NAME}{hint}")
    try:
        return SPPConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {str(e).splitlines()[0]}") from None


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def is_legacy_adapter_dir(directory: Path) -> bool:
    """An spp-kernels 0.1 adapter directory (spp_config.json, no adapter_config.json)."""
    return (directory / LEGACY_CONFIG_NAME).is_file() and not (
        directory / ADAPTER_CONFIG_NAME
    ).is_file()


_LEGACY_KEYS = ("r", "scale", "dropout", "init", "backend", "adapter_dtype", "weight_format")


def read_legacy_adapter(directory: str | os.PathLike) -> tuple[SPPConfig, dict[str, torch.Tensor]]:
    """(config, {"<module>.alpha": ..., "<module>.beta": ...}) of a 0.1 adapter directory.

    target_modules becomes the explicit module list of the tensor keys (the old file's
    pattern, if any, is ignored).
    """
    from safetensors import safe_open

    directory = Path(directory)
    weights = directory / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found")
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    text = metadata.get("spp_config") or (directory / LEGACY_CONFIG_NAME).read_text(
        encoding="utf-8"
    )
    old = parse_json(text, str(directory / LEGACY_CONFIG_NAME), dict)
    names = sorted({k.rsplit(".", 1)[0] for k in state}, key=_natural)
    if not names:
        raise ValueError(f"{weights}: no adapter tensors")
    kwargs = {k: old[k] for k in _LEGACY_KEYS if k in old}
    return SPPConfig(target_modules=names, **kwargs), state
