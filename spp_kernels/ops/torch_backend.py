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

At small p on the CPU (float32 / float64), Y and dX go through the dropped entries instead
of a second GEMM each (spp_kernels.ops.sparse_dropout: Y = X W_c^T - (drop * X) W''^T with
W_c = W + W''); otherwise through spp_kernels.ops.chunked. Both work in row chunks of at
most CHUNK_BYTES; G is contracted chunk by chunk too, so no (m, n) temporary exceeds the
chunk budget and nothing (m, n) is saved for backward.
with_base=False computes the adapter term alone (Y = (keep * X) W''^T, or X (W * s * alpha[g]
* beta)^T at p == 0, and its dX); dalpha and dbeta do not depend on it.
"""

from __future__ import annotations

import torch

from . import chunked, sparse_dropout
from .dropout import keep_values
from .groups import row_chunks, row_groups, times_alpha_rows
from .merge import acc_dtype
from .operand import FrozenWeight, dense_or_none, weight_rows


def _scaled_alpha_rows(weight, alpha, beta, acc):
    m = weight.shape[0]

    def rows_and_t(row0: int, rows: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """W's rows and t = scale * beta[o] * alpha[g(o), i] in the chunk's one buffer."""
        coef = beta[row0 : row0 + rows].to(acc).mul(scale)[:, None]
        return weight_rows(weight, row0, rows), times_alpha_rows(coef, alpha.to(acc), m, row0)

    return rows_and_t


def _builder(weight: FrozenWeight, alpha: torch.Tensor, beta: torch.Tensor, dtype: torch.dtype):
    rows_and_t = _scaled_alpha_rows(weight, alpha, beta, acc_dtype(dtype))

    def build(row0: int, rows: int, mode: str, scale: float) -> torch.Tensor:
        if mode == "weight":
            return weight_rows(weight, row0, rows).to(dtype)
        # W * t ("adapter") or W + W * t ("merged": W_eff, two passes instead of three for
        # W * (1 + t)); the chunk only feeds a product, so the zero-keeping select of
        # merge.merged_weight (a guarantee for stored merged weights) is not needed here.
        w, t = rows_and_t(row0, rows, scale)
        if mode == "merged":
            return torch.addcmul(w, w, t, out=t).to(dtype)
        return t.mul_(w).to(dtype)

    return build


def _pair_builder(weight: FrozenWeight, alpha: torch.Tensor, beta: torch.Tensor, dtype):
    """build_pair(row0, rows, c) -> (W_c rows (rows, n), W''^T (n, rows) contiguous) with
    W'' = W * t and W_c = W + W'': one t, two buffers. W'' is handed over transposed because
    torch's CPU sparse products (S W''^T and the sampled dY W'') read it column by column;
    given a (rows, n) row-major W'' they copy it to that layout themselves, more slowly
    than the one blocked transpose here (NOTES, issue 24 part 2)."""
    rows_and_t = _scaled_alpha_rows(weight, alpha, beta, acc_dtype(dtype))

    def build_pair(row0: int, rows: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        w, t = rows_and_t(row0, rows, scale)
        adapter = t.mul_(w)
        adapter_t = adapter.t().to(dtype, memory_format=torch.contiguous_format, copy=True)
        return adapter.add_(w).to(dtype), adapter_t

    return build_pair


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
    if with_base and sparse_dropout.applies(x, dropout_p, bits):
        build_pair = _pair_builder(weight, alpha, beta, x.dtype)
        c = scale / (1.0 - dropout_p)
        return sparse_dropout.forward(x, bits, bias, build_pair, m, alpha.shape[0], c)

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
    acc = acc_dtype(x.dtype)
    dropped = keep = None
    sparse = sparse_dropout.applies(x, dropout_p, bits)
    if sparse and (need_dalpha_dbeta or (need_dx and with_base)):  # they serve dX and G
        dropped = sparse_dropout.dropped_entries(bits, n)
    if dropout_p > 0.0 and (dropped is None or (need_dx and not with_base)):
        keep = _keep(bits, n, x.dtype)
    dx = dalpha = dbeta = None
    if need_dx and with_base and dropped is not None:
        build_pair = _pair_builder(weight, alpha, beta, x.dtype)
        c = scale / (1.0 - dropout_p)
        dx = sparse_dropout.backward_dx(dy, dropped, build_pair, m, r, c)
    elif need_dx:
        build = _builder(weight, alpha, beta, x.dtype)
        dx = chunked.backward_dx(
            dy, m, r, n, scale, dropout_p, build, dense_or_none(weight),
            lambda out, a: out.addcmul_(a, keep), with_base,
        )  # fmt: skip
    if need_dalpha_dbeta:
        if dropped is not None:
            xd = sparse_dropout.kept_x(x, dropped, acc)
        elif keep is None:
            xd = x.to(acc)
        elif keep.dtype == acc:
            xd = keep.mul_(x)  # the mask's last use (backward's dX has read it)
        else:
            xd = x.to(acc) * keep
        dalpha, dbeta = _dalpha_dbeta(dy, xd, weight, alpha, beta, scale, dropout_p)
    return dx, dalpha, dbeta


def _dalpha_dbeta(dy, xd, weight, alpha, beta, scale, dropout_p):
    """G = dY^T (keep * X) row chunk by row chunk, contracted at once (float32 / float64);
    xd = keep * X in that accumulation dtype.

    P = G * W (in place on the chunk of G); then dbeta[o] = c * <P[o], alpha[g(o)]> and
    dalpha[j] = c * sum_{g(o)=j} beta[o] P[o], c = s / (1 - p): batched products over
    the groups when the chunk is made of whole groups (no (m, n) temporary beyond P).
    """
    acc = xd.dtype
    (m, n), r = weight.shape, alpha.shape[0]
    alpha_acc, beta_acc = alpha.to(acc), beta.to(acc)
    dalpha = torch.zeros((r, n), dtype=acc, device=xd.device)
    dbeta = torch.empty((m,), dtype=acc, device=xd.device)
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
            groups = row_groups(m, r, xd.device, row0, rows)
            dalpha.index_add_(0, groups, p.mul_(beta_rows[:, None]))
        del p
    coef = scale / (1.0 - dropout_p)
    return dalpha.mul_(coef).to(alpha.dtype), dbeta.mul_(coef).to(beta.dtype)
