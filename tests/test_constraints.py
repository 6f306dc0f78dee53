"""constraints.txt (the versions the committed numbers were made with) stays in step with
pyproject.toml, the Makefile installs with it, and result files record versions (issue 23)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
# Not pinned by design (constraints.txt says why): the Makefile's own torch / triton / numpy
# rules, and the dev tools, which move no number.
UNPINNED = {"torch", "triton", "numpy", "pytest", "pytest-benchmark", "ruff", "matplotlib"}


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in project["dependencies"] + extras]


def test_every_pin_lies_in_pyproject_ranges_and_every_dependency_is_pinned():
    pins = _pins()
    for req in _requirements():
        name = canonicalize_name(req.name)
        if name in UNPINNED:
            assert name not in pins, f"{name} is pinned but documented as unpinned"
            continue
        assert name in pins, f"constraints.txt has no pin for {req.name} ({req})"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {req}"
        )


def test_the_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt -e '\.\[", makefile)
    assert re.search(r"^\$\(STAMP\):.*constraints\.txt", makefile, re.M)


def test_result_files_record_the_library_versions():
    from importlib.metadata import version

    meta = common.metadata("cpu", quick=True)
    assert meta["libraries"]["transformers"] == version("transformers")
    assert meta["libraries"]["peft"] == version("peft")
    line = common.versions_line(meta)
    assert line.startswith(f"torch {meta['torch']}, transformers ") and "peft " in line
