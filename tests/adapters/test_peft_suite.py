"""Issue 19 item 5: peft's own generic tuner tests (tests/test_custom_models.py of the
installed peft's sdist) with SPP rows, built by `make install` (tests/peft_suite/build.py)
into .venv/peft_suite and run here, so conformance with peft cannot regress. Known
differences are strict xfails in the generated conftest, each with its reason."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(sys.prefix) / "peft_suite"


@pytest.mark.slow
def test_peft_generic_tuner_tests_pass_with_spp_rows():
    if not (SUITE / "test_custom_models.py").is_file():
        pytest.fail(f"{SUITE} is missing: `make install` builds it from peft's sdist")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(SUITE / "test_custom_models.py"), "-k", "SPP",
         "-q", "-p", "no:cacheprovider", "--rootdir", str(SUITE), "-c", os.devnull,
         "-W", "ignore::DeprecationWarning"],
        capture_output=True, text=True, env=env, timeout=1800,
    )  # fmt: skip
    tail = run.stdout[-4000:]
    assert run.returncode == 0, tail + run.stderr[-2000:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|xfailed|errors?)", tail)}
    print(tail.splitlines()[-1])
    assert counts.get("passed", 0) >= 700 and not counts.get("failed")
