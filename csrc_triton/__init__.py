"""Fused Triton kernels for SPP linear layers (device code and launchers only).

    Y  = X W^T + scale * Dropout(X) W'^T + bias,  W'[o, i] = W[o, i] alpha[g(o), i] beta[o]

- `spp_linear_forward`: Y in one pass over W (spp_forward.py).
- `spp_linear_dx` (spp_backward.py): dX = dY W_eff with the effective weight built tile by tile.
- `spp_linear_dalpha_dbeta`: dalpha, dbeta contracted from G = dY^T Dropout(X) tiles.

No (m, n) or (tokens, n, r) tensor is ever written: see the header of each kernel file.
Nothing here imports spp_kernels; the host glue is spp_kernels/triton_backend.py.
Set TRITON_INTERPRET=1 before importing to run the kernels on CPU (slow, for tests).
"""

from ._launch import INTERPRET, KERNEL_DTYPES
from .spp_backward import spp_linear_dalpha_dbeta, spp_linear_dx
from .spp_forward import spp_linear_forward

__all__ = [
    "INTERPRET",
    "KERNEL_DTYPES",
    "spp_linear_dalpha_dbeta",
    "spp_linear_dx",
    "spp_linear_forward",
]
