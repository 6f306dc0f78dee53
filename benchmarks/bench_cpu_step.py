"""One SPP training step on the CPU, torch backend, against its baselines, dropout 0 and 0.05.

    python -m benchmarks --only cpu_step --device cpu --threads 1     (the reported table)

A step is forward + backward into X, alpha and beta (no optimizer) of one layer:
W (1024, 1024) 50 % unstructured sparse, X (2048, 1024), float32, r = 16, scale 2, for
  torch    spp_kernels.spp_linear(backend="torch")
  naive    spp_kernels.ops.reference.spp_linear_naive (W' materialised)
  blocked  spp_kernels.ops.reference.spp_linear_blocked (the paper's Eq. 7)
  lora     X W^T + 2 (D(X) A^T) B^T, rank 8 (D = dropout, the same rate)
  frozen   X W^T with the input gradient only: two GEMMs, the floor
SPP's floor is 3 GEMMs at p = 0 (1.5x frozen) and 5 at p > 0 (2.5x): the adapter term then
needs its own X and dY products. Fixed repetitions (3 untimed, then 9 timed steps per
provider, interleaved round-robin so machine load hits every provider alike); the row
median is ms per step. Quick mode: 256 x 256 at 512 tokens, 1 + 5 steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spp_kernels import spp_linear
from spp_kernels.ops.reference import spp_linear_blocked, spp_linear_naive

from . import common

BENCH = "cpu_step"
KERNEL = "cpu_step"
PROVIDERS = ("torch", "naive", "blocked", "lora", "frozen")
DROPOUTS = (0.0, 0.05)
R, LORA_RANK, SCALE = 16, 8, 2.0
FULL = dict(m=1024, n=1024, tokens=2048, warmup=3, reps=9)
QUICK = dict(m=256, n=256, tokens=512, warmup=1, reps=5)


def _inputs(m: int, n: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=gen) * (torch.rand(m, n, generator=gen) > 0.5)
    return {
        "x": torch.randn(tokens, n, generator=gen).requires_grad_(),
        "dy": torch.randn(tokens, m, generator=gen),
        "w": weight,
        "alpha": (torch.randn(R, n, generator=gen) / n**0.5).requires_grad_(),
        "beta": (torch.randn(m, generator=gen) / m**0.5).requires_grad_(),
        "a": (torch.randn(LORA_RANK, n, generator=gen) / n**0.5).requires_grad_(),
        "b": (torch.randn(m, LORA_RANK, generator=gen) / LORA_RANK**0.5).requires_grad_(),
    }


def _step(provider: str, t: dict[str, torch.Tensor], p: float, seed: int):
    def run() -> None:
        for key in ("x", "alpha", "beta", "a", "b"):
            t[key].grad = None
        kw = dict(scale=SCALE, dropout_p=p, seed=seed)
        if provider == "torch":
            y = spp_linear(t["x"], t["w"], t["alpha"], t["beta"], backend="torch", **kw)
        elif provider == "naive":
            y = spp_linear_naive(t["x"], t["w"], t["alpha"], t["beta"], **kw)
        elif provider == "blocked":
            y = spp_linear_blocked(t["x"], t["w"], t["alpha"], t["beta"], **kw)
        elif provider == "lora":
            xd = F.dropout(t["x"], p) if p else t["x"]
            y = F.linear(t["x"], t["w"]) + SCALE * F.linear(F.linear(xd, t["a"]), t["b"])
        else:
            y = F.linear(t["x"], t["w"])
        y.backward(t["dy"])

    return run


def run(quick: bool, device: str):
    """Rows (time, ms per step) of every provider at both dropout rates; CPU only."""
    if device != "cpu":
        common.note(BENCH, f"CPU benchmark; skipped on {device}")
        return
    size = QUICK if quick else FULL
    tensors = _inputs(size["m"], size["n"], size["tokens"], seed=0)
    extra = {
        "m": size["m"], "n": size["n"], "tokens": size["tokens"], "r": R,
        "lora_rank": LORA_RANK, "dtype": "float32", "sparsity": "50%",
        "threads": torch.get_num_threads(), "reps": size["reps"],
    }  # fmt: skip
    for p in DROPOUTS:
        steps = {name: _step(name, tensors, p, seed=1) for name in PROVIDERS}
        times = common.interleaved_times(steps, size["warmup"], size["reps"])
        for name in PROVIDERS:
            stats = common.quantile_stats(times[name])
            yield common.make_row(
                KERNEL, name, "full", "time", "dropout", p, stats, dict(extra, dropout=p)
            )


def ratio_table(rows: list[dict]) -> str:
    """Markdown: per dropout rate, each provider's median and its ratio to frozen."""
    lines = ["| dropout | provider | ms / step | / frozen |", "|---|---|---:|---:|"]
    by = {(r["x_value"], r["provider"]): r["median"] for r in rows if r["kernel"] == KERNEL}
    for p in DROPOUTS:
        frozen = by.get((p, "frozen"))
        for name in PROVIDERS:
            if (p, name) in by and frozen:
                lines.append(
                    f"| {p} | {name} | {by[(p, name)]:.1f} | {by[(p, name)] / frozen:.2f}x |"
                )
    return "\n".join(lines)
