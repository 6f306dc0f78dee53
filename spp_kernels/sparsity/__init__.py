"""Sparse weight formats and checks: N:M patterns and the packed (values, meta) format
(`nm`), `PackedWeight` (`packed`), 2:4 export and semi-structured inference (`sparse24`),
and per-layer sparsity reports (`report`). Imports nothing from ops or adapters."""

from .nm import is_nm, nm_compress, nm_decompress, nm_pattern
from .packed import PackedLinear, PackedWeight
from .report import LayerSparsity, SparsityReport, sparsity_report

__all__ = [
    "LayerSparsity",
    "PackedLinear",
    "PackedWeight",
    "SparsityReport",
    "is_nm",
    "nm_compress",
    "nm_decompress",
    "nm_pattern",
    "sparsity_report",
]
