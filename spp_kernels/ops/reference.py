"""Reference SPP implementations: test oracles and benchmark baselines.

Both compute, with plain autograd,
    W'[o, i] = W[o, i] * alpha[g(o), i] * beta[o],   g(o) = floor(o * r / m)
    Y = X W^T + scale * Dropout(X) W'^T + bias                      (paper Eq. 5)
and take the same arguments as `spp_kernels.spp_linear`.

- `spp_linear_naive` materialises Repeat(alpha) and W' (m, n) and autograd keeps them for
  backward: the authors' default implementation.
- `spp_linear_blocked` follows the paper's Eq. 7: a loop over the r row blocks, each a
  product of alpha-scaled inputs with that block of W.
Neither is a fast path; they exist to be compared against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import apply_dropout, new_seed
from .groups import row_groups
from .validation import check_spp_args


def _dropped(x: torch.Tensor, dropout_p: float, training: bool, seed: int | None) -> torch.Tensor:
    if not training or dropout_p == 0.0:
        return x
    seed = int(new_seed()) if seed is None else seed
    x2d = x.reshape(-1, x.shape[-1])
    return apply_dropout(x2d, dropout_p, seed).view(x.shape)


def spp_linear_naive(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    seed: int | None = None,
) -> torch.Tensor:
    """SPP linear with W' materialised: Y = X W^T + scale * D(X) (W * Repeat(alpha) * beta)^T + b."""
    del backend  # accepted for signature compatibility
    check_spp_args(x, weight, alpha, beta, bias, scale, dropout_p)
    m = weight.shape[0]
    repeated = alpha[row_groups(m, alpha.shape[0], alpha.device)]  # Repeat(alpha): (m, n)
    w_prime = weight * repeated.to(weight.dtype) * beta.to(weight.dtype)[:, None]
    y = F.linear(x, weight) + scale * F.linear(_dropped(x, dropout_p, training, seed), w_prime)
    return y if bias is None else y + bias.to(y.dtype)


def spp_linear_blocked(
    x: torch.Tensor,
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    seed: int | None = None,
) -> torch.Tensor:
    """SPP linear as the paper's Eq. 7: for each block j, Y_j += scale * (D(X) * alpha_j) W_j^T * beta_j."""
    del backend
    check_spp_args(x, weight, alpha, beta, bias, scale, dropout_p)
    m = weight.shape[0]
    r = alpha.shape[0]
    xd = _dropped(x, dropout_p, training, seed)
    groups = row_groups(m, r)
    bounds = torch.searchsorted(groups, torch.arange(r + 1), right=False).tolist()
    blocks = []
    for j in range(r):
        lo, hi = bounds[j], bounds[j + 1]
        w_j = weight[lo:hi]
        blocks.append(F.linear(xd * alpha[j].to(x.dtype), w_j) * beta[lo:hi].to(x.dtype))
    y = F.linear(x, weight) + scale * torch.cat(blocks, dim=-1)
    return y if bias is None else y + bias.to(y.dtype)
