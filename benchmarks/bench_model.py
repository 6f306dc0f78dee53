"""Whole-model training steps: SPP (fused, torch backend, naive) against LoRA.

A LLaMA-architecture decoder is built from a config (random init, no download; full mode
uses TinyLlama-1.1B's shape: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
heads, vocabulary 32000, about 1.1B parameters) in bf16. The seven projections of every
layer (q/k/v/o, gate/up/down) are magnitude-pruned to 2:4, everything is frozen, and one
adapter type is attached to those seven projections:
  spp-triton  spp_kernels.get_spp_model (SPPLinear.from_linear), backend "triton", r = 16
  spp-torch   the same with backend "torch"
  spp-naive   SPPLinear whose forward is spp_linear_naive (W' materialised), r = 16
  lora        plain LoRA, rank 8 (A kaiming-uniform, B = 0, scaling 2)
Rank 8 LoRA has about the same trainable-parameter count as SPP with r = 16 on these
projections (both counts are recorded; 0.94x for the full config). Each provider gets a
freshly built model from the same seed, runs warm-up steps, then timed steps of AdamW on
random token ids with labels = inputs. Rows: time per step (tokens/s in extra) and peak
memory of one step above the resident model, adapters and optimizer state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from spp_kernels.adapters.layer import SPPLinear
from spp_kernels.ops.reference import spp_linear_naive
from spp_kernels.utils import shapes

from . import common

BENCH = "model"
KERNEL = "llama_train_step"
# Order matters under a time budget: the two the summary compares come first.
# LoRA first: the model-level ratio needs it, and a time budget only cuts the tail.
PROVIDERS = ("lora", "spp-triton", "spp-torch", "spp-naive")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R = 16
SCALE = 2.0
LORA_RANK = 8
SPARSITY = (2, 4)
DTYPE = torch.bfloat16

FULL = dict(config=dict(shapes.TINYLLAMA_1B, max_position_embeddings=2048), batch=4, seq=2048,
            warmup=2, steps=5)  # fmt: skip
QUICK = dict(config=dict(shapes.TINY, max_position_embeddings=128), batch=2, seq=64, warmup=1,
             steps=3)  # fmt: skip


class NaiveSPPLinear(SPPLinear):
    """SPPLinear computed by the reference with W' materialised (the authors' default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spp_linear_naive(
            x,
            self.weight,
            self.alpha,
            self.beta,
            self.bias,
            scale=self.scale,
            dropout_p=self.dropout,
            training=self.training,
        )


class LoRALinear(nn.Module):
    """y = base(x) + scaling * (x A^T) B^T with the base frozen, A (rank, n), B (m, rank)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = scaling
        w = base.weight
        self.lora_a = nn.Parameter(
            torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype)
        )
        self.lora_b = nn.Parameter(
            torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype)
        )
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * F.linear(F.linear(x, self.lora_a), self.lora_b)


def build_model(cfg: dict, device: str, seed: int = 0) -> nn.Module:
    """A random-init LLaMA decoder in bf16 with its seven projections pruned to 2:4, frozen."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spp_kernels.pruning.magnitude import magnitude_prune_weight

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False)).to(DTYPE)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                module.weight.copy_(magnitude_prune_weight(module.weight, SPARSITY))
    return model.requires_grad_(False).train()


def _replace_targets(model: nn.Module, wrap: Callable[[nn.Linear], nn.Module]) -> None:
    targets = [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, wrap(linear))


def attach(model: nn.Module, provider: str) -> nn.Module:
    """The model to train: `model` with `provider`'s adapters on the seven projections."""
    if provider in ("spp-triton", "spp-torch"):
        backend = provider.removeprefix("spp-")
        from spp_kernels.adapters import SPPConfig, get_spp_model

        config = SPPConfig(
            r=R, scale=SCALE, dropout=0.0, target_modules=list(TARGETS), backend=backend
        )
        return get_spp_model(model, config)
    if provider == "spp-naive":
        _replace_targets(model, lambda lin: NaiveSPPLinear.from_linear(lin, r=R, scale=SCALE))
    elif provider == "lora":
        _replace_targets(model, lambda lin: LoRALinear(lin, LORA_RANK, SCALE))
    else:
        raise ValueError(f"bench_model: unknown provider {provider!r}; expected one of {PROVIDERS}")
    return model


def _count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def measure_provider(provider: str, plan: dict, device: str) -> list[dict]:
    """Time per step and peak step memory of one provider on a freshly built model."""
    model = attach(build_model(plan["config"], device), provider)
    trainable, total = _count(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = common.generator(device, 1)
    ids = torch.randint(
        0, plan["config"]["vocab_size"], (plan["batch"], plan["seq"]), device=device, generator=gen
    )

    def step() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(plan["warmup"]):
        step()
    times = []
    for _ in range(plan["steps"]):
        common.synchronize(device)
        start = time.perf_counter()
        step()
        common.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    stats = common.quantile_stats(times)
    memory = common.measure_peak_memory(step, device)
    tokens = plan["batch"] * plan["seq"]
    extra = {
        "model": "llama (random init)",
        **{k: plan["config"][k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        "batch": plan["batch"],
        "seq": plan["seq"],
        "dtype": str(DTYPE).removeprefix("torch."),
        "sparsity": f"{SPARSITY[0]}:{SPARSITY[1]}",
        "r": R,
        "lora_rank": LORA_RANK,
        "params_total": total,
        "params_trainable": trainable,
        "timed_steps": plan["steps"],
        "tokens_per_s": tokens / (stats.median / 1e3),
    }
    return [
        common.make_row(KERNEL, provider, "full", "time", "tokens_per_step", tokens, stats, extra),
        common.make_row(
            KERNEL,
            provider,
            "full",
            "memory",
            "tokens_per_step",
            tokens,
            common.Stats.single(memory),
            dict(extra, memory="one training step, peak minus resident model and optimizer"),
        ),
    ]


def run(quick: bool, device: str):
    """Rows of every provider, yielded as each is measured (LoRA first)."""
    plan = QUICK if quick else FULL
    providers = list(PROVIDERS)
    reason = common.triton_unavailable(device)
    if reason is not None:
        providers.remove("spp-triton")
        common.note(BENCH, reason.replace("triton:", "spp-triton:", 1))
    for i, provider in enumerate(providers):
        if common.out_of_time():
            common.note(BENCH, f"time budget spent; not measured: {', '.join(providers[i:])}")
            break
        print(f"[{BENCH}] {provider}", flush=True)
        try:
            yield from measure_provider(provider, plan, device)
        except (RuntimeError, ValueError, TypeError) as e:
            common.note(BENCH, f"{provider} failed: {type(e).__name__}: {e}"[:500])
        except common.Interrupted:
            common.note(BENCH, f"interrupted (SIGTERM); not measured: {', '.join(providers[i:])}")
            break
        common.release_memory(device)  # the provider's model is garbage by now
