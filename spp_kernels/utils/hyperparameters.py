"""The adapter hyper-parameters' one default and help text (stdlib only).

`AdapterOptions` is the single source for r, scale, dropout, init, backend,
weight_format, weight_dtype and weight_group_size: `SPPConfig`'s fields, `SPPLinear`, the op and the `spp` command-line options
all read their default and help here (the CLI imports this module without torch or peft).
Defaults are the SPP paper's (r = 16 rows of alpha, scale 2, dropout 0.05).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def option(default: Any, help: str, *, flags: tuple[str, ...] | None = None,
           minimum: int | None = None, choices: tuple[str, ...] | None = None) -> Any:  # fmt: skip
    """A dataclass field carrying what a command-line option needs: help text, the option's
    names where they are not `--field-name`, an integer lower bound, fixed choices."""
    metadata = {"help": help, "flags": flags, "minimum": minimum, "choices": choices}
    return field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


@dataclass(frozen=True)
class AdapterOptions:
    """SPP's per-layer hyper-parameters (defaults and help shared by every surface)."""

    r: int = option(16, "Rows of each alpha (r, n); 1 <= r <= every targeted layer's "
                    "out_features m (--r is an alias that torchrun refuses).",
                    flags=("--spp-r", "--r"), minimum=1)  # fmt: skip
    scale: float = option(2.0, "Multiplier of the adapter term (merged W = W * (1 + scale * "
                          "alpha[g] * beta)).")  # fmt: skip
    dropout: float = option(0.05, "Dropout rate on the adapter's input while training.")
    init: str = option("paper", "'paper' (alpha ~ U(+-1/sqrt(n)), beta = 0: the wrapped model "
                       "starts equal to the pruned one), 'both_random' or 'alpha_zero' (the "
                       "paper's ablation).")  # fmt: skip
    backend: str = option("auto", "SPP kernels: 'auto' (triton on CUDA), 'triton' or 'torch'.")
    weight_format: str = option("dense", "Frozen weights 'dense', 'nm' (kept N:M packed: values "
                                "+ metadata) or 'auto' (packed where a layer is N:M sparse and "
                                "packing saves bytes).", choices=("dense", "nm", "auto"))  # fmt: skip
    weight_dtype: str | None = option(None, "Packed frozen values as low-bit codes (with "
                                      "--weight-format nm or auto): 'int8' or 'fp8' (scale per "
                                      "row) or 'int4' (scale per --weight-group-size kept "
                                      "values); round-to-nearest, at load. Default: the "
                                      "model's dtype.", choices=("int8", "int4", "fp8"))  # fmt: skip
    weight_group_size: int = option(128, "Kept values per int4 scale (must divide every "
                                    "packed row: in_features / M * N).", minimum=1)  # fmt: skip


def default(cls: type, name: str) -> Any:
    """The default of dataclass field `name` of `cls`."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def shared(name: str) -> dict[str, Any]:
    """`field(**shared("r"))`: AdapterOptions' default and help for another dataclass."""
    f = next(f for f in dataclasses.fields(AdapterOptions) if f.name == name)
    return {"default": f.default, "metadata": {"help": f.metadata["help"]}}


DEFAULT_R: int = default(AdapterOptions, "r")
DEFAULT_SCALE: float = default(AdapterOptions, "scale")
DEFAULT_DROPOUT: float = default(AdapterOptions, "dropout")
