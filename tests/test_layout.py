"""The architecture, checked: imports point one way down the tiers, csrc_triton imports no
host code, every module is named in its tier, the kernel tiers import without the Hugging
Face stack, and no module in spp_kernels grows past 600 lines (README, "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "spp_kernels"
# Lower number = lower tier; a module may import its own tier's siblings and anything below.
TIERS = {
    "compat": 0,
    "utils": 0,
    "sparsity": 1,
    "ops": 2,
    "adapters": 3,
    "pruning": 4,
    "training": 4,
    "evaluate": 4,
    "datasets": 1,
    "_version": 0,
    "lmeval_tasks": 1,
    "cli": 5,
}
# Every module, by tier (a new module is added here on purpose; a stale name fails).
MODULES = {
    "compat": [""],
    "utils": ["", "hf", "hyperparameters", "io", "lazy", "seeding", "shapes", "threads"],
    "sparsity": ["", "nm", "packed", "lowbit", "semi_structured", "compressed", "sparse24", "report",
                 "hf_quantizer", "hf_conversion", "lowbit_hf"],
    "ops": ["", "quantized", "operand", "backends", "validation", "groups", "dropout", "reference", "chunked",
            "sparse_dropout", "torch_backend", "triton_backend", "linear", "merge"],
    "adapters": ["", "config", "registration", "layer", "packed_layer", "bnb_layer", "lowbit_layer", "dispatch",
                 "model",
                 "peft_model", "checkpoint", "authors"],
}  # fmt: skip
TOP = 6  # spp_kernels/__init__.py, __main__.py: the public surface
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


def test_every_module_is_named_in_its_tier():
    found = {m for _, m in _modules(PACKAGE, "spp_kernels")}
    for tier, names in MODULES.items():
        named = {f"spp_kernels.{tier}" + (f".{n}" if n else "") for n in names}
        present = {
            m for m in found if m == f"spp_kernels.{tier}" or m.startswith(f"spp_kernels.{tier}.")
        }
        assert named == present, (
            f"{tier}: unnamed {sorted(present - named)}, stale {sorted(named - present)}"
        )
    tiers = {m.split(".")[1] for m in found if m.count(".")} - {"__main__"}
    assert tiers <= set(TIERS), f"modules outside every tier: {sorted(tiers - set(TIERS))}"


def test_kernel_tiers_import_without_the_hugging_face_stack():
    code = (
        "import sys, spp_kernels.ops, spp_kernels.sparsity.sparse24, spp_kernels.sparsity.packed\n"
        "from spp_kernels.ops import spp_linear\n"
        "heavy = sorted({'peft', 'transformers', 'accelerate'} & set(sys.modules))\n"
        "assert not heavy, heavy"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
