"""`spp merge` (adapters into the weights, zero pattern checked bitwise) and `spp export-2to4`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .models import (
    load_adapter,
    load_model,
    prepare_out_dir,
    resolve_device,
    save_model_atomically,
    sparsity_of,
    target_linears,
    zero_masks,
)
from .output import UserError, emit, format_table

log = logging.getLogger("spp_kernels.cli")


def cmd_merge(args: argparse.Namespace) -> int:
    out = prepare_out_dir(args.out, args.force)
    model, tokenizer = load_model(args.model, device=resolve_device(args.device))
    before = zero_masks(model)
    spp = load_adapter(model, args.adapter)
    merged = spp.merge_and_unload()
    after = zero_masks(merged)
    changed = [n for n in before if not bool((before[n] == after[n]).all())]
    info = {
        "sparsity_before": sparsity_of(before),
        "sparsity_after": sparsity_of(after),
        "sparsity_preserved": not changed,
        "layers": len(before),
        "out": str(out),
    }
    if changed:
        raise UserError(
            f"merge changed the zero pattern of {len(changed)} layer(s), e.g. {changed[0]}; "
            "nothing was written"
        )
    save_model_atomically(merged, tokenizer, out, {"spp_merge.json": json.dumps(info, indent=2)})
    rows = [
        ["layers merged", len(before)],
        ["sparsity before", f"{info['sparsity_before']:.4f}"],
        ["sparsity after", f"{info['sparsity_after']:.4f}"],
        ["zero pattern unchanged (bitwise)", "yes"],
        ["saved to", str(out)],
    ]
    emit(args, info, format_table(rows, ["merge", "value"]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from ..sparsity import sparse24

    out = prepare_out_dir(args.out, args.force)
    model, tokenizer = load_model(args.model)
    masks = zero_masks(model)
    bad = {n: m for n, m in target_linears(model).items() if not sparse24.is_2to4(m.weight)}
    if bad:
        rows = [
            [n, f"{float((m.weight == 0).float().mean()):.3f}"] for n, m in list(bad.items())[:20]
        ]
        print(format_table(rows, ["layer not 2:4", "zero fraction"]), file=sys.stderr)
        raise UserError(
            f"{len(bad)} of {len(masks)} targeted layers are not 2:4 sparse (listed above); "
            "prune with --sparsity 2:4 first; nothing was written"
        )
    if not torch.cuda.is_available():
        log.warning(
            "no CUDA GPU: the compressed checkpoint is written, but 2:4 sparse speed-ups "
            "(torch semi-structured kernels) need an Ampere or newer GPU"
        )
    from ..utils.io import atomic_directory

    with atomic_directory(out) as tmp:
        manifest = sparse24.save_compressed(model, tmp, modules=list(masks))
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    info = {
        "layers": len(masks),
        "sparsity": sparsity_of(masks),
        "bytes_on_disk": manifest.get("bytes_on_disk"),
        "fraction_of_dense": manifest.get("fraction_of_dense"),
        "out": str(out),
    }
    rows = [
        ["2:4 layers packed", len(masks)],
        ["sparsity", f"{info['sparsity']:.4f}"],
        ["bytes on disk", info["bytes_on_disk"]],
        ["fraction of dense", info["fraction_of_dense"]],
        ["saved to", str(out)],
    ]
    emit(args, info, format_table(rows, ["export-2to4", "value"]))
    return 0
