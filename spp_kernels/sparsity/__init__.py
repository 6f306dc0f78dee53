"""Sparse weight formats and checks: N:M patterns and the packed (values, meta) format
(`nm`), `PackedWeight` (`packed`), 2:4 export and semi-structured inference (`sparse24`),
and per-layer sparsity reports (`report`). Imports nothing from ops or adapters, and
importing this package loads no Hugging Face library (names are imported on first use)."""

from __future__ import annotations

from ..utils.lazy import by_module, lazy_getattr

_LAZY = by_module(
    {
        ".nm": ("is_nm", "nm_compress", "nm_decompress", "nm_pattern"),
        ".packed": ("PackedLinear", "PackedWeight"),
        ".report": ("LayerSparsity", "SparsityReport", "sparsity_report"),
    }
)
__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
