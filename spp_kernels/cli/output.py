"""What `spp` prints: one-line user errors, plain-text tables and JSON results on stdout."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 1."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def format_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A plain-text table with left-aligned first column and right-aligned others."""
    cells = [[str(h) for h in header]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r: list[str]) -> str:
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        return "  ".join(parts).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,d}"
    return str(v)


def strict_json(result: Any) -> tuple[Any, dict[str, str]]:
    """(result with every non-finite float replaced by None, {dotted path: "nan"/"inf"}):
    JSON has no NaN, and strict parsers (jq, browsers) reject Python's bare NaN."""
    nonfinite: dict[str, str] = {}

    def clean(value: Any, path: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            nonfinite[path] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    return clean(result, ""), nonfinite


def emit(args: argparse.Namespace, result: dict[str, Any], table: str) -> None:
    """Print `result` as strict JSON (with --json) or `table` to stdout. Non-finite numbers
    become null, and the field "nonfinite" names each with its value ("nan", "inf")."""
    stream = getattr(args, "result_stream", None) or sys.stdout
    if args.json:
        clean, nonfinite = strict_json(result)
        if nonfinite:
            clean["nonfinite"] = nonfinite
        print(json.dumps(clean, indent=2, sort_keys=True, allow_nan=False), file=stream)
    else:
        print(table, file=stream)
    stream.flush()
