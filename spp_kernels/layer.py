"""SPPLinear: a frozen (pruned) linear layer with SPP's trainable alpha and beta.

    W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o],   g(o) = floor(o * r / m)
    Y = X W^T + scale * Dropout(X) W'^T + bias
    merged weight = W * (1 + scale * alpha[g(o), i] * beta[o])   (zeros of W stay zero)

Shapes: weight (m, n) = (out_features, in_features), frozen; alpha (r, n); beta (m,).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .ops import spp_linear
from .torch_backend import effective_weight
from .validation import check_backend

INITS = ("paper", "both_random", "alpha_zero")


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
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 16,
        scale: float = 2.0,
        dropout: float = 0.0,
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
        r: int = 16,
        scale: float = 2.0,
        dropout: float = 0.0,
        *,
        init: str = "paper",
        backend: str = "auto",
        adapter_dtype: torch.dtype | None = None,
    ) -> SPPLinear:
        """Wrap a (pruned) nn.Linear: its weight and bias are shared, frozen, not copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SPPLinear.from_linear expects nn.Linear, got {type(linear).__name__}")
        w = linear.weight
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
        layer.weight = nn.Parameter(w.data, requires_grad=False)
        layer.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)
        )
        adapter = adapter_dtype or w.dtype
        layer.alpha = nn.Parameter(
            torch.empty(r, linear.in_features, device=w.device, dtype=adapter)
        )
        layer.beta = nn.Parameter(torch.empty(linear.out_features, device=w.device, dtype=adapter))
        layer.reset_adapter(init)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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
    def merged_weight(self) -> torch.Tensor:
        """W + scale * W' = W * (1 + scale * alpha[g] * beta), (m, n) in weight's dtype.

        Computed in float32 (float64 for float64 weights); every zero of W is kept bitwise.
        """
        return effective_weight(self.weight, self.alpha, self.beta, self.scale).to(
            self.weight.dtype
        )

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (same zero pattern, bitwise)."""
        w = self.weight
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=w.dtype,
        )
        linear.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def sparsity(self) -> float:
        """Fraction of exact zeros in the frozen weight."""
        return float((self.weight == 0).sum()) / self.weight.numel()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, r={self.r}, scale={self.scale}, "
            f"dropout={self.dropout}, sparsity={self.sparsity():.3f}"
        )
