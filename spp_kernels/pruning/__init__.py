"""Post-training pruning of LLaMA-family decoders: magnitude, Wanda, SparseGPT."""

from ..sparsity.report import LayerSparsity, SparsityReport, sparsity_report
from ..utils.hf import find_decoder_layers
from .masks import nm_mask, parse_sparsity, unstructured_mask
from .sequential import METHODS, prune

__all__ = [
    "METHODS",
    "LayerSparsity",
    "SparsityReport",
    "find_decoder_layers",
    "nm_mask",
    "parse_sparsity",
    "prune",
    "sparsity_report",
    "unstructured_mask",
]
