"""One linear layer, many ways: time and peak memory of forward, backward and both.

Providers (same inputs, same dtype, one run; W (m, n) frozen and pruned, X (tokens, n)):
  triton         spp_linear(backend="triton"), the path it picks (chunked cuBLAS at >= 512
                 tokens, fused kernels below; CUDA only)
  triton-fused   the fused one-pass kernels forced at any token count (fused vs chunked)
  triton-packed  spp_linear_packed(backend="triton"): the frozen weight N:M packed
  triton-forward, triton-dx, triton-dab   the three parts of `triton` timed alone (forward;
                 dX only; dalpha/dbeta only): per-kernel rows, time only
  cublas-gemm    Y = X W^T alone, one GEMM of the layer's shape: time only
  torch          spp_linear(backend="torch"): the package's PyTorch backend
  naive          spp_kernels.ops.reference.spp_linear_naive: W' = W * Repeat(alpha) * beta
  blocked        spp_kernels.ops.reference.spp_linear_blocked: the paper's Eq. 7 loop
  lora           Y = X W^T + scale * (D(X) A^T) B^T, A (8, n), B (m, 8): LoRA rank 8
  frozen         Y = X W^T with only the input gradient: the floor no adapter can beat
  masked-ft      W itself trainable, its gradient multiplied by the keep-mask (paper Eq. 3)
SPP uses r = 16, scale = 2 and the case's dropout (0 or the paper's 0.05; LoRA gets the same
rate on its input); every trainable tensor and X are in the layer's dtype (bf16) and X
always requires a gradient (the layer sits inside a network).

Modes: "forward" (training forward: autograd records the graph), "backward" (dY -> all
gradients, graph kept between calls), "full" (forward + backward). Time rows time exactly
that. Memory rows of mode "full" cover one training step: forward, backward and an AdamW
step whose state is created inside the measured window (so masked-ft pays for its m x n
gradient and AdamW moments, adapters for theirs); frozen has no step.

Order (`plan`): the reference configuration (LLaMA-7B shapes, 8192 tokens, 2:4) at p = 0
with every provider, then at p = 0.05, then the other families and token counts, then
unstructured 50 %: a time budget only cuts the tail. Rows are yielded as they are measured.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from spp_kernels import PackedWeight, spp_linear, spp_linear_packed
from spp_kernels.ops.reference import spp_linear_blocked, spp_linear_naive

from . import common

BENCH = "linear"
KERNEL = "spp_linear"
PROVIDERS = (
    "frozen", "cublas-gemm", "lora", "triton", "triton-fused", "triton-packed",
    "triton-forward", "triton-dx", "triton-dab", "naive", "blocked", "torch", "masked-ft",
)  # fmt: skip
SPP_PROVIDERS = ("triton", "triton-fused", "triton-packed", "torch", "naive", "blocked")
TRITON_PROVIDERS = ("triton", "triton-fused", "triton-packed", "triton-forward", "triton-dx",
                    "triton-dab")  # fmt: skip
TIME_ONLY = {"cublas-gemm": "forward", "triton-forward": "forward", "triton-dx": "backward",
             "triton-dab": "backward"}  # fmt: skip
DROPOUT = 0.05  # the paper's rate, the second reference configuration
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
    dropout: float = 0.0

    @property
    def shape(self) -> str:
        return f"{self.m}x{self.n}"


REFERENCE_PROVIDERS = PROVIDERS
DROPOUT_PROVIDERS = ("frozen", "lora", "triton", "triton-fused", "triton-packed",
                     "triton-forward", "triton-dx", "triton-dab", "naive", "blocked", "torch")  # fmt: skip
OTHER_PROVIDERS = ("frozen", "lora", "triton", "naive", "blocked", "torch")


def plan(quick: bool) -> list[tuple[Case, tuple[str, ...]]]:
    """(case, providers) in measuring order, most important first (see the module docstring)."""
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    tokens = QUICK_TOKENS if quick else FULL_TOKENS
    ref_family, ref_tokens = REFERENCE["quick" if quick else "full"]
    ref = [Case(ref_family, m, n, ref_tokens, SPARSITIES[0]) for m, n in shapes[ref_family]]
    out = [(c, REFERENCE_PROVIDERS) for c in ref]
    out += [
        (Case(c.family, c.m, c.n, c.tokens, c.sparsity, DROPOUT), DROPOUT_PROVIDERS) for c in ref
    ]
    families = [ref_family, *(f for f in shapes if f != ref_family)]
    others = [(f, m, n, t) for t in tokens for f in families for m, n in shapes[f]]
    others = [g for g in others if not (g[0] == ref_family and g[3] == ref_tokens)]
    out += [(Case(f, m, n, t, SPARSITIES[0]), OTHER_PROVIDERS) for f, m, n, t in others]
    unstructured = [
        Case(ref_family, m, n, ref_tokens, SPARSITIES[1]) for m, n in shapes[ref_family]
    ]
    out += [(c, OTHER_PROVIDERS) for c in (unstructured[:1] if quick else unstructured)]
    return out


def cases(quick: bool) -> list[Case]:
    """Every case of `plan`, in order."""
    return [case for case, _ in plan(quick)]


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
    packed: PackedWeight | None = None
    dropout: float = 0.0


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
        packed=PackedWeight.from_dense(weight, 2, 4) if case.sparsity == "2:4" else None,
        dropout=case.dropout,
    )


Forward = Callable[[InputSet], torch.Tensor]


def _spp(backend: str) -> Forward:
    return lambda s: spp_linear(
        s.x, s.weight, s.alpha, s.beta, scale=SCALE, dropout_p=s.dropout, backend=backend
    )


# Providers whose Triton path is pinned around every call they time (forward and backward).
PATH_OF = {"triton-fused": "fused"}


def _packed(s: InputSet) -> torch.Tensor:
    return spp_linear_packed(
        s.x, s.packed, s.alpha, s.beta, scale=SCALE, dropout_p=s.dropout, backend="triton"
    )


class _forced_path:
    """Pin the Triton backend's path (None: its own choice) for the calls inside."""

    def __init__(self, path: str | None) -> None:
        self.path, self.saved = path, None

    def __enter__(self) -> None:
        if self.path is not None:
            from spp_kernels.ops import triton_backend

            self.saved = triton_backend.CHUNKED_MIN_TOKENS
            triton_backend.CHUNKED_MIN_TOKENS = 1 if self.path == "chunked" else 2**62

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            from spp_kernels.ops import triton_backend

            triton_backend.CHUNKED_MIN_TOKENS = self.saved


