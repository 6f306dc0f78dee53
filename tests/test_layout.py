"""The architecture, checked: imports point one way down the tiers, csrc_triton imports no
host code, and no module in spp_kernels grows past 600 lines (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spp_kernels"
# Lower number = lower tier; a module may import its own tier's siblings and anything below.
TIERS = {
    "utils": 0,
    "sparsity": 1,
    "ops": 2,
    "adapters": 3,
    "pruning": 4,
    "training": 4,
    "evaluate": 4,
    "data": 4,
    "datasets": 1,
    "_version": 0,
    "lmeval_tasks": 1,
    "cli": 5,
}
TOP = 6  # spp_kernels/__init__.py, __main__.py, _compat.py: the public surface
MAX_LINES = 600


def _tier(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "spp_kernels":
        raise ValueError(module)
    return TIERS[parts[1]] if len(parts) > 1 and parts[1] in TIERS else TOP


def _imports(path: Path, module: str) -> list[str]:
    """Absolute spp_kernels / csrc_triton module names imported anywhere in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append(name)
    return [n for n in found if n.split(".")[0] in ("spp_kernels", "csrc_triton")]


def _modules(root: Path, package: str):
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        yield path, ".".join([package, *parts])


@pytest.mark.parametrize("path,module", list(_modules(PACKAGE, "spp_kernels")), ids=str)
def test_imports_point_down_the_tiers(path, module):
    own = _tier(module)
    for name in _imports(path, module):
        if name.startswith("csrc_triton"):
            assert module.startswith("spp_kernels.ops"), f"{module} imports device code {name}"
            continue
        assert _tier(name) <= own, f"{module} (tier {own}) imports {name} (tier {_tier(name)})"


def test_device_code_imports_no_host_code():
    for path, module in _modules(ROOT / "csrc_triton", "csrc_triton"):
        bad = [n for n in _imports(path, module) if n.startswith("spp_kernels")]
        assert not bad, f"{module} imports {bad}"


def test_modules_stay_small():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
