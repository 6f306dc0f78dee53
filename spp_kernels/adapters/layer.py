"""SPP tuner layers: adapters on a frozen (pruned) linear layer, one class per base kind.

    W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o],   g(o) = floor(o * r / m)
    Y = X W^T + sum_k scale_k * Dropout_k(X) W'_k^T + bias   (the active adapters k)
    merged weight = W * (1 + sum_k scale_k * alpha_k[g(o), i] * beta_k[o])   (zeros stay zero)

Shapes: W (m, n) = (out_features, in_features), frozen; alpha (r, n); beta (m,).

As peft's LoRA: `SPPLayer` holds what every base kind shares (the adapters in the
`spp_alpha` / `spp_beta` ParameterDicts and every per-adapter setting in a dict keyed by
adapter name: r, scale, dropout, init, backend, explicit dtype), and a class per base kind
knows its frozen weight:

* `SPPLinear`: an nn.Linear base, W dense (a Parameter shared with the wrapped layer);
* `SPPPackedLinear` (packed_layer.py): a `PackedLinear` base, W kept N:M packed.

`spp_kernels.adapters.dispatch` chooses the class for a target (`DISPATCHERS`, tried in
order, as peft's LoRA dispatches between its Linear, bnb and other layers). The forward is one SPP op per active adapter, the frozen weight
passed as its operand (`frozen_operand`): the first adapter's call includes X W^T, the
others add their term alone. `merge()` / `unmerge()` change the frozen weight in place and
keep the original aside, so unmerging restores it exactly (no division).

Outside peft: `SPPLinear.from_linear(linear, r=16, ...)` or
`SPPLinear.standalone(in_features, out_features, bias=True, ...)` (also spelled
`SPPLinear(in_features, out_features, ...)`, spp-kernels 0.1's form) give a layer with one
adapter ("default") whose `alpha`, `beta`, `r`, `scale` and `dropout` read that adapter.
"""

from __future__ import annotations

import logging
import math
import warnings
from abc import ABCMeta
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..ops import spp_linear
from ..ops.merge import merged_weight_many
from ..ops.operand import FrozenWeight
from ..ops.validation import DEFAULT_DROPOUT, DEFAULT_R, DEFAULT_SCALE
from ..sparsity.lowbit import DEFAULT_GROUP_SIZE
from ..sparsity.nm import nm_pattern
from ..sparsity.packed import PackedWeight
from .config import SPPConfig

logger = logging.getLogger(__name__)
DEFAULT_ADAPTER = "default"


def _uniform_fan_in(t: torch.Tensor, fan_in: int) -> None:
    # kaiming_uniform_(a=sqrt(5)) on a (rows, fan_in) tensor is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


