"""SPPLinear: a frozen (pruned) linear layer with SPP's trainable alpha and beta.

    W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o],   g(o) = floor(o * r / m)
    Y = X W^T + scale * Dropout(X) W'^T + bias
    merged weight = W * (1 + scale * alpha[g(o), i] * beta[o])   (zeros of W stay zero)

Shapes: weight (m, n) = (out_features, in_features), frozen; alpha (r, n); beta (m,).

The frozen weight is held either dense (a frozen Parameter `weight`, the default) or, for
an N:M sparse weight, packed (`weight_format == "nm"`: buffers `weight_values` and
`weight_meta` in the format of spp_kernels.nm, `weight` is None); see `from_linear`.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..ops import spp_linear, spp_linear_packed
from ..ops.merge import merged_weight
from ..ops.validation import DEFAULT_DROPOUT, DEFAULT_R, DEFAULT_SCALE, check_backend
from ..sparsity.nm import is_nm, nm_packed_nbytes, nm_pattern
from ..sparsity.packed import PackedWeight

INITS = ("paper", "both_random", "alpha_zero")
WEIGHT_FORMATS = ("dense", "nm", "auto")

logger = logging.getLogger(__name__)


def _uniform_fan_in(t: torch.Tensor, fan_in: int) -> None:
    # kaiming_uniform_(a=sqrt(5)) on a (rows, fan_in) tensor is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


class SPPLinear(nn.Module):
    """Linear layer y = x W^T + scale * Dropout(x) W'^T + b with frozen W and trainable alpha, beta.

    Args:
        in_features: n.  out_features: m.  bias: learnable bias (frozen when converted
        from a pruned layer by `from_linear`, like W).
        r: rows of alpha, 1 <= r <= out_features.  scale: multiplier of the adapter term.
        dropout: dropout rate on the adapter's input.
        init: "paper" (alpha ~ kaiming_uniform(a=sqrt(5)), beta = 0: a fresh layer equals
            the pruned one), "both_random" (beta ~ U(-1/sqrt(m), 1/sqrt(m)) too) or
            "alpha_zero" (alpha = 0, beta random), the inits of the paper's ablation.
        backend: "auto", "triton" or "torch" (see `spp_kernels.spp_linear`).

    Attributes:
        weight_format: "dense" (frozen Parameter `weight`) or "nm" (packed buffers
            `weight_values`, `weight_meta`; `weight` is None).  nm: (N, M) when packed.
    """

    weight_format: str = "dense"
    nm: tuple[int, int] | None = None

    def __init__(
        self,
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
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"SPPLinear: in_features and out_features must be >= 1, got {in_features}, "
                f"{out_features}"
            )
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= out_features:
            raise ValueError(
                f"SPPLinear: r must be an int in [1, out_features={out_features}], got {r!r}"
            )
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"SPPLinear: scale must be a finite number, got {scale!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"SPPLinear: dropout must be in [0, 1), got {dropout!r}")
        if init not in INITS:
            raise ValueError(f"SPPLinear: init must be one of {INITS}, got {init!r}")
        check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        adapter_factory = {"device": device, "dtype": adapter_dtype or dtype}
        self.in_features, self.out_features = in_features, out_features
        self.r, self.scale, self.dropout, self.backend = r, float(scale), float(dropout), backend
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, **factory), requires_grad=False
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        self.alpha = nn.Parameter(torch.empty(r, in_features, **adapter_factory))
        self.beta = nn.Parameter(torch.empty(out_features, **adapter_factory))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.reset_adapter(init)

    @torch.no_grad()
    def reset_adapter(self, init: str = "paper") -> None:
        """Re-initialise alpha and beta with one of `INITS`."""
        if init not in INITS:
            raise ValueError(f"SPPLinear: init must be one of {INITS}, got {init!r}")
        if init == "alpha_zero":
            self.alpha.zero_()
        else:
            _uniform_fan_in(self.alpha, self.in_features)
        if init == "paper":
            self.beta.zero_()
        else:
            _uniform_fan_in(self.beta, self.out_features)

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
        adapter_dtype: torch.dtype | None = None,
        weight_format: str = "dense",
        nm: tuple[int, int] | None = None,
    ) -> SPPLinear:
        """Wrap a (pruned) nn.Linear; its weight and bias are frozen.

        weight_format:
            "dense": the linear's weight and bias are shared, not copied.
            "nm": the weight is stored packed (spp_kernels.nm) with the N:M pattern `nm`,
                or the sparsest one it satisfies (`nm_pattern`) when `nm` is None;
                ValueError if it is not N:M sparse. The layer does not keep the dense weight.
            "auto": as "nm" when the weight satisfies `nm` (or some N:M pattern) and packing
                saves bytes, as "dense" otherwise. The choice is in `layer.weight_format`
                and logged at INFO level.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SPPLinear.from_linear expects nn.Linear, got {type(linear).__name__}")
        if weight_format not in WEIGHT_FORMATS:
            raise ValueError(
                f"SPPLinear.from_linear: weight_format must be one of {WEIGHT_FORMATS}, "
                f"got {weight_format!r}"
            )
        w = linear.weight
        pattern = _packing_pattern(w.data, weight_format, nm)
        packed = None if pattern is None else PackedWeight.from_dense(w.data, *pattern)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=False,
            r=r,
            scale=scale,
            dropout=dropout,
            init=init,
            backend=backend,
            device="meta",
            dtype=w.dtype,
            adapter_dtype=adapter_dtype,
        )
        if packed is None:
            layer.weight = nn.Parameter(w.data, requires_grad=False)
        else:
            layer.weight = None
            layer.register_buffer("weight_values", packed.values)
            layer.register_buffer("weight_meta", packed.meta)
            layer.weight_format, layer.nm = "nm", pattern
        if weight_format != "dense":
            shape = f"{tuple(w.shape)} {w.dtype} weight"
            if packed is None:
                logger.info(
                    "SPPLinear.from_linear: kept the %s dense (not N:M sparse, or packing "
                    "saves no bytes)",
                    shape,
                )
            else:
                fraction = packed.nbytes / (w.numel() * w.element_size())
                logger.info(
                    "SPPLinear.from_linear: packed the %s as %d:%d, %.1f%% of its dense bytes",
                    shape,
                    *pattern,
                    100 * fraction,
                )
        layer.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        )
        adapter = adapter_dtype or w.dtype
        layer.alpha = nn.Parameter(
            torch.empty(r, linear.in_features, device=w.device, dtype=adapter)
        )
        layer.beta = nn.Parameter(torch.empty(linear.out_features, device=w.device, dtype=adapter))
        layer.reset_adapter(init)
        return layer.train(linear.training)

    def packed_weight(self) -> PackedWeight:
        """The frozen weight as a PackedWeight (views of the buffers); only when packed."""
        if self.nm is None:
            raise ValueError("SPPLinear.packed_weight: this layer's weight is dense")
        return PackedWeight(
            self.weight_values, self.weight_meta, self.nm[0], self.nm[1], self.in_features
        )

    def dense_weight(self) -> torch.Tensor:
        """The frozen weight W (m, n): the Parameter itself, or decompressed (a new tensor)."""
        return self.weight if self.nm is None else self.packed_weight().dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nm is not None:
            return spp_linear_packed(
                x,
                self.packed_weight(),
                self.alpha,
                self.beta,
                self.bias,
                scale=self.scale,
                dropout_p=self.dropout,
                training=self.training,
                backend=self.backend,
            )
        return spp_linear(
            x,
            self.weight,
            self.alpha,
            self.beta,
            self.bias,
            scale=self.scale,
            dropout_p=self.dropout,
            training=self.training,
            backend=self.backend,
        )

    @torch.no_grad()
    def merged_weight(self, packed: bool = False) -> torch.Tensor | PackedWeight:
        """W + scale * W' = W * (1 + scale * alpha[g] * beta), (m, n) in weight's dtype.

        Computed in float32 (float64 for float64 weights); every zero of W is kept bitwise.
        packed=True returns it as a PackedWeight with the layer's N:M pattern (for a dense
        layer, the sparsest pattern its weight satisfies; ValueError if none).
        """
        w = self.dense_weight()
        merged = merged_weight(w, self.alpha, self.beta, self.scale).to(w.dtype)
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
    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding the dense merged weight (same zero pattern, bitwise)."""
        w = self.dense_weight()
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=w.dtype,
        )
        linear.weight = nn.Parameter(
            merged_weight(w, self.alpha, self.beta, self.scale).to(w.dtype),
            requires_grad=False,
        )
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear.train(self.training)

    def sparsity(self) -> float:
        """Fraction of exact zeros in the frozen weight."""
        if self.nm is not None:
            nonzeros = int(torch.count_nonzero(self.weight_values))
            return 1.0 - nonzeros / (self.out_features * self.in_features)
        return float((self.weight == 0).sum()) / self.weight.numel()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, scale={self.scale}, "
            f"dropout={self.dropout}, sparsity={self.sparsity():.3f}"
            + ("" if self.nm is None else f", weight_format=nm({self.nm[0]}:{self.nm[1]})")
        )


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
