"""2:4 semi-structured inference: dense vs sparse tensor cores, per layer and end to end.

Rows (shared schema, fp16, mode "forward", metric "time"):
  kernel "linear_2to4"   Y = X W^T for W (m, n) magnitude-pruned 2:4, X (tokens, n); provider
                         "dense" (F.linear, cuBLAS) or the semi-structured backend
                         ("cusparselt" / "cutlass", chosen by spp_kernels.sparse24.semi_structured_backend);
                         x = tokens: prefill-sized (2048..16384) and decode-sized (1..64).
                         Sparse rows carry extra.speedup_vs_dense = dense median / sparse
                         median (below 1 where 2:4 is slower, typically at decode sizes),
                         extra.max_abs_err against the dense result, and weight bytes.
  kernel "llama_prefill" one forward pass (logits) of a LLaMA-architecture model, random init
                         from a config, every decoder linear pruned 2:4 (what
                         merge_and_unload leaves), before and after to_semi_structured.
  kernel "nm_compress" / "nm_decompress"
                         the package's pure-PyTorch 2:4 packing (spp_kernels.sparse24), the
                         only rows a CPU can produce: 2:4 matmuls need sparse tensor cores.
GPU timing: triton.testing.do_bench via benchmarks.common.measure_time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from spp_kernels.sparsity.sparse24 import (
    compress,
    decompress,
    semi_structured_backend,
    semi_structured_weight,
    to_semi_structured,
)
from spp_kernels.utils import shapes as llama_shapes

from . import common

BENCH = "sparse24"
DTYPE = torch.float16

# (m, n) = (out_features, in_features) of the LLaMA projections: qkvo, gate/up, down.
LINEAR_SHAPES = {
    "llama-7b": ((4096, 4096), (11008, 4096), (4096, 11008)),
    "llama-13b": ((5120, 5120), (13824, 5120), (5120, 13824)),
}
PREFILL_TOKENS = (2048, 4096, 8192, 16384)
DECODE_TOKENS = (1, 16, 64)
QUICK_PREFILL_TOKENS = (2048, 8192)
QUICK_DECODE_TOKENS = (1, 64)

LLAMA_7B = dict(llama_shapes.LLAMA_7B, max_position_embeddings=4096, tie_word_embeddings=False)
E2E_LAYERS = {"full": 32, "quick": 4}
E2E_TOKENS = {"full": (2048, 4096), "quick": (2048,)}

PACK_SHAPES = {"quick": ((128, 128), (344, 128), (128, 344)), "full": ((4096, 4096), (11008, 4096))}


def _magnitude_2to4(w: torch.Tensor) -> torch.Tensor:
    from spp_kernels.pruning.masks import nm_mask

    return w.masked_fill(~nm_mask(w.abs().float(), 2, 4), 0.0)


def _weight_nbytes(w: torch.Tensor) -> int:
    if isinstance(w, torch.sparse.SparseSemiStructuredTensor):
        parts = (w.packed, w.meta)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)
    return w.numel() * w.element_size()


def _linear_case(
    family: str,
    m: int,
    n: int,
    tokens_list: tuple[int, ...],
    quick: bool,
    device: str,
    backend: str,
) -> list[dict]:
    """Dense and 2:4 rows of one (m, n) weight at each token count."""
    gen = common.generator(device, m * 7 + n)
    w = _magnitude_2to4(
        common.random_tensor((m, n), dtype=DTYPE, device=device, gen=gen, std=n**-0.5)
    )
    ws = semi_structured_weight(w, backend)
    rows = []
    for tokens in tokens_list:
        x = common.random_tensor((tokens, n), dtype=DTYPE, device=device, gen=gen)
        with torch.inference_mode():
            err = (F.linear(x, ws).float() - F.linear(x, w).float()).abs().max().item()
            dense = common.measure_time(lambda x=x: F.linear(x, w), device, quick=quick)
            sparse = common.measure_time(lambda x=x: F.linear(x, ws), device, quick=quick)
        extra = {
            "family": family,
            "shape": f"{m}x{n}",
            "m": m,
            "n": n,
            "dtype": str(DTYPE),
            "sparsity": "2:4",
            "phase": "decode" if tokens <= max(DECODE_TOKENS) else "prefill",
        }
        dense_extra = {**extra, "weight_bytes": _weight_nbytes(w)}
        sparse_extra = {
            **extra,
            "weight_bytes": _weight_nbytes(ws),
            "speedup_vs_dense": dense.median / sparse.median,
            "max_abs_err": err,
        }
        for provider, stats, more in (
            ("dense", dense, dense_extra),
            (backend, sparse, sparse_extra),
        ):
            rows.append(
                common.make_row(
                    "linear_2to4", provider, "forward", "time", "tokens", tokens, stats, more
                )
            )
    return rows


def _linear_rows(quick: bool, device: str, backend: str) -> list[dict]:
    rows: list[dict] = []
    families = {"llama-7b": LINEAR_SHAPES["llama-7b"]} if quick else LINEAR_SHAPES
    prefill = QUICK_PREFILL_TOKENS if quick else PREFILL_TOKENS
    decode = QUICK_DECODE_TOKENS if quick else DECODE_TOKENS
    for family, shapes in families.items():
        for m, n in shapes:
            if common.out_of_time():
                common.note(BENCH, f"out of time before {family} {m}x{n}; later cases skipped")
                return rows
            rows += _linear_case(family, m, n, (*decode, *prefill), quick, device, backend)
            common.release_memory(device)
    return rows


def _llama_2to4(layers: int, device: str) -> torch.nn.Module:
    """A random-init LLaMA (7B widths, `layers` decoder layers), decoder linears pruned 2:4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA_7B, "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(DTYPE).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.copy_(_magnitude_2to4(mod.weight))
    return model


