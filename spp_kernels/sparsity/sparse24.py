"""2:4 semi-structured sparsity for inference: checks, packing, GPU conversion, compact storage.

After SPP training and ``merge_and_unload`` a 2:4-pruned model is still exactly 2:4 (every
zero of W stays zero). This module is the one place to import the 2:4 tools from:

* ``is_2to4`` / ``check_2to4``: every group of 4 consecutive input columns of a weight
  (m, n) holds at most 2 nonzeros (zero judged by value, so -0.0 counts as zero).
* ``compress`` / ``decompress``: the 2:4 case of the N:M packed format of
  ``spp_kernels.sparsity.nm``: values (m, n/2) + int32 metadata (m, ceil(n/32)), exact
  round trip.
* ``to_semi_structured`` (``semi_structured.py``): swaps each qualifying nn.Linear weight
  for a ``torch.sparse.SparseSemiStructuredTensor`` so F.linear runs on the sparse tensor
  cores (cuSPARSELt or CUTLASS), leaving the rest dense and saying why in a report.
* ``save_compressed`` / ``load_compressed`` (``compressed.py``): a model directory holding
  2:4 weights packed (about 56 % of their dense fp16 bytes) and every other tensor dense,
  bit-exact on reload.
"""

from __future__ import annotations

from typing import Any

import torch

from ..compat import renamed_function
from .compressed import load_compressed, save_compressed
from .nm import check_nm, is_nm, nm_compress, nm_decompress
from .semi_structured import (
    SEMI_STRUCTURED_BACKENDS,
    SEMI_STRUCTURED_DTYPES,
    SemiStructuredReport,
    semi_structured_backend,
    semi_structured_weight,
    to_semi_structured,
)

__all__ = [
    "SEMI_STRUCTURED_BACKENDS",
    "SEMI_STRUCTURED_DTYPES",
    "SemiStructuredReport",
    "check_2to4",
    "compress",
    "decompress",
    "is_2to4",
    "load_compressed",
    "save_compressed",
    "semi_structured_backend",
    "semi_structured_weight",
    "to_semi_structured",
]


# ---- pattern checks and packing ---------------------------------------------------------


def is_2to4(weight: torch.Tensor) -> bool:
    """True iff weight is 2-D (m, n), 4 divides n, and every group of 4 columns has <= 2 nonzeros."""
    return is_nm(weight, 2, 4)


def check_2to4(weight: torch.Tensor, name: str = "") -> None:
    """Raise ValueError naming ``name`` and the first offending row/group unless weight is 2:4."""
    check_nm(weight, 2, 4, name=name)


def compress(weight: torch.Tensor, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2:4 weight (m, n) into values (m, n/2) and int32 meta (m, ceil(n/32)).

    ``nm_compress(weight, 2, 4)``: meta word j of a row holds groups 8j..8j+7, 4 bits each
    (two 2-bit positions). Raises ValueError naming ``name`` if weight is not 2:4.
    """
    return nm_compress(weight, 2, 4, name=name)


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of ``compress``: the dense (m, 2 * values.shape[1]) weight."""
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError("decompress: values must be a 2-D tensor (m, n/2)")
    return nm_decompress(values, meta, 2, 4, values.shape[1] * 2)


def __getattr__(name: str) -> Any:  # resolve_backend, BACKENDS: spp_kernels.compat
    return renamed_function(__name__, name)
