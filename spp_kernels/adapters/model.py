"""SPPTuner: the peft BaseTuner of SPP (registered as the "SPP" method, prefix "spp_"),
in the module peft gives every method's tuner (`tuners/<method>/model.py`).

peft's injection logic (target matching, exclude_modules, layers_to_transform,
modules_to_save, merge / unmerge / unload, adapter switching, state-dict keys) is reused;
this class adds what SPP needs on top:

* every check before any module changes (`inject_adapter`): each target is an nn.Linear
  that SPP can wrap (an explicitly named target of another type, or a linear that
  nn.MultiheadAttention reads directly, is refused), r <= its out_features, packable when
  weight_format is "nm", and the frozen weights match the adapter's `base_fingerprint`;
* the layer class per base kind, chosen by the dispatchers of `layer`;
* the record of what was wrapped: `wrapped_modules` (exact names) and `base_fingerprint`
  (shapes and zero-mask hashes) go into the config, hence into adapter_config.json;
* unloading keeps the merged (or restored) plain module as is, a packed base decompressed;
* `adapter_dtype`: an explicit adapter dtype is kept (peft would upcast it to float32),
  and peft 0.21's upcast no longer unfreezes inactive adapters;
* saving refuses adapters that were merged away or hold non-finite values, and mixed
  adapter batches (`adapter_names=`) are refused: every row of a batch uses the active
  adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from ..ops.dropout import pack_keep_mask
from ..ops.quantized import BnbWeight, is_bnb_layer
from ..sparsity.lowbit import QuantizedPackedLinear, check_value_format
from ..sparsity.packed import PackedLinear
from ..utils.hf import check_finite
from .config import ALL_LINEAR, LLAMA_TARGET_MODULES, SPPConfig
from .dispatch import _packing_pattern, check_loaded_codes, new_layer
from .layer import SPPLinear
from .registration import PREFIX

# The default targets per transformers model type (peft's target_module_mapping), used when
# a config gives target_modules=None.
TARGETS_BY_MODEL_TYPE = {
    model_type: list(LLAMA_TARGET_MODULES)
    for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")
}


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None
    return None


def _unsupported(module: nn.Module, parent: nn.Module | None) -> str | None:
    """Why SPP cannot wrap `module`, or None when it can."""
    if isinstance(module, (SPPLinear, QuantizedPackedLinear)):
        return None
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__}: only `torch.nn.Linear` is supported"
    if isinstance(parent, nn.MultiheadAttention):
        return (
            "a projection of nn.MultiheadAttention, which reads its weight directly: an "
            "adapter there would never be applied"
        )
    return None


def find_targets(model: nn.Module, config: SPPConfig) -> dict[str, nn.Module]:
    """The modules of `model` that `config` targets (nn.Linear, or SPPLinear layers that get
    another adapter), by full name, in module order; modules inside SPP layers are skipped.

    A module named in a target_modules list that SPP cannot wrap is an error naming it and
    its type (peft's message); with a regex or "all-linear" such modules are skipped.
    ValueError when nothing matches, naming the model's linear layers.
    """
    if config.target_modules is None:
        raise ValueError("Please specify `target_modules` in `peft_config`")
    head = _output_head(model) if config.target_modules == ALL_LINEAR else None
    inner = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    modules = dict(model.named_modules())
    explicit = isinstance(config.target_modules, list)
    targets: dict[str, nn.Module] = {}
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not name or name.startswith(inner) or not config.matches(name):
            continue
        if config.target_modules == ALL_LINEAR and (module is head or name == "lm_head"):
            continue
        reason = _unsupported(module, modules.get(name.rpartition(".")[0]))
        if reason is None:
            targets[name] = module
        elif explicit:
            raise ValueError(f"Target module {name} is not supported: {reason}.")
        elif isinstance(module, nn.Linear) or len(module._modules) == 0:
            unsupported.append(f"{name} ({type(module).__name__})")
    if not targets:
        suffixes = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        )
        msg = (
            f"get_spp_model: target_modules={config.target_modules!r} matched no nn.Linear in "
            f"{type(model).__name__}; its nn.Linear layers are named ...{suffixes}"
        )
        if unsupported:
            msg += f"; matched but not supported: {unsupported[:5]}"
        raise ValueError(msg)
    return targets


def _frozen_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


# Rows of each frozen weight whose values enter the fingerprint (evenly spaced): enough to
# see a merge (it rescales every row with a nonzero beta) at a cost of a few KB per layer.
FINGERPRINT_ROWS = 8


def _frozen_weight(module: nn.Module) -> torch.Tensor:
    """The unmerged frozen weight W (m, n) of a plain or wrapped linear (dense)."""
    if isinstance(module, SPPLinear):
        return module._unmerged_dense()
    base = _frozen_of(module)
    return base.dense_weight() if isinstance(base, PackedLinear) else base.weight


def _quantized_format(module: nn.Module) -> tuple[int, int, str] | None:
    """(m, n, format) of a (wrapped) quantized linear: a bitsandbytes one ('nf4', 'fp4',
    'int8') or one with low-bit N:M values ('nm-int8', 'nm-int4', 'nm-fp8'), else None."""
    from .bnb_layer import SPPBnbLinear
    from .lowbit_layer import SPPQuantizedPackedLinear

    if isinstance(module, SPPQuantizedPackedLinear):
        return module.out_features, module.in_features, f"nm-{module.weight_dtype}"
    if isinstance(module, QuantizedPackedLinear):  # a base loaded with its codes (spp quantize)
        return module.out_features, module.in_features, f"nm-{module.value_format}"
    if isinstance(module, SPPBnbLinear):
        operand = module.frozen_operand()
        return (*operand.shape, operand.kind)
    base = _frozen_of(module)
    if not is_bnb_layer(base):
        return None
    BnbWeight.check_layer(base)
    state = getattr(base.weight, "quant_state", None)
    m, n = tuple(state.shape) if state is not None else tuple(base.weight.shape)
    return m, n, state.quant_type if state is not None else "int8"


def base_fingerprint(module: nn.Module) -> str | None:
    """'m x n:<mask hash>:<values hash>' of a (wrapped) linear's frozen weight, or None on the
    meta device: 16 hex digits of the sha256 of the packed zero mask, then of FINGERPRINT_ROWS
    evenly spaced rows rounded to bfloat16 (the same digest whether the base was loaded in
    float32, bfloat16 or float16 from one checkpoint; a merge changes it). A bitsandbytes
    base gives 'm x n:-:-:<format>' ('nf4', 'fp4', 'int8'), as does a wrapped layer with
    low-bit N:M values ('nm-int8', 'nm-int4', 'nm-fp8'): its shape only is compared
    (`check_fingerprint`), so nothing is dequantized for it."""
    digest = lambda b: hashlib.sha256(b).hexdigest()[:16]  # noqa: E731
    quantized = _quantized_format(module)
    if quantized is not None:
        m, n, kind = quantized
        return f"{m}x{n}:-:-:{kind}"
    w = _frozen_weight(module).detach()
    if w.device.type == "meta":
        return None
    m, n = w.shape
    bits = pack_keep_mask((w != 0).reshape(m, n)).cpu().numpy().tobytes()
    rows = torch.linspace(0, m - 1, min(m, FINGERPRINT_ROWS)).round().long().unique()
    sample = w[rows.to(w.device)].to(torch.bfloat16).cpu().view(torch.int16).numpy().tobytes()
    return f"{m}x{n}:{digest(bits)}:{digest(sample)}"


def check_fingerprint(saved: dict[str, str], targets: dict[str, nn.Module]) -> None:
    """ValueError naming the first wrapped layer (in module order) whose frozen weight
    differs from `saved`: shapes first, then missing layers, zero patterns, then values (a
    fingerprint from spp-kernels 0.2 has no values part: only its zero mask is compared).
    Where either side is a quantized base (an adapter trained on NF4, loaded on the
    bfloat16 model, QLoRA's usual path, or on an NF4 base loaded in another dtype) only
    shapes are compared: quantization moves every value, its codes depend on the dtype it
    was quantized from, and it may round a few small weights to zero."""
    now = {name: base_fingerprint(module) for name, module in targets.items()}
    part = lambda fp, i: (fp.split(":") + [None, None, None])[i]  # noqa: E731
    same_format = {
        n for n in targets if n in saved and now[n] and part(now[n], 3) is part(saved[n], 3) is None
    }
    for name in targets:
        if name in saved and now[name] is not None and part(now[name], 0) != part(saved[name], 0):
            raise ValueError(
                f"the adapter was trained on another base: layer {name} has shape "
                f"{part(saved[name], 0)} there, {part(now[name], 0)} here"
            )
    missing = [name for name in saved if name not in targets]
    if missing:
        raise ValueError(
            f"the adapter was trained with layer {missing[0]}, which this model lacks "
            f"({len(missing)} such layers)"
        )
    hint = "; pass allow_other_base (CLI: --allow-other-base) to load it anyway"
    for name in targets:
        if name not in same_format:
            continue
        if part(now[name], 1) != part(saved[name], 1):
            raise ValueError(
                f"the adapter was trained on another base: the zero pattern of layer {name} "
                f"differs (saved {saved[name]}, this model {now[name]}){hint}"
            )
    for name in targets:
        values = part(saved.get(name, ""), 2)
        if values is not None and name in same_format and part(now[name], 2) != values:
            raise ValueError(
                f"the adapter was trained on another base: the weights of layer {name} differ "
                "(its zero pattern is the same: was this adapter already merged into this "
                f"model?){hint}"
            )


def record_fingerprint(config: SPPConfig, targets: dict[str, nn.Module]) -> None:
    """Set `config.base_fingerprint` from `targets` unless a weight is still on the meta
    device (then it is recorded when the adapter is saved)."""
    prints = {name: base_fingerprint(module) for name, module in targets.items()}
    if prints and all(v is not None for v in prints.values()):
        config.base_fingerprint = dict(sorted(prints.items()))


class SPPTuner(BaseTuner):
    """The BaseTuner of SPP; see the module docstring."""

    prefix: str = PREFIX
    tuner_layer_cls = SPPLinear
    target_module_mapping = TARGETS_BY_MODEL_TYPE

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, **kw: Any
    ) -> None:
        """Check every target first (nothing changes on an error), inject, then record the
        wrapped names and the base fingerprint in the config."""
        config = self.peft_config[adapter_name]
        if config.target_modules is None:
            self._prepare_adapter_config(config, self.get_model_config(model))
        targets = find_targets(model, config)
        for name, module in targets.items():
            out_features = module.out_features
            if config.r > out_features:
                raise ValueError(f"SPP: r={config.r} exceeds out_features={out_features} of {name}")
            if isinstance(module, QuantizedPackedLinear):
                check_loaded_codes(module, config, name)
            elif is_bnb_layer(module):
                try:
                    BnbWeight.check_layer(module)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
                if config.weight_format == "nm" or config.weight_dtype is not None:
                    raise ValueError(
                        f"SPP: {name}: weight_format='nm' and weight_dtype pack float weights, "
                        "but this layer is quantized by bitsandbytes; use weight_format='dense' "
                        "or 'auto' without weight_dtype"
                    )
            elif (config.weight_format == "nm" or config.weight_dtype is not None) and isinstance(
                module, nn.Linear
            ):
                try:
                    pattern = _packing_pattern(module.weight.data, config.weight_format, None)
                except ValueError as e:
                    raise ValueError(f"SPP: {name}: {e}") from None
                if pattern is not None and config.weight_dtype is not None:
                    check_value_format(config.weight_dtype, config.weight_group_size,
                                       pattern[0], module.in_features // pattern[1] * pattern[0],
                                       f"SPP: {name}")  # fmt: skip
                    if not bool(torch.isfinite(module.weight).all()):
                        raise ValueError(
                            f"SPP: {name}: the weight has non-finite values; it cannot be "
                            f"quantized to {config.weight_dtype}"
                        )
        if config.base_fingerprint is not None and not config.allow_other_base:
            check_fingerprint(config.base_fingerprint, targets)
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, **kw
        )
        config.wrapped_modules = sorted(targets)
        if config.base_fingerprint is None:
            record_fingerprint(config, targets)

    def _prepare_adapter_config(self, peft_config: SPPConfig, model_config: dict) -> SPPConfig:
        """target_modules=None: the model type's default (TARGETS_BY_MODEL_TYPE), else peft's
        "Please specify `target_modules`" error."""
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_config.get("model_type"))
            if targets is None:
                raise ValueError("Please specify `target_modules` in `peft_config`")
            peft_config.target_modules = list(targets)
        return peft_config

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Mixed adapter batches (`adapter_names=[...]` per row) are refused: peft would drop
        the argument and run every row through the active adapters."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "SPP does not support mixed adapter batches (adapter_names=...): call "
                "set_adapter(name) and run each adapter's rows as their own batch"
            )
        yield

    def _create_and_replace(
        self,
        config: SPPConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, SPPLinear):  # another adapter on an already wrapped layer
            target.update_layer(adapter_name, config)
            return
        if _unsupported(target, parent) is not None:
            return  # a regex also matched a module SPP skips (find_targets refused names)
        new = new_layer(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new.requires_grad_(False)  # an additional adapter is not trainable until set_adapter
        new.train(target.training)
        self._replace_module(parent, target_name, new, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        if isinstance(child, SPPLinear) and not isinstance(new_module, BaseTunerLayer):
            # Unloading: new_module is the complete plain layer (merged, or restored); peft's
            # default would copy the base layer's (unmerged, or absent) weight onto it.
            setattr(parent, child_name, new_module)
            return
        if isinstance(child, QuantizedPackedLinear):
            # No weight for peft's device move to read: the adapters were made on the codes'
            # device (SPPLinear.update_layer).
            setattr(parent, child_name, new_module)
            return
        super()._replace_module(parent, child_name, new_module, child)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        config = self.peft_config.get(adapter_name)
        if config is not None and config.adapter_dtype is not None:
            return  # an explicit adapter dtype is what the user asked for
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        super()._cast_adapter_dtype(
            adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype
        )
        # peft 0.21 re-wraps cast ParameterDict entries as new Parameters (requires_grad=True),
        # unfreezing inactive and inference-mode adapters: restore every flag.
        for name, p in self.model.named_parameters():
            if name in flags and p.requires_grad != flags[name]:
                p.requires_grad_(flags[name])

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: SPPConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """peft's selection of the adapter's tensors for saving (every save path: PeftModel
        and transformers' save_pretrained, Trainer checkpoints), refused before any adapter
        file is written when the SPP layers were merged away or hold non-finite values;
        records the base fingerprint of an adapter made on the meta device."""
        layers = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, SPPLinear) and adapter_name in m.spp_alpha
        }
        if not layers:
            raise ValueError(
                f"save_pretrained: adapter {adapter_name!r} has no SPP layers left "
                "(merge_and_unload() or unload() removed them), so there is nothing to save; "
                "the adapter files were not written: save the merged model with its own "
                "save_pretrained"
            )
        out = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        for key in sorted(out):
            value = out[key]
            full = getattr(value, "full_tensor", None)
            check_finite(full() if callable(full) else value, key, "save_pretrained",
                         "; training diverged? the adapter files were not written")  # fmt: skip
        if config.base_fingerprint is None and isinstance(config, SPPConfig):
            record_fingerprint(config, {_strip(name): m for name, m in layers.items()})
        return out

    def check_mergeable(self, adapter_names: list[str] | None = None) -> None:
        """ValueError naming the first layer whose merged weight would hold non-finite values
        (and how many): merge_adapter / merge_and_unload check every layer before changing
        any."""
        for name, layer in self.spp_layers().items():
            names = adapter_names or [a for a in layer.active_adapters if a in layer.spp_alpha]
            names = [a for a in names if a in layer.spp_alpha and a not in layer.merged_adapters]
            if names:
                layer.checked_merge(names, where=name)

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        self.check_mergeable(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:  # fmt: skip
        self.check_mergeable(adapter_names)
        model = super().merge_and_unload(
            progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        from .bnb_layer import finish_dequantized
        from .lowbit_layer import finish_decoded

        finish_dequantized(model)
        finish_decoded(model)
        return model

    def unload(self) -> nn.Module:
        model = super().unload()
        from .lowbit_layer import finish_decoded

        finish_decoded(model)
        return model

    def spp_layers(self) -> dict[str, SPPLinear]:
        """The SPP layers by full name in the wrapped model, in module order."""
        return {n: m for n, m in self.model.named_modules() if isinstance(m, SPPLinear)}


def _strip(name: str) -> str:
    """A module name of the wrapped model as the tuner records it (no PeftModel prefix)."""
    return name.removeprefix("base_model.model.")
