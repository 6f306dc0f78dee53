"""SPPLinear: a peft tuner layer adding SPP adapters to a frozen (pruned) linear layer.

    W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o],   g(o) = floor(o * r / m)
    Y = X W^T + scale * Dropout(X) W'^T + bias
    merged weight = W * (1 + scale * alpha[g(o), i] * beta[o])   (zeros of W stay zero)

Shapes: W (m, n) = (out_features, in_features), frozen; alpha (r, n); beta (m,).

A `peft` BaseTunerLayer: `base_layer` is the frozen nn.Linear (or a `PackedLinear` holding
an N:M weight packed), adapters live in `spp_alpha` / `spp_beta` ParameterDicts keyed by
adapter name. The forward is one fused SPP op (`spp_kernels.spp_linear` or
`spp_linear_packed`): the base product and the active adapter's term in one call.
`merge()` / `unmerge()` change the base weight in place and keep the frozen original
aside, so unmerging restores it exactly (no division).

`SPPLinear.from_linear(linear, r=16, ...)` and `SPPLinear(in_features, out_features, ...)`
build a layer with one adapter ("default") outside peft, with `alpha`, `beta`, `r`,
`scale` and `dropout` as attributes of that adapter.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..ops import spp_linear, spp_linear_packed
from ..ops.merge import merged_weight_many
from ..ops.validation import DEFAULT_DROPOUT, DEFAULT_R, DEFAULT_SCALE, check_backend
from ..sparsity.nm import is_nm, nm_gather_values, nm_packed_nbytes, nm_pattern
from ..sparsity.packed import PackedLinear, PackedWeight
from .config import INITS, WEIGHT_FORMATS, SPPConfig

logger = logging.getLogger(__name__)
DEFAULT_ADAPTER = "default"


def _uniform_fan_in(t: torch.Tensor, fan_in: int) -> None:
    # kaiming_uniform_(a=sqrt(5)) on a (rows, fan_in) tensor is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


class SPPLinear(nn.Module, BaseTunerLayer):
    """y = x W^T + scale * Dropout(x) W'^T + b with frozen W and trainable alpha, beta.

    Args (peft form): base_layer (nn.Linear, or PackedLinear), adapter_name, config.
    Args (standalone form, spp-kernels 0.1): in_features, out_features, bias=True, r=16,
        scale=2.0, dropout=0.05, init="paper", backend="auto", device, dtype, adapter_dtype;
        a fresh frozen nn.Linear becomes the base layer.

    Attributes: weight_format "dense" or "nm" (packed base; then `weight` is None and
    `weight_values` / `weight_meta` hold it), nm (N, M) or None, backend.
    """

    adapter_layer_names = ("spp_alpha", "spp_beta")
    other_param_names = ("spp_r", "spp_scale", "spp_dropout", "spp_init")

    def __init__(
        self,
        base_layer: nn.Module | int,
        adapter_name: str | int = DEFAULT_ADAPTER,
        config: SPPConfig | bool | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(base_layer, int):  # the standalone (0.1) constructor
            base_layer, adapter_name, config = _standalone(base_layer, adapter_name, config, kwargs)
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, PackedLinear)):
            raise TypeError(
                f"SPPLinear wraps nn.Linear (or a PackedLinear), got {type(base_layer).__name__}"
            )
        config = SPPConfig() if config is None else config
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.spp_alpha = nn.ParameterDict({})
        self.spp_beta = nn.ParameterDict({})
        self.spp_r: dict[str, int] = {}
        self.spp_scale: dict[str, float] = {}
        self.spp_dropout: dict[str, float] = {}
        self.spp_init: dict[str, str] = {}
        # Adapters made on the meta device: initialised once materialised (to_empty), at the
        # first forward or by reset_parameters(), unless a state dict loads them first.
        self._uninitialised: set[str] = set()
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.backend = config.backend
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self._unmerged: torch.Tensor | None = None  # the frozen weight while merged
        self.update_layer(adapter_name, config)

    # ---- adapters ---------------------------------------------------------------------

    def update_layer(self, adapter_name: str, config: SPPConfig, **kwargs: Any) -> None:
        """Add (or replace) adapter `adapter_name`: alpha (r, n), beta (m,) per `config`."""
        if config.r > self.out_features:
            raise ValueError(f"SPPLinear: r={config.r} exceeds out_features={self.out_features}")
        check_backend(config.backend)
        device = self._frozen().device
        dtype = config.torch_adapter_dtype or self._frozen().dtype
        if device.type == "meta" or not dtype.is_floating_point:
            dtype = dtype if dtype.is_floating_point else torch.float32
        self.spp_alpha[adapter_name] = nn.Parameter(
            torch.empty(config.r, self.in_features, device=device, dtype=dtype)
        )
        self.spp_beta[adapter_name] = nn.Parameter(
            torch.empty(self.out_features, device=device, dtype=dtype)
        )
        self.spp_r[adapter_name] = config.r
        self.spp_scale[adapter_name] = float(config.scale)
        self.spp_dropout[adapter_name] = float(config.dropout)
        self.spp_init[adapter_name] = config.init
        self.backend = config.backend
        self.reset_adapter(config.init, adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        # Every load path (peft's set_peft_model_state_dict, transformers' load_adapter,
        # load_state_dict) ends here: an integer alpha/beta would be cast silently.
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

    @torch.no_grad()
    def reset_adapter(self, init: str = "paper", adapter_name: str | None = None) -> None:
        """Re-initialise an adapter's alpha and beta with one of INITS (the paper's
        ablation): "paper" alpha ~ U(+-1/sqrt(n)), beta = 0 (the layer equals the frozen
        one); "both_random"; "alpha_zero"."""
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

    def _single_adapter(self) -> str:
        active = [a for a in self.active_adapters if a in self.spp_alpha]
        if len(active) != 1:
            raise ValueError(
                f"SPPLinear: {len(active)} active adapters ({active}); SPP runs one adapter at "
                "a time: set_adapter(name) first"
            )
        return active[0]

    # ---- the frozen weight ------------------------------------------------------------

    def _frozen(self) -> torch.Tensor:
        base = self.base_layer
        return base.weight_values if isinstance(base, PackedLinear) else base.weight

    @property
    def weight_format(self) -> str:
        return "nm" if isinstance(self.base_layer, PackedLinear) else "dense"

    @property
    def nm(self) -> tuple[int, int] | None:
        return self.base_layer.nm if isinstance(self.base_layer, PackedLinear) else None

    @property
    def weight_values(self) -> torch.Tensor:
        return self._packed_base().weight_values

    @property
    def weight_meta(self) -> torch.Tensor:
        return self._packed_base().weight_meta

    def _packed_base(self) -> PackedLinear:
        if not isinstance(self.base_layer, PackedLinear):
            raise ValueError("SPPLinear: this layer's weight is dense")
        return self.base_layer

    def packed_weight(self) -> PackedWeight:
        """The frozen weight as a PackedWeight (views of the buffers); only when packed."""
        return self._packed_base().packed_weight()

    def dense_weight(self) -> torch.Tensor:
        """The frozen weight W (m, n): the Parameter itself, or decompressed (a new tensor)."""
        base = self.base_layer
        return base.dense_weight() if isinstance(base, PackedLinear) else base.weight

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

    # ---- forward ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._uninitialised:
            self._initialise_materialised()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.spp_alpha]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        name = self._single_adapter()
        kw = dict(
            scale=self.spp_scale[name],
            dropout_p=self.spp_dropout[name],
            training=self.training,
            backend=self.backend,
        )
        base = self.base_layer
        if isinstance(base, PackedLinear):
            weight = base.packed_weight()
            return spp_linear_packed(
                x, weight, self.spp_alpha[name], self.spp_beta[name], base.bias, **kw
            )
        return spp_linear(
            x, base.weight, self.spp_alpha[name], self.spp_beta[name], base.bias, **kw
        )

    # ---- merge ------------------------------------------------------------------------

    def _merged_dense(self, frozen_dense: torch.Tensor, names: list[str]) -> torch.Tensor:
        terms = [
            (self.spp_alpha[a].detach(), self.spp_beta[a].detach(), self.spp_scale[a])
            for a in names
        ]
        return merged_weight_many(frozen_dense, terms).to(frozen_dense.dtype)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge adapters into the base weight in place (peft semantics):
        W <- W * (1 + sum_k scale_k alpha_k[g] beta_k), zeros kept bitwise; the frozen W is
        kept aside so `unmerge()` restores it exactly. Returns the base layer.

        safe_merge: check the merged weight is finite first (ValueError naming the count).
        (spp-kernels 0.1's merge() returned a new nn.Linear and left the layer unchanged:
        that is `merged_linear()` now.)
        """
        names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.spp_alpha]
        if not names:
            return self.base_layer
        base = self.base_layer
        frozen_dense = self._unmerged_dense()
        merged = self._merged_dense(frozen_dense, self.merged_adapters + names)
        bad = int((~torch.isfinite(merged)).sum())
        if safe_merge and bad:
            raise ValueError(f"SPPLinear.merge: {bad} non-finite merged weights; nothing merged")
        if self._unmerged is None:
            self._unmerged = self._frozen().data
        if isinstance(base, PackedLinear):
            base.weight_values = nm_gather_values(merged, base.weight_meta, *base.nm)
        else:
            base.weight.data = merged
        self.merged_adapters.extend(names)
        return base

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the frozen weight exactly as it was before `merge`."""
        if not self.merged:
            warnings.warn("SPPLinear.unmerge: already unmerged, nothing to do", stacklevel=2)
            return
        base = self.base_layer
        if isinstance(base, PackedLinear):
            base.weight_values = self._unmerged
        else:
            base.weight.data = self._unmerged
        self._unmerged = None
        self.merged_adapters.clear()

    @torch.no_grad()
    def merged_weight(self, packed: bool = False) -> torch.Tensor | PackedWeight:
        """W + scale * W' of the active adapter, (m, n) in W's dtype, zeros kept bitwise; the
        layer is not changed. packed=True returns it as a PackedWeight with the layer's N:M
        pattern (for a dense layer, the sparsest pattern its weight satisfies)."""
        w = self._unmerged_dense()
        merged = self._merged_dense(w, [self._single_adapter()])
        if not packed:
            return merged
        pattern = self.nm or nm_pattern(w)
        if pattern is None:
            raise ValueError(
                "SPPLinear.merged_weight(packed=True): the weight is not N:M sparse for any M "
                "in (4, 8)"
            )
        return PackedWeight.from_dense(merged, *pattern)

    def _unmerged_dense(self) -> torch.Tensor:
        if self._unmerged is None:
            return self.dense_weight()
        base = self.base_layer
        if isinstance(base, PackedLinear):
            return PackedWeight(
                self._unmerged, base.weight_meta, *base.nm, base.in_features
            ).dense()
        return self._unmerged

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A new plain nn.Linear holding the dense merged weight of the active adapter (same
        zero pattern, bitwise); the layer is not changed."""
        w = self.merged_weight()
        bias = self.base_layer.bias
        linear = nn.Linear(
            self.in_features, self.out_features, bias=bias is not None, device="meta", dtype=w.dtype
        )
        linear.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return linear.train(self.training)

    def unload_and_optionally_merge_module(
        self, merge: bool = True, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The plain module that replaces this layer on peft's unload / merge_and_unload: the
        base nn.Linear (merged if `merge`), a packed base decompressed into one."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.base_layer
        self._unmerged = None
        if isinstance(base, PackedLinear):
            linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                               device="meta", dtype=base.weight_values.dtype)  # fmt: skip
            linear.weight = nn.Parameter(base.dense_weight(), requires_grad=False)
            if base.bias is not None:
                linear.bias = nn.Parameter(base.bias.detach(), requires_grad=False)
            return linear.train(self.training)
        return base

    # ---- info -------------------------------------------------------------------------

    def sparsity(self) -> float:
        """Fraction of exact zeros in the frozen weight."""
        if isinstance(self.base_layer, PackedLinear):
            nonzeros = int(torch.count_nonzero(self.base_layer.weight_values))
            return 1.0 - nonzeros / (self.out_features * self.in_features)
        w = self.base_layer.weight
        return float((w == 0).sum()) / w.numel()

    def extra_repr(self) -> str:
        adapters = ", ".join(
            f"{a}: r={self.spp_r[a]}, scale={self.spp_scale[a]}, dropout={self.spp_dropout[a]}"
            for a in self.spp_alpha
        )
        nm = "" if self.nm is None else f", weight_format=nm({self.nm[0]}:{self.nm[1]})"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.base_layer.bias is not None}, {adapters}, "
            f"sparsity={self.sparsity():.3f}{nm}"
        )

    def __repr__(self) -> str:
        return "spp." + super().__repr__()

    # ---- construction from a linear layer ---------------------------------------------

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
    ) -> SPPLinear:
        """Wrap a (pruned) nn.Linear; its weight and bias are frozen.

        weight_format:
            "dense": the linear itself becomes the base layer (weight and bias shared).
            "nm": the weight is stored packed (a PackedLinear base) with the N:M pattern `nm`,
                or the sparsest one it satisfies when `nm` is None; ValueError if it is not
                N:M sparse. The layer does not keep the dense weight.
            "auto": as "nm" when the weight satisfies `nm` (or some N:M pattern) and packing
                saves bytes, as "dense" otherwise (the choice is logged at INFO level).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SPPLinear.from_linear expects nn.Linear, got {type(linear).__name__}")
        config = SPPConfig(
            r=r, scale=scale, dropout=dropout, init=init, backend=backend,
            adapter_dtype=adapter_dtype, weight_format=weight_format,
        )  # fmt: skip
        base = packed_base(linear, weight_format, nm)
        return cls(base, adapter_name, config).train(linear.training)


def packed_base(
    linear: nn.Linear, weight_format: str, nm: tuple[int, int] | None = None
) -> nn.Module:
    """The base layer an SPP adapter wraps for `weight_format`: `linear` itself, or a
    PackedLinear with its weight packed (see SPPLinear.from_linear)."""
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(
            f"SPPLinear.from_linear: weight_format must be one of {WEIGHT_FORMATS}, "
            f"got {weight_format!r}"
        )
    w = linear.weight
    pattern = _packing_pattern(w.data, weight_format, nm)
    if weight_format != "dense":
        shape = f"{tuple(w.shape)} {w.dtype} weight"
        if pattern is None:
            logger.info(
                "SPPLinear.from_linear: kept the %s dense (not N:M sparse, or packing saves "
                "no bytes)",
                shape,
            )
        else:
            fraction = nm_packed_nbytes(*w.shape, *pattern, w.dtype) / (
                w.numel() * w.element_size()
            )
            logger.info(
                "SPPLinear.from_linear: packed the %s as %d:%d, %.1f%% of its dense bytes",
                shape, *pattern, 100 * fraction,
            )  # fmt: skip
    if pattern is None:
        return linear
    return PackedLinear.from_linear(linear, *pattern).train(linear.training)


def _packing_pattern(
    weight: torch.Tensor, weight_format: str, nm: tuple[int, int] | None
) -> tuple[int, int] | None:
    """The (N, M) to pack `weight` with for `weight_format`, or None to keep it dense."""
    if nm is not None and (
        not isinstance(nm, tuple) or len(nm) != 2 or not all(isinstance(v, int) for v in nm)
    ):
        raise ValueError(f"SPPLinear.from_linear: nm must be a tuple (N, M) of ints, got {nm!r}")
    if weight_format == "dense":
        return None
    if weight_format == "nm":
        pattern = nm or nm_pattern(weight)
        if pattern is None:
            raise ValueError(
                f"SPPLinear.from_linear: weight_format='nm' but the {tuple(weight.shape)} weight "
                "is not N:M sparse for any M in (4, 8) dividing in_features; prune it first or "
                "use weight_format='auto'"
            )
        return pattern  # nm_compress names the first offending group if `nm` does not hold
    pattern = nm if nm is not None and is_nm(weight, *nm) else None
    pattern = pattern or (nm_pattern(weight) if nm is None else None)
    if pattern is None:
        return None
    packed_bytes = nm_packed_nbytes(*weight.shape, *pattern, weight.dtype)
    return pattern if packed_bytes < weight.numel() * weight.element_size() else None


def _standalone(in_features, out_features, bias, kwargs) -> tuple[nn.Linear, str, SPPConfig]:
    """SPPLinear(in_features, out_features, bias=True, *, r, scale, dropout, init, backend,
    device, dtype, adapter_dtype): a fresh frozen nn.Linear (kaiming init) with one adapter."""
    if not isinstance(out_features, int) or in_features < 1 or out_features < 1:
        raise ValueError(
            f"SPPLinear: in_features and out_features must be >= 1, got {in_features}, "
            f"{out_features}"
        )
    r = kwargs.pop("r", DEFAULT_R)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= out_features:
        raise ValueError(
            f"SPPLinear: r must be an int in [1, out_features={out_features}], got {r!r}"
        )
    scale = kwargs.pop("scale", DEFAULT_SCALE)
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"SPPLinear: scale must be a finite number, got {scale!r}")
    dropout = kwargs.pop("dropout", DEFAULT_DROPOUT)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"SPPLinear: dropout must be in [0, 1), got {dropout!r}")
    init = kwargs.pop("init", "paper")
    if init not in INITS:
        raise ValueError(f"SPPLinear: init must be one of {INITS}, got {init!r}")
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    config = SPPConfig(
        r=r, scale=scale, dropout=dropout, init=init, backend=kwargs.pop("backend", "auto"),
        adapter_dtype=kwargs.pop("adapter_dtype", None),
    )  # fmt: skip
    if kwargs:
        raise TypeError(f"SPPLinear: unexpected arguments {sorted(kwargs)}")
    linear = nn.Linear(in_features, out_features, bias=True if bias is None else bool(bias),
                       device=device, dtype=dtype)  # fmt: skip
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear, DEFAULT_ADAPTER, config
