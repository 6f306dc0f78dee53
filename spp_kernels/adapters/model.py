"""SPPConfig, get_spp_model and SPPModel: SPP adapters on a (pruned) Hugging Face model.

The peft workflow, without losing sparsity at merge time:

    model = get_spp_model(pruned_llama, SPPConfig(r=16))   # targeted nn.Linear -> SPPLinear
    ...train (only every layer's alpha (r, n) and beta (m,) are trainable)...
    model.save_pretrained("adapter/")                      # adapters only, safetensors
    merged = model.merge_and_unload()                      # plain nn.Linear, W * (1 + s*alpha[g]*beta)

Every zero of a frozen weight W stays zero, bitwise, through training and merging, because
the learnt update is the elementwise product W' = W * alpha[g(o)] * beta[o].

On-disk format of `save_pretrained(dir)`:
  adapter_model.safetensors  tensors "<module name>.alpha" (r, n) and "<module name>.beta" (m,),
                             module names as in the base model (e.g.
                             "model.layers.0.self_attn.q_proj"); metadata "spp_config" holds
                             the config JSON. Written last: it is the commit point.
  spp_config.json            the same config JSON, human readable.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from .checkpoint import check_adapter_state, read_adapter, write_adapter
from .config import ALL_LINEAR, SPPConfig
from .layer import SPPLinear


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts (numel)."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def find_targets(model: nn.Module, config: SPPConfig) -> dict[str, nn.Linear]:
    """The nn.Linear modules of `model` that `config` targets, by full name, in module order.

    Raises ValueError when nothing matches, naming the model's linear layers.
    """
    head = _output_head(model) if config.target_modules == ALL_LINEAR else None
    targets: dict[str, nn.Linear] = {}
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not name or not config.matches(name):
            continue
        if isinstance(module, nn.Linear):
            if config.target_modules == ALL_LINEAR and (module is head or name == "lm_head"):
                continue
            targets[name] = module
        elif config.target_modules != ALL_LINEAR and len(module._modules) == 0:
            skipped.append(f"{name} ({type(module).__name__})")
    if not targets:
        suffixes = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        msg = (
            f"get_spp_model: target_modules={config.target_modules!r} matched no nn.Linear in "
            f"{type(model).__name__}; its nn.Linear layers are named ...{suffixes}"
        )
        if skipped:
            msg += f"; matched but not nn.Linear (unsupported): {skipped[:5]}"
        raise ValueError(msg)
    return targets


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _progress(items: list, desc: str) -> Iterator:
    # tqdm shows a bar only when the loop is still running after `delay` seconds.
    from tqdm.auto import tqdm

    return iter(tqdm(items, desc=desc, delay=2.0, leave=False))


def _from_linear_kwargs(config: SPPConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        r=config.r,
        scale=config.scale,
        dropout=config.dropout,
        init=config.init,
        backend=config.backend,
        adapter_dtype=config.torch_adapter_dtype,
    )
    if config.weight_format != "dense":
        kwargs["weight_format"] = config.weight_format
    return kwargs


def _full(t: torch.Tensor) -> torch.Tensor:
    """A regular tensor holding all of `t` (gathers an FSDP2 / DTensor shard: a collective)."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _is_writer() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class SPPModel(nn.Module):
    """A model whose targeted nn.Linear layers are SPPLinear; everything else frozen.

    Use `get_spp_model(model, config)` (same as `SPPModel(model, config)`). Attribute access
    falls through to the wrapped model (`.config`, `.generate`, `.gradient_checkpointing_enable`,
    ...), and `forward` has the wrapped model's signature, so Hugging Face's Trainer can
    train it like the original.

    Attributes:
        base_model: the wrapped model (modified in place).
        spp_config: the SPPConfig used.
    """

    def __init__(self, model: nn.Module, config: SPPConfig) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"get_spp_model: model must be an nn.Module, got {type(model)}")
        if isinstance(model, SPPModel):
            raise ValueError("get_spp_model: model is already an SPPModel (adapters applied)")
        if not isinstance(config, SPPConfig):
            raise TypeError(f"get_spp_model: config must be an SPPConfig, got {type(config)}")
        existing = [n for n, m in model.named_modules() if isinstance(m, SPPLinear)]
        if existing:
            raise ValueError(
                f"get_spp_model: model already has SPP adapters (e.g. {existing[0]}); "
                "apply get_spp_model once, or merge_and_unload() first"
            )
        targets = find_targets(model, config)
        for name, linear in targets.items():
            if config.r > linear.out_features:
                raise ValueError(
                    f"get_spp_model: r={config.r} exceeds out_features={linear.out_features} "
                    f"of {name}"
                )
        kwargs = _from_linear_kwargs(config)
        super().__init__()
        self.base_model = model
        self.spp_config = config
        # Restored by merge_and_unload, so the merged model trains like the original did.
        self._requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)
        try:
            for name in _progress(list(targets), "SPP: wrapping linear layers"):
                layer = SPPLinear.from_linear(targets[name], **kwargs)
                # A new module starts in training mode; keep the replaced layer's mode
                # (else adapter dropout would run inside an eval-mode model).
                _set_submodule(model, name, layer.train(targets[name].training))
        except BaseException:
            # e.g. weight_format="nm" on a layer that is not N:M sparse: leave `model` as it was.
            for name, linear in targets.items():
                _set_submodule(model, name, linear)
            for name, p in model.named_parameters():
                p.requires_grad_(self._requires_grad_before[name])
            raise
        # A per-instance forward whose signature is the wrapped model's (Trainer reads it to
        # decide which batch columns to keep); it calls the model's __call__ so its hooks run.
        self.forward = functools.update_wrapper(
            functools.partial(SPPModel._call_base, self), model.forward
        )

    def _call_base(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # replaced per instance in __init__
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def spp_layers(self) -> dict[str, SPPLinear]:
        """The SPPLinear modules by full name in the base model, in module order."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SPPLinear)}

    # ---- parameters -------------------------------------------------------------------

    def trainable_parameters(self) -> ParameterCount:
        """(trainable, total) parameter counts; trainable = sum of r*n + m over SPP layers.

        A packed N:M frozen weight (weight_format "nm") counts as its dense m*n parameters.
        """
        trainable = total = 0
        for p in self.parameters():
            numel = p.numel()
            total += numel
            if p.requires_grad:
                trainable += numel
        for layer in self.spp_layers().values():
            if layer.weight is None:  # packed: the frozen weight lives in buffers
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

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """{"<layer>.alpha": (r, n), "<layer>.beta": (m,)}, detached, full (gathered) tensors.

        Under FSDP2 the adapters are gathered, a collective: call on every rank.
        """
        out: dict[str, torch.Tensor] = {}
        for name, layer in self.spp_layers().items():
            out[f"{name}.alpha"] = _full(layer.alpha.detach())
            out[f"{name}.beta"] = _full(layer.beta.detach())
        return out

    def check_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Raise ValueError naming the first layer whose adapters do not fit this model."""
        check_adapter_state(self.spp_layers(), state, where="the adapter")

    @torch.no_grad()
    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy alpha/beta from `state` (keys as in `adapter_state_dict`), checked first.

        Values are cast to each layer's adapter dtype; every layer must be present.
        """
        layers = self.spp_layers()
        check_adapter_state(layers, state, where="the adapter")
        for name, layer in layers.items():
            for part in ("alpha", "beta"):
                param = getattr(layer, part)
                if hasattr(param, "full_tensor"):
                    raise ValueError(
                        "load_adapter_state_dict: parameters are sharded (FSDP2/DTensor); load "
                        "adapters before fully_shard"
                    )
                param.copy_(state[f"{name}.{part}"])

    # ---- merge ------------------------------------------------------------------------

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Replace every SPPLinear by a plain nn.Linear with W * (1 + scale * alpha[g] * beta).

        Returns the base model. Zeros of every frozen weight stay zero (bitwise); the
        parameters' requires_grad flags are restored to what they were before
        get_spp_model. This SPPModel should not be used afterwards.
        """
        layers = self.spp_layers()
        for name in _progress(list(layers), "SPP: merging"):
            merged = layers[name].merge().train(layers[name].training)
            _set_submodule(self.base_model, name, merged)
        for name, p in self.base_model.named_parameters():
            p.requires_grad_(self._requires_grad_before.get(name, False))
        return self.base_model

    # ---- save / load ------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write only the adapters: spp_config.json, then adapter_model.safetensors.

        Each file is written atomically (temp file, fsync, rename); the weights file is the
        commit point and carries the config in its metadata, so an interrupted save leaves
        the previous adapter loadable. Under torch.distributed call on every rank (FSDP2
        shards are gathered); only rank 0 writes.
        """
        directory = Path(save_directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"save_pretrained: {directory} exists and is not a directory")
        state = self.adapter_state_dict()
        if _is_writer():
            write_adapter(directory, self.spp_config, state)
        return directory

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, adapter_directory: str | os.PathLike, is_trainable: bool = False
    ) -> SPPModel:
        """Wrap `model` with the adapters saved in `adapter_directory` by save_pretrained.

        Checks every targeted layer's name and shapes before touching `model`, and raises
        ValueError naming the first mismatching layer. With is_trainable=False the adapters
        are frozen and the model is put in eval mode.
        """
        config, state = read_adapter(adapter_directory)
        targets = find_targets(model, config)
        check_adapter_state(
            {n: (m.out_features, m.in_features) for n, m in targets.items()},
            state,
            where=f"the adapter in {adapter_directory}",
            r=config.r,
        )
        spp = cls(model, config)
        spp.load_adapter_state_dict(state)
        if not is_trainable:
            for layer in spp.spp_layers().values():
                layer.alpha.requires_grad_(False)
                layer.beta.requires_grad_(False)
            spp.eval()
        return spp


def get_spp_model(model: nn.Module, config: SPPConfig | None = None) -> SPPModel:
    """Replace `config`'s target nn.Linear layers of `model` by SPPLinear; freeze the rest.

    The model is modified in place and wrapped. Trainable parameters: alpha (r, n) and
    beta (m,) of every targeted layer, sum of r*n + m. Raises ValueError if the model
    already has SPP adapters or nothing matches target_modules (before any change).
    """
    return SPPModel(model, SPPConfig() if config is None else config)
