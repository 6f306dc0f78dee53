"""Regenerate tests/pruning/data/dsnot_reference.safetensors with the DSnoT authors' code.

    python -m tests.pruning.make_dsnot_fixture /path/to/zyxxmu/DSnoT/lib/prune.py

Runs the per-layer body of the reference `prune_DSnoT` (from `DSnoT_metric = ...` to
`subset[name].weight.data[weight_mask] = 0`, taken from the file as it is, with
`initial_method="wanda"` and the reference's defaults) on seeded random layers and input
statistics, and stores inputs and the masks it produced. Read with `fetch
github:zyxxmu/DSnoT` (commit 4c029df); the repository has no licence file, so none of its
code is copied here: this script reads it from the given path.
"""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

OUT = Path(__file__).parent / "data" / "dsnot_reference.safetensors"
# (name, rows, columns, sparsity ratio, prune_n, prune_m): unstructured 50 % and 75 %, 2:4
# and 6:8 (the reference prunes prune_n of every prune_m: our 2:8), on an attention
# projection's name (where DSnoT applies). 512 columns: as in real layers, DSnoT's 50
# swaps per row never run out of candidates of one sign (on a 64-column layer the
# reference's pointers walk into kept weights and break the N:M pattern).
CASES = [("u50", 16, 512, 0.5, 0, 0), ("u75", 16, 512, 0.75, 0, 0),
         ("nm24", 16, 512, 0.5, 2, 4), ("nm28", 16, 512, 0.75, 6, 8)]  # fmt: skip


def reference_body(prune_py: Path) -> str:
    lines = prune_py.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "DSnoT_metric = subset[name]" in line)
    end = next(i for i in range(start, len(lines)) if "weight.data[weight_mask] = 0" in lines[i])
    return textwrap.dedent("\n".join(lines[start : end + 1]))


def run_case(body: str, weight, sq_norms, mean_row, var, ratio, prune_n, prune_m):
    layer = types.SimpleNamespace(weight=types.SimpleNamespace(data=weight.clone()))
    wrapped = types.SimpleNamespace(scaler_row=sq_norms, sum_metric_row=mean_row, var=var)
    args = types.SimpleNamespace(
        initial_method="wanda", skip_layer="mlp", skip_sub_layer="no_skip",
        max_cycle_time=50, update_threshold=0.1, pow_of_var_regrowing=1.0,
        pow_of_var_pruning=1.0, without_DSnoT=False, without_same_sign=True,
        sparsity_ratio=ratio,
    )  # fmt: skip
    namespace = {
        "torch": torch, "nn": torch.nn, "args": args, "prune_n": prune_n, "prune_m": prune_m,
        "subset": {"self_attn.q_proj": layer}, "wrapped_layers": {"self_attn.q_proj": wrapped},
        "name": "self_attn.q_proj", "return_reorder_indice": REORDER,
    }  # fmt: skip
    exec(compile(body, "DSnoT/lib/prune.py", "exec"), namespace)
    return namespace["weight_mask"]


REORDER = None  # the reference's return_reorder_indice, loaded from the file by main()


def main(argv: list[str]) -> int:
    global REORDER
    prune_py = Path(argv[0])
    source = prune_py.read_text()
    start = source.index("def return_reorder_indice")
    end = source.index("\ndef ", start + 1)
    scope = {"torch": torch}
    exec(compile(source[start:end], str(prune_py), "exec"), scope)
    REORDER = scope["return_reorder_indice"]
    body = reference_body(prune_py)
    tensors = {}
    for name, m, n, ratio, prune_n, prune_m in CASES:
        g = torch.Generator().manual_seed(len(tensors))
        weight = torch.randn(m, n, generator=g)
        sq_norms = torch.rand(n, generator=g) * 4 + 0.1
        mean_row = torch.randn(n, generator=g) * 0.5
        var = torch.rand(n, generator=g) + 0.05
        mask = run_case(body, weight, sq_norms, mean_row, var, ratio, prune_n, prune_m)
        tensors |= {f"{name}.weight": weight, f"{name}.sq_norms": sq_norms,
                    f"{name}.mean_row": mean_row, f"{name}.var": var,
                    f"{name}.pruned": mask.to(torch.uint8)}  # fmt: skip
    save_file(tensors, str(OUT), metadata={"source": "zyxxmu/DSnoT@4c029df lib/prune.py"})
    print(f"wrote {OUT} ({len(CASES)} cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
