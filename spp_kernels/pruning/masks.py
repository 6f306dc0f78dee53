"""Sparsity targets and keep-masks.

Notation (issue 4): "N:M" keeps at most N nonzeros in every group of M consecutive weights
along the input dimension of each output row (2:4 = 50%, 4:8 = 50%, 2:8 = 75%).
Unstructured sparsity s keeps exactly round((1 - s) * n) weights in each output row of an
(m, n) weight: the comparison group is the row, as in Wanda.

Masks are boolean with True = keep, the same shape as the scores.
"""

from __future__ import annotations

import math
import re

import torch

Sparsity = float | tuple[int, int]

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_sparsity(value: float | int | str | tuple[int, int]) -> Sparsity:
    """Parse a sparsity target: a fraction in (0, 1) -> float, "N:M" or (N, M) -> (N, M).

    Accepts 0.5, "0.5", "2:4", (2, 4). N:M needs 1 <= N < M (a pattern that prunes
    something and keeps something). Raises ValueError/TypeError naming the problem.
    """
    if isinstance(value, bool):
        raise TypeError(f"sparsity must be a float in (0, 1) or 'N:M', got {value!r}")
    if isinstance(value, tuple):
        if len(value) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"sparsity tuple must be (N, M) of two ints, got {value!r}")
        return _check_nm(*value, text=f"{value[0]}:{value[1]}")
    if isinstance(value, str):
        match = _NM_RE.match(value)
        if match:
            return _check_nm(int(match.group(1)), int(match.group(2)), text=value.strip())
        if ":" in value:
            raise ValueError(f"sparsity {value!r} is not a valid 'N:M' pattern (e.g. '2:4')")
        try:
            value = float(value)
        except ValueError:
            raise ValueError(
                f"sparsity must be a float in (0, 1) (e.g. '0.5') or 'N:M' (e.g. '2:4'), "
                f"got {value!r}"
            ) from None
    if not isinstance(value, (int, float)):
        raise TypeError(
            f"sparsity must be a float in (0, 1) or 'N:M', got {type(value).__name__} {value!r}"
        )
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise ValueError(f"sparsity must be strictly between 0 and 1, got {value!r}")
    return value


def _check_nm(n: int, m: int, *, text: str) -> tuple[int, int]:
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity {text!r} needs 1 <= N < M (e.g. '2:4'), got N={n}, M={m}")
    return n, m


def sparsity_name(sparsity: Sparsity) -> str:
    """'2:4' for (2, 4), '50%' for 0.5."""
    if isinstance(sparsity, tuple):
        return f"{sparsity[0]}:{sparsity[1]}"
    return f"{100 * sparsity:g}%"


def kept_per_row(columns: int, sparsity: float) -> int:
    """Weights each row keeps under unstructured sparsity: round((1 - sparsity) * columns)."""
    return round((1.0 - sparsity) * columns)


def _check_scores(scores: torch.Tensor, fn: str) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{fn}: scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"{fn}: scores must be 2-D (m, n), got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"{fn}: scores must be floating point, got {scores.dtype}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask of the n largest scores in every group of m consecutive columns.

    scores: (rows, cols) with cols divisible by m. Returns a bool (rows, cols) mask with
    exactly n True per group. Ties are broken by torch.topk (deterministic on one device).
    """
    _check_scores(scores, "nm_mask")
    n, m = _check_nm(n, m, text=f"{n}:{m}")
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"nm_mask: {n}:{m} needs the column count {cols} to be divisible by {m}")
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask of the round((1 - sparsity) * cols) largest scores of each row.

    scores: (rows, cols). Returns a bool (rows, cols) mask, the same count of True per row.
    """
    _check_scores(scores, "unstructured_mask")
    sparsity = parse_sparsity(sparsity)
    if isinstance(sparsity, tuple):
        raise ValueError("unstructured_mask: sparsity must be a fraction; use nm_mask for N:M")
    keep_count = kept_per_row(scores.shape[1], sparsity)
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if keep_count:
        keep.scatter_(1, scores.topk(keep_count, dim=1).indices, True)
    return keep


def keep_mask(scores: torch.Tensor, sparsity: Sparsity) -> torch.Tensor:
    """nm_mask for (N, M) targets, unstructured_mask for fractions."""
    if isinstance(sparsity, tuple):
        return nm_mask(scores, *sparsity)
    return unstructured_mask(scores, sparsity)
