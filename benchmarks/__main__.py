"""Run the benchmark suite: `python -m benchmarks [--quick] [--out DIR] [--only NAMES]`.

Imports every benchmarks/bench_<name>.py, calls its `run(quick, device)` and writes, under
--out (default benchmarks/results):
  <device>[-quick]-<date>.json  {"meta", "notes", "errors", "rows", "roofline"}; each row
                                also carries device, torch/triton versions and timestamp
  <device>[-quick]-<date>.md    tables of the same numbers
  <device>[-quick]-<date>.png   time and memory against tokens (when matplotlib is present)
  summary.json                  one entry per device and mode (benchmarks/summary.py)
Running a subset (--only/--exclude) merges into that day's file: rows of the benchmarks
that ran are replaced, the others kept. Exit status 1 if a benchmark raised.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from spp_kernels.utils.io import atomic_write_text

from . import common, roofline
from .plot import plot_results
from .summary import (
    headline_table,
    markdown_report,
    roofline_table,
    summary_entry,
    update_summary,
)

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = PACKAGE_DIR / "results"
ROW_META = ("device", "torch", "triton", "timestamp", "quick")


def discover() -> list[str]:
    """Names of the benchmark modules: "linear" for benchmarks/bench_linear.py, sorted."""
    return sorted(p.stem.removeprefix("bench_") for p in PACKAGE_DIR.glob("bench_*.py"))


def _names(text: str | None) -> list[str]:
    return [n.strip().removeprefix("bench_") for n in (text or "").split(",") if n.strip()]


def select(available: list[str], only: str | None, exclude: str | None) -> list[str]:
    """The benchmarks to run; unknown names raise ValueError listing the known ones."""
    wanted, dropped = _names(only), _names(exclude)
    unknown = [n for n in wanted + dropped if n not in available]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; available: {available}")
    chosen = wanted or available
    return [n for n in chosen if n not in dropped]


def _check_row(name: str, row: Any) -> dict:
    if not isinstance(row, dict):
        raise TypeError(f"bench_{name}.run must yield row dicts, got {type(row).__name__}")
    missing = [k for k in common.ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"bench_{name}: row {row} lacks keys {missing}")
    return row


def run_benchmarks(
    names: list[str],
    quick: bool,
    device: str,
    flush: Callable[[list[dict], list[dict]], None] | None = None,
) -> tuple[list[dict], list[dict], list[dict]]:
    """(rows, notes, errors) of running each named benchmark; a failure does not stop the rest.

    A benchmark's `run(quick, device)` returns or yields rows; they are kept as they come, so
    an interruption (SIGTERM) or a crash keeps every row measured before it. `flush(rows,
    errors)` is called after each row (it throttles itself) and after each benchmark.
    """
    rows: list[dict] = []
    errors: list[dict] = []
    for name in names:
        if common.interrupted():
            errors.append({"bench": name, "error": "not run: interrupted (SIGTERM)"})
            continue
        start = time.monotonic()
        print(f"== bench_{name} ({'quick' if quick else 'full'}, {device})", flush=True)
        count = 0
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            for row in module.run(quick, device) or ():
                row = _check_row(name, row)
                row["bench"] = name
                rows.append(row)
                count += 1
                if flush is not None:
                    flush(rows, errors)
        except common.Interrupted:
            errors.append({"bench": name, "error": f"interrupted (SIGTERM) after {count} rows"})
        except Exception as e:  # one broken benchmark must not lose the others' results
            traceback.print_exc()
            errors.append({"bench": name, "error": f"{type(e).__name__}: {e}"[:2000]})
            common.release_memory(device)
        if flush is not None:
            flush(rows, errors, force=True)
        print(f"== bench_{name}: {count} rows in {time.monotonic() - start:.1f} s", flush=True)
    return rows, common.take_notes(), errors


def _merge(path: Path, meta: dict, ran: list[str], new: dict[str, list]) -> dict[str, list]:
    """Keep the earlier rows, notes and errors of benchmarks that did not run this time."""
    if not path.exists():
        return new
    old = json.loads(path.read_text())
    if (old["meta"]["device"], old["meta"]["quick"]) != (meta["device"], meta["quick"]):
        return new
    return {
        key: [item for item in old.get(key, []) if item.get("bench") not in ran] + new[key]
        for key in ("rows", "notes", "errors")
    }


def write_results(
    out_dir: Path,
    meta: dict[str, Any],
    ran: list[str],
    rows: list[dict],
    notes: list[dict],
    errors: list[dict],
    *,
    plot: bool = True,
) -> dict[str, Path]:
    """Write JSON, markdown, PNG and summary.json for one run; returns the paths written."""
    for row in rows:
        row.update({k: meta[k] for k in ROW_META})
    stem = common.result_stem(meta)
    json_path = out_dir / f"{stem}.json"
    merged = _merge(json_path, meta, ran, {"rows": rows, "notes": notes, "errors": errors})
    data = {"meta": meta, **merged, "roofline": roofline.roofline_rows(merged["rows"])}
    common.write_json_atomic(json_path, data)
    entry = summary_entry(meta, merged["rows"], json_path.name)
    paths = {"json": json_path, "summary": out_dir / "summary.json"}
    update_summary(paths["summary"], entry)
    paths["markdown"] = out_dir / f"{stem}.md"
    report = markdown_report(meta, merged["rows"], merged["notes"], merged["errors"], entry)
    atomic_write_text(paths["markdown"], report)
    if plot:
        png = plot_results(merged["rows"], out_dir / f"{stem}.png", meta["label"])
        if png is not None:
            paths["plot"] = png
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CI, CPU)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument("--only", help="comma-separated benchmark names, e.g. linear,model")
    parser.add_argument("--exclude", help="comma-separated benchmark names to skip")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument(
        "--time-budget", type=float, help="seconds; benchmarks stop starting cases after it"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: 1 for --quick on CPU, so a shared, oversubscribed "
        "CI machine does not turn every parallel op into a wait; else torch's default)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--list", action="store_true", help="print the benchmark names and exit")
    args = parser.parse_args(argv)
    available = discover()
    if args.list:
        print("\n".join(available))
        return 0
    try:
        names = select(available, args.only, args.exclude)
    except ValueError as e:
        parser.error(str(e))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    threads = (
        args.threads
        if args.threads is not None
        else (1 if args.quick and device == "cpu" else None)
    )
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    common.set_deadline(args.time_budget)
    common.interrupt_on_sigterm()
    meta = common.metadata(device, args.quick)
    last_flush = [0.0]

    def flush(rows: list[dict], errors: list[dict], force: bool = False) -> None:
        # Partial results on disk every 20 s: a killed run (timeout, SIGKILL) keeps them.
        if force or time.monotonic() - last_flush[0] > 20:
            write_results(args.out, meta, names, [dict(r) for r in rows], common.peek_notes(),
                          errors, plot=False)  # fmt: skip
            last_flush[0] = time.monotonic()

    rows, notes, errors = run_benchmarks(names, args.quick, device, flush)
    paths = write_results(args.out, meta, names, rows, notes, errors, plot=not args.no_plot)
    merged_rows = json.loads(paths["json"].read_text())["rows"]
    entry = summary_entry(meta, merged_rows, paths["json"].name)
    print("\n".join(headline_table(entry) + roofline_table(merged_rows)))
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    for error in errors:
        print(f"ERROR in bench_{error['bench']}: {error['error']}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
