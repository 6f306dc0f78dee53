"""The row-to-group map g(o) = floor(o * r / m) and the products that use it.

Row o of the frozen weight W (m, n) is scaled by alpha row g(o). When r divides m the
groups are contiguous blocks of m/r rows (the paper's Repeat0(alpha, m/r)); the same
formula covers every r in [1, m]. The Triton kernels compute g in registers with the same
integer formula (csrc_triton/_tiles.py, group_offsets).

Every helper works on a block of consecutive rows [row0, row0 + rows) of an m-row weight
(the whole weight by default), so the chunked paths can use them chunk by chunk.
"""

from __future__ import annotations

import torch


def row_groups(
    m: int, r: int, device: torch.device | str | None = None, row0: int = 0, rows: int | None = None
) -> torch.Tensor:
    """Group index floor(o * r / m) of rows o in [row0, row0 + rows): LongTensor (rows,)."""
    rows = m - row0 if rows is None else rows
    o = torch.arange(row0, row0 + rows, device=device, dtype=torch.int64)
    return o.mul_(r).div_(m, rounding_mode="floor")


def _aligned(m: int, r: int, row0: int, rows: int) -> bool:
    """Whether rows [row0, row0 + rows) are whole groups of m / r rows (r dividing m)."""
    if m % r:
        return False
    size = m // r
    return row0 % size == 0 and rows % size == 0


def times_alpha_rows(
    w: torch.Tensor, alpha: torch.Tensor, m: int | None = None, row0: int = 0
) -> torch.Tensor:
    """w[o, i] * alpha[g(o), i] for the rows o = row0 .. row0 + len(w) - 1 of an m-row weight;
    w (rows, n) or (rows, 1), alpha (r, n); returns (rows, n).

    When the rows are whole groups this broadcasts alpha over a (groups, m/r, n) view of w,
    so Repeat(alpha) is never built; otherwise alpha rows are gathered (torch backend and
    references only).
    """
    rows = w.shape[0]
    m = rows if m is None else m
    r, n = alpha.shape
    if _aligned(m, r, row0, rows):
        size = m // r
        g0 = row0 // size
        blocks = alpha[g0 : g0 + rows // size, None, :]
        return (w.reshape(rows // size, size, w.shape[1]) * blocks).reshape(rows, n)
    return w * alpha.index_select(0, row_groups(m, r, alpha.device, row0, rows))


def group_sum_(
    out: torch.Tensor, rows_values: torch.Tensor, m: int | None = None, row0: int = 0
) -> torch.Tensor:
    """out[j] += sum over rows o (row0 .. row0 + len - 1) with g(o) = j of rows_values[o];
    out (r, n), rows_values (rows, n); returns out."""
    rows, n = rows_values.shape
    m = rows if m is None else m
    r = out.shape[0]
    if _aligned(m, r, row0, rows):
        size = m // r
        g0 = row0 // size
        out[g0 : g0 + rows // size] += rows_values.view(rows // size, size, n).sum(1)
        return out
    return out.index_add_(0, row_groups(m, r, out.device, row0, rows), rows_values)


def group_sum(rows_values: torch.Tensor, r: int) -> torch.Tensor:
    """Per-group row sums of a whole weight: (m, n) -> (r, n), out[j] = sum_{g(o)=j} rows[o]."""
    out = torch.zeros(r, rows_values.shape[1], dtype=rows_values.dtype, device=rows_values.device)
    return group_sum_(out, rows_values)


def row_chunks(m: int, n: int, r: int, itemsize: int, budget_bytes: int) -> list[tuple[int, int]]:
    """(row0, rows) blocks covering [0, m), each of at most `budget_bytes` as (rows, n) of
    `itemsize` bytes (at least one row), made of whole groups when r divides m (so that the
    broadcast products above apply), in order."""
    per = max(1, budget_bytes // max(1, n * itemsize))
    if m % r == 0 and per >= m // r:
        per -= per % (m // r)
    per = min(per, m)
    return [(row0, min(per, m - row0)) for row0 in range(0, m, per)]
