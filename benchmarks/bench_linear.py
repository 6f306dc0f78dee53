"""One linear layer, seven ways: time and peak memory of forward, backward and both.

Providers (same inputs, same dtype, one run; W (m, n) frozen and pruned, X (tokens, n)):
  triton     spp_kernels.spp_linear(backend="triton"): the fused SPP kernels (CUDA only)
  torch      spp_kernels.spp_linear(backend="torch"): the package's PyTorch backend
  naive      spp_kernels.reference.spp_linear_naive: W' = W * Repeat(alpha) * beta materialised
  blocked    spp_kernels.reference.spp_linear_blocked: the paper's Eq. 7 loop over r blocks
  lora       Y = X W^T + scale * (X A^T) B^T, A (8, n), B (m, 8) trainable: LoRA rank 8
  frozen     Y = X W^T with only the input gradient: the floor no adapter can beat
  masked-ft  W itself trainable, its gradient multiplied by the keep-mask (paper Eq. 3)
SPP uses r = 16, scale = 2, no dropout; every trainable tensor and X are in the layer's
dtype (bf16) and X always requires a gradient (the layer sits inside a network).

Modes: "forward" (training forward: autograd records the graph), "backward" (dY -> all
gradients, graph kept between calls), "full" (forward + backward). Time rows time exactly
that. Memory rows of mode "full" cover one training step: forward, backward and an AdamW
step whose state is created inside the measured window (so masked-ft pays for its m x n
gradient and AdamW moments, adapters for theirs); frozen has no step.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from spp_kernels import spp_linear
from spp_kernels.ops.reference import spp_linear_blocked, spp_linear_naive

from . import common

BENCH = "linear"
KERNEL = "spp_linear"
PROVIDERS = ("triton", "torch", "naive", "blocked", "lora", "frozen", "masked-ft")
SPP_PROVIDERS = ("triton", "torch", "naive", "blocked")
R = 16
LORA_RANK = 8
SCALE = 2.0
DTYPE = torch.bfloat16
SPARSITIES = ("2:4", "50%")

# (m, n) = (out_features, in_features) of the LLaMA projections.
FULL_SHAPES = {
    "llama-7b": ((4096, 4096), (11008, 4096), (4096, 11008)),
    "llama-13b": ((5120, 5120), (13824, 5120)),
    "llama-70b": ((8192, 8192), (28672, 8192)),
}
FULL_TOKENS = (2048, 8192, 16384)
# Quick mode: the LLaMA-7B shapes divided by 32, small enough for a shared CI CPU.
QUICK_SHAPES = {"llama-7b/32": ((128, 128), (344, 128), (128, 344))}
QUICK_TOKENS = (64, 256)

# The configuration summary.json reports on: LLaMA-7B shapes, 2:4 weights, this token count.
REFERENCE = {"full": ("llama-7b", 8192), "quick": ("llama-7b/32", 256)}


@dataclass(frozen=True)
class Case:
    family: str
    m: int
    n: int
    tokens: int
    sparsity: str

    @property
    def shape(self) -> str:
        return f"{self.m}x{self.n}"


def cases(quick: bool) -> list[Case]:
    """Every case, most important first, so a time budget cuts only the tail.

    Order: the reference family at the reference token count with 2:4 weights (what the
    summary needs), then the other families and token counts with 2:4 weights, then the
    unstructured 50% weights in the same order (quick mode: only its first case).
    """
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    tokens = QUICK_TOKENS if quick else FULL_TOKENS
    ref_family, ref_tokens = REFERENCE["quick" if quick else "full"]
    token_order = [ref_tokens, *(t for t in tokens if t != ref_tokens)]
    family_order = [ref_family, *(f for f in shapes if f != ref_family)]
    grid = [(f, m, n, t) for t in token_order for f in family_order for m, n in shapes[f]]
    structured = [Case(f, m, n, t, SPARSITIES[0]) for f, m, n, t in grid]
    unstructured = [Case(f, m, n, t, SPARSITIES[1]) for f, m, n, t in grid]
    return structured + (unstructured[:1] if quick else unstructured)


@dataclass
class InputSet:
    """One set of inputs and parameters for every provider; several are cycled."""

    x: torch.Tensor
    dy: torch.Tensor
    weight: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    ft_weight: torch.Tensor


def make_input_set(case: Case, device: str, seed: int) -> InputSet:
    gen = common.generator(device, seed)

    def rand(*shape: int, std: float = 1.0, grad: bool = True) -> torch.Tensor:
        t = common.random_tensor(shape, dtype=DTYPE, device=device, gen=gen, std=std)
        return t.requires_grad_(grad)

    m, n = case.m, case.n
    weight = common.pruned_weight(m, n, case.sparsity, dtype=DTYPE, device=device, gen=gen)
    ft_weight = weight.clone().requires_grad_(True)
    keep = (weight != 0).to(DTYPE)
    # masked fine-tuning (paper Eq. 3): the pruned entries never receive a gradient.
    ft_weight.register_hook(lambda g: g * keep)
    return InputSet(
        x=rand(case.tokens, n),
        dy=rand(case.tokens, m, grad=False),
        weight=weight,
        alpha=rand(R, n, std=n**-0.5),
        beta=rand(m, std=m**-0.5),
        lora_a=rand(LORA_RANK, n, std=n**-0.5),
        lora_b=rand(m, LORA_RANK, std=LORA_RANK**-0.5),
        ft_weight=ft_weight,
    )


Forward = Callable[[InputSet], torch.Tensor]


def _spp(backend: str) -> Forward:
    return lambda s: spp_linear(s.x, s.weight, s.alpha, s.beta, scale=SCALE, backend=backend)


def _lora(s: InputSet) -> torch.Tensor:
    return F.linear(s.x, s.weight) + SCALE * F.linear(F.linear(s.x, s.lora_a), s.lora_b)


FORWARDS: dict[str, Forward] = {
    "triton": _spp("triton"),
    "torch": _spp("torch"),
    "naive": lambda s: spp_linear_naive(s.x, s.weight, s.alpha, s.beta, scale=SCALE),
    "blocked": lambda s: spp_linear_blocked(s.x, s.weight, s.alpha, s.beta, scale=SCALE),
    "lora": _lora,
    "frozen": lambda s: F.linear(s.x, s.weight),
    "masked-ft": lambda s: F.linear(s.x, s.ft_weight),
}


def trainable(provider: str, s: InputSet) -> list[torch.Tensor]:
    """The tensors an optimizer updates for this provider (X's gradient is not one)."""
    if provider in SPP_PROVIDERS:
        return [s.alpha, s.beta]
    if provider == "lora":
        return [s.lora_a, s.lora_b]
    if provider == "masked-ft":
        return [s.ft_weight]
    return []


def _cycle(sets: list[InputSet]) -> Iterator[int]:
    return itertools.cycle(range(len(sets)))


def _time_rows(provider: str, sets: list[InputSet], device: str, quick: bool) -> dict:
    fwd = FORWARDS[provider]
    grads = [t for s in sets for t in (s.x, *trainable(provider, s))]
    turn = _cycle(sets)

    def forward() -> None:
        fwd(sets[next(turn)])

    def full() -> None:
        s = sets[next(turn)]
        fwd(s).backward(s.dy)

    outputs = [fwd(s) for s in sets]

    def backward() -> None:
        k = next(turn)
        outputs[k].backward(sets[k].dy, retain_graph=True)

    stats = {
        "forward": common.measure_time(forward, device, quick=quick, grad_to_none=grads),
        "backward": common.measure_time(backward, device, quick=quick, grad_to_none=grads),
    }
    outputs.clear()
    stats["full"] = common.measure_time(full, device, quick=quick, grad_to_none=grads)
    for t in grads:
        t.grad = None
    return stats


def _memory_rows(provider: str, s: InputSet, device: str) -> dict:
    fwd = FORWARDS[provider]
    params = trainable(provider, s)
    leaves = [s.x, *params]
    kept: list[torch.Tensor] = []
    stats = {"forward": common.measure_peak_memory(lambda: kept.append(fwd(s)), device)}
    stats["backward"] = common.measure_peak_memory(lambda: kept[0].backward(s.dy), device)
    kept.clear()
    for t in leaves:
        t.grad = None

    def step() -> None:
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        fwd(s).backward(s.dy)
        if opt is not None:
            opt.step()

    stats["full"] = common.measure_peak_memory(step, device)
    for t in leaves:
        t.grad = None
    return stats


def _extra(case: Case, n_sets: int) -> dict:
    return {
        **asdict(case),
        "shape": case.shape,
        "r": R,
        "lora_rank": LORA_RANK,
        "scale": SCALE,
        "dtype": str(DTYPE).removeprefix("torch."),
        "input_sets": n_sets,
    }


def measure_case(case: Case, providers: list[str], device: str, quick: bool) -> list[dict]:
    """Time and memory rows of every provider for one case (failures become notes)."""
    n_sets = 3 if device.startswith("cuda") else 2
    sets = [make_input_set(case, device, seed) for seed in range(n_sets)]
    extra = _extra(case, n_sets)
    rows = []
    for provider in providers:
        try:
            times = _time_rows(provider, sets, device, quick)
            memory = _memory_rows(provider, sets[0], device)
        except (RuntimeError, ValueError, TypeError) as e:  # OOM, unsupported shape...
            common.note(BENCH, f"{provider} failed at {case}: {type(e).__name__}: {e}"[:500])
            common.release_memory(device)
            continue
        for mode in common.MODES:
            rows.append(
                common.make_row(
                    KERNEL, provider, mode, "time", "tokens", case.tokens, times[mode], extra
                )
            )
            mem_extra = dict(extra, memory="peak minus resident inputs")
            if mode == "full":
                mem_extra["memory"] += "; one training step incl. AdamW state"
            rows.append(
                common.make_row(
                    KERNEL,
                    provider,
                    mode,
                    "memory",
                    "tokens",
                    case.tokens,
                    common.Stats.single(memory[mode]),
                    mem_extra,
                )
            )
    del sets
    common.release_memory(device)
    return rows


def run(quick: bool, device: str) -> list[dict]:
    """Measure every case in priority order until done or the runner's budget is spent."""
    providers = list(PROVIDERS)
    reason = common.triton_unavailable(device)
    if reason is not None:
        providers.remove("triton")
        common.note(BENCH, reason)
    if not quick and not device.startswith("cuda"):
        common.note(BENCH, "full shapes on a CPU take hours; use --quick on CPU")
    todo = cases(quick)
    rows: list[dict] = []
    for i, case in enumerate(todo):
        if common.out_of_time():
            skipped = ", ".join(f"{c.shape}/{c.tokens}/{c.sparsity}" for c in todo[i:])
            common.note(BENCH, f"time budget spent; {len(todo) - i} cases skipped: {skipped}")
            break
        print(f"[{BENCH}] {case}", flush=True)
        try:
            rows.extend(measure_case(case, providers, device, quick))
        except common.Interrupted:
            common.note(BENCH, f"interrupted (SIGTERM) during {case}; {len(todo) - i} cases lost")
            break
    return rows
