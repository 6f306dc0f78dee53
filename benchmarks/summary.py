"""From result rows to `results/summary.json` and the markdown report.

summary.json is a list with one entry per measured device (and mode: a CPU quick-mode entry
never replaces a full GPU one). The headline ratios use the spp_linear rows at the
reference configuration (LLaMA-7B shapes, 2:4 weights, 8192 tokens, bf16; the scaled-down
shapes and token count in quick mode), mode "full", each the geometric mean over the shapes
of the per-shape ratio:
  speedup_vs_naive    time(naive) / time(triton)
  speedup_vs_blocked  time(blocked) / time(triton)
  slowdown_vs_frozen  time(triton) / time(frozen)
  memory_vs_lora      peak(triton) / peak(lora), peak of one training step
and from the model-level run tokens_per_s_vs_lora = tokens/s(spp-triton) / tokens/s(lora).
A ratio is null when a provider was not measured at every reference shape. The same ratios
for the package's torch backend are under "torch_backend".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import bench_linear, bench_model, roofline
from .common import versions_line, write_json_atomic

LINEAR = bench_linear.KERNEL
MODEL = bench_model.KERNEL
SPARSITY = bench_linear.SPARSITIES[0]  # 2:4
# The targets, as (comparison, bound) on the measured ratio.
TARGETS = {
    "speedup_vs_naive": (">=", 2.0),
    "speedup_vs_blocked": (">=", 1.3),
    "slowdown_vs_frozen": ("<=", 1.6),
    "memory_vs_lora": ("<=", 1.05),
    "tokens_per_s_vs_lora": (">=", 0.8),
    "slowdown_vs_frozen_p005": ("<=", 2.7),
    "speedup_vs_naive_p005": (">=", 1.2),
}


def reference(quick: bool) -> tuple[list[str], int]:
    """The reference shapes ("m x n") and token count of the headline ratios."""
    family, tokens = bench_linear.REFERENCE["quick" if quick else "full"]
    shapes = (bench_linear.QUICK_SHAPES if quick else bench_linear.FULL_SHAPES)[family]
    return [f"{m}x{n}" for m, n in shapes], tokens


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _values(
    rows: list[dict], provider: str, metric: str, quick: bool, dropout: float = 0.0
) -> dict[str, float]:
    """shape -> median of the reference spp_linear rows of one provider at one dropout."""
    _, tokens = reference(quick)
    return {
        r["extra"]["shape"]: r["median"]
        for r in rows
        if r["kernel"] == LINEAR
        and r["provider"] == provider
        and r["metric"] == metric
        and r["mode"] == "full"
        and r["x_value"] == tokens
        and r["extra"].get("sparsity") == SPARSITY
        and r["extra"].get("dropout", 0.0) == dropout
    }


def _ratio(
    rows: list[dict], num: str, den: str, metric: str, quick: bool, dropout: float = 0.0
) -> float | None:
    """Geometric mean over the reference shapes of median(num) / median(den), or None."""
    shapes, _ = reference(quick)
    a = _values(rows, num, metric, quick, dropout)
    b = _values(rows, den, metric, quick, dropout)
    if not all(s in a and s in b and a[s] > 0 and b[s] > 0 for s in shapes):
        return None
    return _geomean([a[s] / b[s] for s in shapes])


def _model_ratio(rows: list[dict], spp: str) -> float | None:
    """tokens/s(spp) / tokens/s(lora) = step time(lora) / step time(spp), same tokens."""
    times = {
        r["provider"]: r["median"]
        for r in rows
        if r["kernel"] == MODEL and r["metric"] == "time" and r["mode"] == "full"
    }
    if spp not in times or "lora" not in times:
        return None
    return times["lora"] / times[spp]


def ratios(rows: list[dict], spp: str, quick: bool) -> dict[str, float | None]:
    """The headline ratios for one SPP provider ("triton" or "torch"), p = 0 and 0.05."""
    p = bench_linear.DROPOUT
    return {
        "speedup_vs_naive": _ratio(rows, "naive", spp, "time", quick),
        "speedup_vs_blocked": _ratio(rows, "blocked", spp, "time", quick),
        "slowdown_vs_frozen": _ratio(rows, spp, "frozen", "time", quick),
        "memory_vs_lora": _ratio(rows, spp, "lora", "memory", quick),
        "tokens_per_s_vs_lora": _model_ratio(rows, f"spp-{spp}"),
        "slowdown_vs_frozen_p005": _ratio(rows, spp, "frozen", "time", quick, p),
        "speedup_vs_naive_p005": _ratio(rows, "naive", spp, "time", quick, p),
        "packed_slowdown_vs_frozen": _ratio(rows, f"{spp}-packed", "frozen", "time", quick),
        "fused_vs_chunked": _ratio(rows, f"{spp}-fused", spp, "time", quick),
    }


def target_status(values: dict[str, float | None]) -> dict[str, dict[str, Any]]:
    """For each target: the bound, the measured value and whether it is met (None: unmeasured)."""
    out = {}
    for name, (op, bound) in TARGETS.items():
        value = values.get(name)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[name] = {"target": f"{op} {bound}", "measured": value, "met": met}
    return out


def summary_entry(meta: dict[str, Any], rows: list[dict], results_file: str) -> dict[str, Any]:
    """The summary.json entry of one run: metadata, reference configuration and ratios."""
    quick = bool(meta["quick"])
    triton = ratios(rows, "triton", quick)
    shapes, tokens = reference(quick)
    return {
        "device": meta["device"],
        "date": meta["date"],
        "timestamp": meta.get("timestamp"),
        "git_commit": meta.get("git_commit"),
        "gpu": meta.get("gpu"),
        "cuda": meta.get("cuda"),
        "driver": meta.get("driver"),
        "torch": meta["torch"],
        "triton": meta["triton"],
        "quick": quick,
        "label": meta["label"],
        "results_file": results_file,
        "reference": {
            "kernel": LINEAR,
            "shapes": shapes,
            "tokens": tokens,
            "sparsity": SPARSITY,
            "mode": "full (forward + backward); memory: one training step",
            "statistic": "geometric mean over the shapes of the per-shape ratio of medians",
        },
        **triton,
        "targets": target_status(triton),
        "torch_backend": ratios(rows, "torch", quick),
    }


def update_summary(path: str | Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Add `entry` to summary.json, replacing only the entry of the same device, mode and
    commit: every measured commit keeps its own entry (a history, not a last value)."""
    path = Path(path)
    entries = json.loads(path.read_text()) if path.exists() else []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")

    def key(e: dict[str, Any]) -> tuple:
        return e.get("device"), e.get("quick"), e.get("git_commit")

    entries = [e for e in entries if key(e) != key(entry)]
    entries.append(entry)
    entries.sort(
        key=lambda e: (
            e.get("quick", False),
            e.get("device", ""),
            e.get("timestamp") or e.get("date", ""),
        )
    )
    write_json_atomic(path, entries)
    return entries


