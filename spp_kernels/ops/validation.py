"""Input checks shared by spp_linear, the references and SPPLinear.

Every check runs before any computation or state change and names the offending argument.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..sparsity.lowbit import QuantizedPackedWeight
from ..sparsity.packed import PackedWeight

# The paper's hyper-parameters: one default for the op, SPPLinear, SPPConfig and the CLI (the
# functional op alone defaults dropout to 0: see spp_linear's docstring).
from ..utils.hyperparameters import DEFAULT_DROPOUT, DEFAULT_R, DEFAULT_SCALE  # noqa: F401
from .quantized import BnbWeight

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TORCH_DTYPES = (*FLOAT_DTYPES, torch.float64)
BACKENDS = ("auto", "triton", "torch")


def check_spp_args(
    x: torch.Tensor,
    weight: Any,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    allowed_dtypes: tuple[torch.dtype, ...] = TORCH_DTYPES,
    what: str = "spp_linear",
) -> None:
    """Validate shapes, dtypes, devices and scalars of an SPP linear call: the one check of
    a call's operands. `weight` is the frozen-weight operand: a dense (m, n) tensor, a
    PackedWeight or QuantizedPackedWeight (whose values or codes, scales and metadata are
    checked against its format here) or a BnbWeight (checked when made from its layer)."""
    if isinstance(weight, (PackedWeight, QuantizedPackedWeight, BnbWeight)):
        weight.check()
    elif not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{what}: weight must be a torch.Tensor, a PackedWeight, a QuantizedPackedWeight or "
            f"a BnbWeight, got "
            f"{type(weight).__name__}"
        )
    elif weight.dim() != 2:
        raise ValueError(f"{what}: weight must be 2-D (m, n), got shape {tuple(weight.shape)}")
    for name, t in (("x", x), ("alpha", alpha), ("beta", beta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{what}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    m, n = weight.shape
    if x.dim() < 1 or x.shape[-1] != n:
        raise ValueError(
            f"{what}: x's last dimension must equal weight's in_features n={n}, "
            f"got x shape {tuple(x.shape)}"
        )
    if alpha.dim() != 2 or alpha.shape[1] != n:
        raise ValueError(f"{what}: alpha must have shape (r, {n}), got {tuple(alpha.shape)}")
    r = alpha.shape[0]
    if not 1 <= r <= m:
        raise ValueError(f"{what}: r = alpha.shape[0] must be in [1, m={m}], got r={r}")
    if beta.shape != (m,):
        raise ValueError(f"{what}: beta must have shape ({m},), got {tuple(beta.shape)}")
    if bias is not None and bias.shape != (m,):
        raise ValueError(f"{what}: bias must have shape ({m},), got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight)):
        if t.dtype not in allowed_dtypes:
            raise TypeError(
                f"{what}: unsupported {name} dtype {t.dtype}; supported: "
                + ", ".join(str(d) for d in allowed_dtypes)
            )
    if weight.dtype != x.dtype:
        raise TypeError(
            f"{what}: x dtype {x.dtype} differs from weight dtype {weight.dtype} "
            "(cast one, or run under torch.autocast)"
        )
    for name, t in (("alpha", alpha), ("beta", beta), ("bias", bias)):
        if t is not None and t.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"{what}: {name} dtype {t.dtype} must be x's dtype {x.dtype} or torch.float32"
            )
    devices = {t.device for t in (x, weight, alpha, beta, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"{what}: all tensors must be on one device, got "
            + ", ".join(sorted(str(d) for d in devices))
        )
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{what}: scale must be a finite number, got {scale!r}")
    if (
        isinstance(dropout_p, bool)
        or not isinstance(dropout_p, (int, float))
        or not (0.0 <= dropout_p < 1.0)
    ):
        raise ValueError(f"{what}: dropout_p must be in [0, 1), got {dropout_p!r}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"spp_linear: backend must be one of {BACKENDS}, got {backend!r}")
