"""The static kernel report: every shipped config compiles for sm_90a without spilling and
without serialised wgmma (benchmarks/kernel_report.py; no GPU needed, triton's ptxas)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_shipped_config_compiles_spill_free_for_hopper(tmp_path):
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_report", "--arch", "sm_90a", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"forward", "dx", "dalpha_dbeta", "dalpha_reduce", "draw_keep_bits"} <= kernels
    assert {r["weight"] for r in rows} >= {"dense", "2:4"}
    spilling = [r["label"] for r in rows if r["spill_bytes"]]
    assert not spilling, f"shipped configs that spill at sm_90a: {spilling}"
    serialized = [r["label"] for r in rows if r["wgmma_serialized"]]
    assert not serialized, f"shipped configs whose wgmma ptxas serialises: {serialized}"
    gemms = [r for r in rows if r["kernel"] in ("forward", "dx", "dalpha_dbeta")]
    assert all(r["mma_sass"] > 0 for r in gemms), "a GEMM kernel lost its tensor-core MMA"