# ---------------------------------------------------------------- markdown
def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines + [""]


def _linear_tables(rows: list[dict]) -> list[str]:
    linear = [r for r in rows if r["kernel"] == LINEAR]
    providers = list(dict.fromkeys(r["provider"] for r in linear))
    lines: list[str] = []
    for metric, unit in (("time", "ms, median"), ("memory", "MB, peak above inputs")):
        for sparsity in dict.fromkeys(r["extra"]["sparsity"] for r in linear):
            cells: dict[tuple, dict[str, float]] = {}
            for r in linear:
                if r["metric"] == metric and r["extra"]["sparsity"] == sparsity:
                    key = (
                        r["extra"]["shape"],
                        r["x_value"],
                        r["extra"].get("dropout", 0.0),
                        r["mode"],
                    )
                    cells.setdefault(key, {})[r["provider"]] = r["median"]
            lines.append(f"#### spp_linear {metric} ({unit}), {sparsity} weights\n")
            body = [
                [shape, str(tokens), f"{p:g}", mode, *(_fmt(v.get(q)) for q in providers)]
                for (shape, tokens, p, mode), v in cells.items()
            ]
            lines += _table(["shape (m x n)", "tokens", "dropout", "mode", *providers], body)
    return lines


def roofline_table(rows: list[dict]) -> list[str]:
    roof = roofline.roofline_rows(rows)
    if not roof:
        return []
    body = [
        [
            e["shape"],
            str(e["tokens"]),
            e["sparsity"],
            e["provider"],
            _fmt(e["time_ms"]),
            _fmt(e["gflop"]),
            _fmt(e["flop_per_byte"]),
            _fmt(e["tflops"]),
            _fmt(e["frozen_tflops"]),
            _fmt(e["floor_ms"]),
        ]
        for e in roof
    ]
    header = ["shape", "tokens", "sparsity", "provider", "fwd+bwd ms", "GFLOP", "FLOP/B"]
    header += ["TFLOP/s", "frozen TFLOP/s", "floor ms"]
    return [
        "### Roofline (forward + backward)\n",
        "FLOPs: 6Tmn for SPP (forward, dX, dY^T X), 4Tmn for frozen; 'floor ms' = SPP's "
        "FLOPs at the frozen layer's achieved rate. See benchmarks/roofline.py.\n",
        *_table(header, body),
    ]


