"""Pure-PyTorch SPP forward and backward: the CPU path, the float64 path and the fallback.

Same math and calling convention as the Triton backend, on 2-D inputs X (tokens, n),
W (m, n) (the frozen-weight operand, spp_kernels.ops.operand: dense or N:M packed),
alpha (r, n), beta (m,), and the dropout keep bits of the forward call
(spp_kernels.ops.dropout):

    Y      = X W_eff^T + b,   W_eff = W * (1 + s * alpha[g] * beta)            (p == 0)
    Y      = X W^T + b + (keep * X) W''^T,  W'' = W * alpha[g] * s * beta / (1 - p)
    dX     = dY W_eff   or   dY W + keep * (dY W'')
    G      = dY^T (keep * X) / (1 - p)                              (rows chunk, fp32)
    dbeta[o]     = s * sum_i alpha[g(o), i] W[o, i] G[o, i]
    dalpha[j, i] = s * sum_{g(o)=j} beta[o] W[o, i] G[o, i]

Y and dX go through spp_kernels.ops.chunked (row chunks of at most CHUNK_BYTES); G is
contracted chunk by chunk too, so no (m, n) temporary exceeds the chunk budget and
nothing (m, n) is saved for backward. The keep-mask is unpacked once per call.
with_base=False computes the adapter term alone (Y = (keep * X) W''^T, or X (W * s * alpha[g]
* beta)^T at p == 0, and its dX); dalpha and dbeta do not depend on it.
"""

from __future__ import annotations

import torch

from . import chunked
from .dropout import keep_values
from .groups import row_chunks, row_groups, times_alpha_rows
from .merge import acc_dtype
from .operand import FrozenWeight, dense_or_none, weight_rows


def _builder(weight: FrozenWeight, alpha: torch.Tensor, beta: torch.Tensor, dtype: torch.dtype):
    m = weight.shape[0]
    acc = acc_dtype(dtype)

    def build(row0: int, rows: int, mode: str, scale: float) -> torch.Tensor:
        w = weight_rows(weight, row0, rows)
        if mode == "weight":
            return w.to(dtype)
        # t = scale * beta[o] * alpha[g(o), i] written once into the chunk's one buffer,
        # then W * t ("adapter") or W + W * t ("merged": W_eff, two passes instead of three
        # for W * (1 + t)); the chunk only feeds a product, so the zero-keeping select of
        # merge.merged_weight (a guarantee for stored merged weights) is not needed here.
        coef = beta[row0 : row0 + rows].to(acc).mul(scale)[:, None]
        t = times_alpha_rows(coef, alpha.to(acc), m, row0)
        if mode == "merged":
            return torch.addcmul(w, w, t, out=t).to(dtype)
        return t.mul_(w).to(dtype)

    return build


def _keep(bits: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    return None if bits is None else keep_values(bits, n, dtype)


def forward(
    x: torch.Tensor,
    weight: FrozenWeight,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    bits: torch.Tensor | None,
    *,
    with_base: bool = True,
) -> torch.Tensor:
    """Y (tokens, m) in x's dtype."""
    m, n = weight.shape

    def kept_x() -> torch.Tensor:
        return _keep(bits, n, x.dtype).mul_(x)

    return chunked.forward(
        x, m, alpha.shape[0], bias, scale, dropout_p, _builder(weight, alpha, beta, x.dtype),
        dense_or_none(weight), kept_x, with_base,
    )  # fmt: skip


def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: FrozenWeight,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    dropout_p: float,
    bits: torch.Tensor | None,
    need_dx: bool = True,
    need_dalpha_dbeta: bool = True,
    *,
    with_base: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX in x's dtype, dalpha in alpha's dtype, dbeta in beta's dtype); None where not needed.

    dy may arrive in another floating dtype (a mixed-precision loss): it is cast to x's.
    """
    if dy.dtype != x.dtype:
        dy = dy.to(x.dtype)
    (m, n), r = weight.shape, alpha.shape[0]
    keep = _keep(bits, n, x.dtype) if dropout_p > 0.0 else None
    dx = dalpha = dbeta = None
    if need_dx:
        build = _builder(weight, alpha, beta, x.dtype)
        dx = chunked.backward_dx(
            dy, m, r, n, scale, dropout_p, build, dense_or_none(weight),
            lambda out, a: out.addcmul_(a, keep), with_base,
        )  # fmt: skip
    if need_dalpha_dbeta:
        dalpha, dbeta = _dalpha_dbeta(dy, x, weight, alpha, beta, scale, dropout_p, keep)
    return dx, dalpha, dbeta


def _dalpha_dbeta(dy, x, weight, alpha, beta, scale, dropout_p, keep):
    """G = dY^T (keep * X) row chunk by row chunk, contracted at once (float32 / float64).

    P = G * W (in place on the chunk of G); then dbeta[o] = c * <P[o], alpha[g(o)]> and
    dalpha[j] = c * sum_{g(o)=j} beta[o] P[o], c = s / (1 - p): batched products over
    the groups when the chunk is made of whole groups (no (m, n) temporary beyond P).
    """
    acc = acc_dtype(x.dtype)
    (m, n), r = weight.shape, alpha.shape[0]
    if keep is None:
        xd = x.to(acc)
    elif keep.dtype == acc:
        xd = keep.mul_(x)  # the mask's last use (backward's dX has read it)
    else:
        xd = x.to(acc) * keep
    alpha_acc, beta_acc = alpha.to(acc), beta.to(acc)
    dalpha = torch.zeros((r, n), dtype=acc, device=x.device)
    dbeta = torch.empty((m,), dtype=acc, device=x.device)
    for row0, rows in row_chunks(m, n, r, acc.itemsize, chunked.CHUNK_BYTES):
        p = dy[:, row0 : row0 + rows].to(acc).t() @ xd  # G chunk (rows, n)
        p.mul_(weight_rows(weight, row0, rows).to(acc))
        beta_rows = beta_acc[row0 : row0 + rows]
        if m % r == 0 and row0 % (m // r) == 0 and rows % (m // r) == 0:
            size = m // r
            g0, k = row0 // size, rows // size
            blocks = p.view(k, size, n)
            # (1, n) x (n, size) per group: a batched matrix-vector product with P's rows as
            # the contiguous operand runs ~10x faster on CPU BLAS than P @ alpha (NOTES).
            dbeta[row0 : row0 + rows] = torch.bmm(
                alpha_acc[g0 : g0 + k, None, :], blocks.transpose(1, 2)
            ).view(-1)
            dalpha[g0 : g0 + k] += torch.bmm(beta_rows.view(k, 1, size), blocks).view(k, n)
        else:
            dbeta[row0 : row0 + rows] = times_alpha_rows(p, alpha_acc, m, row0).sum(1)
            groups = row_groups(m, r, x.device, row0, rows)
            dalpha.index_add_(0, groups, p.mul_(beta_rows[:, None]))
        del p
    coef = scale / (1.0 - dropout_p)
    return dalpha.mul_(coef).to(alpha.dtype), dbeta.mul_(coef).to(beta.dtype)
