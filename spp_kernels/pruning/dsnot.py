"""DSnoT (Zhang et al., 2023, "Dynamic Sparse No Training"): a training-free refinement of
a Wanda mask that swaps pruned and kept weights to cancel each row's expected output shift.

With x̄ (n,) the calibration inputs' per-channel sum divided by the number of sequences
(the reference's `sum_metric_row`), v (n,) their variance (the mean over sequences of each
sequence's population variance, weighted by tokens) and s = ||X_i||^2 summed likewise
(Wanda's statistic), per output row o:

    c[o, i] = W[o, i] * x̄_i                      contribution of weight i to the row's mean
    e_o     = sum over pruned i of c[o, i]       the mean output the pruned weights remove

and up to `max_cycles` times per row, while |e_o| > `threshold`, one pruned weight is
grown back and one kept weight pruned:
- grow: pruned weights ordered by c / v^p (p = `var_power`): the largest when e_o > 0,
  the smallest when e_o < 0 (two pointers walking in from the ends of that order);
- prune, unstructured: kept weights ordered by Wanda score, their contributions' signs
  reordered as the reference's `return_reorder_indice` does (positive ones first in
  order, negative ones reversed), the next from the end matching the sign of e_o;
- prune, N:M: in the group of the grown weight, the kept weight of least Wanda score
  (weights moved once are not moved again), and only while the swap keeps e_o's sign.
Each swap moves one weight each way: the row keeps its count, a group stays N:M.

This follows the authors' reference implementation (zyxxmu/DSnoT, lib/prune.py,
prune_DSnoT with `initial_method="wanda"`, its defaults: max_cycle_time 50,
update_threshold 0.1, pow_of_var_regrowing 1, the MLP layers left at the Wanda mask);
tests/pruning/test_dsnot.py checks the masks against masks that code produced. Two
differences, both where the reference's result is not a valid mask of the target: a row
stops swapping when its next candidates are not a pruned weight to grow and a kept one to
prune (the reference goes on and can break the row's count or an N:M group; on a
512-column 2:8 layer it left one group of 8 with 3 kept weights), and ties in the initial
N:M sort are broken by index (stable sort; the reference's sort is unstable).
"""

from __future__ import annotations

import torch

from .masks import Sparsity, keep_mask
from .wanda import InputNorms, wanda_scores

MAX_CYCLES = 50
THRESHOLD = 0.1
VAR_POWER = 1.0
SKIP = ("mlp",)  # the reference's skip_layer default: MLP layers keep the Wanda mask


class InputMoments(InputNorms):
    """Wanda's squared norms plus DSnoT's per-channel sum and variance of the inputs.

    Each call of `add` is one calibration sequence (or a batch of them: (b, t, n))."""

    def __init__(self, n: int, device: torch.device) -> None:
        super().__init__(n, device)
        self.sums = torch.zeros(n, dtype=torch.float32, device=device)
        self.var_tokens = torch.zeros(n, dtype=torch.float32, device=device)
        self.sequences = 0

    def add(self, x: torch.Tensor) -> None:
        super().add(x)
        rows = x.detach().reshape(-1, x.shape[-1]).float()
        sequences = x.shape[0] if x.dim() == 3 else 1
        self.sums += rows.sum(0)
        # The reference's running mean of each call's population variance, by tokens.
        self.var_tokens += rows.var(0, unbiased=False) * rows.shape[0]
        self.sequences += sequences

    @property
    def mean_row(self) -> torch.Tensor:
        """The reference's sum_metric_row: sum of inputs / number of sequences."""
        return self.sums / max(self.sequences, 1)

    @property
    def var(self) -> torch.Tensor:
        return self.var_tokens / max(self.tokens, 1)


def _reorder_by_sign(values: torch.Tensor) -> torch.Tensor:
    """Column order per row: the positive entries' indices from last to first, then the
    negative entries' from first to last, zeros' slots filled with index 0 (the
    reference's return_reorder_indice, whose output it reproduces exactly)."""
    idx = torch.arange(values.shape[1], device=values.device, dtype=torch.float64)
    idx = idx.expand(values.shape[0], -1)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=values.device)
    positive = torch.where(values > 0, idx, inf).sort(dim=1).values.flip(1)
    negative = torch.where(values < 0, idx, inf).sort(dim=1).values
    positive = torch.where(positive == inf, 0, positive)
    negative = torch.where(negative == inf, 0, negative)
    return (positive + negative).to(torch.int64)


