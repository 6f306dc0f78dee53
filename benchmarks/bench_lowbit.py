"""One SPP training step of one 2:4-pruned layer per low-bit base format.

    python -m benchmarks --only lowbit --device cpu --threads 1     (the CPU table)
    benchmarks/gpu_check.sh                                          (GPU rows, LLaMA shapes)

A step is forward + backward into X, alpha and beta (no optimizer) of one layer W (m, n),
pruned 2:4, bfloat16 compute, r = 16, scale 2, at dropout 0 and 0.05 (x = dropout).
Providers, each on its own base:
  2:4 bf16            SPP on the packed 2:4 weight (PackedWeight): the reference
  2:4 int8 / fp8 / int4  SPP on the packed weight with low-bit values (QuantizedPackedWeight;
                      int4: 128 kept values per scale)
  lora 2:4 <fmt>      LoRA r = 8 on the same low-bit base: W decoded whole, X W^T, plus
                      2 * D(X) A^T B^T (how a LoRA layer computes on such a base)
  nf4                 SPP on a bitsandbytes NF4 base (double quantization): the layer's own
                      matmul plus the adapter term (SPPBnbLinear's computation)
  qlora nf4           LoRA r = 8 on the same NF4 base (QLoRA)
CPU: torch backend, (1024, 1024) at 512 tokens, 2 untimed and 7 timed steps per provider,
interleaved round-robin (quick: (256, 256) at 128 tokens, 1 + 3). GPU: the fused Triton
kernels, LLaMA-7B's (4096, 4096) and (11008, 4096) and LLaMA-2-70B's (8192, 8192) and
(28672, 8192), 2,048 tokens (quick: 7B's first shape), triton.testing.do_bench.
The table gives each median and its ratio to 2:4 bf16 and to LoRA on the same base.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from spp_kernels import spp_linear
from spp_kernels.sparsity.lowbit import QuantizedPackedWeight
from spp_kernels.sparsity.packed import PackedWeight

from . import common

BENCH = "lowbit"
KERNEL = "lowbit_step"
LOW_BIT = ("int8", "fp8", "int4")
DROPOUTS = (0.0, 0.05)
R, LORA_RANK, SCALE, DTYPE = 16, 8, 2.0, torch.bfloat16
CPU = {"full": dict(shapes=((1024, 1024),), tokens=512, warmup=2, reps=7),
       "quick": dict(shapes=((256, 256),), tokens=128, warmup=1, reps=3)}  # fmt: skip
GPU = {"full": dict(shapes=((4096, 4096), (11008, 4096), (8192, 8192), (28672, 8192)),
                    tokens=2048),
       "quick": dict(shapes=((4096, 4096),), tokens=2048)}  # fmt: skip


def _bnb_nf4(weight: torch.Tensor) -> Any | None:
    """A bitsandbytes NF4 layer (double quantization) holding `weight`, or None without
    bitsandbytes."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    m, n = weight.shape
    layer = bnb.nn.Linear4bit(n, m, bias=False, compute_dtype=DTYPE, quant_type="nf4",
                              compress_statistics=True)  # fmt: skip
    layer.weight = bnb.nn.Params4bit(weight.detach().cpu(), requires_grad=False,
                                     quant_type="nf4", compress_statistics=True)  # fmt: skip
    return layer.to(weight.device)


