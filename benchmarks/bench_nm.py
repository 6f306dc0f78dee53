"""SPP training on N:M packed frozen weights: bytes, time and peak memory, packed vs dense.

Rows (shared schema; fp16 weights; metric "memory" in MiB, reported as "MB"):
  kernel "nm_weight_bytes"   frozen weight bytes of one LLaMA projection (m, n), dense vs
                             packed 2:4 / 2:8 (spp_kernels.nm.nm_packed_nbytes; exact
                             accounting, any device). x = m * n; extra.fraction = packed /
                             dense bytes.
  kernel "nm_model_weights"  frozen bytes of a whole LLaMA-2-7B / 70B: every decoder
                             projection dense or packed, plus the dense embeddings, head
                             and norms. x = parameters in billions.
  kernel "nm_layer_resident" measured bytes of an SPPLinear's parameters and buffers after
                             from_linear(weight_format=...) on small shapes: checks the
                             accounting against real tensors.
  kernel "nm_model_resident" measured parameter + buffer bytes of a small LLaMA-architecture
                             model after get_spp_model(SPPConfig(weight_format=...)).
  GPU only:
  kernel "spp_nm_layer"      one SPP linear at LLaMA-7B / 70B projection shapes, tokens
                             x; time of forward, backward and forward+backward (mode
                             "full"), and the peak memory of a training step (resident
                             layer + what the step allocates), provider "dense" (the fused
                             kernels on the dense weight) or "nm-2:4" / "nm-2:8" (the
                             same fused kernels reading the packed weight).
  kernel "nm_model_step"     peak memory of one training step (forward, loss, backward) of
                             a LLaMA-architecture model with 7B / 70B layer dimensions
                             and a few decoder layers, every projection pruned N:M, dense
                             vs packed; extra.resident_mb = memory before the step.
On CPU only the accounting rows are produced: the packed CPU path is a decompressing
fallback and the kernels run only under the interpreter, so time and step peaks there
would describe neither.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spp_kernels import SPPConfig, SPPLinear, get_spp_model
from spp_kernels.pruning.masks import nm_mask
from spp_kernels.sparsity.nm import nm_packed_nbytes
from spp_kernels.utils import shapes as llama_shapes

from . import common

BENCH = "nm"
DTYPE = torch.float16
PATTERNS = ((2, 4), (2, 8))

# (m, n) = (out_features, in_features) of the LLaMA-2 projections and how many per layer.
LLAMA_SHAPES = {
    "llama-2-7b": {(4096, 4096): 4, (11008, 4096): 2, (4096, 11008): 1},
    "llama-2-70b": {(8192, 8192): 2, (1024, 8192): 2, (28672, 8192): 2, (8192, 28672): 1},
}
LLAMA_DIMS = {"llama-2-7b": llama_shapes.LLAMA_7B, "llama-2-70b": llama_shapes.LLAMA_2_70B}
LAYER_TOKENS = {"quick": (2048,), "full": (2048, 8192)}
STEP_LAYERS = {"quick": {"llama-2-7b": 2}, "full": {"llama-2-7b": 4, "llama-2-70b": 2}}
STEP_TOKENS = {"quick": 1024, "full": 2048}
SMALL_LLAMA = dict(llama_shapes.TINY, hidden_size=256, intermediate_size=688, vocab_size=512)


def _mib(nbytes: float) -> float:
    return nbytes / common.MIB


def _provider(pattern: tuple[int, int] | None) -> str:
    return "dense" if pattern is None else f"nm-{pattern[0]}:{pattern[1]}"


def _frozen_bytes(m: int, n: int, pattern: tuple[int, int] | None) -> int:
    if pattern is None:
        return m * n * DTYPE.itemsize
    return nm_packed_nbytes(m, n, *pattern, DTYPE)


def _memory_row(kernel: str, provider: str, m: int, n: int, stats: Any, extra: dict) -> dict:
    """A full-mode memory row of an (m, n) weight (x axis m*n)."""
    return common.make_row(kernel, provider, "full", "memory", "m*n", m * n, stats, extra)


def weight_bytes_rows() -> list[dict[str, Any]]:
    """Exact frozen-weight bytes per projection shape and per whole model (no allocation)."""
    rows = []
    for model, shapes in LLAMA_SHAPES.items():
        for m, n in shapes:
            dense = _frozen_bytes(m, n, None)
            for pattern in (None, *PATTERNS):
                nbytes = _frozen_bytes(m, n, pattern)
                extra = {"model": model, "shape": [m, n], "dtype": "float16"}
                extra["fraction"] = nbytes / dense
                stats = common.Stats.single(_mib(nbytes))
                rows.append(_memory_row("nm_weight_bytes", _provider(pattern), m, n, stats, extra))
        dims = LLAMA_DIMS[model]
        hidden, vocab, layers = dims["hidden_size"], dims["vocab_size"], dims["num_hidden_layers"]
        # Embeddings, LM head and the RMSNorm weights stay dense.
        other = (2 * vocab * hidden + (2 * layers + 1) * hidden) * DTYPE.itemsize
        params = layers * sum(m * n * k for (m, n), k in shapes.items())
        billions = (params + other / DTYPE.itemsize) / 1e9
        dense_total = layers * sum(_frozen_bytes(m, n, None) * k for (m, n), k in shapes.items())
        for pattern in (None, *PATTERNS):
            linear = layers * sum(_frozen_bytes(m, n, pattern) * k for (m, n), k in shapes.items())
            extra = {
                "model": model,
                "dtype": "float16",
                "linear_gb": linear / 1e9,
                "total_gb": (linear + other) / 1e9,
                "fraction_of_linear": linear / dense_total,
            }
            stats = common.Stats.single(_mib(linear + other))
            rows.append(
                common.make_row(
                    "nm_model_weights",
                    _provider(pattern),
                    "full",
                    "memory",
                    "params_b",
                    round(billions, 2),
                    stats,
                    extra,
                )
            )
    return rows


def _nm_pruned_linear(
    m: int, n: int, pattern: tuple[int, int], device: str, gen: torch.Generator
) -> nn.Linear:
    linear = nn.Linear(n, m, bias=False, device="meta")
    w = common.random_tensor((m, n), dtype=DTYPE, device=device, gen=gen)
    w.masked_fill_(~nm_mask(w.abs().float(), *pattern), 0.0)
    linear.weight = nn.Parameter(w, requires_grad=False)
    return linear


def _module_bytes(module: nn.Module) -> int:
    return sum(t.nbytes for t in (*module.parameters(), *module.buffers()))


def layer_resident_rows(quick: bool, device: str) -> list[dict[str, Any]]:
    """Measured parameter + buffer bytes of SPPLinear layers, dense vs packed."""
    shapes = ((344, 128), (128, 344)) if quick else ((4096, 4096), (11008, 4096))
    rows = []
    gen = common.generator(device, 0)
    for m, n in shapes:
        for pattern in PATTERNS:
            linear = _nm_pruned_linear(m, n, pattern, device, gen)
            for fmt in ("dense", "nm"):
                layer = SPPLinear.from_linear(linear, r=16, weight_format=fmt, nm=pattern)
                frozen = sum(t.nbytes for t in layer.buffers()) + (
                    0 if layer.weight is None else layer.weight.nbytes
                )
                extra = {
                    "shape": [m, n],
                    "dtype": "float16",
                    "pattern": f"{pattern[0]}:{pattern[1]}",
                    "frozen_bytes": frozen,
                    "frozen_fraction": frozen / (m * n * DTYPE.itemsize),
                    "adapter_bytes": layer.alpha.nbytes + layer.beta.nbytes,
                }
                provider = "dense" if fmt == "dense" else _provider(pattern)
                stats = common.Stats.single(_mib(_module_bytes(layer)))
                rows.append(_memory_row("nm_layer_resident", provider, m, n, stats, extra))
    return rows


def _llama(dims: dict[str, int], layers: int, device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{**dims, "num_hidden_layers": layers},
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config).to(DTYPE)


def _spp_model(
    dims: dict[str, int], layers: int, pattern: tuple[int, int], fmt: str, device: str
) -> nn.Module:
    """LLaMA-architecture model, decoder projections pruned to `pattern`, SPP adapters on."""
    model = _llama(dims, layers, device)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".layers." in name:
                w = module.weight
                w.masked_fill_(~nm_mask(w.abs().float(), *pattern), 0.0)
    config = SPPConfig(r=16, dropout=0.05, target_modules="all-linear", weight_format=fmt)
    return get_spp_model(model, config)


def model_resident_rows(device: str) -> list[dict[str, Any]]:
    """Measured parameter + buffer bytes of a small LLaMA-architecture SPP model."""
    rows = []
    for pattern in PATTERNS:
        for fmt in ("dense", "auto"):
            spp = _spp_model(SMALL_LLAMA, SMALL_LLAMA["num_hidden_layers"], pattern, fmt, device)
            layers = spp.spp_layers().values()
            packed = sum(layer.nm is not None for layer in layers)
            frozen = sum(
                _module_bytes(layer) - layer.alpha.nbytes - layer.beta.nbytes for layer in layers
            )
            extra = {
                "model": "llama-arch-small",
                "dims": SMALL_LLAMA,
                "dtype": "float16",
                "pattern": f"{pattern[0]}:{pattern[1]}",
                "packed_layers": packed,
                "spp_layers": len(layers),
                "frozen_linear_bytes": frozen,
            }
            provider = "dense" if fmt == "dense" else _provider(pattern)
            stats = common.Stats.single(_mib(_module_bytes(spp)))
            rows.append(
                common.make_row(
                    "nm_model_resident",
                    provider,
                    "full",
                    "memory",
                    "layers",
                    SMALL_LLAMA["num_hidden_layers"],
                    stats,
                    extra,
                )
            )
            del spp
    return rows


def layer_timing_rows(quick: bool, device: str) -> list[dict[str, Any]]:
    """GPU: fused SPP layer fwd / bwd / fwd+bwd time and step peak memory, packed vs dense."""
    rows = []
    gen = common.generator(device, 0)
    shapes = {"llama-2-7b": ((4096, 4096), (11008, 4096), (4096, 11008))}
    if not quick:
        shapes["llama-2-70b"] = ((8192, 8192), (28672, 8192), (8192, 28672))
    for model, model_shapes in shapes.items():
        for m, n in model_shapes:
            for pattern in PATTERNS:
                linear = _nm_pruned_linear(m, n, pattern, device, gen)
                for fmt in ("dense", "nm"):
                    if common.out_of_time():
                        common.note(BENCH, f"out of time before {model} {(m, n)}")
                        return rows
                    if fmt == "dense" and pattern != PATTERNS[0]:
                        continue  # the dense kernels do not depend on the pattern
                    layer = SPPLinear.from_linear(
                        linear, r=16, dropout=0.05, weight_format=fmt, nm=pattern
                    )
                    provider = "dense" if fmt == "dense" else _provider(pattern)
                    for tokens in LAYER_TOKENS["quick" if quick else "full"]:
                        extra = {"model": model, "shape": [m, n], "dtype": "float16"}
                        rows += _layer_case(layer, tokens, provider, extra, quick, device)
                    del layer
                    common.release_memory(device)
                del linear
    return rows


def _layer_case(layer, tokens, provider, extra, quick, device) -> list[dict[str, Any]]:
    gen = common.generator(device, 1)
    x = common.random_tensor((tokens, layer.in_features), dtype=DTYPE, device=device, gen=gen)
    x.requires_grad_(True)
    dy = common.random_tensor((tokens, layer.out_features), dtype=DTYPE, device=device, gen=gen)
    params = [x, layer.alpha, layer.beta]
    graph = {"y": layer(x)}  # one retained graph for the backward-only timing

    def forward():
        return layer(x)

    def backward():
        graph["y"].backward(dy, retain_graph=True)

    def full():
        layer(x).backward(dy)

    rows = []
    for mode, fn in (("forward", forward), ("backward", backward), ("full", full)):
        stats = common.measure_time(fn, device, quick=quick, grad_to_none=params)
        rows.append(
            common.make_row("spp_nm_layer", provider, mode, "time", "tokens", tokens, stats, extra)
        )
    graph.clear()
    common.synchronize(device)
    resident = _module_bytes(layer)
    step_peak = common.measure_peak_memory(full, device)
    memory = dict(extra, resident_layer_mb=_mib(resident), step_peak_mb=step_peak)
    stats = common.Stats.single(_mib(resident) + step_peak)
    rows.append(
        common.make_row("spp_nm_layer", provider, "full", "memory", "tokens", tokens, stats, memory)
    )
    return rows


def model_step_rows(quick: bool, device: str) -> list[dict[str, Any]]:
    """GPU: peak memory of one training step of a LLaMA-architecture model, packed vs dense."""
    rows = []
    tokens = STEP_TOKENS["quick" if quick else "full"]
    for model_name, layers in STEP_LAYERS["quick" if quick else "full"].items():
        dims = LLAMA_DIMS[model_name]
        for pattern in PATTERNS:
            for fmt in ("dense", "auto"):
                if common.out_of_time():
                    common.note(BENCH, f"out of time before the {model_name} model step")
                    return rows
                common.release_memory(device)
                spp = _spp_model(dims, layers, pattern, fmt, device)
                common.release_memory(device)
                if device.startswith("cuda"):
                    resident = torch.cuda.memory_allocated(device)
                else:  # only reached in smoke runs: CPU rows stop at the accounting
                    resident = _module_bytes(spp)
                ids = torch.randint(0, dims["vocab_size"], (1, tokens), device=device)

                def step(spp=spp, ids=ids):
                    spp(input_ids=ids, labels=ids).loss.backward()
                    for p in spp.parameters():
                        p.grad = None

                step()  # warm-up: autotuning and lazy allocations are not the steady state
                peak = common.measure_peak_memory(step, device)
                extra = {
                    "model": f"{model_name}-dims-{layers}-layers",
                    "dtype": "float16",
                    "pattern": f"{pattern[0]}:{pattern[1]}",
                    "tokens": tokens,
                    "resident_mb": _mib(resident),
                    "step_peak_mb": peak,
                    "packed_layers": sum(x.nm is not None for x in spp.spp_layers().values()),
                }
                provider = "dense" if fmt == "dense" else _provider(pattern)
                stats = common.Stats.single(_mib(resident) + peak)
                rows.append(
                    common.make_row(
                        "nm_model_step",
                        provider,
                        "full",
                        "memory",
                        "layers",
                        layers,
                        stats,
                        extra,
                    )
                )
                del spp, step
    common.release_memory(device)
    return rows


def run(quick: bool, device: str):
    """All rows for `device`, yielded group by group; see the module docstring."""
    yield from weight_bytes_rows()
    yield from layer_resident_rows(quick, device)
    yield from model_resident_rows(device)
    reason = common.triton_unavailable(device)
    if reason is not None:
        common.note(BENCH, f"{reason}; packed-vs-dense time and step-peak rows skipped")
        return
    yield from layer_timing_rows(quick, device)
    yield from model_step_rows(quick, device)
