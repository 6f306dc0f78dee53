"""`spp quantize`: a pruned model with its N:M projections stored as low-bit codes."""

from __future__ import annotations

import argparse
import json
import sys

from . import checks, models, outdir
from .output import UserError, emit, format_table


def cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from ..sparsity.lowbit import QuantizedPackedLinear, quantize_model
    from ..sparsity.lowbit_hf import SppLowbitConfig

    with outdir.owned_output(args.out, args.force, {"--model": args.model}) as out:
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        model, tokenizer = models.load_model(args.model, dtype=dtype)
        checks.check_float_weights(model, "quantize", args.model)
        checks.check_finite_model(model, "quantize")
        targets = models.target_linears(model)
        dense_bytes = sum(m.weight.numel() * 2 for m in targets.values())  # as bf16
        try:
            plan = quantize_model(model, args.weight_dtype, args.weight_group_size,
                                  modules=list(targets))  # fmt: skip
        except (ValueError, TypeError) as e:  # a layer that is not N:M, or not nn.Linear
            lines = str(e).splitlines()
            if len(lines) > 1:
                print("\n".join(lines[1:21]), file=sys.stderr)
            raise UserError(lines[0].replace("quantize_model: ", "")) from None
        layers = [m for m in model.modules() if isinstance(m, QuantizedPackedLinear)]
        frozen = sum(m.quantized_weight().nbytes for m in layers)
        model.config.quantization_config = SppLowbitConfig(
            weight_dtype=args.weight_dtype, group_size=args.weight_group_size, modules=plan
        )
        info = {
            "weight_dtype": args.weight_dtype,
            "group_size": args.weight_group_size if args.weight_dtype == "int4" else None,
            "layers": len(plan),
            "patterns": sorted({f"{n}:{m}" for n, m in plan.values()}),
            "frozen_bytes": frozen,
            "fraction_of_dense_bf16": frozen / max(1, dense_bytes),
            "out": str(out),
            "source_model": str(args.model),
        }
        extra = {"spp_quantize.json": json.dumps(info, indent=2)}
        outdir.save_model_atomically(model, tokenizer, out, extra)
    rows = [
        ["layers quantized", len(plan)],
        [
            "values",
            args.weight_dtype
            + (f" (group {args.weight_group_size})" if args.weight_dtype == "int4" else ""),
        ],  # fmt: skip
        ["N:M patterns", ", ".join(info["patterns"])],
        ["frozen bytes / dense bf16", f"{info['fraction_of_dense_bf16']:.3f}"],
        ["saved to", str(out)],
    ]
    emit(args, info, format_table(rows, ["quantize", "value"]))
    return 0
