"""Training memory of SPP on LLaMA-7B / 13B / 70B, computed from shapes (not measured):
`python -m benchmarks.memory_estimate [--tokens-per-gpu 8192] [--gpus 8] [--r 16]`.

Per GPU, for `spp train --bf16` (frozen weights bf16, adapters fp32, AdamW):
  frozen      every parameter of the base in bf16; "packed 2:4" stores the seven targeted
              projections as N:M values + metadata (spp_kernels.sparsity.nm_packed_nbytes)
  adapters    alpha (r, n) + beta (m,) per targeted layer, fp32: weights + gradients +
              AdamW's two moments = 16 bytes per trainable parameter
  activations saved for backward, bf16, per token and decoder layer (SDPA/flash attention,
              which keeps no (seq x seq) scores): the inputs of the two RMSNorms, of q/k/v
              (shared), of o_proj, of gate/up (shared) and of down_proj, q/k/v/out of
              attention, gate and up outputs for SiLU-gating, i.e. (6 h + 2 kv + 3 i) * 2
              bytes, plus the dropout keep bits of each SPP layer's input (1 bit per
              element); with --gradient-checkpointing only each layer's input (2 h bytes)
              plus one layer's activations during its recomputation
  logits      the (tokens, vocab) logits in fp32 for the loss, and their gradient
Replicated (DDP) frozen weights on every GPU; with --fsdp (FSDP2) weights, adapters and
optimizer state are divided by the number of GPUs (activations are not). DeepSpeed ZeRO-3
(`--deepspeed configs/deepspeed/zero3.json`) partitions the dense bf16 weights (DeepSpeed
partitions parameters, not the packed format's buffers) and the adapters' states the same
way, and holds at most `stage3_max_live_parameters` (DeepSpeed's default 1e9) gathered
parameters at a time; with offload (`zero3_offload.json`) the partitions and AdamW live in
CPU memory and the GPU keeps only the gathered parameters, activations and logits. Allocator
fragmentation, CUDA context (~0.5 GiB) and temporary buffers (the row-chunked W_eff of the
large-token path, at most 64 MiB per call) come on top.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from spp_kernels.sparsity.nm import nm_packed_nbytes
from spp_kernels.utils import shapes as llama_shapes

GIB = 1024**3


SHAPES = {"LLaMA-7B": llama_shapes.LLAMA_7B, "LLaMA-13B": llama_shapes.LLAMA_13B,
          "LLaMA-2-70B": llama_shapes.LLAMA_2_70B}  # fmt: skip


def llama_compressed_fraction(config: Any, dtype: torch.dtype = torch.float16) -> float:
    """Expected size of a ``save_compressed`` LLaMA checkpoint over its dense size.

    All decoder linears (q, k, v, o, gate, up, down) packed 2:4; embeddings, lm_head and
    norms dense; ``config`` is a transformers LlamaConfig (or anything with its fields).
    File headers are ignored (a few kB). LLaMA-7B: about 0.58 (the linears alone: 0.5625).
    """
    hidden = config.hidden_size
    inter = config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    shapes = [(q_out, hidden), (kv_out, hidden), (kv_out, hidden), (hidden, q_out)]
    shapes += [(inter, hidden), (inter, hidden), (hidden, inter)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    layers = config.num_hidden_layers
    linear_dense = layers * sum(r * c for r, c in shapes) * itemsize
    linear_packed = layers * sum(nm_packed_nbytes(r, c, 2, 4, dtype) for r, c in shapes)
    embed = config.vocab_size * hidden * itemsize
    heads = embed if getattr(config, "tie_word_embeddings", False) else 2 * embed
    norms = (2 * layers + 1) * hidden * itemsize
    other = heads + norms
    return (linear_packed + other) / (linear_dense + other)


def projections(c: dict) -> list[tuple[int, int]]:
    """(out, in) of the seven targeted projections of one decoder layer of config `c`."""
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def n_params(c: dict) -> int:
    per_layer = sum(m * n for m, n in projections(c)) + 2 * c["hidden_size"]
    return c["num_hidden_layers"] * per_layer + (2 * c["vocab_size"] + 1) * c["hidden_size"]


def estimate(c: dict, tokens: int, gpus: int, r: int, fsdp: bool, ckpt: bool) -> dict[str, float]:
    import torch

    from spp_kernels.sparsity.nm import nm_packed_nbytes

    proj, layers = projections(c), c["num_hidden_layers"]
    dense = n_params(c) * 2
    targeted = layers * sum(m * n for m, n in proj) * 2
    packed = layers * sum(nm_packed_nbytes(m, n, 2, 4, torch.bfloat16) for m, n in proj)
    trainable = layers * sum(r * n + m for m, n in proj)
    shard = gpus if fsdp else 1
    h, kv, i = c["hidden_size"], proj[1][0], c["intermediate_size"]
    full_layer = tokens * ((6 * h + 2 * kv + 3 * i) * 2 + sum(n for _, n in proj) / 8)
    acts = tokens * layers * 2 * h + full_layer if ckpt else layers * full_layer
    logits = tokens * c["vocab_size"] * 4 * 2
    return {
        "frozen dense": dense / shard / GIB,
        "frozen packed 2:4": (dense - targeted + packed) / shard / GIB,
        "trainable params": trainable,
        "adapters+grad+AdamW": trainable * 16 / shard / GIB,
        "activations": acts / GIB,
        "logits": logits / GIB,
    }


def table(tokens: int, gpus: int, r: int) -> str:
    lines = [
        f"Per-GPU memory (GiB, computed from shapes): {tokens} tokens per GPU, r = {r}, bf16 "
        f"frozen weights, fp32 adapters, {gpus} GPUs under --fsdp.",
        "",
        "| model | params | SPP trainable | frozen dense (DDP) | frozen 2:4 (DDP) | frozen 2:4 "
        f"(FSDP2 /{gpus}) | adapters + AdamW | activations | activations (ckpt) | logits |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in SHAPES.items():
        ddp = estimate(c, tokens, gpus, r, fsdp=False, ckpt=False)
        fsdp = estimate(c, tokens, gpus, r, fsdp=True, ckpt=True)
        lines.append(
            f"| {name} | {n_params(c) / 1e9:.2f} B | {ddp['trainable params'] / 1e6:.1f} M | "
            f"{ddp['frozen dense']:.1f} | {ddp['frozen packed 2:4']:.1f} | "
            f"{fsdp['frozen packed 2:4']:.2f} | {ddp['adapters+grad+AdamW']:.2f} | "
            f"{ddp['activations']:.1f} | {fsdp['activations']:.1f} | {ddp['logits']:.1f} |"
        )
    return "\n".join(lines)


# ---- low-bit frozen bases (issue 22): bytes of one (m, n) projection per format ----------
# Packed N:M formats store n/2 kept values per row (2:4) plus the index metadata of
# `nm_packed_nbytes`; int8 and FP8 values carry one fp32 scale per row, int4 values one
# bf16 scale per 128 kept values (symmetric). bitsandbytes: NF4 packs two 4-bit codes per
# byte with a uint8 absmax per 64 weights (double quantization) and an fp32 absmax per 256
# of those; LLM.int8 stores int8 weights and an fp32 scale per row.
FORMATS = ("dense bf16", "bnb int8", "bnb NF4", "2:4 bf16", "2:4 int8", "2:4 fp8", "2:4 int4")


def format_nbytes(fmt: str, m: int, n: int, group_size: int = 128) -> float:
    """Bytes of a frozen (m, n) weight stored as `fmt` (one of FORMATS); `group_size`: the
    kept values per int4 scale (spp_kernels.sparsity.lowbit)."""
    kept = m * n // 2
    meta = nm_packed_nbytes(m, n, 2, 4, torch.bfloat16) - kept * 2
    table = {
        "dense bf16": m * n * 2,
        "bnb int8": m * n + 4 * m,
        "bnb NF4": m * n / 2 + m * n / 64 + 4 * m * n / (64 * 256),
        "2:4 bf16": kept * 2 + meta,
        "2:4 int8": kept + meta + 4 * m,
        "2:4 fp8": kept + meta + 4 * m,
        "2:4 int4": kept / 2 + meta + 2 * kept / group_size,
    }
    return table[fmt]


def frozen_bytes(c: dict, fmt: str) -> float:
    """Frozen bytes of a whole model: the targeted projections in `fmt`, everything else
    (embeddings, lm_head, norms) in bf16."""
    layers, proj = c["num_hidden_layers"], projections(c)
    linear = layers * sum(m * n for m, n in proj)
    return layers * sum(format_nbytes(fmt, m, n) for m, n in proj) + (n_params(c) - linear) * 2


def one_gpu_step(c: dict, fmt: str, tokens: int, r: int) -> dict[str, float]:
    """GiB of one training step on one GPU with --gradient-checkpointing: frozen weights in
    `fmt`, adapters + AdamW, activations, logits, and the total."""
    parts = estimate(c, tokens, 1, r, fsdp=False, ckpt=True)
    row = {
        "frozen": frozen_bytes(c, fmt) / GIB,
        "adapters+grad+AdamW": parts["adapters+grad+AdamW"],
        "activations": parts["activations"],
        "logits": parts["logits"],
    }
    row["total"] = sum(row.values())
    return row


def formats_table(tokens: int, r: int) -> str:
    lines = [
        "Frozen weights per format (GiB, from shapes; projections in the format, embeddings, "
        f"lm_head and norms bf16), and one GPU's step for the 70B ({tokens} tokens, r = {r}, "
        "--gradient-checkpointing).",
        "",
        "| format | " + " | ".join(SHAPES) + " | 70B one-GPU step total |",
        "|---|" + "---:|" * (len(SHAPES) + 1),
    ]
    for fmt in FORMATS:
        sizes = [frozen_bytes(c, fmt) / GIB for c in SHAPES.values()]
        step = one_gpu_step(SHAPES["LLaMA-2-70B"], fmt, tokens, r)["total"]
        lines.append(f"| {fmt} | " + " | ".join(f"{v:.1f}" for v in sizes) + f" | {step:.1f} |")
    return "\n".join(lines)


MAX_LIVE_PARAMETERS = 1e9  # DeepSpeed's stage3_max_live_parameters default


def totals(c: dict, tokens: int, gpus: int, r: int) -> dict[str, dict[str, float]]:
    """Per-GPU GiB (and host GiB for offload) of one model under each engine, all with
    activation checkpointing: {engine: {"gpu": ..., "host": ...}}."""
    ddp = estimate(c, tokens, gpus, r, fsdp=False, ckpt=True)
    fsdp = estimate(c, tokens, gpus, r, fsdp=True, ckpt=True)
    step = ddp["activations"] + ddp["logits"]
    live = min(MAX_LIVE_PARAMETERS, n_params(c)) * 2 / GIB
    zero3 = fsdp["frozen dense"] + fsdp["adapters+grad+AdamW"] + live + step
    return {
        "DDP, packed 2:4": {"gpu": ddp["frozen packed 2:4"] + ddp["adapters+grad+AdamW"] + step,
                            "host": 0.0},
        f"FSDP2 /{gpus}, packed 2:4": {
            "gpu": fsdp["frozen packed 2:4"] + fsdp["adapters+grad+AdamW"] + step, "host": 0.0},
        f"ZeRO-3 /{gpus}, dense bf16": {"gpu": zero3, "host": 0.0},
        f"ZeRO-3 /{gpus} + CPU offload": {
            "gpu": live + step, "host": ddp["frozen dense"] + ddp["adapters+grad+AdamW"]},
    }  # fmt: skip


def totals_table(tokens: int, gpus: int, r: int, model: str = "LLaMA-2-70B") -> str:
    lines = [
        f"{model}, {gpus} GPUs, {tokens} tokens per GPU, r = {r}, --gradient-checkpointing: "
        "per-GPU total (GiB, from shapes; host = CPU memory of the whole node).",
        "",
        "| engine | per GPU | host (node) |",
        "|---|---:|---:|",
    ]
    for name, row in totals(SHAPES[model], tokens, gpus, r).items():
        host = f"{row['host']:.1f}" if row["host"] else "-"
        lines.append(f"| {name} | {row['gpu']:.1f} | {host} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_estimate")
    parser.add_argument("--tokens-per-gpu", type=int, default=8192)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args(argv)
    print(table(args.tokens_per_gpu, args.gpus, args.r))
    print()
    print(totals_table(args.tokens_per_gpu, args.gpus, args.r))
    print()
    print(formats_table(args.tokens_per_gpu, args.r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
