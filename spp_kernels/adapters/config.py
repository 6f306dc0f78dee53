"""SPPConfig: which layers get SPP adapters and how (r, scale, dropout, init, backend, ...).

Round-trips through JSON (`to_json` / `from_json`); every field is validated in
`__post_init__`, so a bad value fails when the config is made, before any model changes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.validation import BACKENDS, DEFAULT_DROPOUT, DEFAULT_R, DEFAULT_SCALE
from .layer import INITS

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "spp_config.json"
FORMAT_VERSION = "1"
LLAMA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_DTYPES = ("float32", "float16", "bfloat16", "float64")
WEIGHT_FORMATS = ("dense", "nm", "auto")
ALL_LINEAR = "all-linear"


def _default_targets() -> list[str]:
    return list(LLAMA_TARGET_MODULES)


@dataclass
class SPPConfig:
    """Configuration of SPP adapters; round-trips through JSON (`to_json` / `from_json`).

    Args:
        r: rows of each alpha (r, n); 1 <= r <= every targeted layer's out_features m.
        scale: multiplier of the adapter term (merged W = W * (1 + scale * alpha[g] * beta)).
        dropout: dropout rate on the adapter input during training.
        target_modules: which nn.Linear modules get adapters: a list of module-name suffixes
            (matching whole dotted components: "q_proj" matches "model.layers.0.self_attn.q_proj"),
            a regular expression matched against the full module name (re.fullmatch), or
            "all-linear" (every nn.Linear except the output head). Default: LLaMA's seven
            projections q/k/v/o_proj, gate/up/down_proj, as in the paper.
        init: adapter init, one of spp_kernels.layer.INITS ("paper": beta = 0, so the
            wrapped model starts equal to the pruned one).
        backend: "auto", "triton" or "torch" (see spp_kernels.spp_linear).
        adapter_dtype: None (adapters in the weight's dtype) or "float32", "bfloat16",
            "float16", "float64": e.g. a bf16 model with fp32 adapters.
        weight_format: "dense", "nm" (packed N:M frozen weights) or "auto"; forwarded to
            SPPLinear.from_linear when not "dense".
    """

    r: int = DEFAULT_R
    scale: float = DEFAULT_SCALE
    dropout: float = DEFAULT_DROPOUT
    target_modules: list[str] | str = field(default_factory=_default_targets)
    init: str = "paper"
    backend: str = "auto"
    adapter_dtype: str | None = None
    weight_format: str = "dense"

    def __post_init__(self) -> None:
        if isinstance(self.adapter_dtype, torch.dtype):
            self.adapter_dtype = str(self.adapter_dtype).removeprefix("torch.")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"SPPConfig: r must be a positive int, got {self.r!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise ValueError(f"SPPConfig: scale must be a number, got {self.scale!r}")
        if not torch.isfinite(torch.tensor(float(self.scale))):
            raise ValueError(f"SPPConfig: scale must be finite, got {self.scale!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"SPPConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                try:
                    re.compile(self.target_modules)
                except re.error as e:
                    raise ValueError(
                        f"SPPConfig: target_modules {self.target_modules!r} is not a valid "
                        f"regular expression: {e}"
                    ) from None
        elif not isinstance(self.target_modules, list) or not all(
            isinstance(s, str) and s for s in self.target_modules
        ):
            raise ValueError(
                "SPPConfig: target_modules must be a list of non-empty module-name suffixes, "
                f"a regex string or {ALL_LINEAR!r}, got {self.target_modules!r}"
            )
        elif not self.target_modules:
            raise ValueError("SPPConfig: target_modules is an empty list")
        if self.init not in INITS:
            raise ValueError(f"SPPConfig: init must be one of {INITS}, got {self.init!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"SPPConfig: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(
                f"SPPConfig: adapter_dtype must be None or one of {ADAPTER_DTYPES}, "
                f"got {self.adapter_dtype!r}"
            )
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(
                f"SPPConfig: weight_format must be one of {WEIGHT_FORMATS}, "
                f"got {self.weight_format!r}"
            )
        self.scale = float(self.scale)
        self.dropout = float(self.dropout)

    @property
    def torch_adapter_dtype(self) -> torch.dtype | None:
        """`adapter_dtype` as a torch.dtype (None: the weight's dtype)."""
        return None if self.adapter_dtype is None else getattr(torch, self.adapter_dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SPPConfig:
        if not isinstance(data, dict):
            raise TypeError(f"SPPConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SPPConfig: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> SPPConfig:
        return cls.from_dict(json.loads(text))

    def matches(self, name: str) -> bool:
        """Whether the module called `name` is targeted (module type is checked elsewhere)."""
        if isinstance(self.target_modules, list):
            return any(name == s or name.endswith("." + s) for s in self.target_modules)
        if self.target_modules == ALL_LINEAR:
            return True
        return re.fullmatch(self.target_modules, name) is not None
