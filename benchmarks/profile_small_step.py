"""Profile one small-shape training step (bench_small_step's models) with torch.profiler.

    python -m benchmarks.profile_small_step [--dropout 0.05] [--rows 15]

One thread, the embedded SmolLM2 pruned 2:4, 1 x 256 tokens, AdamW: after two untimed
steps, one step of SPP and one of peft LoRA run under torch.profiler (CPU activities).
Prints, per provider, the step's total self CPU time, its GEMM share (aten::mm / addmm /
addmm_) and the operators with the most self CPU time, then the operators where SPP spends
more than LoRA: the host-side cost around the GEMMs (benchmarks/NOTES.md, issue 24 part 2).
The profiler adds a few microseconds per recorded operator, so Python-heavy rows read high.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from .bench_small_step import FULL, PROVIDERS, attach, base_model, make_step

GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_")


def self_times(step) -> dict[str, tuple[float, int]]:
    """{operator: (self CPU ms, calls)} of one call of `step` after two untimed ones."""
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()}


def profile_providers(base: torch.nn.Module, ids: torch.Tensor, dropout: float):
    """{provider: self_times of one step} for LoRA and SPP on copies of `base`."""
    return {name: self_times(make_step(attach(base, name, dropout), ids)) for name in PROVIDERS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    base = base_model()
    ids = torch.randint(
        0, base.config.vocab_size, (1, FULL["tokens"]), generator=torch.Generator().manual_seed(0)
    )
    times = profile_providers(base, ids, args.dropout)
    for name, ops in times.items():
        total = sum(ms for ms, _ in ops.values())
        gemm = sum(ops.get(k, (0.0, 0))[0] for k in GEMMS)
        print(f"\n{name}, p = {args.dropout}: {total:.0f} ms self CPU, GEMMs {gemm:.0f} ms")
        for key, (ms, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[: args.rows]:
            print(f"  {ms:8.1f} ms  {calls:5d} calls  {key[:70]}")
    spp, lora = times["spp"], times["lora"]
    extra = {k: spp.get(k, (0.0, 0))[0] - lora.get(k, (0.0, 0))[0] for k in set(spp) | set(lora)}
    print(f"\nSPP minus LoRA, p = {args.dropout} (ms self CPU per step):")
    for key, ms in sorted(extra.items(), key=lambda kv: -kv[1])[: args.rows]:
        print(f"  {ms:8.1f}  {key[:70]}")


if __name__ == "__main__":
    main()
