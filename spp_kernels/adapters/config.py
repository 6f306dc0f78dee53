"""SPPConfig: SPP as a peft method (`peft_type` "SPP"): which layers get adapters, and how.

    W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o],   g(o) = floor(o * r / m)
    Y = X W^T + scale * Dropout(X) W'^T + bias,   merged W = W * (1 + scale * alpha[g] * beta)

A `peft.PeftConfig` dataclass: saved as peft's `adapter_config.json` ("peft_type": "SPP")
and read back by `PeftModel.from_pretrained`, `AutoPeftModelForCausalLM` and transformers'
`load_adapter` once `spp_kernels` is imported. Every field is validated in `__post_init__`,
so a bad value fails when the config is made, before any model changes.

Set by the tuner when it wraps a model (and saved with the adapter): `wrapped_modules`, the
explicit sorted list of wrapped module names, and `base_fingerprint`, each wrapped weight's
shape, a hash of its zero mask and a hash of sampled rows of its values (a load onto
another base, or onto a base the adapter was already merged into, is an error unless the
user passes `allow_other_base`).

Read from a file (an `adapter_config.json`: `peft_type` arrives as the plain string "SPP"),
a config never yields a pattern: with `wrapped_modules` the module list is used as
`target_modules` and the other matching fields (`exclude_modules`, `layers_to_transform`,
`layers_pattern`) are dropped (they were applied when the adapter was made); without it, a
regex in `target_modules` or `exclude_modules`, or any `layers_pattern` (peft compiles it
into a regex) is refused. `allow_other_base` is the loading user's choice: it is never
written to a file and is ignored (with a warning) when a file holds it.
"""

from __future__ import annotations

import enum
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig

from ..ops.validation import BACKENDS
from ..sparsity.lowbit import VALUE_FORMATS
from ..utils.hyperparameters import shared
from .registration import SPP_PEFT_TYPE, ensure_tuner

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's name
LEGACY_CONFIG_NAME = "spp_config.json"  # spp-kernels 0.1.0's adapter directories
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DTYPES = ("float32", "float16", "bfloat16", "float64")
WEIGHT_FORMATS = ("dense", "nm", "auto")
BIAS_MODES = ("none", "all", "spp_only")
INITS = ("paper", "both_random", "alpha_zero")
ALL_LINEAR = "all-linear"
# |scale| beyond this is an error: merged weights W * (1 + scale * alpha * beta) overflow long
# before (the paper uses 2).
MAX_ABS_SCALE = 1e4
# Matching fields a saved adapter has already applied (its wrapped_modules list says what).
APPLIED_FIELDS = ("exclude_modules", "layers_to_transform", "layers_pattern")


