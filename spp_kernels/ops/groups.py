"""The row-to-group map g(o) = floor(o * r / m) and the products that use it.

Row o of the frozen weight W (m, n) is scaled by alpha row g(o). When r divides m the
groups are contiguous blocks of m/r rows (the paper's Repeat0(alpha, m/r)); the same
formula covers every r in [1, m]. The Triton kernels compute g in registers with the same
integer formula, `(o * r) // m`.
"""

from __future__ import annotations

import torch


def row_groups(m: int, r: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Group index of every row: LongTensor (m,) with values floor(o * r / m) in [0, r)."""
    return torch.arange(m, device=device, dtype=torch.int64).mul_(r).div_(m, rounding_mode="floor")


def times_alpha_rows(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """w[o, i] * alpha[g(o), i] for w (m, n) or (m, 1) and alpha (r, n); returns (m, n).

    When r divides m this broadcasts alpha over a (r, m/r, n) view of w, so Repeat(alpha)
    is never built; otherwise alpha rows are gathered (torch backend / references only).
    """
    m = w.shape[0]
    r, n = alpha.shape
    if m % r == 0:
        return (w.reshape(r, m // r, w.shape[1]) * alpha[:, None, :]).reshape(m, n)
    return w * alpha.index_select(0, row_groups(m, r, alpha.device))


def group_sum(rows: torch.Tensor, r: int) -> torch.Tensor:
    """Per-group row sums: rows (m, n) -> (r, n) with out[j] = sum over g(o) = j of rows[o]."""
    m, n = rows.shape
    if m % r == 0:
        return rows.view(r, m // r, n).sum(1)
    out = torch.zeros(r, n, dtype=rows.dtype, device=rows.device)
    return out.index_add_(0, row_groups(m, r, rows.device), rows)
