"""The differentiable SPP op and its backends.

    Y = X W^T + scale * Dropout(X) W'^T + bias,   W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o]

`spp_linear` (dense W) and `spp_linear_packed` (N:M packed W) are torch.library custom
ops with autograd and fake implementations; `torch_backend` and `triton_backend` compute
them, `reference` holds the plain-autograd oracles (naive W', the paper's Eq. 7).
Nothing here knows about Hugging Face or adapters.
"""

from .dropout import dropout_mask
from .linear import resolve_backend, spp_linear, spp_linear_packed

__all__ = ["dropout_mask", "resolve_backend", "spp_linear", "spp_linear_packed"]
