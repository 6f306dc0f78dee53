"""Import checkpoints saved by the SPP authors' reference code (a fork of peft 0.2.0).

Their adapter directory holds
  adapter_config.json          peft config with at least "r" and "lora_alpha"
  adapter_model.safetensors    or adapter_model.bin (a plain state dict of tensors)
with, for every adapted projection,
  "<prefix><module>.lora_A.weight"      alpha (r, n)
  "<prefix><module>.lora_A.weight_col"  beta, stored (m, 1) or (1, m)
where <prefix> is peft's wrapper path such as "base_model.model.". Their layer computes
W' = W * alpha[g(o)] * beta[o] with scaling lora_alpha / r, the same math as SPPLinear, so
the checkpoint maps onto SPPModel directly: alpha -> alpha, beta -> beta (flattened),
scale = lora_alpha / r. Their alpha may have more rows than the config's r (16 rows with
r = 8): the tensor's row count is the r used, the config's lora_alpha / r the scale.

Their adapters are float32 even on a float16 model, and stay float32 here (peft's rule for
LoRA too): casting them to the model's dtype would change thousands of merged weights.
Their memory-optimised variant (beta saved as (1, m)) assigns row o to block j when
floor(j * m / r) <= o < floor((j + 1) * m / r); that equals g(o) = floor(o * r / m) only
for some (m, r) (always when r divides m). A layer where the two differ is refused,
naming it: SPP's kernels implement only g(o).

The .bin file is read with torch.load(weights_only=True): tensors only, no arbitrary objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..ops.groups import row_groups
from .config import SPPConfig
from .peft_model import SPPModel

__all__ = ["load_authors_checkpoint"]

_ALPHA_SUFFIX = ".lora_A.weight"
_BETA_SUFFIX = ".lora_A.weight_col"
_WRAPPER_PREFIXES = ("base_model.model.", "base_model.")


def _read_state(directory: Path) -> dict[str, torch.Tensor]:
    st, binary = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    if binary.is_file():
        import pickle

        try:  # weights_only: tensors and containers only, never arbitrary objects
            state = torch.load(binary, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise ValueError(
                f"load_authors_checkpoint: {binary} is not a plain tensor file and was not "
                f"loaded (pickled objects are refused: {str(e).splitlines()[0][:160]})"
            ) from None
        if not isinstance(state, dict):
            raise ValueError(f"load_authors_checkpoint: {binary} does not hold a state dict")
        return state
    raise FileNotFoundError(
        f"load_authors_checkpoint: neither {st.name} nor {binary.name} found in {directory}"
    )


def _read_config(directory: Path) -> tuple[int, float, float]:
    """(r, lora_alpha, lora_dropout) from adapter_config.json."""
    path = directory / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"load_authors_checkpoint: {path} not found")
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool):
            raise ValueError(f"load_authors_checkpoint: {path} lacks a numeric {key!r}")
    if config["r"] <= 0:
        raise ValueError(f"load_authors_checkpoint: {path} has r={config['r']}, must be > 0")
    return int(config["r"]), float(config["lora_alpha"]), float(config.get("lora_dropout", 0.0))


def _layer_paths(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{checkpoint layer path: {"alpha": tensor, "beta": tensor}}; unknown keys raise."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"load_authors_checkpoint: {key!r} is not a tensor")
        if key.endswith(_ALPHA_SUFFIX):
            layers.setdefault(key[: -len(_ALPHA_SUFFIX)], {})["alpha"] = value
        elif key.endswith(_BETA_SUFFIX):
            layers.setdefault(key[: -len(_BETA_SUFFIX)], {})["beta"] = value
        else:
            raise ValueError(
                f"load_authors_checkpoint: unexpected key {key!r}; expected keys ending in "
                f"{_ALPHA_SUFFIX!r} (alpha) or {_BETA_SUFFIX!r} (beta)"
            )
    for path, parts in layers.items():
        missing = {"alpha", "beta"} - set(parts)
        if missing:
            raise ValueError(f"load_authors_checkpoint: layer {path} has no {sorted(missing)[0]}")
    return layers


def _strip_wrapper(path: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


def _module_name(path: str, linears: dict[str, nn.Linear]) -> str:
    """The model's module name for a checkpoint layer path (after stripping peft's prefix).

    Exact match first; else the unique linear whose dotted name is a suffix of the path or
    has the path as a suffix (a checkpoint of LlamaForCausalLM loaded into LlamaModel).
    """
    stripped = _strip_wrapper(path)
    if stripped in linears:
        return stripped
    candidates = [
        n
        for n in linears
        if stripped.endswith("." + n) or n.endswith("." + stripped) or path.endswith("." + n)
    ]
    if len(candidates) != 1:
        what = "no" if not candidates else f"{len(candidates)} ({candidates[:3]})"
        raise ValueError(
            f"load_authors_checkpoint: checkpoint layer {path!r} matches {what} nn.Linear "
            "modules of the model; is this checkpoint for this model?"
        )
    return candidates[0]


def load_authors_checkpoint(model: nn.Module, path: str | os.PathLike) -> SPPModel:
    """Wrap `model` with the SPP adapters of the authors' checkpoint directory `path`.

    Returns a trainable SPPModel (targets: exactly the checkpoint's layers; r: alpha's row
    count; scale: lora_alpha / r of adapter_config.json; dropout: its lora_dropout). Every
    layer is mapped and shape-checked before `model` is modified; a mismatch raises
    ValueError naming the layer.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise NotADirectoryError(f"load_authors_checkpoint: {directory} is not a directory")
    config_r, lora_alpha, dropout = _read_config(directory)
    layers = _layer_paths(_read_state(directory))
    if not layers:
        raise ValueError(f"load_authors_checkpoint: no SPP adapter tensors in {directory}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    state: dict[str, torch.Tensor] = {}
    rows: dict[int, str] = {}
    for ckpt_path, parts in layers.items():
        name = _module_name(ckpt_path, linears)
        if f"{name}.alpha" in state:
            raise ValueError(f"load_authors_checkpoint: two checkpoint layers map to {name}")
        linear, alpha, beta = linears[name], parts["alpha"], parts["beta"]
        m, n = linear.out_features, linear.in_features
        if alpha.dim() != 2 or alpha.shape[1] != n or not 1 <= alpha.shape[0] <= m:
            raise ValueError(
                f"load_authors_checkpoint: layer {name}: alpha has shape {tuple(alpha.shape)}, "
                f"expected (r, {n}) with 1 <= r <= {m}"
            )
        if beta.shape not in ((m, 1), (1, m), (m,)):
            raise ValueError(
                f"load_authors_checkpoint: layer {name}: beta has shape {tuple(beta.shape)}, "
                f"expected ({m}, 1) or (1, {m})"
            )
        r_layer = alpha.shape[0]
        if (
            beta.shape == (1, m)
            and m > 1
            and not torch.equal(_blocked_groups(m, r_layer), row_groups(m, r_layer))
        ):
            raise ValueError(
                f"load_authors_checkpoint: layer {name} comes from the authors' memory-optimised "
                f"variant (beta (1, {m})), whose rows are grouped as floor(j*m/r) <= o < "
                f"floor((j+1)*m/r); with m={m}, r={r_layer} that differs from SPP's "
                "g(o) = floor(o*r/m), which the kernels implement: this checkpoint cannot be "
                "mapped exactly"
            )
        rows.setdefault(r_layer, name)
        state[f"{name}.alpha"] = alpha
        state[f"{name}.beta"] = beta.reshape(m)
    if len(rows) > 1:
        raise ValueError(
            "load_authors_checkpoint: alpha row counts differ between layers: "
            + ", ".join(f"{r} rows in {name}" for r, name in rows.items())
        )
    (r,) = rows
    config = SPPConfig(
        r=r,
        scale=lora_alpha / config_r,
        dropout=dropout,
        target_modules=sorted({key.rsplit(".", 1)[0] for key in state}),
    )
    spp = SPPModel(model, config)  # float16/bfloat16 models get float32 adapters (peft's rule)
    spp.load_adapter_state_dict(state)
    return spp


def _blocked_groups(m: int, r: int) -> torch.Tensor:
    """Row o's block in the authors' memory-optimised variant: the j with
    floor(j*m/r) <= o < floor((j+1)*m/r)."""
    starts = torch.arange(r, dtype=torch.int64) * m // r
    return torch.searchsorted(starts, torch.arange(m, dtype=torch.int64), right=True) - 1
