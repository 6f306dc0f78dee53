"""Reference SPP implementations: test oracles and benchmark baselines.

Both compute, with plain autograd,
    W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o],   g(o) = floor(o * r / m)
    Y = X W^T + scale * Dropout(X) W'^T + bias                      (paper Eq. 5)
and take the same arguments as `spp_kernels.spp_linear` (the same seed or keep_mask gives
the same dropout mask, see spp_kernels.ops.dropout).

- `spp_linear_naive` materialises Repeat(alpha) and W' (m, n) and autograd keeps them for
  backward: the authors' default implementation.
- `spp_linear_blocked` follows the paper's Eq. 7: a loop over the r row blocks, each a
  product of alpha-scaled inputs with that block of W.
Neither is a fast path; they exist to be compared against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import dropout_mask, new_seed, unpack_keep_mask
from .groups import row_groups
from .validation import DEFAULT_SCALE, check_spp_args


def _dropped(
    x: torch.Tensor,
    dropout_p: float,
    training: bool,
    seed: int | None,
    keep_mask: torch.Tensor | None,
) -> torch.Tensor:
    if not training or dropout_p == 0.0:
        return x
    n = x.shape[-1]
    if keep_mask is None:
        seed = int(new_seed()) if seed is None else int(seed)
        keep = dropout_mask((x.numel() // n, n), dropout_p, seed, x.device)
    elif keep_mask.dtype == torch.bool:
        keep = keep_mask.reshape(-1, n)
    else:
        keep = unpack_keep_mask(keep_mask, n)
    return x * keep.view(x.shape).to(x.dtype) * (1.0 / (1.0 - dropout_p))


def spp_linear_naive(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float = DEFAULT_SCALE,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    seed: int | None = None,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPP linear with W' materialised: Y = X W^T + scale * D(X) (W * Repeat(alpha) * beta)^T + b."""
    del backend  # accepted for signature compatibility
    check_spp_args(x, weight, alpha, beta, bias, scale, dropout_p)
    m = weight.shape[0]
    repeated = alpha[row_groups(m, alpha.shape[0], alpha.device)]  # Repeat(alpha): (m, n)
    w_prime = weight * repeated.to(weight.dtype) * beta.to(weight.dtype)[:, None]
    xd = _dropped(x, dropout_p, training, seed, keep_mask)
    y = F.linear(x, weight) + scale * F.linear(xd, w_prime)
    return y if bias is None else y + bias.to(y.dtype)


def spp_linear_blocked(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float = DEFAULT_SCALE,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    seed: int | None = None,
    keep_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPP linear as the paper's Eq. 7: for each block j, Y_j += scale * (D(X) * alpha_j) W_j^T * beta_j."""
    del backend
    check_spp_args(x, weight, alpha, beta, bias, scale, dropout_p)
    m = weight.shape[0]
    r = alpha.shape[0]
    xd = _dropped(x, dropout_p, training, seed, keep_mask)
    groups = row_groups(m, r)
    bounds = torch.searchsorted(groups, torch.arange(r + 1), right=False).tolist()
    blocks = []
    for j in range(r):
        lo, hi = bounds[j], bounds[j + 1]
        w_j = weight[lo:hi]
        blocks.append(F.linear(xd * alpha[j].to(x.dtype), w_j) * beta[lo:hi].to(x.dtype))
    y = F.linear(x, weight) + scale * torch.cat(blocks, dim=-1)
    return y if bias is None else y + bias.to(y.dtype)
