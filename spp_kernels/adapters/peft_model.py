"""SPPModel and get_spp_model: SPP adapters on a (pruned) Hugging Face model through peft.

SPP is a peft method (see spp_kernels.adapters.registration), so peft's own API works:

    model = peft.get_peft_model(pruned_llama, SPPConfig(r=16))   # nn.Linear -> SPPLinear
    ...train (only every layer's alpha (r, n) and beta (m,) are trainable)...
    model.save_pretrained("adapter/")          # adapter_config.json + adapter_model.safetensors
    merged = model.merge_and_unload()          # plain nn.Linear, W * (1 + s*alpha[g]*beta)

`SPPModel` (a `peft.PeftModel`, in the module peft gives its PeftModel) and `get_spp_model`
are the spp-kernels 0.1 entry points, kept as thin layers on top: the same object with the
old helpers (`spp_layers`, `trainable_parameters`, `adapter_state_dict`, ...), peft's own
`save_pretrained` made atomic, and `from_pretrained` that also reads 0.1 adapter
directories (`spp_config.json`, with a deprecation warning).

Every zero of a frozen weight W stays zero, bitwise, through training and merging, because
the learnt update is the elementwise product W' = W * alpha[g(o)] * beta[o].
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import PeftModel
from torch import nn

from .checkpoint import (
    check_adapter_state,
    is_legacy_adapter_dir,
    read_adapter_config,
    read_legacy_adapter,
    save_adapter,
)
from .config import SPPConfig
from .layer import SPPLinear
from .model import find_targets

__all__ = ["ParameterCount", "SPPModel", "find_targets", "get_spp_model"]


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts (numel)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def _full(t: torch.Tensor) -> torch.Tensor:
    """A regular tensor holding all of `t` (gathers an FSDP2 / DTensor shard: a collective)."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


