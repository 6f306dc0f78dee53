"""SPP forward and dX with the frozen weight processed in bounded row chunks.

    Y  = X W_eff^T + bias                                     (p == 0)
    Y  = X W^T + bias + (keep * X) W''^T                      (p > 0)
    dX = dY W_eff                                             (p == 0)
    dX = dY W + keep * (dY W'')                               (p > 0)
    W_eff = W * (1 + s * alpha[g] * beta),   W'' = W * alpha[g] * s * beta / (1 - p)

Rows [row0, row0 + rows) of W_eff, W'' or (packed) W are written into a (rows, n) chunk
of at most CHUNK_BYTES (default 64 MiB; environment SPP_CHUNK_BYTES) by `build`, then
GEMMs (torch.mm / addmm: cuBLAS on CUDA) consume it: Y[:, rows] directly, dX accumulated
over the chunks (one extra rounding per chunk for half precision outputs). A dense W
enters the p > 0 GEMMs as it is. A chunk lives only inside the call; nothing (m, n) is
saved for backward.

Shared by the torch backend (CPU path; `build` in PyTorch) and the Triton backend's
many-token path (`build` = csrc_triton.weight_chunks, dropout bits applied by Triton
kernels); the dalpha/dbeta contraction is each backend's own.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .groups import row_chunks

CHUNK_BYTES = int(os.environ.get("SPP_CHUNK_BYTES", 64 * 2**20))

# build(row0, rows, mode, scale) -> (rows, n) chunk in the compute dtype; mode "weight"
# (W), "merged" (W_eff with `scale`) or "adapter" (W * alpha[g] * scale * beta).
Build = Callable[[int, int, str, float], torch.Tensor]


def chunks_of(m: int, n: int, r: int, dtype: torch.dtype) -> list[tuple[int, int]]:
    """The (row0, rows) chunks of an (m, n) weight of `dtype` under CHUNK_BYTES."""
    return row_chunks(m, n, r, dtype.itemsize, CHUNK_BYTES)


def product_into(
    out: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    bias: torch.Tensor | None = None,
    row0: int = 0,
    accumulate: bool = False,
) -> None:
    """out = a b (+ bias[row0 : row0 + out's columns]), or out += a b when `accumulate`."""
    if accumulate:
        out.addmm_(a, b)
    elif bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias[row0 : row0 + out.shape[1]].to(out.dtype), a, b, out=out)


def _adapter_only_forward(x, m, chunks, scale, dropout_p, build, kept_x) -> torch.Tensor:
    """scale * Dropout(X) W'^T alone (with_base=False): Y += X_kept W''^T per chunk."""
    y = torch.empty((x.shape[0], m), dtype=x.dtype, device=x.device)
    xk = x if dropout_p == 0.0 else kept_x()
    for row0, rows in chunks:
        w_ad = build(row0, rows, "adapter", scale / (1.0 - dropout_p))
        product_into(y[:, row0 : row0 + rows], xk, w_ad.t())
        del w_ad
    return y


def forward(
    x: torch.Tensor,
    m: int,
    r: int,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    build: Build,
    dense_weight: torch.Tensor | None,
    kept_x: Callable[[], torch.Tensor],
    with_base: bool = True,
) -> torch.Tensor:
    """Y (tokens, m) in x's dtype; `kept_x()` gives keep * X (p > 0 only); `dense_weight`
    is W when it is stored dense (None when packed). with_base=False: the adapter term
    alone (no X W^T, no bias)."""
    tokens, n = x.shape
    chunks = chunks_of(m, n, r, x.dtype)
    if not with_base:
        return _adapter_only_forward(x, m, chunks, scale, dropout_p, build, kept_x)
    b = None if bias is None else bias.to(x.dtype)
    y = torch.empty((tokens, m), dtype=x.dtype, device=x.device)
    if dropout_p > 0.0 and dense_weight is not None:
        if b is None:
            torch.mm(x, dense_weight.t(), out=y)
        else:
            torch.addmm(b, x, dense_weight.t(), out=y)
    mode = "merged" if dropout_p == 0.0 else "weight"
    for row0, rows in chunks:
        out = y[:, row0 : row0 + rows]
        if dropout_p == 0.0 or dense_weight is None:
            w = build(row0, rows, mode, scale)
            product_into(out, x, w.t(), b, row0)
            del w
    if dropout_p > 0.0:
        xk = kept_x()
        for row0, rows in chunks:
            w_ad = build(row0, rows, "adapter", scale / (1.0 - dropout_p))
            y[:, row0 : row0 + rows].addmm_(xk, w_ad.t())
            del w_ad
    return y


def backward_dx(
    dy: torch.Tensor,
    m: int,
    r: int,
    n: int,
    scale: float,
    dropout_p: float,
    build: Build,
    dense_weight: torch.Tensor | None,
    masked_add_: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    with_base: bool = True,
) -> torch.Tensor:
    """dX (tokens, n) in dy's dtype; `masked_add_(dx, a)` does dx += keep * a (p > 0).
    with_base=False: the adapter term's dX alone."""
    chunks = chunks_of(m, n, r, dy.dtype)
    tokens = dy.shape[0]
    dx = torch.empty((tokens, n), dtype=dy.dtype, device=dy.device)
    if dropout_p == 0.0:
        mode = "merged" if with_base else "adapter"
        for i, (row0, rows) in enumerate(chunks):
            product_into(
                dx, dy[:, row0 : row0 + rows], build(row0, rows, mode, scale), accumulate=i > 0
            )
        return dx
    if not with_base:
        dx.zero_()
    elif dense_weight is not None:
        torch.mm(dy, dense_weight, out=dx)
    else:
        for i, (row0, rows) in enumerate(chunks):
            w = build(row0, rows, "weight", scale)
            product_into(dx, dy[:, row0 : row0 + rows], w, accumulate=i > 0)
    a = torch.empty((tokens, n), dtype=dy.dtype, device=dy.device)
    for i, (row0, rows) in enumerate(chunks):
        w_ad = build(row0, rows, "adapter", scale / (1.0 - dropout_p))
        product_into(a, dy[:, row0 : row0 + rows], w_ad, accumulate=i > 0)
    return masked_add_(dx, a)