def _model_table(rows: list[dict]) -> list[str]:
    model = [r for r in rows if r["kernel"] == MODEL]
    if not model:
        return []
    by_provider: dict[str, dict[str, dict]] = {}
    for r in model:
        by_provider.setdefault(r["provider"], {})[r["metric"]] = r
    body = []
    for provider, m in by_provider.items():
        t, mem = m.get("time"), m.get("memory")
        x = (t or mem)["extra"]
        body.append(
            [
                provider,
                str((t or mem)["x_value"]),
                f"{_fmt(t['median'])} [{_fmt(t['p20'])}, {_fmt(t['p80'])}]" if t else "-",
                f"{x['tokens_per_s']:,.0f}" if t and "tokens_per_s" in x else "-",
                _fmt(mem["median"]) if mem else "-",
                _count(x.get("params_trainable")),
                _count(x.get("params_total")),
            ]
        )
    x = model[0]["extra"]
    return [
        "### Model-level training step\n",
        f"LLaMA-architecture decoder, hidden {x.get('hidden_size')}, intermediate "
        f"{x.get('intermediate_size')}, {x.get('num_hidden_layers')} layers, batch "
        f"{x.get('batch')} x {x.get('seq')} tokens, {x.get('dtype')}, projections pruned "
        f"{x.get('sparsity')}, SPP r = {x.get('r')}, LoRA rank {x.get('lora_rank')}, AdamW.\n",
        *_table(
            [
                "provider",
                "tokens/step",
                "ms/step median [p20, p80]",
                "tokens/s",
                "peak MB above resident",
                "trainable",
                "total params",
            ],
            body,
        ),
    ]


def _other_tables(rows: list[dict]) -> list[str]:
    other = [r for r in rows if r["kernel"] not in (LINEAR, MODEL)]
    if not other:
        return []
    body = [
        [
            r["kernel"],
            r["provider"],
            r["mode"],
            f"{r['metric']} ({r['unit']})",
            f"{r['x_name']}={r['x_value']}",
            _fmt(r["median"]),
            _fmt(r["p20"]),
            _fmt(r["p80"]),
            ", ".join(
                f"{k}={v}"
                for k, v in r["extra"].items()
                if k in ("shape", "sparsity", "dtype", "tokens_per_s", "spp_over_lora_tokens_s")
            ),
        ]
        for r in other
    ]
    return [
        "### Other benchmarks\n",
        *_table(
            ["kernel", "provider", "mode", "metric", "x", "median", "p20", "p80", "extra"], body
        ),
    ]