def _pointer_step(order: torch.Tensor, pointers: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """The entry of `order` at each row's pointer on `side` (0: the front, moving right;
    1: the back, moving left), advancing that pointer."""
    at = pointers.gather(1, side)
    # A pointer past the end repeats the last candidate, already moved: the row stops.
    picked = order.gather(1, at.clamp(0, order.shape[1] - 1))
    pointers.scatter_(1, side, at + torch.where(side == 0, 1, -1))
    return picked


def _pointers(rows: int, length: int, device: torch.device) -> torch.Tensor:
    pointers = torch.zeros((rows, 2), dtype=torch.long, device=device)
    pointers[:, 1] = length - 1
    return pointers


def dsnot_prune_mask(
    weight: torch.Tensor,
    sq_norms: torch.Tensor,
    mean_row: torch.Tensor,
    var: torch.Tensor,
    sparsity: Sparsity,
    max_cycles: int = MAX_CYCLES,
    threshold: float = THRESHOLD,
    var_power: float = VAR_POWER,
) -> torch.Tensor:
    """The pruned positions (bool (m, n), True = pruned) of weight (m, n) after DSnoT from
    the Wanda start; sq_norms, mean_row, var: (n,) (see InputMoments)."""
    w = weight.detach().float()
    m, n = w.shape
    score = wanda_scores(w, sq_norms)
    contrib = w * mean_row.float().reshape(1, -1)
    pruned = torch.zeros((m, n), dtype=torch.bool, device=w.device)
    if isinstance(sparsity, tuple):
        n_keep, group = sparsity
        n_prune = group - n_keep
        order = score.reshape(m, n // group, group).sort(dim=2, stable=True).indices
        order = order + torch.arange(0, n, group, device=w.device).reshape(1, -1, 1)
        prune_idx = order[:, :, :n_prune].reshape(m, -1)
        kept_idx = order[:, :, n_prune:].reshape(m, -1)
    else:
        order = score.sort(dim=1, stable=True).indices
        n_prune = n - int(round((1.0 - sparsity) * n))
        prune_idx, kept_idx = order[:, :n_prune], order[:, n_prune:]
    pruned.scatter_(1, prune_idx, True)
    grow = contrib.clone().scatter_(1, kept_idx, 0)
    error = grow.sum(1, keepdim=True)
    error_sign = error.sign()
    if var_power:
        grow = grow / var.float().reshape(1, -1).pow(var_power)
    grow_order = grow.sort(dim=1, stable=True).indices
    grow_pointers = _pointers(m, n, w.device)
    update = torch.ones((m, 1), dtype=torch.bool, device=w.device)
    if isinstance(sparsity, tuple):
        score = score.scatter(1, prune_idx, float("inf"))
        moved = score.max(dim=1, keepdim=True).values + 1
        offsets = torch.arange(group, device=w.device).reshape(1, -1)
        for _ in range(max_cycles):
            if not bool(update.any()):
                break
            grown = _pointer_step(grow_order, grow_pointers, (error > 0).long())
            grown_c = contrib.gather(1, grown)
            start = grown - grown % group
            _, victim = score.gather(1, start + offsets).topk(1, dim=1, largest=False)
            victim = victim + start
            victim_c = contrib.gather(1, victim)
            after = error + victim_c - grown_c
            update = update & (error_sign == after.sign()) & (error.abs() > threshold)
            update = update & _proper(pruned, grown, victim)
            score.scatter_(1, victim, moved)
            error, pruned = _swap(pruned, error, victim, grown, victim_c, grown_c, update)
        return pruned
    kept_score = score.scatter(1, prune_idx, float("inf"))
    kept_order = kept_score.sort(dim=1, stable=True).indices[:, : n - n_prune]
    prune_order = kept_order.gather(1, _reorder_by_sign(contrib.gather(1, kept_order)))
    prune_pointers = _pointers(m, n - n_prune, w.device)
    for _ in range(max_cycles):
        if not bool(update.any()):
            break
        grown = _pointer_step(grow_order, grow_pointers, (error > 0).long())
        victim = _pointer_step(prune_order, prune_pointers, (error < 0).long())
        grown_c, victim_c = contrib.gather(1, grown), contrib.gather(1, victim)
        update = update & (error.abs() > threshold) & _proper(pruned, grown, victim)
        error, pruned = _swap(pruned, error, victim, grown, victim_c, grown_c, update)
    return pruned


def _proper(pruned: torch.Tensor, grown: torch.Tensor, victim: torch.Tensor) -> torch.Tensor:
    """Rows whose candidates are a pruned weight to grow and a kept one to prune. The
    reference swaps regardless and then can prune a kept weight or keep a third weight in
    an N:M group (its pointers run into kept weights, or a group's kept weights have all
    moved); here such a row stops, so counts and N:M groups always hold."""
    return pruned.gather(1, grown) & ~pruned.gather(1, victim)


def _swap(pruned, error, victim, grown, victim_c, grown_c, update):
    """Prune `victim` and grow `grown` in the rows where `update` holds (the reference
    writes the other rows too; with proper candidates that changes nothing)."""
    pruned.scatter_(1, victim, update | pruned.gather(1, victim))
    pruned.scatter_(1, grown, ~update & pruned.gather(1, grown))
    zero = torch.zeros_like(victim_c)
    error = error + torch.where(update, victim_c, zero) - torch.where(update, grown_c, zero)
    return error, pruned


def dsnot_prune_weight(
    weight: torch.Tensor, stats: InputMoments, sparsity: Sparsity, refine: bool = True
) -> torch.Tensor:
    """The pruned copy of weight (m, n), same dtype: Wanda, then DSnoT when `refine`."""
    if not refine:
        keep = keep_mask(wanda_scores(weight, stats.sq_norms), sparsity)
        return weight.detach().masked_fill(~keep, 0)
    pruned = dsnot_prune_mask(weight, stats.sq_norms, stats.mean_row, stats.var, sparsity)
    return weight.detach().masked_fill(pruned, 0)