def _default_targets() -> list[str]:
    return list(LLAMA_TARGET_MODULES)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class SPPConfig(PeftConfig):
    """Configuration of SPP adapters (a peft config; JSON round trip with to_json/from_json)."""

    r: int = field(**shared("r"))
    scale: float = field(**shared("scale"))
    dropout: float = field(**shared("dropout"))
    target_modules: list[str] | str | None = field(default_factory=_default_targets, metadata=_help(
        "Module-name suffixes ('q_proj' matches 'model.layers.0.self_attn.q_proj'), a regex "
        "matched against full names, or 'all-linear' (every nn.Linear but the output head). "
        "Default: LLaMA's seven projections, as in the paper."))  # fmt: skip
    exclude_modules: list[str] | str | None = field(default=None, metadata=_help(
        "Module names or a regex to leave out."))  # fmt: skip
    init: str = field(**shared("init"))
    backend: str = field(**shared("backend"))
    adapter_dtype: str | None = field(default=None, metadata=_help(
        "None: peft's rule (float32 adapters on a float16/bfloat16 model, autocast_adapter_dtype), "
        "or 'float32', 'bfloat16', 'float16', 'float64'."))  # fmt: skip
    weight_format: str = field(**shared("weight_format"))
    weight_dtype: str | None = field(**shared("weight_dtype"))
    weight_group_size: int = field(**shared("weight_group_size"))
    init_weights: bool = field(default=True, metadata=_help(
        "peft's switch for an identity init: False makes init 'paper' start away from the "
        "frozen layer ('both_random'); peft's generic tests use it."))  # fmt: skip
    bias: str = field(default="none", metadata=_help(
        "'none' (biases frozen), or peft's 'all' / 'spp_only' (train every bias / the biases "
        "of the wrapped layers)."))  # fmt: skip
    layers_to_transform: list[int] | int | None = field(default=None, metadata=_help(
        "Only these decoder layer indices (peft's semantics)."))  # fmt: skip
    layers_pattern: list[str] | str | None = field(default=None, metadata=_help(
        "The name of the decoder layer list for layers_to_transform (peft's semantics)."))  # fmt: skip
    modules_to_save: list[str] | None = field(default=None, metadata=_help(
        "Other modules to train and save fully (peft's semantics)."))  # fmt: skip
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None, metadata=_help("peft's trainable tokens (set by TRL for new chat tokens).")
    )
    wrapped_modules: list[str] | None = field(default=None, metadata=_help(
        "Set by the tuner: the exact module names wrapped (used as target_modules on load)."))  # fmt: skip
    base_fingerprint: dict[str, str] | None = field(default=None, metadata=_help(
        "Set by the tuner: per wrapped layer 'm x n' and a hash of its zero mask."))  # fmt: skip
    allow_other_base: bool = field(default=False, metadata=_help(
        "Allow loading onto a base whose frozen weights differ from the fingerprint (the "
        "loading user's choice: never written to or read from a file)."))  # fmt: skip

    def __post_init__(self) -> None:
        # peft's loaders pass the file's "peft_type" on; Python code passes none (or the member).
        from_file = type(self.peft_type) is str
        super().__post_init__()
        self.peft_type = SPP_PEFT_TYPE
        if isinstance(self.adapter_dtype, torch.dtype):
            self.adapter_dtype = str(self.adapter_dtype).removeprefix("torch.")
        if from_file and self.allow_other_base:
            warnings.warn(
                "SPPConfig: ignored allow_other_base from the adapter file: it is the loading "
                "user's choice (set it on the config, or pass --allow-other-base)",
                stacklevel=2,
            )
            self.allow_other_base = False
        if self.wrapped_modules is not None:
            if not isinstance(self.wrapped_modules, (list, tuple, set)) or not all(
                isinstance(n, str) and n for n in self.wrapped_modules
            ):
                raise ValueError("SPPConfig: wrapped_modules must be a list of module names")
            # A saved adapter names exactly what it wrapped: match those names; the fields
            # that selected them were applied when it was made.
            self.wrapped_modules = sorted(set(self.wrapped_modules))
            self.target_modules = list(self.wrapped_modules)
            for name in APPLIED_FIELDS:
                setattr(self, name, None)
        elif from_file:
            _refuse_file_patterns(self)
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if self.init_weights is False and self.init == "paper":
            self.init = "both_random"
        self._validate()
        ensure_tuner()

    # peft's matching helpers read this attribute of every config; SPP wraps modules only.
    target_parameters = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # pickle and deepcopy skip __post_init__: the tuner must be registered all the same.
        self.__dict__.update(state)
        ensure_tuner()

    def _validate(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"SPPConfig: r must be a positive int, got {self.r!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"SPPConfig: scale must be a number, got {self.scale!r}")
        if not math.isfinite(self.scale) or abs(self.scale) > MAX_ABS_SCALE:
            raise ValueError(
                f"SPPConfig: scale must be a finite number with |scale| <= {MAX_ABS_SCALE:g}, "
                f"got {self.scale!r}"
            )
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"SPPConfig: dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as e:
                    raise ValueError(
                        f"SPPConfig: target_modules {targets!r} is not a valid regular expression: {e}"
                    ) from None
        elif targets is not None and (
            not isinstance(targets, list) or not all(isinstance(s, str) and s for s in targets)
        ):
            raise ValueError(
                "SPPConfig: target_modules must be a list of non-empty module-name suffixes, "
                f"a regex string or {ALL_LINEAR!r}, got {targets!r}"
            )
        elif targets is not None and not targets:
            raise ValueError("SPPConfig: target_modules is an empty list")
        for name, value, allowed in (
            ("init", self.init, INITS),
            ("backend", self.backend, BACKENDS),
            ("weight_format", self.weight_format, WEIGHT_FORMATS),
            ("bias", self.bias, BIAS_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"SPPConfig: {name} must be one of {allowed}, got {value!r}")
        if self.weight_dtype is not None:
            if self.weight_dtype not in VALUE_FORMATS:
                raise ValueError(
                    f"SPPConfig: weight_dtype must be None or one of {VALUE_FORMATS}, got "
                    f"{self.weight_dtype!r}"
                )
            if self.weight_format == "dense":
                raise ValueError(
                    f"SPPConfig: weight_dtype={self.weight_dtype!r} stores packed N:M values; "
                    "set weight_format='nm' (or 'auto')"
                )
        if (
            isinstance(self.weight_group_size, bool)
            or not isinstance(self.weight_group_size, int)
            or self.weight_group_size < 1
        ):
            raise ValueError(
                f"SPPConfig: weight_group_size must be a positive int, got {self.weight_group_size!r}"
            )
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(
                f"SPPConfig: adapter_dtype must be None or one of {ADAPTER_DTYPES}, "
                f"got {self.adapter_dtype!r}"
            )
        self.scale = float(self.scale)
        self.dropout = float(self.dropout)

    @property
    def torch_adapter_dtype(self) -> torch.dtype | None:
        """`adapter_dtype` as a torch.dtype (None: peft's rule)."""
        return None if self.adapter_dtype is None else getattr(torch, self.adapter_dtype)

    # ---- JSON (peft's to_dict keeps the enum member; these give plain JSON) ------------

    def to_dict(self) -> dict[str, Any]:
        """peft's dict (what save_pretrained writes), without `allow_other_base`."""
        out = super().to_dict()
        out.pop("allow_other_base", None)
        return out

    def to_json(self) -> str:
        return json.dumps(_jsonable(self.to_dict()), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SPPConfig:
        if not isinstance(data, dict):
            raise TypeError(f"SPPConfig.from_dict expects a dict, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SPPConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> SPPConfig:
        return cls.from_dict(json.loads(text))

    def matches(self, name: str) -> bool:
        """Whether the module called `name` is targeted (peft's rule; module type is checked
        when wrapping)."""
        from peft.tuners.tuners_utils import check_target_module_exists

        if self.target_modules == ALL_LINEAR:
            return True
        return bool(check_target_module_exists(self, name))


def _refuse_file_patterns(config: SPPConfig) -> None:
    """ValueError for a pattern read from a file without the module list that replaces it."""
    patterns = {
        "target_modules": config.target_modules
        if isinstance(config.target_modules, str) and config.target_modules != ALL_LINEAR
        else None,
        "exclude_modules": config.exclude_modules
        if isinstance(config.exclude_modules, str)
        else None,
        "layers_pattern": config.layers_pattern,
    }
    for name, value in patterns.items():
        if value:
            raise ValueError(
                f"adapter config: {name}={value!r} is a pattern and the file has no "
                "wrapped_modules list; patterns are never read from files: pass "
                "SPPConfig(...) yourself or re-save the adapter with spp-kernels"
            )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in (sorted(value) if isinstance(value, set) else value)]
    if isinstance(value, enum.Enum):
        return value.value  # the PeftType member "SPP"
    return value
