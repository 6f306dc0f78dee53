"""The differentiable SPP op and its backends.

    Y = X W^T + scale * Dropout(X) W'^T + bias,   W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o]

`spp_linear` is one torch.library custom op family (autograd and fake implementations)
for every frozen-weight kind (`operand`: dense or N:M packed); `torch_backend` and
`triton_backend` compute it, `reference` holds the plain-autograd oracles (naive W', the
paper's Eq. 7). Nothing here knows about Hugging Face or adapters, and importing this
package loads neither (its names are imported on first use).
"""

from __future__ import annotations

from ..utils.lazy import by_module, lazy_getattr

_LAZY = by_module(
    {
        ".dropout": ("dropout_mask",),
        ".backends": ("resolve_backend",),
        ".linear": ("spp_linear", "spp_linear_packed"),
    }
)
__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
