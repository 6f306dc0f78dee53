"""A small-shape training step on the CPU: SPP against peft's LoRA on the embedded SmolLM2.

    python -m benchmarks --only small_step --device cpu --threads 1     (the reported table)

The embedded SmolLM2-135M-Instruct (float32, loaded offline), its seven projections of
every layer magnitude-pruned to 2:4, then for each dropout rate p in (0, 0.05) two peft
models built from copies of it:
  lora  peft LoRA, rank 8, lora_alpha 16 (scaling 2), lora_dropout p
  spp   SPPConfig(r=16, scale=2, dropout=p), backend "auto" (the torch backend on a CPU)
Rank 8 LoRA and r = 16 SPP train about the same number of parameters. A step is forward,
backward and AdamW (lr 1e-4) on one sequence of 256 token ids (labels = inputs). Fixed
repetitions: 2 untimed steps, then 8 timed steps per provider, interleaved so machine load
hits both alike; the row median is ms per step and `extra` carries tokens/s and SPP's
tokens/s relative to LoRA's of the same run. Quick mode: 64 tokens, 1 + 3 steps.

At these shapes an SPP step does three GEMMs per projection (X W_eff^T, dY W_eff, G = dY^T
X; at p = 0.05 plus two sparse products over the dropped entries, ops.sparse_dropout),
LoRA two plus rank-8 products; the rest is host-side work around the GEMMs
(benchmarks/NOTES.md, issue 24 part 2).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch

from . import common
from .bench_model import TARGETS

BENCH = "small_step"
KERNEL = "smollm2_step"
PROVIDERS = ("lora", "spp")
DROPOUTS = (0.0, 0.05)
R, LORA_RANK, SCALE, LR = 16, 8, 2.0, 1e-4
FULL = dict(tokens=256, warmup=2, reps=8)
QUICK = dict(tokens=64, warmup=1, reps=3)


def base_model() -> torch.nn.Module:
    """The embedded SmolLM2 in float32 with its seven projections pruned to 2:4, frozen."""
    from spp_kernels.cli.demo import load_default_model
    from spp_kernels.pruning import prune

    model, _ = load_default_model("cpu", torch.float32)
    prune(model, "magnitude", "2:4", progress=False)
    return model.requires_grad_(False)


def attach(base: torch.nn.Module, provider: str, p: float) -> torch.nn.Module:
    """A copy of `base` with `provider`'s adapters on the seven projections, in train mode."""
    from peft import LoraConfig, get_peft_model

    from spp_kernels.adapters import SPPConfig

    if provider == "lora":
        config = LoraConfig(
            r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=p, target_modules=list(TARGETS)
        )
    else:
        config = SPPConfig(r=R, scale=SCALE, dropout=p, target_modules=list(TARGETS))
    return get_peft_model(copy.deepcopy(base), config).train()


def make_step(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """One training step of `model` on `ids`: loss, backward, AdamW, gradients cleared."""
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run(quick: bool, device: str, model_fn: Callable[[], torch.nn.Module] = base_model):
    """Rows (time, ms per step) of LoRA and SPP at both dropout rates; CPU only."""
    if device != "cpu":
        common.note(BENCH, f"CPU benchmark; skipped on {device}")
        return
    size = QUICK if quick else FULL
    base = model_fn()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (1, size["tokens"]), generator=gen)
    extra: dict[str, Any] = {
        "model": type(base).__name__, "tokens": size["tokens"], "r": R, "lora_rank": LORA_RANK,
        "dtype": "float32", "sparsity": "2:4", "threads": torch.get_num_threads(),
        "reps": size["reps"],
    }  # fmt: skip
    for p in DROPOUTS:
        steps = {name: make_step(attach(base, name, p), ids) for name in PROVIDERS}
        times = common.interleaved_times(steps, size["warmup"], size["reps"])
        stats = {name: common.quantile_stats(times[name]) for name in PROVIDERS}
        ratio = stats["lora"].median / stats["spp"].median
        for name in PROVIDERS:
            tokens_s = size["tokens"] / (stats[name].median / 1e3)
            info = dict(extra, dropout=p, tokens_per_s=round(tokens_s, 1),
                        spp_over_lora_tokens_s=round(ratio, 3))  # fmt: skip
            yield common.make_row(KERNEL, name, "full", "time", "dropout", p, stats[name], info)
