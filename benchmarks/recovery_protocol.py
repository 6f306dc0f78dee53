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
50 % and 2:4 as pruning-only rows; SPP ablations (ABLATIONS: init, r) at Wanda 2:4.
Writes benchmarks/results/recovery-protocol-<device>-<date>.{json,md,png}. Every row is
a `Unit` computed on its own: --jobs N runs them in N processes side by side, --unit KEY
(with --rates-from a result file) reruns one. --quick: a tiny random model, two rates per
grid, two seeds (a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import recovery as rec
from benchmarks.common import (
    ResultLog,
    command_line,
    commit_state,
    metadata,
    model_benchmark_parser,
    result_stem,
    versions_line,
    write_json_atomic,
)

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
ABLATIONS = {  # SPP at TUNING_SETTING; the protocol's SPP runs (init "paper", r = SPP_R) are
    "init=both_random": {"init": "both_random"},  # the baseline
    "init=alpha_zero": {"init": "alpha_zero"},
    "r=1": {"r": 1},
    "r=4": {"r": 4},
    "r=64": {"r": 64},
}
GRID = {  # each spans 30x around the rate benchmarks.recovery fixed before
    "spp": (4e-3, 1e-2, 3e-2, 1.2e-1),
    "lora*": (3e-4, 1e-3, 3e-3, 1e-2),
    "masked-ft": (1e-5, 3e-5, 1e-4, 3e-4),
}


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(
            rec.sizes(True),
            validation_tokens=256,
            mc_docs=4,
            seeds=2,
            grid_values=2,
            ablations=["init=both_random", "r=4"],
        )  # the tiny model's k_proj has 32 rows
    return dict(rec.sizes(False), validation_tokens=4096, mc_docs=None, seeds=3, grid_values=4,
                ablations=list(ABLATIONS))  # fmt: skip


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


def trained(name: str, pruned, data, s, lr: float, seed: int, spp_params: int | None,
            options: dict[str, Any] | None = None):  # fmt: skip
    """(merged model, run info) of one training run of `name` on `pruned`."""
    masks = rec.masks_of(pruned)
    torch.manual_seed(seed)
    model, details = rec.wrap(name, pruned, spp_params, options)
    params = rec.count_trainable(model)
    info = rec.train_method(model, data["train"], s, lr, seed)
    final = rec.finish(name, model, masks)
    after = rec.masks_of(final)
    kept = all(torch.equal(masks[n], after[n]) for n in masks)
    return final, {"lr": lr, "seed": seed, "trainable_params": params, "zeros_kept": kept,
                   **details, **info}  # fmt: skip


def mc(model, tokenizer, s) -> float | None:
    return rec.mc_accuracy(model, tokenizer, {"mc_docs": s["mc_docs"]})


# ---------------------------------------------------------------- units of work


@dataclass(frozen=True)
class Unit:
    """One row of the protocol, computed on its own from the dense model, the data, the
    seed and (for trained rows) the chosen rates: any unit gives the same numbers in any
    process, so `--jobs` splits them and `--unit KEY` reruns one."""

    kind: str  # "dense", "grid", "pruned", "run" or "ablation"
    setting: str = ""
    method: str = ""
    seed: int = 0
    lr: float = 0.0  # grid only: the rate tried
    variant: str = ""  # ablation only: a key of ABLATIONS

    @property
    def key(self) -> str:
        return "|".join(
            [self.kind, self.setting, self.method, str(self.seed), repr(self.lr), self.variant]
        )

    @classmethod
    def parse(cls, key: str) -> Unit:
        parts = key.split("|")
        if len(parts) != 6:
            raise ValueError(f"--unit {key!r}: expected kind|setting|method|seed|lr|variant")
        kind, setting, method, seed, lr, variant = parts
        return cls(kind, setting, method, int(seed), float(lr), variant)

    def cost(self) -> float:
        """Seconds on one thread of this project's CPU, measured per part (for scheduling)."""
        train = {"spp": 100.0, "lora*": 70.0, "masked-ft": 80.0}.get(self.method, 0.0)
        if self.variant == "r=64":
            train *= 1.3
        return {"dense": PPL + MC, "pruned": PPL, "grid": train + PPL, "ablation": train + PPL,
                "run": train + PPL}[self.kind] + (MC if self.with_mc else 0.0)  # fmt: skip

    @property
    def with_mc(self) -> bool:
        return self.kind == "dense" or (
            self.setting in MC_SETTINGS and (self.kind == "pruned" or (self.kind == "run"
                                                                      and self.seed == 0))
        )  # fmt: skip


PPL, MC, PRUNE = 18.0, 452.0, 40.0


def setting_of(label: str) -> tuple:
    return next(x for x in SETTINGS if x[0] == label)


def grid_of(name: str, s: dict[str, Any]) -> tuple[float, ...]:
    return GRID[name][:: max(1, len(GRID[name]) // s["grid_values"])][: s["grid_values"]]


def rate_units(s: dict[str, Any]) -> list[Unit]:
    """The learning-rate grids at TUNING_SETTING, and the dense model."""
    grid = [Unit("grid", TUNING_SETTING, m, 0, lr) for m in METHODS for lr in grid_of(m, s)]
    return [Unit("dense"), *grid]


def row_units(s: dict[str, Any], settings: list, ablations: bool) -> list[Unit]:
    """Every row that needs the chosen rates, in the order of the result file."""
    out = []
    for label, _, _, _, train_it in settings:
        out.append(Unit("pruned", label))
        for name in METHODS if train_it else ():
            out += [Unit("run", label, name, seed) for seed in range(s["seeds"])]
    if ablations:
        for variant in s["ablations"]:
            out += [Unit("ablation", TUNING_SETTING, "spp", seed, 0.0, variant)
                    for seed in range(s["seeds"])]  # fmt: skip
    return out


def schedule(units: list[Unit], jobs: int) -> list[list[Unit]]:
    """Units split over `jobs` processes, longest first onto the least loaded one (a
    process prunes each setting it meets once: PRUNE is charged the first time)."""
    loads, parts, seen = [0.0] * jobs, [[] for _ in range(jobs)], [set() for _ in range(jobs)]
    for unit in sorted(units, key=lambda u: -u.cost()):
        need = unit.setting if unit.kind != "dense" else None
        extra = [PRUNE if need and need not in seen[j] else 0.0 for j in range(jobs)]
        j = min(range(jobs), key=lambda j: loads[j] + extra[j])
        loads[j] += unit.cost() + extra[j]
        parts[j].append(unit)
        if need:
            seen[j].add(need)
    order = {u: i for i, u in enumerate(units)}
    # in the canonical order within a process, so each pruned model is made once
    return [sorted(p, key=lambda u: (u.setting, order[u])) for p in parts if p]


class Worker:
    """Runs units on one model and data set, pruning each setting once (the last kept)."""

    def __init__(self, dense, tokenizer, data, s) -> None:
        self.dense, self.tokenizer, self.data, self.s = dense, tokenizer, data, s
        self._pruned: tuple[str, torch.nn.Module] | None = None
        self._spp_params: dict[str, int] = {}

    def pruned(self, label: str) -> torch.nn.Module:
        if self._pruned is None or self._pruned[0] != label:
            self._pruned = None  # free the previous one first
            _, method, sparsity, refine, _ = setting_of(label)
            self._pruned = (label, pruned_copy(self.dense, self.data, self.s, method, sparsity,
                                               refine))  # fmt: skip
        return self._pruned[1]

    def spp_params(self, label: str) -> int:
        """SPP's trainable-parameter count at `label` (LoRA*'s rank is matched to it)."""
        if label not in self._spp_params:
            model, _ = rec.wrap("spp", self.pruned(label), None)
            self._spp_params[label] = rec.count_trainable(model)
        return self._spp_params[label]

    def __call__(self, unit: Unit, rates: dict[str, float] | None) -> dict[str, Any]:
        s, data, tok = self.s, self.data, self.tokenizer
        t0 = time.perf_counter()
        if unit.kind == "dense":
            row = {"ppl": ppl(self.dense, data["heldout"], s), "mc_acc": mc(self.dense, tok, s)}
        elif unit.kind == "pruned":
            model = self.pruned(unit.setting)
            row = {"ppl": ppl(model, data["heldout"], s),
                   "mc_acc": mc(model, tok, s) if unit.with_mc else None}  # fmt: skip
        else:
            lr = unit.lr if unit.kind == "grid" else rates[unit.method]
            options = ABLATIONS[unit.variant] if unit.kind == "ablation" else None
            params = self.spp_params(unit.setting) if unit.method == "lora*" else None
            final, info = trained(unit.method, self.pruned(unit.setting), data, s, lr,
                                  unit.seed, params, options)  # fmt: skip
            if unit.kind == "grid":
                row = {"validation_ppl": ppl(final, data["validation"], s),
                       "loss_last": info["loss_last"], "lr": lr}  # fmt: skip
            else:
                row = {"ppl": ppl(final, data["heldout"], s),
                       "mc_acc": mc(final, tok, s) if unit.with_mc else None, **info}  # fmt: skip
        head = {"kind": "lr-grid" if unit.kind == "grid" else unit.kind, "unit": unit.key}
        if unit.kind != "dense":
            head.update(setting=unit.setting)
        if unit.method:
            head.update(method=unit.method)
        if unit.variant:
            head.update(variant=unit.variant)
        return {**head, **row, "seconds": time.perf_counter() - t0}


def chosen_rates(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The validation-perplexity argmin of each method's grid (the first rate if none is
    finite)."""
    out = {}
    for name in METHODS:
        grid = [r for r in rows if r.get("kind") == "lr-grid" and r["method"] == name]
        finite = [r for r in grid if math.isfinite(r["validation_ppl"])]
        out[name] = (
            min(finite, key=lambda r: r["validation_ppl"])["lr"] if finite else grid[0]["lr"]
        )
    return out


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
            row = {"setting": label, "method": method, **_spread(list(seeds.values()))}
            if method == "spp" and by["lora*"]:
                common = sorted(set(seeds) & set(by["lora*"]))
                diffs = [seeds[k]["ppl"] - by["lora*"][k]["ppl"] for k in common]
                row["spp_minus_lora_mean"] = statistics.fmean(diffs) if diffs else None
                row["spp_minus_lora_std"] = _std(diffs)
                row["spp_better_in"] = f"{sum(d < 0 for d in diffs)}/{len(diffs)}"
            out.append(row)
    return out


def ablation_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SPP at TUNING_SETTING per variant; the protocol's own SPP runs are the baseline."""
    base = [r for r in rows if r.get("kind") == "run" and r["setting"] == TUNING_SETTING
            and r["method"] == "spp"]  # fmt: skip
    out = (
        [{"variant": f"init=paper, r={rec.SPP_R} (the runs above)", **_spread(base)}]
        if base
        else []
    )
    for variant in ABLATIONS:
        runs = [r for r in rows if r.get("kind") == "ablation" and r["variant"] == variant]
        if runs:
            out.append({"variant": variant, "trainable_params": runs[0]["trainable_params"],
                        **_spread(runs)})  # fmt: skip
    if base and len(out) > 1:
        out[0]["trainable_params"] = base[0]["trainable_params"]
    return out


def _spread(runs: list[dict[str, Any]]) -> dict[str, Any]:
    values = [r["ppl"] for r in runs]
    accs = [r["mc_acc"] for r in runs if r.get("mc_acc") is not None]
    return {"seeds": len(values), "ppl_mean": statistics.fmean(values), "ppl_std": _std(values),
            "mc_mean": statistics.fmean(accs) if accs else None,
            "loss_last_mean": statistics.fmean(r["loss_last"] for r in runs)}  # fmt: skip


def _std(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    def cell(v: Any, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    def spread(r: dict[str, Any]) -> str:
        return f"{r['ppl_mean']:.2f}" + (
            f" ± {r['ppl_std']:.2f}" if r["ppl_std"] is not None else ""
        )

    rates = next(r for r in rows if r.get("kind") == "chosen-rates")
    grid = [r for r in rows if r.get("kind") == "lr-grid"]
    lines = [
        f"Protocol on {meta['model']}, {meta['device']}, {meta['date']}: {meta['jobs']} "
        f"process(es) of {meta['cpu_threads']} thread(s) each, {meta.get('seconds', 0) / 60:.0f} "
        f"min wall; commit {meta.get('commit', '?')}; data: {meta['data']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Versions: {versions_line(meta)}.",
        "",
        f"Learning rates, validation perplexity at {TUNING_SETTING} (seed 0; chosen in bold):",
        "",
        "| method | " + " | ".join(f"rate {i + 1}" for i in range(max(len(grid_of(m, meta['sizes']))
                                                                   for m in METHODS))) + " |",
        "|---|" + "---:|" * max(len(grid_of(m, meta["sizes"])) for m in METHODS),
    ]  # fmt: skip
    for m in METHODS:
        tried = [r for r in grid if r["method"] == m]
        cells = [(f"**{r['lr']:g}: {r['validation_ppl']:.2f}**" if r["lr"] == rates[m]
                  else f"{r['lr']:g}: {cell(r['validation_ppl'], '.2f')}") for r in tried]  # fmt: skip
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    dense = next((r for r in rows if r.get("kind") == "dense"), None)
    lines += [
        "",
        "| setting | method | seeds | held-out ppl (mean ± std) | wiki_title_mc (seed 0) | "
        "final train loss | SPP − LoRA* ppl (paired mean ± std) | SPP better |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]  # fmt: skip
    if dense:
        lines.append(f"| dense | - | - | {dense['ppl']:.2f} | {cell(dense.get('mc_acc'), '.3f')} "
                     "| - | - | - |")  # fmt: skip
    table = summary(rows)
    for r in rows:
        if r.get("kind") != "pruned":
            continue
        lines.append(f"| {r['setting']} | pruned | - | {cell(r['ppl'], '.2f')} | "
                     f"{cell(r.get('mc_acc'), '.3f')} | - | - | - |")  # fmt: skip
        for t in (t for t in table if t["setting"] == r["setting"]):
            diff, dstd = t.get("spp_minus_lora_mean"), t.get("spp_minus_lora_std")
            paired = "-" if diff is None else f"{diff:+.2f}" + (f" ± {dstd:.2f}" if dstd else "")
            lines.append(
                f"| {t['setting']} | {t['method']} | {t['seeds']} | {spread(t)} | "
                f"{cell(t['mc_mean'], '.3f')} | {cell(t['loss_last_mean'], '.3f')} | {paired} | "
                f"{t.get('spp_better_in', '-')} |"
            )
    ablations = ablation_summary(rows)
    if len(ablations) > 1:
        lines += ["", f"SPP ablations at {TUNING_SETTING} (rate {rates['spp']:g}, the same seeds):",
                  "", "| variant | trainable params | seeds | held-out ppl (mean ± std) | "
                  "final train loss |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for a in ablations:
            lines.append(f"| {a['variant']} | {a.get('trainable_params', '-')} | {a['seeds']} | "
                         f"{spread(a)} | {cell(a['loss_last_mean'], '.3f')} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Held-out perplexity per trained setting (mean, error bars one standard deviation over
    seeds), the pruned model beside it; log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    table = summary(rows)
    labels = list(dict.fromkeys(t["setting"] for t in table))
    if not labels:
        return None
    pruned = {r["setting"]: r["ppl"] for r in rows if r.get("kind") == "pruned"}
    fig, ax = plt.subplots(figsize=(9, 4.5))
    series = [("pruned", None), *[(m, m) for m in METHODS]]
    width = 0.8 / len(series)
    for i, (name, method) in enumerate(series):
        xs = [k + (i - (len(series) - 1) / 2) * width for k in range(len(labels))]
        if method is None:
            ys, err = [pruned.get(x, math.nan) for x in labels], None
        else:
            found = {t["setting"]: t for t in table if t["method"] == method}
            ys = [found[x]["ppl_mean"] if x in found else math.nan for x in labels]
            err = [(found[x]["ppl_std"] or 0.0) if x in found else 0.0 for x in labels]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=name)
    dense = next((r["ppl"] for r in rows if r.get("kind") == "dense"), None)
    if dense:
        ax.axhline(dense, color="black", linewidth=0.8, linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("held-out Wikipedia perplexity (log)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- running


def setup(quick: bool, s: dict[str, Any]):
    """(dense model, tokenizer, data, model name, data name, settings)."""
    if quick:
        from tests.helpers import make_tiny_llama, tiny_tokenizer

        g = torch.Generator().manual_seed(0)
        data = {"calibration": torch.randint(0, 100, (s["calib"], s["calib_seqlen"]), generator=g),
                "train": torch.randint(0, 100, (s["train_windows"], s["seqlen"]), generator=g),
                "validation": torch.randint(0, 100, (s["validation_tokens"],), generator=g),
                "heldout": torch.randint(0, 100, (s["heldout_tokens"],), generator=g)}  # fmt: skip
        settings = [x for x in SETTINGS if x[0] in ("Wanda 2:4", "Wanda + DSnoT 2:4")]
        return (make_tiny_llama(seed=0), tiny_tokenizer(), data, "tiny LLaMA",
                "random token ids (quick mode)", settings)  # fmt: skip
    from spp_kernels.datasets import SOURCE

    dense, tokenizer = rec.load_smollm2()
    return (dense, tokenizer, wikipedia_data(tokenizer, s),
            "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", SOURCE, SETTINGS)  # fmt: skip


class Runner:
    """Computes units in this process (jobs = 1) or in `jobs` child processes of
    `--threads` threads each, and returns their rows in the units' order."""

    def __init__(self, args: argparse.Namespace, s: dict[str, Any], work: Path) -> None:
        self.args, self.s, self.work = args, s, work
        self._worker: Worker | None = None

    def local(self) -> Worker:
        if self._worker is None:
            dense, tok, data, *_ = setup(self.args.quick, self.s)
            self._worker = Worker(dense, tok, data, self.s)
        return self._worker

    def __call__(self, units: list[Unit], rates: dict[str, float] | None, phase: str,
                 log: ResultLog) -> list[dict[str, Any]]:  # fmt: skip
        if self.args.jobs == 1:
            rows = []
            for unit in units:
                rows.append(self.local()(unit, rates))
                log(rows[-1])
            return rows
        self.work.mkdir(parents=True, exist_ok=True)
        procs = []
        for i, part in enumerate(schedule(units, self.args.jobs)):
            spec = self.work / f"{phase}-{i}.spec.json"
            write_json_atomic(spec, {"units": [u.key for u in part], "rates": rates,
                                     "out": str(self.work / f"{phase}-{i}.json")})  # fmt: skip
            cmd = [sys.executable, "-m", "benchmarks.recovery_protocol", "--worker", str(spec),
                   "--threads", str(self.args.threads), "--seeds", str(self.s["seeds"])]  # fmt: skip
            cmd += ["--quick"] if self.args.quick else []
            env = {**os.environ, "OMP_NUM_THREADS": str(self.args.threads), "TQDM_DISABLE": "1"}
            with open(self.work / f"{phase}-{i}.log", "wb") as out:
                procs.append((i, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                  env=env)))  # fmt: skip
        failed = [i for i, p in procs if p.wait() != 0]
        if failed:
            raise RuntimeError(f"recovery_protocol: worker(s) {failed} of phase {phase} failed; "
                               f"see {self.work}/{phase}-<i>.log")  # fmt: skip
        found = {}
        for i, _ in procs:
            for row in json.loads((self.work / f"{phase}-{i}.json").read_text())["rows"]:
                found[row["unit"]] = row
        rows = [found[u.key] for u in units]
        for row in rows:
            log(row)
        return rows


def run_worker(args: argparse.Namespace, s: dict[str, Any]) -> int:
    spec = json.loads(Path(args.worker).read_text())
    dense, tok, data, *_ = setup(args.quick, s)
    worker, log = Worker(dense, tok, data, s), ResultLog(spec["out"], {"spec": args.worker})
    for key in spec["units"]:
        log(worker(Unit.parse(key), spec["rates"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = model_benchmark_parser("benchmarks.recovery_protocol", __doc__, rec.RESULTS,
                                    threads_help="CPU threads per process")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="processes side by side")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per (setting, method)")
    parser.add_argument("--no-ablations", action="store_true", help="skip the SPP ablations")
    parser.add_argument(
        "--unit",
        action="append",
        default=[],
        metavar="KEY",
        help="rerun only this row (its 'unit' in a result file); repeatable",
    )
    parser.add_argument(
        "--rates-from",
        metavar="JSON",
        help="with --unit: take the chosen rates from this result file",
    )
    parser.add_argument(
        "--report", metavar="JSON", help="only write the .md and .png of this result file again"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    s = sizes(args.quick)
    if args.seeds is not None:
        s["seeds"] = args.seeds
    if args.worker:
        return run_worker(args, s)
    if args.report:
        return report(Path(args.report))
    if args.unit:
        return rerun(args, s)
    model_name, data_name, labels = _names(args.quick)
    meta = {**metadata("cpu", args.quick), "model": model_name, "data": data_name, "sizes": s,
            "grid": GRID, "spp_r": rec.SPP_R, "ablations": ABLATIONS, "jobs": args.jobs,
            "commit": commit_state(),
            "command": command_line("benchmarks.recovery_protocol", argv)}  # fmt: skip
    out = Path(args.out)
    stem = f"recovery-protocol-{result_stem(meta)}"
    log = ResultLog(out / f"{stem}.json", meta)
    runner = Runner(args, s, out / f".{stem}-work")
    t0 = time.perf_counter()
    runner(rate_units(s), None, "rates", log)
    rates = chosen_rates(log.rows)
    log({"kind": "chosen-rates", **rates})
    settings = [x for x in SETTINGS if x[0] in labels]
    runner(row_units(s, settings, not args.no_ablations), rates, "rows", log)
    meta["seconds"] = time.perf_counter() - t0
    log.write(summary=summary(log.rows), ablations=ablation_summary(log.rows))
    report(out / f"{stem}.json")
    print((out / f"{stem}.md").read_text())
    return 0


def _names(quick: bool) -> tuple[str, str, list[str]]:
    """(model name, data name, setting labels) without loading anything."""
    if quick:
        return "tiny LLaMA", "random token ids (quick mode)", ["Wanda 2:4", "Wanda + DSnoT 2:4"]
    from spp_kernels.datasets import SOURCE

    return "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", SOURCE, [x[0] for x in SETTINGS]


def report(path: Path) -> int:
    """The .md and .png beside a result file, from its rows and meta."""
    data = json.loads(path.read_text())
    (path.with_suffix(".md")).write_text(markdown(data["rows"], data["meta"]))
    plot(data["rows"], path.with_suffix(".png"))
    return 0


def rerun(args: argparse.Namespace, s: dict[str, Any]) -> int:
    """The rows of `--unit` keys, printed as JSON lines (nothing is written)."""
    units = [Unit.parse(k) for k in args.unit]
    rates = None
    if args.rates_from:
        rows = json.loads(Path(args.rates_from).read_text())["rows"]
        rates = next(r for r in rows if r.get("kind") == "chosen-rates")
        rates = {m: rates[m] for m in METHODS}
    if rates is None and any(u.kind in ("run", "ablation") for u in units):
        raise SystemExit("recovery_protocol: --unit of a run or ablation needs --rates-from")
    dense, tok, data, *_ = setup(args.quick, s)
    worker = Worker(dense, tok, data, s)
    for unit in units:
        print(json.dumps(worker(unit, rates)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
