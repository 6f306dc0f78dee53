"""PNG plot of a results file: time and memory against tokens, one line per provider.

One column per (kernel, shape) whose rows are measured at two or more token counts (the
spp_linear shapes at 2:4 weights; other benchmarks' kernels with x_name "tokens" the same
way), mode "full" where a kernel has it. Row 1: median time with the 20-80 percentile band; row 2: peak memory. Needs
matplotlib; `plot_results` returns None without it (the GPU script treats the plot as
optional). Also a command: `python -m benchmarks.plot results/<file>.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from spp_kernels.utils.io import atomic_writer

PREFERRED_SPARSITY = "2:4"
X_NAME = "tokens"


def _panels(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """(kernel, shape) -> the rows to draw: mode full (if any), one sparsity."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["x_name"] != X_NAME:
            continue
        groups.setdefault((r["kernel"], str(r["extra"].get("shape", ""))), []).append(r)
    panels = {}
    for key, group in groups.items():
        modes = {r["mode"] for r in group}
        mode = "full" if "full" in modes else sorted(modes)[0]
        sparsities = [r["extra"].get("sparsity") for r in group]
        sparsity = PREFERRED_SPARSITY if PREFERRED_SPARSITY in sparsities else sparsities[0]
        chosen = [r for r in group if r["mode"] == mode and r["extra"].get("sparsity") == sparsity]
        if len({r["x_value"] for r in chosen}) >= 2:
            panels[key] = chosen
    return panels


def plot_results(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path | None:
    """Write the figure to `path` (atomically); None if matplotlib or plottable rows are missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    panels = _panels(rows)
    if not panels:
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7), squeeze=False)
    for col, ((kernel, shape), chosen) in enumerate(panels.items()):
        for row, (metric, label) in enumerate((("time", "time (ms)"), ("memory", "peak (MB)"))):
            ax = axes[row][col]
            for provider in dict.fromkeys(r["provider"] for r in chosen):
                pts = sorted(
                    (r["x_value"], r["median"], r["p20"], r["p80"])
                    for r in chosen
                    if r["provider"] == provider and r["metric"] == metric
                )
                if not pts:
                    continue
                x, med, lo, hi = zip(*pts)
                ax.plot(x, med, marker="o", label=provider)
                ax.fill_between(x, lo, hi, alpha=0.2)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(chosen[0]["x_name"])
            ax.set_ylabel(label)
            sparsity = chosen[0]["extra"].get("sparsity")
            ax.set_title(
                f"{kernel} {shape} ({chosen[0]['mode']}{', ' + sparsity if sparsity else ''})",
                fontsize=9,
            )
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot a benchmarks results JSON file.")
    parser.add_argument("results", type=Path, help="results/<device>-<date>.json")
    parser.add_argument("--out", type=Path, help="PNG path (default: next to the JSON)")
    args = parser.parse_args(argv)
    data = json.loads(args.results.read_text())
    out = args.out or args.results.with_suffix(".png")
    written = plot_results(data["rows"], out, data["meta"]["label"])
    print(written or "nothing plotted (matplotlib missing or no plottable rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
