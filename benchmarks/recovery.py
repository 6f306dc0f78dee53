"""The SPP paper's comparison on the embedded model: `python -m benchmarks.recovery`.

SmolLM2-135M-Instruct (the embedded GGUF, dequantized to float32) and the offline
Wikipedia corpus (spp_kernels.datasets). For each pruning setting (Wanda 50% / 2:4 / 2:8,
SparseGPT 2:4; SparseGPT 50% with its block-wise and per-row masks is reported pruned
only, to compare the two masks), held-out perplexity of

  pruned      the pruned model;
  spp         + SPP adapters (r=16), merged; the zero pattern is compared bitwise;
  lora*       + LoRA on the pruned model (rank chosen for about SPP's trainable count),
              merged, then the pruning mask re-applied (the paper's LoRA* baseline);
  masked-ft   + full fine-tuning of the pruned projections with the gradient multiplied
              by the mask (paper Eq. 3; AdamW keeps zeros zero), the upper reference;

trained with the same data (Wikipedia train-split windows, next-token cross-entropy), the
same steps, batch, AdamW schedule and seed (`spp_kernels.training.train`); learning rates
are per method (LR below, fixed before the run, not tuned on the held-out split). Each row
also has wall time, the peak tensor memory of one training step (torch's CPU allocator:
activations + gradients + optimizer state) and the trainable parameter count; dense,
pruned and SPP rows get the accuracy on the wiki_title_mc zero-shot task (lm-eval).

Writes benchmarks/results/recovery-<device>-<date>.{json,md,png}. --quick runs a tiny
random model and tokenizer (a smoke test of the script, numbers meaningless).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import (
    ResultLog,
    measure_peak_memory,
    metadata,
    model_benchmark_parser,
    result_stem,
    versions_line,
)

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = [  # (label, method, sparsity, sparsegpt mask, trained methods)
    ("Wanda 50%", "wanda", "0.5", "block", ("spp", "lora*", "masked-ft")),
    ("Wanda 2:4", "wanda", "2:4", "block", ("spp", "lora*", "masked-ft")),
    ("Wanda 2:8 (75%)", "wanda", "2:8", "block", ("spp", "lora*", "masked-ft")),
    ("SparseGPT 2:4", "sparsegpt", "2:4", "block", ("spp", "lora*", "masked-ft")),
    ("SparseGPT 50% (block mask)", "sparsegpt", "0.5", "block", ()),
    ("SparseGPT 50% (row mask)", "sparsegpt", "0.5", "row", ()),
]
LR = {"spp": 2e-2, "lora*": 2e-3, "masked-ft": 1e-4}
SPP_R = 16


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return dict(calib=4, calib_seqlen=32, train_windows=8, seqlen=32, steps=2, batch=2,
                    heldout_tokens=256, ppl_seqlen=64, mc_docs=4)  # fmt: skip
    # Sized to run in about an hour on one CPU thread (prune_ppl ran on the other core).
    return dict(calib=32, calib_seqlen=128, train_windows=48, seqlen=128, steps=24, batch=2,
                heldout_tokens=4096, ppl_seqlen=512, mc_docs=60)  # fmt: skip


# ---------------------------------------------------------------- models and data


def load_smollm2() -> tuple[nn.Module, Any]:
    from spp_kernels.cli.demo import load_default_model

    return load_default_model("cpu", torch.float32)


def wikipedia_data(tokenizer: Any, s: dict[str, int]) -> dict[str, torch.Tensor]:
    from spp_kernels.datasets import wikipedia_tokens, wikipedia_windows

    return {
        "calibration": wikipedia_windows(tokenizer, "calibration", s["calib_seqlen"], s["calib"]),
        "train": wikipedia_windows(tokenizer, "train", s["seqlen"], s["train_windows"]),
        "heldout": wikipedia_tokens(tokenizer, "heldout", s["heldout_tokens"]),
    }


def targets(model: nn.Module) -> dict[str, nn.Linear]:
    from spp_kernels.adapters import SPPConfig, find_targets

    return find_targets(model, SPPConfig())


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (m.weight.detach() == 0).clone() for n, m in targets(model).items()}


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_rank_for(model: nn.Module, budget: int) -> int:
    """The LoRA rank whose trainable count (r * (n + m) per layer) is closest to `budget`."""
    per_rank = sum(m.in_features + m.out_features for m in targets(model).values())
    return max(1, round(budget / per_rank))


# ---------------------------------------------------------------- the three trained methods


def wrap(method: str, pruned: nn.Module, spp_params: int | None,
         options: dict[str, Any] | None = None) -> tuple[nn.Module, dict]:  # fmt: skip
    """(trainable model, details) for `method`, on a copy of `pruned`; `options` override
    SPPConfig's fields (the protocol's ablations)."""
    model = copy.deepcopy(pruned)
    if method == "spp":
        from peft import get_peft_model

        from spp_kernels.adapters import SPPConfig

        fields = {"r": SPP_R, "dropout": 0.0, **(options or {})}
        return get_peft_model(model, SPPConfig(**fields)), {"r": fields["r"]}
    if method == "lora*":
        from peft import LoraConfig, get_peft_model

        rank = lora_rank_for(model, spp_params)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                            target_modules=list(targets(model)))  # fmt: skip
        return get_peft_model(model, config), {"r": rank, "lora_alpha": 2 * rank}
    if method == "masked-ft":
        for p in model.parameters():
            p.requires_grad_(False)
        for module in targets(model).values():
            keep = (module.weight.detach() != 0).to(module.weight.dtype)
            module.weight.requires_grad_(True)
            module.weight.register_hook(lambda g, keep=keep: g * keep)
        return model, {}
    raise ValueError(method)


def finish(method: str, model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The plain model after training: merged (SPP, LoRA*), the mask re-applied (LoRA*)."""
    if method in ("spp", "lora*"):
        model = model.merge_and_unload()
    if method == "lora*":
        with torch.no_grad():
            for name, module in targets(model).items():
                module.weight.masked_fill_(masks[name], 0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def step_peak_mib(model: nn.Module, batch: torch.Tensor, lr: float) -> float:
    """Peak tensor memory of one forward + backward + AdamW step on a copy of `model`."""
    twin = copy.deepcopy(model).train()
    params = [p for p in twin.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)

    def step() -> None:
        twin(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()

    return measure_peak_memory(step, "cpu")


def train_method(model: nn.Module, windows: torch.Tensor, s: dict[str, int], lr: float,
                 seed: int) -> dict[str, Any]:  # fmt: skip
    from spp_kernels.training.data import Example
    from spp_kernels.training.train import TrainConfig, train

    examples = [Example(tuple(r), tuple(r)) for r in windows.tolist()]
    config = TrainConfig(lr=lr, epochs=1, batch_size=s["batch"], max_steps=s["steps"], seed=seed,
                         warmup_ratio=0.03, weight_decay=0.001, kd_weight=0.0)  # fmt: skip
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    result = train(model, examples, config, None, progress=False)
    return {"train_seconds": time.perf_counter() - t0, "steps": result.step,
            "loss_first": result.losses[0], "loss_last": result.losses[-1]}  # fmt: skip


# ---------------------------------------------------------------- evaluation


def heldout_ppl(model: nn.Module, data: dict[str, torch.Tensor], s: dict[str, int]) -> float:
    from spp_kernels.evaluate import perplexity

    return float(perplexity(model, data["heldout"], seqlen=s["ppl_seqlen"], progress=False))


def mc_accuracy(model: nn.Module, tokenizer: Any, s: dict[str, int]) -> float | None:
    from spp_kernels.evaluate import zero_shot

    try:
        results = zero_shot(model, tokenizer, ["wiki_title_mc"], limit=s["mc_docs"], batch_size=8,
                            random_seed=None, numpy_random_seed=None, torch_random_seed=None)  # fmt: skip
    except ImportError:
        return None
    return float(results["wiki_title_mc"]["acc,none"])


def run(dense: nn.Module, tokenizer: Any, data: dict[str, torch.Tensor], s: dict[str, int],
        settings: list, seed: int = 0, log=print) -> list[dict[str, Any]]:  # fmt: skip
    """Every row of the comparison (see the module docstring)."""
    from spp_kernels.pruning import prune

    rows = [{"setting": "dense", "method": "dense", "ppl": heldout_ppl(dense, data, s),
             "mc_acc": mc_accuracy(dense, tokenizer, s), "sparsity": 0.0,
             "trainable_params": 0}]  # fmt: skip
    log(rows[-1])
    sample = data["train"][: s["batch"]]
    for label, method, sparsity, mask, trained in settings:
        pruned = copy.deepcopy(dense)
        t0 = time.perf_counter()
        calib = data["calibration"]
        prune(pruned, method, sparsity, calibration=calib, nsamples=calib.shape[0],
              progress=False, sparsegpt_mask=mask)  # fmt: skip
        masks = masks_of(pruned)
        zeros = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        rows.append({"setting": label, "method": "pruned", "ppl": heldout_ppl(pruned, data, s),
                     "mc_acc": mc_accuracy(pruned, tokenizer, s), "sparsity": zeros,
                     "trainable_params": 0, "prune_seconds": time.perf_counter() - t0})  # fmt: skip
        log(rows[-1])
        spp_params = None
        for name in trained:
            torch.manual_seed(seed)
            model, details = wrap(name, pruned, spp_params)
            params = count_trainable(model)
            spp_params = spp_params or params
            peak = step_peak_mib(model, sample, LR[name])
            info = train_method(model, data["train"], s, LR[name], seed)
            final = finish(name, model, masks)
            after = masks_of(final)
            row = {"setting": label, "method": name, "ppl": heldout_ppl(final, data, s),
                   "mc_acc": mc_accuracy(final, tokenizer, s) if name == "spp" else None,
                   "sparsity": zeros, "trainable_params": params, "lr": LR[name],
                   "zero_pattern_kept": all(torch.equal(masks[n], after[n]) for n in masks),
                   "step_peak_mib": peak, **details, **info}  # fmt: skip
            rows.append(row)
            log(row)
            del model, final
    return rows


# ---------------------------------------------------------------- output


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def cell(v: Any, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [
        f"Recovery on {meta['model']}, {meta['device']} ({meta['cpu_threads']} threads), "
        f"{meta['date']}; data: {meta['data']}.",
        "",
        f"Versions: {versions_line(meta)}.",
        "",
        "| setting | method | held-out ppl | wiki_title_mc acc | sparsity | zeros kept | "
        "trainable | lr | train s | step peak MiB |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        kept = {True: "yes (bitwise)", False: "NO"}.get(r.get("zero_pattern_kept"), "-")
        lines.append(
            f"| {r['setting']} | {r['method']} | {cell(r['ppl'], '.2f')} | "
            f"{cell(r.get('mc_acc'), '.3f')} | {cell(r['sparsity'], '.4f')} | {kept} | "
            f"{r['trainable_params']:,d} | {cell(r.get('lr'), 'g')} | "
            f"{cell(r.get('train_seconds'), '.0f')} | {cell(r.get('step_peak_mib'), '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    settings = [r["setting"] for r in rows if r["method"] == "pruned"]
    methods = ["pruned", "spp", "lora*", "masked-ft"]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.2
    for k, method in enumerate(methods):
        values = [next((r["ppl"] for r in rows if r["setting"] == st and r["method"] == method),
                       float("nan")) for st in settings]  # fmt: skip
        ax.bar([i + (k - 1.5) * width for i in range(len(settings))], values, width, label=method)
    dense = next(r["ppl"] for r in rows if r["method"] == "dense")
    ax.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xticks(range(len(settings)), settings, rotation=15, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("held-out Wikipedia perplexity (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = model_benchmark_parser("benchmarks.recovery", __doc__, RESULTS, threads=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    s = sizes(args.quick)
    if args.quick:
        from tests.helpers import make_tiny_llama, tiny_tokenizer

        dense, tokenizer, model_name = (
            make_tiny_llama(seed=0),
            tiny_tokenizer(),
            "tiny random LLaMA",
        )
        g = torch.Generator().manual_seed(0)
        data = {"calibration": torch.randint(0, 100, (s["calib"], s["calib_seqlen"]), generator=g),
                "train": torch.randint(0, 100, (s["train_windows"], s["seqlen"]), generator=g),
                "heldout": torch.randint(0, 100, (s["heldout_tokens"],), generator=g)}  # fmt: skip
        data_name = "random token ids (quick mode)"
        settings = SETTINGS[1:2]
    else:
        from spp_kernels.datasets import SOURCE

        dense, tokenizer = load_smollm2()
        model_name, data = "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", wikipedia_data(tokenizer, s)
        data_name = SOURCE
        settings = SETTINGS
    meta = {**metadata("cpu", args.quick), "model": model_name, "data": data_name, "sizes": s,
            "lr": LR, "spp_r": SPP_R}  # fmt: skip
    out = Path(args.out)
    stem = f"recovery-{result_stem(meta)}"

    log = ResultLog(out / f"{stem}.json", meta)
    rows = log.rows
    t0 = time.perf_counter()
    run(dense, tokenizer, data, s, settings, log=log)
    meta["seconds"] = time.perf_counter() - t0
    log.write()
    (out / f"{stem}.md").write_text(markdown(rows, meta))
    plot(rows, out / f"{stem}.png")
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
