"""Which SPP layer class wraps a target module: one dispatch function per base kind, tried
in order (`DISPATCHERS`), as peft's LoRA chooses between its Linear, bnb and other layers."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ..ops.quantized import is_bnb_layer
from ..sparsity.nm import is_nm, nm_packed_nbytes, nm_pattern
from ..sparsity.packed import PackedLinear
from .config import WEIGHT_FORMATS, SPPConfig
from .layer import SPPLinear
from .packed_layer import SPPPackedLinear

logger = logging.getLogger(__name__)


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


def dispatch_packed(
    target: nn.Module, adapter_name: str, config: SPPConfig, nm: tuple[int, int] | None = None
) -> SPPLinear | None:
    """An SPPPackedLinear when `config.weight_format` asks to pack `target` (an nn.Linear)
    and its weight has an N:M pattern worth packing (an SPPQuantizedPackedLinear when
    `config.weight_dtype` names low-bit values), else None."""
    if config.weight_format not in WEIGHT_FORMATS:
        raise ValueError(
            f"SPPLinear: weight_format must be one of {WEIGHT_FORMATS}, got {config.weight_format!r}"
        )
    if not isinstance(target, nn.Linear) or config.weight_format == "dense":
        return None
    w = target.weight
    pattern = _packing_pattern(w.data, config.weight_format, nm)
    shape = f"{tuple(w.shape)} {w.dtype} weight"
    if pattern is None:
        logger.info("SPP: kept the %s dense (not N:M sparse, or packing saves no bytes)", shape)
        return None
    if config.weight_dtype is not None:
        from ..sparsity.lowbit import QuantizedPackedLinear
        from .lowbit_layer import SPPQuantizedPackedLinear

        base = QuantizedPackedLinear.from_linear(
            target, *pattern, config.weight_dtype, config.weight_group_size
        ).train(target.training)
        logger.info("SPP: packed the %s as %d:%d with %s values, %.1f%% of its dense bytes",
                    shape, *pattern, config.weight_dtype,
                    100 * base.quantized_weight().nbytes / (w.numel() * w.element_size()))  # fmt: skip
        return SPPQuantizedPackedLinear(base, adapter_name, config)
    fraction = nm_packed_nbytes(*w.shape, *pattern, w.dtype) / (w.numel() * w.element_size())
    logger.info("SPP: packed the %s as %d:%d, %.1f%% of its dense bytes", shape, *pattern,
                100 * fraction)  # fmt: skip
    base = PackedLinear.from_linear(target, *pattern).train(target.training)
    return SPPPackedLinear(base, adapter_name, config)


def dispatch_bnb(
    target: nn.Module, adapter_name: str, config: SPPConfig, **kwargs: Any
) -> SPPLinear | None:
    """An SPPBnbLinear over a bitsandbytes Linear4bit / Linear8bitLt (kept quantized), else
    None. weight_format "nm" is refused: the base is quantized already, not packable."""
    if not is_bnb_layer(target):
        return None
    if config.weight_format == "nm" or config.weight_dtype is not None:
        raise ValueError(
            f"SPP: weight_format='nm' and weight_dtype pack float weights, but this "
            f"{type(target).__name__} is quantized by bitsandbytes; use weight_format='dense' "
            "or 'auto' without weight_dtype"
        )
    from .bnb_layer import SPPBnbLinear

    return SPPBnbLinear(target, adapter_name, config)


def check_loaded_codes(target: nn.Module, config: SPPConfig, name: str = "the layer") -> None:
    """ValueError when `config.weight_dtype` asks a base that holds low-bit N:M codes
    already (a QuantizedPackedLinear) for another format."""
    if config.weight_dtype not in (None, target.value_format):
        raise ValueError(
            f"SPP: {name} holds {target.value_format} N:M values already; "
            f"weight_dtype={config.weight_dtype!r} cannot change them (leave it unset)"
        )


def dispatch_lowbit(
    target: nn.Module, adapter_name: str, config: SPPConfig, **kwargs: Any
) -> SPPLinear | None:
    """An SPPQuantizedPackedLinear over a QuantizedPackedLinear (a base loaded with its
    low-bit N:M codes, as `spp quantize` writes it), else None."""
    from ..sparsity.lowbit import QuantizedPackedLinear

    if not isinstance(target, QuantizedPackedLinear):
        return None
    check_loaded_codes(target, config)
    from .lowbit_layer import SPPQuantizedPackedLinear

    layer = SPPQuantizedPackedLinear(target, adapter_name, config)
    layer.loaded_quantized = True
    return layer


def dispatch_dense(
    target: nn.Module, adapter_name: str, config: SPPConfig, **kwargs: Any
) -> SPPLinear | None:
    """An SPPLinear over `target` when it is an nn.Linear, else None."""
    if isinstance(target, nn.Linear):
        return SPPLinear(target, adapter_name, config)
    return None


# Tried in order; the first that returns a layer wins (peft's LoRA dispatch pattern). The
# bitsandbytes layers subclass nn.Linear, so theirs comes first.
DISPATCHERS = [dispatch_bnb, dispatch_lowbit, dispatch_packed, dispatch_dense]


def new_layer(target: nn.Module, adapter_name: str, config: SPPConfig, **kwargs: Any) -> SPPLinear:
    """The SPP layer class for `target` chosen by DISPATCHERS; TypeError naming the module's
    type when none takes it."""
    for dispatch in DISPATCHERS:
        layer = dispatch(target, adapter_name, config, **kwargs)
        if layer is not None:
            return layer
    raise TypeError(
        f"Target module {type(target).__name__} is not supported. Currently, only "
        "`torch.nn.Linear` is supported."
    )
