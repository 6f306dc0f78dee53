"""SPP on low-bit frozen bases, on real text: `python -m benchmarks.lowbit_quality`.

The embedded SmolLM2-135M-Instruct pruned 2:4 (Wanda, the calibration windows of
benchmarks.recovery), saved, then loaded with its projections in each base format:

  bf16      the pruned weights in bfloat16 (the reference base);
  int8      bitsandbytes LLM.int8() (Linear8bitLt);
  NF4       bitsandbytes NF4 with double quantization (QLoRA's base);
  2:4 int8  the packed 2:4 values as int8 codes, one scale per row (spp_kernels.sparsity.lowbit);
  2:4 fp8   as float8 e4m3 codes, one scale per row;
  2:4 int4  as int4 codes, one scale per --int4-group kept values (default: the largest
            group up to 128 dividing every packed row: 96 for SmolLM2's 288 and 768);

all computing in bfloat16 (adapters in float32, as QLoRA keeps them). For each format:
held-out Wikipedia perplexity of the base, then after the same SPP training (r = 16, the
steps, batch, schedule and seed of benchmarks.recovery; learning rate --spp-lr), merged (a
bitsandbytes base merges into a dequantized model; every zero is checked bitwise) and
evaluated in bfloat16. Beside them, QLoRA*: LoRA r = 8 on the
NF4 base, trained the same way (--lora-lr), merged into the dequantized weight and the
2:4 mask re-applied (the paper's LoRA* on a quantized base).

The 2:4 rows quantize round-to-nearest when SPP wraps the bfloat16 model
(SPPConfig(weight_format="nm", weight_dtype=...)); their base perplexity is the wrapped
model before training (beta = 0: exactly the quantized base), and they merge into
bfloat16 weights decoded from the codes. Writes benchmarks/results/lowbit-quality-<device>-<date>.{json,md}; --quick: a tiny random
model (a smoke test).
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import recovery as rec
from benchmarks.common import (
    ResultLog,
    command_line,
    commit_state,
    metadata,
    model_benchmark_parser,
    result_stem,
    versions_line,
)

FORMATS = ("bf16", "int8", "NF4", "2:4 int8", "2:4 fp8", "2:4 int4")
NM_FORMATS = {"2:4 int8": "int8", "2:4 fp8": "fp8", "2:4 int4": "int4"}


def int4_group(model: nn.Module, largest: int = 128) -> int:
    """The largest group size <= `largest` dividing the packed row (in_features / 2) of
    every 2:4 target layer."""
    import math

    rows = math.gcd(*(m.in_features // 2 for m in rec.targets(model).values()))
    return max(d for d in range(1, largest + 1) if rows % d == 0)


DEFAULT_SPP_LR, DEFAULT_LORA_LR = 3e-2, 3e-3  # benchmarks.recovery_protocol's chosen rates


def quantization(fmt: str) -> Any:  # bitsandbytes formats; the 2:4 ones load as bf16
    from transformers import BitsAndBytesConfig

    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if fmt == "NF4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)  # fmt: skip
    return None


def load(path: Path, fmt: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = quantization(fmt)
    kwargs = {"quantization_config": config, "device_map": "cpu"} if config else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()


def dense_of(layer: nn.Module) -> torch.Tensor:
    """A target layer's frozen weight, dense (bitsandbytes layers dequantized)."""
    from spp_kernels.ops.quantized import BnbWeight, is_bnb_layer

    return BnbWeight.of_layer(layer).dense() if is_bnb_layer(layer) else layer.weight.detach()


def ppl(model: nn.Module, data: dict[str, torch.Tensor], s: dict[str, Any]) -> float:
    with torch.no_grad():
        return rec.heldout_ppl(model, data, s)


def spp_run(path: Path, fmt: str, data, s, lr: float, seed: int,
            group: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Base perplexity, then SPP trained and merged: perplexity and zeros."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from spp_kernels.adapters import SPPConfig

    model = load(path, fmt)
    masks = {n: dense_of(m) == 0 for n, m in rec.targets(model).items()}
    low_bit = {}
    if fmt in NM_FORMATS:
        group = group or int4_group(model)
        low_bit = dict(weight_format="nm", weight_dtype=NM_FORMATS[fmt], weight_group_size=group)
    else:
        base_ppl = ppl(model, data, s)
    if fmt in ("int8", "NF4"):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed)
    spp = get_peft_model(model, SPPConfig(r=rec.SPP_R, dropout=0.0, adapter_dtype="float32",
                                          **low_bit))  # fmt: skip
    if low_bit:
        base_ppl = ppl(spp, data, s)  # beta = 0: the quantized base itself
    info = rec.train_method(spp, data["train"], s, lr, seed)
    merged = spp.merge_and_unload().to(torch.bfloat16).eval()
    kept = all(bool((m.weight[masks[n]] == 0).all()) for n, m in rec.targets(merged).items())
    extra = {"int4_group": group} if fmt == "2:4 int4" else {}
    return {"base_ppl": base_ppl, "ppl": ppl(merged, data, s), "zeros_kept": kept, **extra,
            **info}  # fmt: skip