def headline_table(entry: dict[str, Any]) -> list[str]:
    body = []
    for name, status in entry["targets"].items():
        met = {True: "yes", False: "no", None: "not measured"}[status["met"]]
        body.append(
            [
                name,
                status["target"],
                _fmt(status["measured"]),
                met,
                _fmt(entry["torch_backend"][name]),
            ]
        )
    ref = entry["reference"]
    return [
        "### Headline ratios\n",
        f"Shapes {', '.join(ref['shapes'])} at {ref['tokens']} tokens, {ref['sparsity']} "
        f"weights; {ref['statistic']}.\n",
        *_table(["ratio", "target", "triton", "met", "torch backend"], body),
    ]


def markdown_report(
    meta: dict[str, Any],
    rows: list[dict],
    notes: list[dict],
    errors: list[dict],
    entry: dict[str, Any],
) -> str:
    """The human-readable companion of a results JSON file."""
    lines = [
        f"# spp-kernels benchmarks: {meta['device']}, {meta['date']}\n",
        f"**{meta['label']}**\n",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, "
        f"{meta['cpu_threads']} CPU threads, {meta['timestamp']}. Method: benchmarks/NOTES.md.\n",
        f"Versions: {versions_line(meta)}.\n",
    ]
    if errors:
        lines += ["Errors:\n", *(f"- [{e['bench']}] {e['error']}" for e in errors), ""]
    if notes:
        lines += ["Notes:\n", *(f"- [{n['bench']}] {n['note']}" for n in notes), ""]
    lines += headline_table(entry)
    lines += _linear_tables(rows)
    lines += roofline_table(rows)
    lines += _model_table(rows)
    lines += _other_tables(rows)
    return "\n".join(lines).rstrip() + "\n"


def reference_table(rows: list[dict], quick: bool) -> list[str]:
    """spp_linear forward + backward at the reference shapes: median time and step peak."""
    shapes, tokens = reference(quick)
    linear = [
        r
        for r in rows
        if r["kernel"] == LINEAR
        and r["mode"] == "full"
        and r["x_value"] == tokens
        and r["extra"].get("sparsity") == SPARSITY
    ]
    providers = list(dict.fromkeys(r["provider"] for r in linear))
    value = {(r["extra"]["shape"], r["metric"], r["provider"]): r["median"] for r in linear}
    body = [
        [shape, label, *(_fmt(value.get((shape, metric, p))) for p in providers)]
        for shape in shapes
        for metric, label in (("time", "fwd+bwd ms"), ("memory", "step peak MB"))
    ]
    return [
        f"### spp_linear at {tokens} tokens, {SPARSITY} weights, forward + backward\n",
        *_table(["shape (m x n)", "metric", *providers], body),
    ]


def compact_report(meta: dict[str, Any], rows: list[dict], entry: dict[str, Any]) -> str:
    """The short form for a README: label, headline ratios, reference cases, model steps."""
    lines = [
        f"**{meta['label']}** {meta['device']}, torch {meta['torch']}, triton "
        f"{meta['triton']}, {meta['cpu_threads']} CPU thread(s), {meta['timestamp']}.\n",
        *headline_table(entry),
        *reference_table(rows, bool(meta["quick"])),
        *_model_table(rows),
    ]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.summary",
        description="Render a results JSON file as markdown (the full report, or --compact).",
    )
    parser.add_argument("results", type=Path, help="benchmarks/results/<device>-<date>.json")
    parser.add_argument("--compact", action="store_true", help="short form for a README")
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    meta, rows = data["meta"], data["rows"]
    entry = summary_entry(meta, rows, args.results.name)
    if args.compact:
        print(compact_report(meta, rows, entry), end="")
    else:
        print(markdown_report(meta, rows, data["notes"], data["errors"], entry), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