def _prefill_case(
    layers: int, tokens_list: tuple[int, ...], quick: bool, device: str, backend: str
):
    """Prefill time per token count, dense then converted; the conversion report; logit error."""
    model = _llama_2to4(layers, device)
    gen = common.generator(device, 1)
    inputs = {
        t: torch.randint(0, LLAMA_7B["vocab_size"], (1, t), device=device, generator=gen)
        for t in tokens_list
    }

    def forward(ids):
        return model(input_ids=ids, use_cache=False).logits

    first = tokens_list[0]
    with torch.inference_mode():
        dense = {
            t: common.measure_time(lambda i=i: forward(i), device, quick=quick)
            for t, i in inputs.items()
        }
        dense_logits = forward(inputs[first]).float()
    _, report = to_semi_structured(model, backend=backend)
    with torch.inference_mode():
        sparse = {
            t: common.measure_time(lambda i=i: forward(i), device, quick=quick)
            for t, i in inputs.items()
        }
        err = (forward(inputs[first]).float() - dense_logits).abs().max().item()
    return dense, sparse, report, err


def _prefill_rows(quick: bool, device: str, backend: str) -> list[dict]:
    mode = "quick" if quick else "full"
    layers = E2E_LAYERS[mode]
    if common.out_of_time():
        common.note(BENCH, "out of time before the end-to-end prefill")
        return []
    tokens_list = E2E_TOKENS[mode]
    dense, sparse, report, err = _prefill_case(layers, tokens_list, quick, device, backend)
    common.release_memory(device)
    extra = {
        "model": f"llama-7b widths, {layers} layers, random init, decoder linears 2:4",
        "layers": layers,
        "batch": 1,
        "dtype": str(DTYPE),
        "sparsity": "2:4",
    }
    rows = []
    for t in tokens_list:
        sparse_extra = {
            **extra,
            "speedup_vs_dense": dense[t].median / sparse[t].median,
            "converted_layers": len(report.converted),
            "skipped_layers": len(report.skipped),
            "max_abs_logit_err": err if t == tokens_list[0] else None,
        }
        for provider, stats, more in (
            ("dense", dense[t], extra),
            (report.backend or backend, sparse[t], sparse_extra),
        ):
            rows.append(
                common.make_row(
                    "llama_prefill", provider, "forward", "time", "tokens", t, stats, more
                )
            )
    return rows


def _pack_rows(quick: bool, device: str) -> list[dict]:
    rows = []
    gen = common.generator(device, 2)
    for m, n in PACK_SHAPES["quick" if quick else "full"]:
        w = _magnitude_2to4(common.random_tensor((m, n), dtype=DTYPE, device=device, gen=gen))
        values, meta = compress(w)
        if not torch.equal(decompress(values, meta), w):
            raise RuntimeError(f"bench_sparse24: 2:4 round trip not exact at {m}x{n}")
        extra = {"shape": f"{m}x{n}", "m": m, "n": n, "dtype": str(DTYPE), "sparsity": "2:4"}
        for kernel, fn in (
            ("nm_compress", lambda w=w: compress(w)),
            ("nm_decompress", lambda v=values, mt=meta: decompress(v, mt)),
        ):
            stats = common.measure_time(fn, device, quick=quick)
            rows.append(
                common.make_row(kernel, "torch", "forward", "time", "elements", m * n, stats, extra)
            )
    return rows


def run(quick: bool, device: str):
    """Benchmark rows for `device` ("cpu" or "cuda[:i]"), yielded group by group."""
    yield from _pack_rows(quick, device)
    backend, reason = semi_structured_backend(device, "auto")
    if backend is None:
        common.note(BENCH, f"2:4 semi-structured matmul not measured: {reason}")
        return
    yield from _linear_rows(quick, device, backend)
    yield from _prefill_rows(quick, device, backend)