class SPPModel(PeftModel):
    """A model whose targeted nn.Linear layers are SPPLinear; everything else frozen.

    A `peft.PeftModel` (forward, generate, save_pretrained, merge_and_unload, disable_adapter,
    add_adapter / set_adapter, ... work as for any peft method), plus the spp-kernels helpers.
    `get_spp_model(model, config)` is `SPPModel(model, config)`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SPPConfig | None = None,
        adapter_name: str = "default",
        autocast_adapter_dtype: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"get_spp_model: model must be an nn.Module, got {type(model)}")
        if isinstance(model, PeftModel):
            raise ValueError(
                "get_spp_model: model is already an SPPModel or another peft model (adapters "
                "applied)"
            )
        config = SPPConfig() if config is None else config
        if not isinstance(config, SPPConfig):
            raise TypeError(f"get_spp_model: config must be an SPPConfig, got {type(config)}")
        existing = [n for n, m in model.named_modules() if isinstance(m, SPPLinear)]
        if existing:
            raise ValueError(
                f"get_spp_model: model already has SPP adapters (e.g. {existing[0]}); "
                "apply get_spp_model once, or merge_and_unload() first"
            )
        # Restored by merge_and_unload, so the merged model trains like the original did.
        requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        with warnings.catch_warnings():
            # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` property.
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
            )
            super().__init__(
                model, config, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, **kwargs
            )
        self._requires_grad_before = requires_grad_before

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """peft's merge_and_unload (every SPPLinear becomes a plain nn.Linear holding
        W * (1 + scale * alpha[g] * beta), zeros bitwise), then the parameters' requires_grad
        flags as they were before get_spp_model. This SPPModel should not be used after."""
        merged = self.base_model.merge_and_unload(*args, **kwargs)
        for name, p in merged.named_parameters():
            p.requires_grad_(self._requires_grad_before.get(name, False))
        return merged

    @property
    def spp_config(self) -> SPPConfig:
        """The active adapter's SPPConfig."""
        return self.peft_config[self.active_adapter]

    def spp_layers(self) -> dict[str, SPPLinear]:
        """The SPPLinear modules by full name in the base model, in module order."""
        return {n: m for n, m in self.get_base_model().named_modules() if isinstance(m, SPPLinear)}

    # ---- parameters -------------------------------------------------------------------

    def trainable_parameters(self) -> ParameterCount:
        """(trainable, total) parameter counts; trainable = sum of r*n + m over SPP layers.

        A packed N:M frozen weight (weight_format "nm") counts as its dense m*n parameters.
        """
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        for layer in self.spp_layers().values():
            if layer.weight_format == "nm":  # the frozen weight lives in buffers
                total += layer.out_features * layer.in_features
        return ParameterCount(trainable, total)

    def print_trainable_parameters(self) -> None:
        """Print peft's line: trainable params: X || all params: Y || trainable%: Z."""
        count = self.trainable_parameters()
        print(
            f"trainable params: {count.trainable:,d} || all params: {count.total:,d} "
            f"|| trainable%: {count.percent:.4f}"
        )

    # ---- adapter state ----------------------------------------------------------------

    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """{"<layer>.alpha": (r, n), "<layer>.beta": (m,)}, detached, full (gathered) tensors.

        Under FSDP2 the adapters are gathered, a collective: call on every rank.
        """
        name = adapter_name or self.active_adapter
        out: dict[str, torch.Tensor] = {}
        for layer_name, layer in self.spp_layers().items():
            out[f"{layer_name}.alpha"] = _full(layer.spp_alpha[name].detach())
            out[f"{layer_name}.beta"] = _full(layer.spp_beta[name].detach())
        return out

    def check_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Raise ValueError naming the first layer whose adapters do not fit this model."""
        check_adapter_state(self._layer_shapes(), state, where="the adapter")

    def _layer_shapes(self, adapter_name: str | None = None) -> dict[str, tuple[int, int, int]]:
        name = adapter_name or self.active_adapter
        return {
            n: (m.out_features, m.in_features, m.spp_r[name]) for n, m in self.spp_layers().items()
        }

    @torch.no_grad()
    def load_adapter_state_dict(
        self, state: dict[str, torch.Tensor], adapter_name: str | None = None
    ) -> None:
        """Copy alpha/beta from `state` (keys as in `adapter_state_dict`), checked first.

        Values keep each parameter's dtype (an adapter saved in float32 stays float32 on a
        float32 adapter); every layer must be present.
        """
        name = adapter_name or self.active_adapter
        check_adapter_state(self._layer_shapes(name), state, where="the adapter")
        for layer_name, layer in self.spp_layers().items():
            for part, params in (("alpha", layer.spp_alpha), ("beta", layer.spp_beta)):
                param = params[name]
                if hasattr(param, "full_tensor"):
                    raise ValueError(
                        "load_adapter_state_dict: parameters are sharded (FSDP2/DTensor); load "
                        "adapters before fully_shard"
                    )
                param.copy_(state[f"{layer_name}.{part}"])

    # ---- save / load ------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """peft's save_pretrained (adapter_config.json + adapter_model.safetensors, other
        adapters in subfolders; `state_dict`, `is_main_process`, `selected_adapters` as in
        peft), each file replaced atomically, the weights last (`checkpoint.save_adapter`).
        Refuses non-finite adapters, or a model whose SPP layers were merged away, before
        any adapter file is written. Under torch.distributed call on every rank (FSDP2 or
        DeepSpeed ZeRO-3 shards are gathered); rank 0 writes."""
        partitioned = [(n, p) for n, p in self.named_parameters() if hasattr(p, "ds_id")]
        if "state_dict" not in kwargs and any("spp_" in n for n, _ in partitioned):
            # DeepSpeed ZeRO-3: parameters are partitioned (empty on each rank) unless below
            # stage3_param_persistence_threshold; gather the adapters (a collective).
            import deepspeed

            spp = [p for n, p in partitioned if "spp_" in n]
            with deepspeed.zero.GatheredParameters(spp, modifier_rank=None):
                kwargs["state_dict"] = {
                    k: v.detach().clone() for k, v in self.state_dict().items() if "spp_" in k
                }
        elif "state_dict" not in kwargs and any(
            hasattr(p, "full_tensor") for p in self.parameters()
        ):
            # FSDP2 shards (DTensors): gather the trainable tensors (a collective, every rank)
            kwargs["state_dict"] = {
                k: _full(v.detach())
                for k, v in self.state_dict().items()
                if "spp_" in k or "modules_to_save" in k
            }
        return save_adapter(self, save_directory, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: SPPConfig | None = None,
        **kwargs: Any,
    ) -> SPPModel:
        """Wrap `model` with the adapters saved in `model_id` (a local directory).

        Reads peft's layout and spp-kernels 0.1's (`spp_config.json`, DeprecationWarning).
        Checks every targeted layer's name, shape and frozen weight (the base fingerprint)
        before touching `model`; ValueError names the first mismatching layer. With
        is_trainable=False the adapters are frozen and the model is in eval mode.
        """
        directory = Path(model_id)
        if not directory.is_dir():
            raise FileNotFoundError(f"SPPModel.from_pretrained: {directory} is not a directory")
        if is_legacy_adapter_dir(directory):
            warnings.warn(
                f"{directory} is an spp-kernels 0.1 adapter (spp_config.json); it still loads, "
                "but save_pretrained now writes peft's layout: re-save it once",
                DeprecationWarning,
                stacklevel=2,
            )
            legacy_config, state = read_legacy_adapter(directory)
            config = config or legacy_config
            shapes = {
                n: (m.out_features, m.in_features, config.r)
                for n, m in find_targets(model, config).items()
            }
            check_adapter_state(shapes, state, where=f"the adapter in {directory}")
            spp = cls(model, config, adapter_name)
            spp.load_adapter_state_dict(state, adapter_name)
        else:
            from peft.utils.save_and_load import load_peft_weights, set_peft_model_state_dict

            saved = read_adapter_config(directory)  # checks the directory's files first
            config = config or saved
            if not isinstance(config, SPPConfig):
                raise ValueError(f"{directory} holds a {config.peft_type} adapter, not SPP")
            config.inference_mode = not is_trainable
            weights = load_peft_weights(str(directory), device="cpu")
            spp = cls(model, config, adapter_name, **kwargs)
            result = set_peft_model_state_dict(spp, weights, adapter_name=adapter_name)
            missing = [k for k in result.missing_keys if "spp_" in k]
            if missing or result.unexpected_keys:
                raise ValueError(
                    f"the adapter in {directory} does not fit the model: missing "
                    f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}"
                )
        if not is_trainable:
            for layer in spp.spp_layers().values():
                layer.spp_alpha[adapter_name].requires_grad_(False)
                layer.spp_beta[adapter_name].requires_grad_(False)
            spp.eval()
        return spp


def get_spp_model(model: nn.Module, config: SPPConfig | None = None) -> SPPModel:
    """Replace `config`'s target nn.Linear layers of `model` by SPPLinear; freeze the rest.

    The model is modified in place and wrapped (an SPPModel, i.e. a peft PeftModel).
    Trainable parameters: alpha (r, n) and beta (m,) of every targeted layer, sum of
    r*n + m. Raises ValueError if the model already has SPP adapters or nothing matches
    target_modules (before any change).
    """
    return SPPModel(model, SPPConfig() if config is None else config)
