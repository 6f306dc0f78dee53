"""The static kernel report: every shipped config of each architecture's table compiles for
that architecture (sm_90a: H100/H200, sm_80: A100) without spilling and, on sm_90a, without
serialised wgmma (benchmarks/kernel_report.py; no GPU needed, triton's ptxas)."""

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
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_every_shipped_config_compiles_spill_free(tmp_path, arch):
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_report", "--arch", arch, "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["meta"]["config_table"] == arch
    rows = report["rows"]
    kernels = {r["kernel"] for r in rows}
    assert {"forward", "dx", "dalpha_dbeta", "dalpha_reduce", "draw_keep_bits"} <= kernels
    assert {r["weight"] for r in rows} >= {"dense", "2:4"}
    spilling = [r["label"] for r in rows if r["spill_bytes"]]
    assert not spilling, f"shipped configs that spill at {arch}: {spilling}"
    serialized = [r["label"] for r in rows if r["wgmma_serialized"]]
    assert not serialized, f"shipped configs whose wgmma ptxas serialises: {serialized}"
    gemms = [r for r in rows if r["kernel"] in ("forward", "dx", "dalpha_dbeta")]
    assert all(r["mma_sass"] > 0 for r in gemms), "a GEMM kernel lost its tensor-core MMA"