def _lora(s: InputSet) -> torch.Tensor:
    xd = F.dropout(s.x, s.dropout) if s.dropout else s.x
    return F.linear(s.x, s.weight) + SCALE * F.linear(F.linear(xd, s.lora_a), s.lora_b)


def _reference(fn) -> Forward:
    return lambda s: fn(s.x, s.weight, s.alpha, s.beta, scale=SCALE, dropout_p=s.dropout)


FORWARDS: dict[str, Forward] = {
    "triton": _spp("triton"),
    "triton-fused": _spp("triton"),
    "triton-packed": _packed,
    "torch": _spp("torch"),
    "naive": _reference(spp_linear_naive),
    "blocked": _reference(spp_linear_blocked),
    "lora": _lora,
    "frozen": lambda s: F.linear(s.x, s.weight),
    "masked-ft": lambda s: F.linear(s.x, s.ft_weight),
}


def _part(part: str):
    """triton-forward / -dx / -dab: one part of the triton backend's step, alone."""
    from spp_kernels.ops import triton_backend
    from spp_kernels.ops.dropout import draw_keep_bits

    def run(s: InputSet) -> None:
        frozen = s.weight
        bits = draw_keep_bits(*s.x.shape, s.dropout, 7, s.x.device) if s.dropout else None
        x, a, b = s.x.detach(), s.alpha.detach(), s.beta.detach()
        if part == "forward":
            triton_backend.forward(x, frozen, a, b, None, SCALE, s.dropout, bits)
        else:
            dx = part == "dx"
            triton_backend.backward(s.dy, x, frozen, a, b, SCALE, s.dropout, bits, dx, not dx)

    return run


