"""The dropout term at small p through the dropped entries (torch backend, CPU).

With keep * X = X - drop * X, c = s / (1 - p), W'' = c * W * alpha[g] * beta and the
merged weight at that scale W_c = W + W'':

    Y  = X W^T + (keep * X) W''^T   = X W_c^T - S W''^T,           S = drop * X
    dX = dY W + keep * (dY W'')     = dY W_c - drop * (dY W'')

S (tokens, n) is a CSR matrix of the nnz ~ p * tokens * n dropped entries of X. S W''^T
is a sparse-dense product and drop * (dY W'') the sampled product (SDDMM) of dY and W''
at the dropped entries; each costs about nnz * m multiply-adds where the dense dropout
GEMM it replaces costs tokens * n * m. So a call at p > 0 does the GEMMs of p = 0 plus two
sparse products of about p times a GEMM each. The mask is the same bits as on every other
path; only the order of the sums differs (float rounding).

Used where it pays and torch has the kernels (`applies`): CPU tensors of float32 or
float64 (torch's CSR kernels have no half types on the CPU) and 0 < p <= MAX_P. The
sparse products cost more per multiply-add than a dense GEMM; at SmolLM2's shapes the
break-even is near p = 0.15-0.2 (benchmarks/NOTES.md, issue 24 part 2).

Every (rows, n) buffer is one chunk of spp_kernels.ops.chunked's budget, built by
`build_pair(row0, rows, c) -> (W_c rows (rows, n), W''^T (n, rows) contiguous)` and freed
before the next chunk. The forward's CSR indices are int32 (what MKL's sparse matmul takes),
the sampled product's int64 (what it takes).

Non-finite inputs: an inf or NaN of X at a dropped entry still makes Y non-finite (it
enters X W_c^T), as on the two-GEMM path; G = dY^T (keep * X) takes X with its dropped
entries set to 0, where the two-GEMM path multiplies them by 0 (inf * 0 = NaN), so dalpha
and dbeta can stay finite here and not there.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from .chunked import chunks_of, product_into
from .dropout import keep_values

MAX_P = 0.1

BuildPair = Callable[[int, int, float], tuple[torch.Tensor, torch.Tensor]]


class Dropped(NamedTuple):
    """The dropped entries of a (tokens, n) mask in row-major order (a CSR pattern)."""

    flat: torch.Tensor  # (nnz,) int64 t * n + i
    cols: torch.Tensor  # (nnz,) int32 feature index i (int64 past 2**31 entries)
    crow: torch.Tensor  # (tokens + 1,) row pointers, cols' dtype
    shape: tuple[int, int]

    def csr(self, values: torch.Tensor, index: torch.dtype | None = None) -> torch.Tensor:
        """The sparse CSR (tokens, n) matrix with `values` (nnz,) at the dropped entries,
        its indices in `index` (default: cols' dtype)."""
        crow, cols = self.crow, self.cols
        if index is not None:
            crow, cols = crow.to(index), cols.to(index)
        if not _beta_notice_silenced:
            return _first_csr(crow, cols, values, self.shape)
        return torch.sparse_csr_tensor(crow, cols, values, self.shape, check_invariants=False)


_beta_notice_silenced = False


def _first_csr(crow, cols, values, shape) -> torch.Tensor:
    """torch warns once per process that CSR support is in beta; that first construction
    runs with the notice filtered (catch_warnings only once: on every call it would reset
    the once-per-location record of the user's own warnings)."""
    global _beta_notice_silenced
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support", UserWarning)
        out = torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)
    _beta_notice_silenced = True
    return out


def applies(x: torch.Tensor, dropout_p: float, bits: torch.Tensor | None) -> bool:
    """Whether this module computes the dropout term of a call on `x` at rate `dropout_p`."""
    return (
        bits is not None
        and 0.0 < dropout_p <= MAX_P
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
    )


def dropped_entries(bits: torch.Tensor, n: int) -> Dropped:
    """The entries (t, i) with keep bit 0 of the packed mask `bits` (tokens, ceil(n / 8))."""
    tokens = bits.shape[0]
    drop = keep_values(bits, n, torch.bool).logical_not_()
    rows, cols = drop.nonzero().unbind(1)
    index = torch.int32 if tokens * n < 2**31 else torch.int64
    crow = torch.zeros(tokens + 1, dtype=index)
    torch.cumsum(torch.bincount(rows, minlength=tokens), 0, dtype=index, out=crow[1:])
    return Dropped(rows * n + cols, cols.to(index), crow, (tokens, n))


def kept_x(x: torch.Tensor, dropped: Dropped, dtype: torch.dtype) -> torch.Tensor:
    """keep * X (tokens, n) in `dtype`, contiguous: X with its dropped entries set to 0."""
    out = x.to(dtype, memory_format=torch.contiguous_format, copy=True)
    return out.view(-1).index_fill_(0, dropped.flat, 0).view(x.shape)


def forward(
    x: torch.Tensor,
    bits: torch.Tensor,
    bias: torch.Tensor | None,
    build_pair: BuildPair,
    m: int,
    r: int,
    c: float,
) -> torch.Tensor:
    """Y = X W_c^T + bias - S W''^T (tokens, m) in x's dtype; c = s / (1 - p)."""
    tokens, n = x.shape
    dropped = dropped_entries(bits, n)
    s = dropped.csr(x.take(dropped.flat)) if dropped.flat.numel() else None
    y = torch.empty((tokens, m), dtype=x.dtype, device=x.device)
    for row0, rows in chunks_of(m, n, r, x.dtype):
        merged, adapter_t = build_pair(row0, rows, c)
        out = y[:, row0 : row0 + rows]
        product_into(out, x, merged.t(), bias, row0)
        del merged
        if s is not None:
            out.addmm_(s, adapter_t, alpha=-1.0)
        del adapter_t
    return y


def backward_dx(
    dy: torch.Tensor, dropped: Dropped, build_pair: BuildPair, m: int, r: int, c: float
) -> torch.Tensor:
    """dX = dY W_c - drop * (dY W'') (tokens, n) in dy's dtype; c = s / (1 - p)."""
    tokens, n = dropped.shape
    nnz = dropped.flat.numel()
    # sampled_addmm takes int64 indices (it would convert int32 ones on every chunk).
    pattern = dropped.csr(torch.zeros(nnz, dtype=dy.dtype), torch.int64) if nnz else None
    dx = torch.empty((tokens, n), dtype=dy.dtype, device=dy.device)
    sampled = None
    # sampled_addmm copies its column slice of dY, (tokens, rows): the chunks bound it too.
    for i, (row0, rows) in enumerate(chunks_of(m, max(n, tokens), r, dy.dtype)):
        merged, adapter_t = build_pair(row0, rows, c)
        dy_rows = dy[:, row0 : row0 + rows]
        product_into(dx, dy_rows, merged, None, accumulate=i > 0)
        del merged
        if pattern is not None:
            # beta=0 still reads the pattern's values (NaN would propagate): they are zeros.
            part = torch.sparse.sampled_addmm(pattern, dy_rows, adapter_t.t(), beta=0.0)
            sampled = part.values() if sampled is None else sampled.add_(part.values())
        del adapter_t
    if sampled is not None:
        dx.view(-1).index_add_(0, dropped.flat, sampled, alpha=-1.0)
    return dx
