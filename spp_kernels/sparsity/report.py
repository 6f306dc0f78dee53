"""Sparsity report: per-layer and total sparsity, and the tightest N:M pattern per layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..utils.hf import find_decoder_layers
from .packed import PackedLinear

# Standard N:M patterns, tightest first: by density N/M, then smaller M (2:4 implies 4:8).
STANDARD_PATTERNS = ((1, 8), (1, 4), (2, 8), (3, 8), (2, 4), (4, 8))


@dataclass(frozen=True)
class LayerSparsity:
    """One weight (m, n): its nonzeros and the standard N:M patterns it satisfies."""

    name: str
    shape: tuple[int, int]
    nonzeros: int
    satisfies: tuple[tuple[int, int], ...]

    @property
    def pattern(self) -> tuple[int, int] | None:
        """The tightest standard N:M pattern the weight satisfies, or None."""
        return self.satisfies[0] if self.satisfies else None

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / self.numel

    @property
    def pattern_name(self) -> str | None:
        return None if self.pattern is None else f"{self.pattern[0]}:{self.pattern[1]}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "nonzeros": self.nonzeros,
            "numel": self.numel,
            "sparsity": self.sparsity,
            "pattern": self.pattern_name,
        }


@dataclass(frozen=True)
class SparsityReport:
    """Sparsity of the prunable layers of a model (see `sparsity_report`)."""

    layers: tuple[LayerSparsity, ...]

    @property
    def nonzeros(self) -> int:
        return sum(layer.nonzeros for layer in self.layers)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Zeros over all reported weights."""
        return 1.0 - self.nonzeros / self.numel if self.numel else 0.0

    @property
    def pattern(self) -> tuple[int, int] | None:
        """The tightest standard N:M pattern every layer satisfies, or None."""
        for nm in STANDARD_PATTERNS:
            if self.layers and all(nm in layer.satisfies for layer in self.layers):
                return nm
        return None

    def to_dict(self) -> dict:
        pattern = self.pattern
        return {
            "sparsity": self.sparsity,
            "nonzeros": self.nonzeros,
            "numel": self.numel,
            "pattern": None if pattern is None else f"{pattern[0]}:{pattern[1]}",
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def __str__(self) -> str:
        width = max([len("layer"), *(len(layer.name) for layer in self.layers)])
        lines = [f"{'layer':<{width}}  {'shape':>13}  {'sparsity':>8}  {'N:M':>5}"]
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            lines.append(
                f"{layer.name:<{width}}  {shape:>13}  {100 * layer.sparsity:7.2f}%  "
                f"{layer.pattern_name or '-':>5}"
            )
        pattern = self.pattern
        lines.append(
            f"{'total':<{width}}  {self.numel:>13,}  {100 * self.sparsity:7.2f}%  "
            f"{'-' if pattern is None else f'{pattern[0]}:{pattern[1]}':>5}"
        )
        return "\n".join(lines)


def satisfied_patterns(weight: torch.Tensor) -> tuple[tuple[int, int], ...]:
    """The STANDARD_PATTERNS (in their order) that weight (m, n) satisfies."""
    nonzero = weight.detach() != 0
    rows, cols = nonzero.shape
    most: dict[int, int] = {}
    for m in sorted({m for _, m in STANDARD_PATTERNS}):
        if cols % m == 0:
            most[m] = int(nonzero.reshape(rows, cols // m, m).sum(-1).max())
    return tuple((n, m) for n, m in STANDARD_PATTERNS if m in most and most[m] <= n)


def is_adapter_layer(module: nn.Module) -> bool:
    """Whether `module` is an unmerged adapter layer (any peft tuner layer: SPP, LoRA, ...),
    known by peft's tuner-layer interface (`get_base_layer`, `active_adapters`): this tier
    does not import peft."""
    return callable(getattr(type(module), "get_base_layer", None)) and hasattr(
        type(module), "active_adapters"
    )


def frozen_weight(module: nn.Module) -> torch.Tensor:
    """The (m, n) weight a linear layer computes with: nn.Linear's weight, a PackedLinear's
    decompressed, or an adapter layer's frozen base weight."""
    if is_adapter_layer(module):
        module = module.get_base_layer()
    if isinstance(module, PackedLinear):
        return module.dense_weight()
    return module.weight


def _is_reported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, PackedLinear)) or is_adapter_layer(module)


def _outermost(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Drop the modules inside a reported adapter layer (its base layer, its adapters)."""
    wrappers = tuple(f"{n}." for n, m in named if is_adapter_layer(m))
    return [(n, m) for n, m in named if not (wrappers and n.startswith(wrappers))]


def _report_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    try:
        path, layers = find_decoder_layers(model)
    except ValueError:
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        return _outermost(
            [
                (name, mod)
                for name, mod in model.named_modules()
                if _is_reported(mod) and mod is not head
            ]
        )
    prefix = f"{path}." if path else ""
    return _outermost(
        [
            (f"{prefix}{i}.{name}", mod)
            for i, layer in enumerate(layers)
            for name, mod in layer.named_modules()
            if _is_reported(mod)
        ]
    )


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Sparsity of the linear layers inside the decoder blocks (what `prune` targets).

    Counts exact zeros of each weight (an adapter layer such as SPPLinear reports its
    frozen weight, a packed layer its decompressed weight). Models
    without findable decoder blocks report every linear layer except the output head.
    """
    modules = _report_modules(model)
    if not modules:
        raise ValueError(f"{type(model).__name__} has no linear layers to report on")
    layers = []
    for name, mod in modules:
        w = frozen_weight(mod)
        layers.append(
            LayerSparsity(
                name=name,
                shape=(int(w.shape[0]), int(w.shape[1])),
                nonzeros=int(torch.count_nonzero(w)),
                satisfies=satisfied_patterns(w),
            )
        )
    return SparsityReport(layers=tuple(layers))