def _steps(m: int, n: int, tokens: int, p: float, device: str) -> tuple[dict, list]:
    """{provider: step function} for one shape and dropout, and the tensors whose
    gradients each step resets."""
    gen = common.generator(device, 0)
    w = common.pruned_weight(m, n, "2:4", dtype=DTYPE, device=device, gen=gen)
    x = common.random_tensor((tokens, n), dtype=DTYPE, device=device, gen=gen).requires_grad_()
    dy = common.random_tensor((tokens, m), dtype=DTYPE, device=device, gen=gen)
    alpha = (torch.randn(R, n, device=device, generator=gen) / n**0.5).requires_grad_()
    beta = (torch.randn(m, device=device, generator=gen) / m**0.5).requires_grad_()
    a = (torch.randn(LORA_RANK, n, device=device, generator=gen) / n**0.5).requires_grad_()
    b = (torch.randn(m, LORA_RANK, device=device, generator=gen) / 8**0.5).requires_grad_()
    leaves = [x, alpha, beta, a, b]
    kw = dict(scale=SCALE, dropout_p=p, seed=1)

    def spp(operand: Any, with_base: bool = True, base: Callable | None = None) -> Callable:
        def step() -> None:
            for t in leaves:
                t.grad = None
            y = spp_linear(x, operand, alpha, beta, with_base=with_base, **kw)
            if base is not None:
                y = y + base(x)
            y.backward(dy)

        return step

    def lora(frozen: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def step() -> None:
            for t in leaves:
                t.grad = None
            xd = F.dropout(x, p) if p else x
            y = frozen(x) + SCALE * F.linear(F.linear(xd, a.to(DTYPE)), b.to(DTYPE))
            y.backward(dy)

        return step

    steps = {"2:4 bf16": spp(PackedWeight.from_dense(w, 2, 4))}
    for fmt in LOW_BIT:
        q = QuantizedPackedWeight.from_dense(w, 2, 4, fmt)
        steps[f"2:4 {fmt}"] = spp(q)
        steps[f"lora 2:4 {fmt}"] = lora(lambda t, q=q: F.linear(t, q.dense()))
    nf4 = _bnb_nf4(w)
    if nf4 is not None:
        from spp_kernels.ops.quantized import BnbWeight

        steps["nf4"] = spp(BnbWeight.of_layer(nf4, DTYPE), with_base=False, base=nf4)
        steps["qlora nf4"] = lora(nf4)
    else:
        common.note(BENCH, "bitsandbytes not installed: no nf4 rows")
    return steps, leaves


def run(quick: bool, device: str):
    """Rows (time, ms per step) of every provider, shape and dropout rate."""
    mode = "quick" if quick else "full"
    cuda = device.startswith("cuda")
    if cuda and (reason := common.triton_unavailable(device)):
        common.note(BENCH, reason)
        return
    size = (GPU if cuda else CPU)[mode]
    for m, n in size["shapes"]:
        for p in DROPOUTS:
            if common.out_of_time():
                common.note(BENCH, f"time budget reached before ({m}, {n}) p={p}")
                return
            steps, leaves = _steps(m, n, size["tokens"], p, device)
            extra = {"m": m, "n": n, "shape": [m, n], "tokens": size["tokens"], "r": R, "lora_rank": LORA_RANK,
                     "dtype": "bfloat16", "sparsity": "2:4", "dropout": p,
                     "threads": torch.get_num_threads(),
                     "backend": "triton" if cuda else "torch"}  # fmt: skip
            if cuda:
                stats = {k: common.measure_time(f, device, quick=quick, grad_to_none=leaves)
                         for k, f in steps.items()}  # fmt: skip
            else:
                times = common.interleaved_times(steps, size["warmup"], size["reps"])
                stats = {k: common.quantile_stats(v) for k, v in times.items()}
            for name, st in stats.items():
                yield common.make_row(KERNEL, name, "full", "time", "dropout", p, st,
                                      dict(extra, reps=size.get("reps")))  # fmt: skip
            del steps
            common.release_memory(device)


def ratio_table(rows: list[dict]) -> str:
    """Markdown: per shape and dropout, each provider's median, its ratio to 2:4 bf16 and
    (SPP rows) to LoRA on the same base."""
    lines = ["| shape | dropout | provider | ms / step | / 2:4 bf16 | / LoRA, same base |",
             "|---|---|---|---:|---:|---:|"]  # fmt: skip
    mine = [r for r in rows if r["kernel"] == KERNEL]
    for key in dict.fromkeys((r["extra"]["m"], r["extra"]["n"], r["x_value"]) for r in mine):
        by = {r["provider"]: r["median"] for r in mine
              if (r["extra"]["m"], r["extra"]["n"], r["x_value"]) == key}  # fmt: skip
        for name, ms in by.items():
            lora = {"nf4": "qlora nf4"}.get(name, f"lora {name}")
            same = f"{ms / by[lora]:.2f}x" if lora in by else "-"
            ref = f"{ms / by['2:4 bf16']:.2f}x" if "2:4 bf16" in by else "-"
            lines.append(f"| {key[0]} x {key[1]} | {key[2]} | {name} | {ms:.1f} | {ref} | {same} |")
    return "\n".join(lines)