class SPPLayer(BaseTunerLayer):
    """The adapter logic of every SPP layer, whatever its base kind (see the module doc).

    A subclass (SPPLayer before nn.Module, so that this class's forward, extra_repr and
    _load_from_state_dict win over nn.Module's) provides the frozen weight: `frozen_operand()`
    (the op's operand), `dense_weight()` (W (m, n)), `_frozen_storage()` / `_set_frozen_storage`
    (what merge changes in place) and `_merged_storage(merged_dense)`.
    """

    adapter_layer_names = ("spp_alpha", "spp_beta")
    other_param_names = (
        "spp_r", "spp_scale", "spp_dropout", "spp_init", "spp_backend", "spp_adapter_dtype",
    )  # fmt: skip

    def _init_adapters(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.spp_alpha = nn.ParameterDict({})
        self.spp_beta = nn.ParameterDict({})
        self.spp_r: dict[str, int] = {}
        self.spp_scale: dict[str, float] = {}
        self.spp_dropout: dict[str, float] = {}
        self.spp_init: dict[str, str] = {}
        self.spp_backend: dict[str, str] = {}
        self.spp_adapter_dtype: dict[str, torch.dtype | None] = {}
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self._disable_adapters = False
        self.merged_adapters = []
        self._unmerged: torch.Tensor | None = None  # the frozen storage while merged
        # Adapters made on the meta device: initialised once materialised (to_empty), at the
        # first forward or by reset_parameters(), unless a state dict loads them first.
        self._uninitialised: set[str] = set()

    # ---- adapters ---------------------------------------------------------------------

    def update_layer(self, adapter_name: str, config: SPPConfig, **kwargs: Any) -> None:
        """Add (or replace) adapter `adapter_name`: alpha (r, n), beta (m,) per `config` (an
        SPPConfig, already validated)."""
        if config.r > self.out_features:
            raise ValueError(f"SPPLinear: r={config.r} exceeds out_features={self.out_features}")
        frozen = self.frozen_operand()
        dtype = config.torch_adapter_dtype or self._default_adapter_dtype(frozen)
        self.spp_alpha[adapter_name] = nn.Parameter(
            torch.empty(config.r, self.in_features, device=frozen.device, dtype=dtype)
        )
        self.spp_beta[adapter_name] = nn.Parameter(
            torch.empty(self.out_features, device=frozen.device, dtype=dtype)
        )
        self.spp_r[adapter_name] = config.r
        self.spp_scale[adapter_name] = float(config.scale)
        self.spp_dropout[adapter_name] = float(config.dropout)
        self.spp_init[adapter_name] = config.init
        self.spp_backend[adapter_name] = config.backend
        self.spp_adapter_dtype[adapter_name] = config.torch_adapter_dtype
        self.reset_adapter(config.init, adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _default_adapter_dtype(self, frozen: FrozenWeight) -> torch.dtype:
        """alpha and beta's dtype when the config names none: the frozen weight's."""
        return frozen.dtype if frozen.dtype.is_floating_point else torch.float32

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # Every load path (peft's set_peft_model_state_dict, transformers' load_adapter,
        # load_state_dict) ends here: an integer alpha/beta would be cast silently, and a
        # wrong shape would fail without naming the tensor.
        for key, value in state_dict.items():
            if not key.startswith(prefix + "spp_"):
                continue
            if not value.is_floating_point():
                raise ValueError(
                    f"adapter tensor {key} has dtype {value.dtype}; SPP adapters are floating point"
                )
            part, _, name = key[len(prefix) :].partition(".")
            params = {"spp_alpha": self.spp_alpha, "spp_beta": self.spp_beta}.get(part, {})
            if name in params and tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"adapter tensor {key} has shape {tuple(value.shape)}; this layer "
                    f"(out_features={self.out_features}, in_features={self.in_features}, "
                    f"r={self.spp_r[name]}) needs {tuple(params[name].shape)}"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name in list(self._uninitialised):
            if (
                f"{prefix}spp_alpha.{name}" in state_dict
                and f"{prefix}spp_beta.{name}" in state_dict
            ):
                self._uninitialised.discard(name)

    def _move_adapter_to_device_of_base_layer(
        self, adapter_name: str, device: torch.device | None = None
    ) -> None:
        """peft's move (to the base layer's device and dtype), then an explicit adapter dtype
        (SPPConfig.adapter_dtype) restored: it is what the user asked for."""
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        dtype = self.spp_adapter_dtype.get(adapter_name)
        for params in (self.spp_alpha, self.spp_beta):
            p = params[adapter_name] if adapter_name in params else None  # noqa: SIM401
            if dtype is not None and p is not None and p.dtype != dtype:
                params[adapter_name] = nn.Parameter(p.detach().to(dtype), p.requires_grad)

    @torch.no_grad()
    def reset_adapter(self, init: str = "paper", adapter_name: str | None = None) -> None:
        """Re-initialise an adapter's alpha and beta with one of INITS (the paper's
        ablation): "paper" alpha ~ U(+-1/sqrt(n)), beta = 0 (the layer equals the frozen
        one); "both_random"; "alpha_zero"."""
        from .config import INITS

        if init not in INITS:
            raise ValueError(f"SPPLinear: init must be one of {INITS}, got {init!r}")
        name = adapter_name or self._single_adapter()
        alpha, beta = self.spp_alpha[name], self.spp_beta[name]
        if alpha.device.type == "meta":
            self._uninitialised.add(name)
            return
        self._uninitialised.discard(name)
        if init == "alpha_zero":
            alpha.zero_()
        else:
            _uniform_fan_in(alpha, self.in_features)
        if init == "paper":
            beta.zero_()
        else:
            _uniform_fan_in(beta, self.out_features)

    def reset_parameters(self) -> None:
        """Initialise every adapter with its own init (torch's convention after `to_empty`:
        a model built on the meta device is materialised, then reset). The frozen base
        layer is not touched."""
        for name in self.spp_alpha:
            self.reset_adapter(self.spp_init.get(name, "paper"), name)

    def _initialise_materialised(self) -> None:
        for name in list(self._uninitialised):
            if self.spp_alpha[name].device.type != "meta":
                self.reset_adapter(self.spp_init.get(name, "paper"), name)

    def _active(self) -> list[str]:
        return [a for a in self.active_adapters if a in self.spp_alpha]

    def _single_adapter(self) -> str:
        active = self._active()
        if len(active) != 1:
            raise ValueError(
                f"SPPLinear: {len(active)} active adapters ({active}); alpha, beta, r, scale "
                "and dropout name one adapter: set_adapter(name) first, or read "
                "spp_alpha[name] and the other per-adapter dicts"
            )
        return active[0]

    # ---- the one-adapter view of the standalone layer ---------------------------------

    @property
    def alpha(self) -> nn.Parameter:
        return self.spp_alpha[self._single_adapter()]

    @property
    def beta(self) -> nn.Parameter:
        return self.spp_beta[self._single_adapter()]

    @property
    def r(self) -> int:
        return self.spp_r[self._single_adapter()]

    @property
    def scale(self) -> float:
        return self.spp_scale[self._single_adapter()]

    @scale.setter
    def scale(self, value: float) -> None:
        self.spp_scale[self._single_adapter()] = float(value)

    @property
    def dropout(self) -> float:
        return self.spp_dropout[self._single_adapter()]

    @dropout.setter
    def dropout(self, value: float) -> None:
        self.spp_dropout[self._single_adapter()] = float(value)

    @property
    def backend(self) -> str:
        """The kernels of the active adapter ("auto", "triton", "torch")."""
        return self.spp_backend[self._single_adapter()]

    @backend.setter
    def backend(self, value: str) -> None:
        from ..ops.validation import check_backend

        check_backend(value)
        for name in self._active():
            self.spp_backend[name] = value

    # ---- forward ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._uninitialised:
            self._initialise_materialised()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = self._active()
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_adapters(x, active, *args, **kwargs)

    def _forward_adapters(self, x: torch.Tensor, active: list[str], *args: Any,
                          **kwargs: Any) -> torch.Tensor:  # fmt: skip
        """Y with the active adapters, the layer unmerged: one op per adapter, the first one
        computing X W^T + bias as well."""
        weight, bias = self.frozen_operand(), self.base_layer.bias
        y = None
        for k, name in enumerate(active):
            term = spp_linear(
                x, weight, self.spp_alpha[name], self.spp_beta[name], bias if k == 0 else None,
                scale=self.spp_scale[name], dropout_p=self.spp_dropout[name],
                training=self.training, backend=self.spp_backend[name], with_base=k == 0,
            )  # fmt: skip
            y = term if y is None else y + term
        return y

    # ---- merge ------------------------------------------------------------------------

    def _merged_dense(self, frozen_dense: torch.Tensor, names: list[str]) -> torch.Tensor:
        terms = [
            (self.spp_alpha[a].detach(), self.spp_beta[a].detach(), self.spp_scale[a])
            for a in names
        ]
        return merged_weight_many(frozen_dense, terms).to(frozen_dense.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge adapters into the frozen weight in place (peft semantics):
        W <- W * (1 + sum_k scale_k alpha_k[g] beta_k), zeros kept bitwise; the frozen W is
        kept aside so `unmerge()` restores it exactly. Returns the base layer.

        Non-finite merged weights are refused whatever `safe_merge` says (ValueError with
        peft's message, nothing changed).
        (spp-kernels 0.1's merge() returned a new nn.Linear and left the layer unchanged:
        that is `merged_linear()` now.)
        """
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.spp_alpha]
        if not names:
            return self.base_layer
        merged = self.checked_merge(names)
        if self._unmerged is None:
            self._unmerged = self._frozen_storage()
        self._set_frozen_storage(self._merged_storage(merged))
        self.merged_adapters.extend(names)
        return self.base_layer

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 - nn.Module's hook
        # The frozen storage kept aside while merged lives outside the module tree: it follows
        # the layer's moves and casts, so that unmerge() restores it where the layer now is.
        super()._apply(fn, recurse)
        if isinstance(self._unmerged, torch.Tensor):
            self._unmerged = fn(self._unmerged)
        elif isinstance(self._unmerged, tuple):
            for module in self._unmerged:
                module._apply(fn, recurse)
        return self

    @torch.no_grad()
    def checked_merge(self, names: list[str], where: str = "") -> torch.Tensor:
        """The dense (m, n) weight with adapters `names` merged on top of those already
        merged (a transient of this call); ValueError in peft's words when any value is not
        finite (`where` names the layer in the message)."""
        merged = self._merged_dense(self._unmerged_dense(), self.merged_adapters + names)
        bad = int((~torch.isfinite(merged)).sum())
        if bad:
            place = f" in layer {where}" if where else ""
            raise ValueError(
                f"NaNs detected in the merged weights. The adapter {', '.join(names)} seems to "
                f"be broken ({bad} non-finite weights{place}); nothing was merged"
            )
        return merged

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the frozen weight exactly as it was before `merge`."""
        if not self.merged:
            warnings.warn("SPPLinear.unmerge: already unmerged, nothing to do", stacklevel=2)
            return
        self._set_frozen_storage(self._unmerged)
        self._unmerged = None
        self.merged_adapters.clear()

    @torch.no_grad()
    def merged_weight(self, packed: bool = False) -> torch.Tensor | PackedWeight:
        """W + scale * W' of the active adapters, (m, n) in W's dtype, zeros kept bitwise;
        the layer is not changed. packed=True returns it as a PackedWeight with the layer's
        N:M pattern (for a dense layer, the sparsest pattern its weight satisfies)."""
        w = self._unmerged_dense()
        merged = self._merged_dense(w, self._active())
        if not packed:
            return merged
        pattern = self.nm or nm_pattern(w)
        if pattern is None:
            raise ValueError(
                "SPPLinear.merged_weight(packed=True): the weight is not N:M sparse for any M "
                "in (4, 8)"
            )
        return PackedWeight.from_dense(merged, *pattern)

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A new plain nn.Linear holding the dense merged weight of the active adapters (same
        zero pattern, bitwise); the layer is not changed."""
        return _linear(self.merged_weight(), self.base_layer.bias, self.training)

    def unload_and_optionally_merge_module(
        self, merge: bool = True, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The plain module that replaces this layer on peft's unload / merge_and_unload: the
        base nn.Linear (merged if `merge`), a packed base decompressed into one."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        self._unmerged = None
        return self._unloaded_base()

    # ---- info -------------------------------------------------------------------------

    weight_format = "dense"
    nm: tuple[int, int] | None = None

    _repr_sparsity = True  # False where counting zeros means decoding the whole weight

    def sparsity(self) -> float:
        """Fraction of exact zeros in the frozen weight."""
        w = self._frozen_storage()
        return 1.0 - int(torch.count_nonzero(w)) / (self.out_features * self.in_features)

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{a}: r={self.spp_r[a]}, scale={self.spp_scale[a]}, dropout={self.spp_dropout[a]}"
            for a in self.spp_alpha
        )
        nm = "" if self.nm is None else f", weight_format=nm({self.nm[0]}:{self.nm[1]})"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.base_layer.bias is not None}, {adapters}"
            + (f", sparsity={self.sparsity():.3f}" if self._repr_sparsity else "")
            + nm
        )

    def __repr__(self) -> str:
        return "spp." + super().__repr__()

    def _unmerged_dense(self) -> torch.Tensor:
        """The frozen W (m, n), dense, as it was before any merge."""
        if self._unmerged is None:
            return self.dense_weight()
        return self._dense_of(self._unmerged)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, training: bool) -> nn.Linear:
    """A plain frozen nn.Linear holding `weight` (m, n) and a copy of `bias`."""
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype
    )
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return linear.train(training)


class _StandaloneForm(ABCMeta):
    """Lets `SPPLinear(in_features, out_features, ...)` (spp-kernels 0.1's constructor) build
    a standalone layer, while `SPPLinear(base_layer, adapter_name, config)` stays peft's."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):
            return cls.standalone(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class SPPLinear(SPPLayer, nn.Module, metaclass=_StandaloneForm):
    """SPP adapters on a dense nn.Linear: y = x W^T + scale * Dropout(x) W'^T + b.

    Args (peft's form): base_layer (nn.Linear), adapter_name, config (SPPConfig).
    Standalone: `SPPLinear.from_linear(linear, r=16, ...)`, `SPPLinear.standalone(...)`.
    Attributes: weight_format "dense" ("nm" for SPPPackedLinear), nm (N, M) or None.
    """

    def __init__(
        self, base_layer: nn.Module, adapter_name: str = DEFAULT_ADAPTER,
        config: SPPConfig | None = None, **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        self._check_base(base_layer)
        self._init_adapters(base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, SPPConfig() if config is None else config)

    @staticmethod
    def _check_base(base_layer: nn.Module) -> None:
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SPPLinear wraps nn.Linear, got {type(base_layer).__name__}")

    # ---- the frozen weight (dense) ----------------------------------------------------

    def frozen_operand(self) -> FrozenWeight:
        """W as the SPP op takes it: the frozen Parameter itself."""
        return self.base_layer.weight

    def dense_weight(self) -> torch.Tensor:
        """The frozen weight W (m, n) (the Parameter itself)."""
        return self.base_layer.weight

    def _frozen_storage(self) -> torch.Tensor:
        return self.base_layer.weight.data

    def _set_frozen_storage(self, value: torch.Tensor) -> None:
        self.base_layer.weight.data = value

    def _merged_storage(self, merged_dense: torch.Tensor) -> torch.Tensor:
        return merged_dense

    def _dense_of(self, storage: torch.Tensor) -> torch.Tensor:
        return storage

    def _unloaded_base(self) -> nn.Module:
        return self.base_layer

    # ---- construction outside peft ----------------------------------------------------

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = DEFAULT_R,
        scale: float = DEFAULT_SCALE,
        dropout: float = DEFAULT_DROPOUT,
        *,
        init: str = "paper",
        backend: str = "auto",
        adapter_dtype: torch.dtype | str | None = None,
        weight_format: str = "dense",
        nm: tuple[int, int] | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
        weight_dtype: str | None = None,
        weight_group_size: int = DEFAULT_GROUP_SIZE,
    ) -> SPPLinear:
        """Wrap a (pruned) nn.Linear; its weight and bias are frozen.

        weight_format:
            "dense": the linear itself becomes the base layer (weight and bias shared).
            "nm": the weight is stored packed (an SPPPackedLinear over a PackedLinear) with
                the N:M pattern `nm`, or the sparsest one it satisfies when `nm` is None;
                ValueError if it is not N:M sparse. The layer does not keep the dense weight.
            "auto": as "nm" when the weight satisfies `nm` (or some N:M pattern) and packing
                saves bytes, as "dense" otherwise (the choice is logged at INFO level).
        weight_dtype: with "nm" / "auto", store the packed values as "int8", "fp8" or "int4"
            codes (an SPPQuantizedPackedLinear; spp_kernels.sparsity.lowbit), int4 with one
            scale per `weight_group_size` kept values.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SPPLinear.from_linear expects nn.Linear, got {type(linear).__name__}")
        config = SPPConfig(
            r=r, scale=scale, dropout=dropout, init=init, backend=backend,
            adapter_dtype=adapter_dtype, weight_format=weight_format, weight_dtype=weight_dtype,
            weight_group_size=weight_group_size,
        )  # fmt: skip
        from .dispatch import new_layer

        layer = new_layer(linear, adapter_name, config, nm=nm)
        return layer.train(linear.training)

    @classmethod
    def standalone(
        cls,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = DEFAULT_R,
        scale: float = DEFAULT_SCALE,
        dropout: float = DEFAULT_DROPOUT,
        init: str = "paper",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype | str | None = None,
    ) -> SPPLinear:
        """A fresh frozen nn.Linear (in_features -> out_features, kaiming init, zero bias)
        with one SPP adapter "default"; every value is checked by SPPConfig."""
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SPPLinear: {name} must be an int >= 1, got {value!r}")
        config = SPPConfig(
            r=r, scale=scale, dropout=dropout, init=init, backend=backend,
            adapter_dtype=adapter_dtype,
        )  # fmt: skip
        if config.r > out_features:
            raise ValueError(
                f"SPPLinear: r must be an int in [1, out_features={out_features}], got {config.r}"
            )
        linear = nn.Linear(in_features, out_features, bias=bool(bias), device=device, dtype=dtype)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
        return cls(linear, DEFAULT_ADAPTER, config)
