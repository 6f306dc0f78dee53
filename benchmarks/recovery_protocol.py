"""The paper's comparison as a protocol: `python -m benchmarks.recovery_protocol`.

benchmarks.recovery with the choices a reviewer asks for (issue 23):

1. Learning rates chosen on validation, not fixed: at one setting (Wanda 2:4) every method
   (SPP, LoRA*, masked fine-tuning) trains with each rate of its grid (4 values spanning
   at least 30x) on the `fit` part of the Wikipedia train articles; the rate with the
   lowest perplexity on the `validation` part (train articles disjoint from `fit`, and
   from held-out) is then used for every setting.
2. Seeds: every (setting, method) trains with `--seeds` seeds (adapter init and data
   order; the pruned model is the same); held-out perplexity is reported as mean and
   standard deviation, and SPP vs LoRA* as the mean and standard deviation of the paired
   per-seed difference.
3. Zero-shot for every method: wiki_title_mc (all 856 questions by default) on the pruned
   model and on each method's seed-0 run, at the settings in MC_SETTINGS (one evaluation
   of the 856 questions took 452 s on one thread of this project's CPU: seeds multiply the
   training, not the evaluation).
4. The final training loss of each run (before LoRA*'s re-masking: the paper's argument).

Settings: Wanda 50 %, 75 % unstructured, 2:4, 2:8; SparseGPT 2:4; and Wanda + DSnoT at
50 % and 2:4 as pruning-only rows. Writes benchmarks/results/protocol-<device>-<date>.
{json,md}. --quick: a tiny random model, two rates per grid, two seeds (a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import recovery as rec
from benchmarks.common import ResultLog, metadata, result_stem, versions_line

# (label, method, sparsity, refine, trained)
SETTINGS = [
    ("Wanda 50%", "wanda", "0.5", None, True),
    ("Wanda 75%", "wanda", "0.75", None, True),
    ("Wanda 2:4", "wanda", "2:4", None, True),
    ("Wanda 2:8 (75%)", "wanda", "2:8", None, True),
    ("SparseGPT 2:4", "sparsegpt", "2:4", None, True),
    ("Wanda + DSnoT 50%", "wanda", "0.5", "dsnot", False),
    ("Wanda + DSnoT 2:4", "wanda", "2:4", "dsnot", False),
]
TUNING_SETTING = "Wanda 2:4"
MC_SETTINGS = ("Wanda 2:4", "Wanda 2:8 (75%)")
METHODS = ("spp", "lora*", "masked-ft")
GRID = {  # each spans 30x around the rate benchmarks.recovery fixed before
    "spp": (4e-3, 1e-2, 3e-2, 1.2e-1),
    "lora*": (3e-4, 1e-3, 3e-3, 1e-2),
    "masked-ft": (1e-5, 3e-5, 1e-4, 3e-4),
}


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(rec.sizes(True), validation_tokens=256, mc_docs=4, seeds=2, grid_values=2)
    return dict(rec.sizes(False), validation_tokens=4096, mc_docs=None, seeds=3, grid_values=4)


def wikipedia_data(tokenizer: Any, s: dict[str, Any]) -> dict[str, torch.Tensor]:
    from spp_kernels.datasets import wikipedia_tokens, wikipedia_windows

    return {
        "calibration": wikipedia_windows(tokenizer, "calibration", s["calib_seqlen"], s["calib"]),
        "train": wikipedia_windows(tokenizer, "fit", s["seqlen"], s["train_windows"]),
        "validation": wikipedia_tokens(tokenizer, "validation", s["validation_tokens"]),
        "heldout": wikipedia_tokens(tokenizer, "heldout", s["heldout_tokens"]),
    }


def ppl(model: torch.nn.Module, tokens: torch.Tensor, s: dict[str, Any]) -> float:
    from spp_kernels.evaluate import perplexity

    return float(perplexity(model, tokens, seqlen=s["ppl_seqlen"], progress=False))


def pruned_copy(dense, data, s, method, sparsity, refine) -> torch.nn.Module:
    from spp_kernels.pruning import prune

    model = copy.deepcopy(dense)
    calib = data["calibration"]
    prune(model, method, sparsity, calibration=calib, nsamples=calib.shape[0], progress=False,
          refine=refine)  # fmt: skip
    return model


def trained(name: str, pruned, data, s, lr: float, seed: int, spp_params: int | None):
    """(merged model, run info) of one training run of `name` on `pruned`."""
    masks = rec.masks_of(pruned)
    torch.manual_seed(seed)
    model, details = rec.wrap(name, pruned, spp_params)
    params = rec.count_trainable(model)
    info = rec.train_method(model, data["train"], s, lr, seed)
    final = rec.finish(name, model, masks)
    after = rec.masks_of(final)
    kept = all(torch.equal(masks[n], after[n]) for n in masks)
    return final, {"lr": lr, "seed": seed, "trainable_params": params, "zeros_kept": kept,
                   **details, **info}  # fmt: skip


def choose_rates(dense, tokenizer, data, s, log) -> dict[str, float]:
    """The validation-perplexity argmin of each method's grid at TUNING_SETTING."""
    label, method, sparsity, refine, _ = next(x for x in SETTINGS if x[0] == TUNING_SETTING)
    pruned = pruned_copy(dense, data, s, method, sparsity, refine)
    chosen, spp_params = {}, None
    for name in METHODS:
        grid = GRID[name][:: max(1, len(GRID[name]) // s["grid_values"])][: s["grid_values"]]
        scores = {}
        for lr in grid:
            final, info = trained(name, pruned, data, s, lr, 0, spp_params)
            spp_params = spp_params or (info["trainable_params"] if name == "spp" else None)
            scores[lr] = ppl(final, data["validation"], s)
            log({"kind": "lr-grid", "setting": label, "method": name, "lr": lr,
                 "validation_ppl": scores[lr], "loss_last": info["loss_last"]})  # fmt: skip
        finite = {lr: v for lr, v in scores.items() if math.isfinite(v)}
        chosen[name] = min(finite, key=finite.get) if finite else grid[0]
    return chosen


def mc(model, tokenizer, s) -> float | None:
    return rec.mc_accuracy(model, tokenizer, {"mc_docs": s["mc_docs"]})


def run(dense, tokenizer, data, s, settings, log) -> dict[str, Any]:
    rates = choose_rates(dense, tokenizer, data, s, log)
    log({"kind": "chosen-rates", **rates})
    seeds = list(range(s["seeds"]))
    log({"kind": "dense", "ppl": ppl(dense, data["heldout"], s), "mc_acc": mc(dense, tokenizer, s)})
    for label, method, sparsity, refine, train_it in settings:
        pruned = pruned_copy(dense, data, s, method, sparsity, refine)
        with_mc = label in MC_SETTINGS
        log({"kind": "pruned", "setting": label, "ppl": ppl(pruned, data["heldout"], s),
             "mc_acc": mc(pruned, tokenizer, s) if with_mc else None})  # fmt: skip
        spp_params = None
        for name in METHODS if train_it else ():
            for seed in seeds:
                final, info = trained(name, pruned, data, s, rates[name], seed, spp_params)
                if name == "spp":
                    spp_params = info["trainable_params"]
                log({"kind": "run", "setting": label, "method": name,
                     "ppl": ppl(final, data["heldout"], s),
                     "mc_acc": mc(final, tokenizer, s) if with_mc and seed == 0 else None,
                     **info})  # fmt: skip
                del final
    return rates


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, method): mean and standard deviation over seeds of held-out perplexity
    and accuracy, and (SPP) the paired per-seed difference to LoRA*."""
    runs = [r for r in rows if r.get("kind") == "run"]
    out = []
    for label in dict.fromkeys(r["setting"] for r in runs):
        by = {m: {r["seed"]: r for r in runs if r["setting"] == label and r["method"] == m}
              for m in METHODS}  # fmt: skip
        for method, seeds in by.items():
            if not seeds:
                continue
            values = [r["ppl"] for r in seeds.values()]
            accs = [r["mc_acc"] for r in seeds.values() if r.get("mc_acc") is not None]
            row = {"setting": label, "method": method, "seeds": len(values),
                   "ppl_mean": statistics.fmean(values), "ppl_std": _std(values),
                   "mc_mean": statistics.fmean(accs) if accs else None,
                   "loss_last_mean": statistics.fmean(r["loss_last"] for r in seeds.values())}  # fmt: skip
            if method == "spp" and by["lora*"]:
                common = sorted(set(seeds) & set(by["lora*"]))
                diffs = [seeds[k]["ppl"] - by["lora*"][k]["ppl"] for k in common]
                row["spp_minus_lora_mean"] = statistics.fmean(diffs) if diffs else None
                row["spp_minus_lora_std"] = _std(diffs)
                row["spp_better_in"] = f"{sum(d < 0 for d in diffs)}/{len(diffs)}"
            out.append(row)
    return out


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def cell(v: Any, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    rates = next(r for r in rows if r.get("kind") == "chosen-rates")
    lines = [
        f"Protocol on {meta['model']}, {meta['device']} ({meta['cpu_threads']} threads), "
        f"{meta['date']}; data: {meta['data']}.",
        "",
        f"Versions: {versions_line(meta)}.",
        "",
        "Learning rates chosen on validation perplexity at " + TUNING_SETTING + ": "
        + ", ".join(f"{m} {rates[m]:g}" for m in METHODS) + ".",
        "",
        "| setting | method | seeds | held-out ppl (mean ± std) | wiki_title_mc (mean) | "
        "final train loss | SPP − LoRA* ppl (paired) | SPP better |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    for r in rows:
        if r.get("kind") == "pruned":
            lines.append(f"| {r['setting']} | pruned | - | {cell(r['ppl'], '.2f')} | "
                         f"{cell(r.get('mc_acc'), '.3f')} | - | - | - |")  # fmt: skip
    for r in summary(rows):
        spread = f" ± {r['ppl_std']:.2f}" if r["ppl_std"] is not None else ""
        diff = r.get("spp_minus_lora_mean")
        dstd = r.get("spp_minus_lora_std")
        paired = "-" if diff is None else f"{diff:+.2f}" + (f" ± {dstd:.2f}" if dstd else "")
        lines.append(
            f"| {r['setting']} | {r['method']} | {r['seeds']} | {r['ppl_mean']:.2f}{spread} | "
            f"{cell(r['mc_mean'], '.3f')} | {cell(r['loss_last_mean'], '.3f')} | {paired} | "
            f"{r.get('spp_better_in', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recovery_protocol",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per (setting, method)")
    parser.add_argument("--out", default=str(rec.RESULTS), help="results directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    s = sizes(args.quick)
    if args.seeds is not None:
        s["seeds"] = args.seeds
    if args.quick:
        from tests.helpers import make_tiny_llama, tiny_tokenizer

        dense, tokenizer, model_name = make_tiny_llama(seed=0), tiny_tokenizer(), "tiny LLaMA"
        g = torch.Generator().manual_seed(0)
        data = {"calibration": torch.randint(0, 100, (s["calib"], s["calib_seqlen"]), generator=g),
                "train": torch.randint(0, 100, (s["train_windows"], s["seqlen"]), generator=g),
                "validation": torch.randint(0, 100, (s["validation_tokens"],), generator=g),
                "heldout": torch.randint(0, 100, (s["heldout_tokens"],), generator=g)}  # fmt: skip
        data_name = "random token ids (quick mode)"
        settings = [x for x in SETTINGS if x[0] in ("Wanda 2:4", "Wanda + DSnoT 2:4")]
    else:
        from spp_kernels.datasets import SOURCE

        dense, tokenizer = rec.load_smollm2()
        model_name = "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)"
        data, data_name, settings = wikipedia_data(tokenizer, s), SOURCE, SETTINGS
    meta = {**metadata("cpu", args.quick), "model": model_name, "data": data_name, "sizes": s,
            "grid": GRID, "spp_r": rec.SPP_R}  # fmt: skip
    out = Path(args.out)
    stem = f"protocol-{result_stem(meta)}"

    log = ResultLog(out / f"{stem}.json", meta)
    rows = log.rows
    t0 = time.perf_counter()
    run(dense, tokenizer, data, s, settings, log)
    meta["seconds"] = time.perf_counter() - t0
    log.write(summary=summary(rows))
    (out / f"{stem}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
