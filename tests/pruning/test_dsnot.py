"""DSnoT: the masks of the authors' code (fixture made by make_dsnot_fixture.py from
zyxxmu/DSnoT's lib/prune.py), a valid refinement (counts, N:M), prune(refine="dsnot")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spp_kernels.pruning import prune
from spp_kernels.pruning.dsnot import InputMoments, dsnot_prune_mask
from spp_kernels.pruning.masks import keep_mask
from spp_kernels.pruning.wanda import wanda_scores
from tests.helpers import make_tiny_llama

FIXTURE = Path(__file__).parent / "data" / "dsnot_reference.safetensors"
CASES = {"u50": 0.5, "u75": 0.75, "nm24": (2, 4), "nm28": (2, 8)}


def _valid_rows(pruned: torch.Tensor, sparsity) -> torch.Tensor:
    """Rows whose mask has the target's count (unstructured) or N:M pattern."""
    m, n = pruned.shape
    if isinstance(sparsity, tuple):
        n_keep, group = sparsity
        return (pruned.reshape(m, n // group, group).sum(2) == group - n_keep).all(1)
    return pruned.sum(1) == n - round((1 - sparsity) * n)


@pytest.mark.parametrize("case", sorted(CASES))
def test_masks_equal_the_authors_code_where_it_gives_a_valid_mask(case):
    t = load_file(str(FIXTURE))
    w, sq, mean, var = (t[f"{case}.{k}"] for k in ("weight", "sq_norms", "mean_row", "var"))
    sparsity = CASES[case]
    expected = t[f"{case}.pruned"].bool()
    got = dsnot_prune_mask(w, sq, mean, var, sparsity)
    valid = _valid_rows(expected, sparsity)
    assert int(valid.sum()) >= len(valid) - 1  # the reference breaks at most one row here
    assert torch.equal(got[valid], expected[valid])
    assert _valid_rows(got, sparsity).all()  # ours keeps every row valid
    wanda = ~keep_mask(wanda_scores(w, sq), sparsity)
    assert int((got != wanda).sum()) > 0  # DSnoT moved weights: not Wanda's mask twice


def test_n_m_groups_stay_n_m_and_rows_keep_their_count():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 96, generator=g)
    args = (torch.rand(96, generator=g) + 0.1, torch.randn(96, generator=g),
            torch.rand(96, generator=g) + 0.05)  # fmt: skip
    pruned = dsnot_prune_mask(w, *args, (2, 8))
    assert (pruned.reshape(40, 12, 8).sum(2) == 6).all()
    pruned = dsnot_prune_mask(w, *args, 0.75)
    assert (pruned.sum(1) == 72).all()


def test_input_moments_follow_the_reference_statistics():
    g = torch.Generator().manual_seed(0)
    samples = [torch.randn(1, 7, 5, generator=g) * (i + 1) for i in range(3)]
    stats = InputMoments(5, torch.device("cpu"))
    for x in samples:
        stats.add(x)
    rows = torch.cat([x[0] for x in samples])
    torch.testing.assert_close(stats.sq_norms, rows.square().sum(0))
    torch.testing.assert_close(stats.mean_row, rows.sum(0) / 3)  # sum over tokens / samples
    per_sample = torch.stack([x[0].var(0, unbiased=False) for x in samples]).mean(0)
    torch.testing.assert_close(stats.var, per_sample)  # equal token counts: the plain mean


def test_prune_refine_dsnot_changes_attention_masks_only():
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    wanda, dsnot = make_tiny_llama(seed=0), make_tiny_llama(seed=0)
    prune(wanda, "wanda", "2:4", calibration=calib, nsamples=4, progress=False)
    report = prune(dsnot, "wanda", "2:4", calibration=calib, nsamples=4, progress=False,
                   refine="dsnot")  # fmt: skip
    assert report.pattern == (2, 4)
    moved = {}
    for (name, a), (_, b) in zip(wanda.named_parameters(), dsnot.named_parameters()):
        if name.endswith("proj.weight"):
            moved[name] = int(((a == 0) != (b == 0)).sum())
    # Block 0's MLP statistics come from the dense block: its Wanda mask is untouched (later
    # blocks see the refined attention's outputs).
    assert all(v == 0 for k, v in moved.items() if k.startswith("model.layers.0.mlp."))
    assert sum(v for k, v in moved.items() if ".self_attn." in k) > 0
    with pytest.raises(ValueError, match="refines a Wanda mask"):
        prune(make_tiny_llama(), "magnitude", "2:4", refine="dsnot", progress=False)
