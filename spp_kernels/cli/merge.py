"""`spp merge` (adapters into the weights, zero pattern checked bitwise) and `spp export-2to4`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import checks, models, outdir
from .output import UserError, emit, format_table

log = logging.getLogger(__name__)


def cmd_merge(args: argparse.Namespace) -> int:
    inputs = {"--model": args.model, "--adapter": args.adapter}
    with outdir.owned_output(args.out, args.force, inputs) as out:
        model, tokenizer = models.load_model(args.model, device=models.resolve_device(args.device))
        before = models.zero_masks(model)
        spp = models.load_adapter(model, args.adapter, allow_other_base=args.allow_other_base,
                                  float_values=True)  # fmt: skip
        try:
            merged = spp.merge_and_unload()  # refuses non-finite merged weights, naming the layer
        except ValueError as e:
            raise UserError(f"{e}; nothing was written") from None
        checks.check_finite_model(merged, "merge")
        checks.check_probe_output(merged, "merge")
        after = models.zero_masks(merged)
        changed = [n for n in before if not bool((before[n] == after[n]).all())]
        info = {
            "sparsity_before": models.sparsity_of(before),
            "sparsity_after": models.sparsity_of(after),
            "sparsity_preserved": not changed,
            "layers": len(before),
            "out": str(out),
        }
        if changed:
            raise UserError(
                f"merge changed the zero pattern of {len(changed)} layer(s), e.g. {changed[0]}; "
                "nothing was written"
            )
        extra = {"spp_merge.json": json.dumps(info, indent=2)}
        outdir.save_model_atomically(merged, tokenizer, out, extra)
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
    from ..utils.io import atomic_directory

    with outdir.owned_output(args.out, args.force, {"--model": args.model}) as out:
        model, tokenizer = models.load_model(args.model)
        checks.check_float_weights(model, "export-2to4", args.model)
        checks.check_finite_model(model, "export-2to4")
        masks = models.zero_masks(model)
        bad = {
            n: m for n, m in models.target_linears(model).items() if not sparse24.is_2to4(m.weight)
        }
        if bad:
            rows = [
                [n, f"{float((m.weight == 0).float().mean()):.3f}"]
                for n, m in list(bad.items())[:20]
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
        with atomic_directory(out) as tmp:
            manifest = sparse24.save_compressed(model, tmp, modules=list(masks))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    info = {
        "layers": len(masks),
        "sparsity": models.sparsity_of(masks),
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