def qlora_run(path: Path, data, s, lr: float, seed: int) -> dict[str, Any]:
    """LoRA r = 8 on the NF4 base, merged into the dequantized weights, mask re-applied."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from spp_kernels.adapters.bnb_layer import DequantizedLinear, finish_dequantized

    model = prepare_model_for_kbit_training(load(path, "NF4"), use_gradient_checkpointing=False)
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=sorted({n.rsplit(".", 1)[-1] for n in rec.targets(model)}))  # fmt: skip
    lora = get_peft_model(model, config)
    info = rec.train_method(lora, data["train"], s, lr, seed)
    with torch.no_grad():
        for name, layer in list(lora.named_modules()):
            if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
                continue
            w = dense_of(layer.base_layer).float()
            delta = layer.lora_B["default"].weight.float() @ layer.lora_A["default"].weight.float()
            merged = (w + delta * layer.scaling["default"]).masked_fill(w == 0, 0.0)
            plain = DequantizedLinear.holding(merged.to(torch.bfloat16), None, False)
            parent, _, child = name.rpartition(".")
            setattr(lora.get_submodule(parent), child, plain)
    model = lora.get_base_model()
    finish_dequantized(model)  # no bitsandbytes layer left: the model is plain again
    model = model.to(torch.bfloat16).eval()
    return {"ppl": ppl(model, data, s), **info}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Low-bit frozen bases on {meta['model']}, pruned 2:4 (Wanda), {meta['device']} "
        f"({meta['cpu_threads']} thread(s)), {meta['date']}, {meta.get('seconds', 0) / 60:.0f} "
        f"min; commit {meta.get('commit', '?')}; data: {meta['data']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Versions: {versions_line(meta)}.",
        "",
        f"SPP r = {rec.SPP_R}, lr {meta['spp_lr']:g}; QLoRA* r = 8, lr {meta['lora_lr']:g}; "
        f"{meta['sizes']['steps']} steps of {meta['sizes']['batch']} x {meta['sizes']['seqlen']} "
        "tokens; bfloat16 compute.",
        "",
        "| base format | method | held-out ppl of the base | after training, merged | "
        "zeros kept | final train loss | train s |",
        "|---|---|---:|---:|---|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        base = f"{r['base_ppl']:.2f}" if "base_ppl" in r else "-"
        kept = {True: "yes (bitwise)", False: "NO", None: "by construction"}[r.get("zeros_kept")]
        fmt = r["format"] + (f" (group {r['int4_group']})" if "int4_group" in r else "")
        lines.append(f"| {fmt} | {r['method']} | {base} | {r['ppl']:.2f} | {kept} | "
                     f"{r['loss_last']:.3f} | {r['train_seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = model_benchmark_parser("benchmarks.lowbit_quality", __doc__, rec.RESULTS)
    parser.add_argument("--spp-lr", type=float, default=DEFAULT_SPP_LR)
    parser.add_argument("--lora-lr", type=float, default=DEFAULT_LORA_LR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--int4-group", type=int, default=None,
                        help="kept values per int4 scale (default: the largest <= 128 dividing "
                        "every packed row)")  # fmt: skip
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma-separated subset of " + ", ".join(FORMATS))  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    from spp_kernels.pruning import prune

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        parser.error(f"--formats: unknown {unknown}; choose from {', '.join(FORMATS)}")
    s = rec.sizes(args.quick)
    if args.quick:
        from tests.helpers import make_tiny_llama

        dense = make_tiny_llama(seed=0, hidden_size=128, intermediate_size=256)
        g = torch.Generator().manual_seed(0)
        data = {"calibration": torch.randint(0, 100, (s["calib"], s["calib_seqlen"]), generator=g),
                "train": torch.randint(0, 100, (s["train_windows"], s["seqlen"]), generator=g),
                "heldout": torch.randint(0, 100, (s["heldout_tokens"],), generator=g)}  # fmt: skip
        model_name, data_name = "tiny LLaMA", "random token ids (quick mode)"
    else:
        from spp_kernels.datasets import SOURCE

        dense, tokenizer = rec.load_smollm2()
        data = rec.wikipedia_data(tokenizer, s)
        model_name, data_name = "SmolLM2-135M-Instruct (GGUF Q4_1 -> fp32)", SOURCE
    meta = {**metadata("cpu", args.quick), "model": model_name, "data": data_name, "sizes": s,
            "spp_lr": args.spp_lr, "lora_lr": args.lora_lr, "seed": args.seed,
            "commit": commit_state(), "command": command_line("benchmarks.lowbit_quality", argv)}  # fmt: skip
    out = Path(args.out)
    stem = f"lowbit-quality-{result_stem(meta)}"
    log = ResultLog(out / f"{stem}.json", meta)
    t0 = time.perf_counter()
    pruned = copy.deepcopy(dense)
    calib = data["calibration"]
    prune(pruned, "wanda", "2:4", calibration=calib, nsamples=calib.shape[0], progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pruned-2-4"
        pruned.save_pretrained(path)
        for fmt in formats:
            row = spp_run(path, fmt, data, s, args.spp_lr, args.seed, args.int4_group)
            log({"format": fmt, "method": "spp", **row})
            if fmt == "NF4":
                log({"format": "NF4", "method": "qlora*", "zeros_kept": None,
                     **qlora_run(path, data, s, args.lora_lr, args.seed)})  # fmt: skip
    meta["seconds"] = time.perf_counter() - t0
    log.write()
    (out / f"{stem}.md").write_text(markdown(log.rows, meta))
    print(markdown(log.rows, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