TIMED_ONLY: dict[str, Callable[[], Callable[[InputSet], None]]] = {
    "cublas-gemm": lambda: lambda s: torch.mm(s.x.detach(), s.weight.t()),
    "triton-forward": lambda: _part("forward"),
    "triton-dx": lambda: _part("dx"),
    "triton-dab": lambda: _part("dab"),
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

    pinned = PATH_OF.get(provider)

    def forward() -> None:
        with _forced_path(pinned):
            fwd(sets[next(turn)])

    def full() -> None:
        s = sets[next(turn)]
        with _forced_path(pinned):
            fwd(s).backward(s.dy)

    with _forced_path(pinned):
        outputs = [fwd(s) for s in sets]

    def backward() -> None:
        k = next(turn)
        with _forced_path(pinned):
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
    pinned = PATH_OF.get(provider)

    def fwd(s: InputSet) -> torch.Tensor:
        with _forced_path(pinned):
            return FORWARDS[provider](s)

    params = trainable(provider, s)
    leaves = [s.x, *params]
    kept: list[torch.Tensor] = []
    stats = {"forward": common.measure_peak_memory(lambda: kept.append(fwd(s)), device)}

    def backward() -> None:
        with _forced_path(pinned):
            kept[0].backward(s.dy)

    stats["backward"] = common.measure_peak_memory(backward, device)
    kept.clear()
    for t in leaves:
        t.grad = None

    def step() -> None:
        opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        with _forced_path(pinned):
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


def _timed_only_row(
    provider: str, sets: list[InputSet], case: Case, device: str, quick: bool, extra: dict
) -> dict:
    fn = TIMED_ONLY[provider]()
    turn = _cycle(sets)
    stats = common.measure_time(lambda: fn(sets[next(turn)]), device, quick=quick)
    mode = TIME_ONLY[provider]
    return common.make_row(KERNEL, provider, mode, "time", "tokens", case.tokens, stats, extra)


def measure_case(case: Case, providers: list[str], device: str, quick: bool):
    """Time and memory rows of every provider for one case, yielded provider by provider
    (failures become notes)."""
    n_sets = 3 if device.startswith("cuda") else 2
    sets = [make_input_set(case, device, seed) for seed in range(n_sets)]
    extra = _extra(case, n_sets)
    for provider in providers:
        try:
            if provider in TIME_ONLY:
                rows = [_timed_only_row(provider, sets, case, device, quick, extra)]
            else:
                times = _time_rows(provider, sets, device, quick)
                memory = _memory_rows(provider, sets[0], device)
                rows = []
                for mode in common.MODES:
                    rows.append(common.make_row(
                        KERNEL, provider, mode, "time", "tokens", case.tokens, times[mode], extra
                    ))  # fmt: skip
                    mem_extra = dict(extra, memory="peak minus resident inputs")
                    if mode == "full":
                        mem_extra["memory"] += "; one training step incl. AdamW state"
                    rows.append(common.make_row(
                        KERNEL, provider, mode, "memory", "tokens", case.tokens,
                        common.Stats.single(memory[mode]), mem_extra,
                    ))  # fmt: skip
        except (RuntimeError, ValueError, TypeError) as e:  # OOM, unsupported shape...
            common.note(BENCH, f"{provider} failed at {case}: {type(e).__name__}: {e}"[:500])
            common.release_memory(device)
            continue
        yield from rows
    del sets
    common.release_memory(device)


def run(quick: bool, device: str):
    """Measure the plan in priority order until done or the runner's budget is spent; rows
    are yielded as they are measured (an interruption keeps them)."""
    reason = common.triton_unavailable(device)
    if reason is not None:
        common.note(BENCH, reason)
    if not quick and not device.startswith("cuda"):
        common.note(BENCH, "full shapes on a CPU take hours; use --quick on CPU")
    todo = plan(quick)
    for i, (case, providers) in enumerate(todo):
        if common.out_of_time():
            skipped = ", ".join(
                f"{c.shape}/{c.tokens}/{c.sparsity}/p{c.dropout}" for c, _ in todo[i:]
            )
            common.note(BENCH, f"time budget spent; {len(todo) - i} cases skipped: {skipped}")
            break
        wanted = [p for p in providers if reason is None or p not in TRITON_PROVIDERS]
        if case.sparsity != "2:4":
            wanted = [p for p in wanted if p != "triton-packed"]
        print(f"[{BENCH}] {case}", flush=True)
        try:
            yield from measure_case(case, wanted, device, quick)
        except common.Interrupted:
            common.note(BENCH, f"interrupted (SIGTERM) during {case}; {len(todo) - i} cases lost")
            break
    if reason is None:
        from csrc_triton._launch import chosen_configs

        common.note(BENCH, f"autotuned configs: {chosen_configs()}"[:4000])
