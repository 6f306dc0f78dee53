"""What every benchmark shares: timing, peak memory, test data, metadata and result files.

Timing (median and 20th/80th percentiles, milliseconds):
  CUDA: `triton.testing.do_bench`, which warms up, flushes the L2 cache before every call
        and times each call with CUDA events; callers also rotate several input sets.
  CPU:  `time.perf_counter` around each call after a warm-up; quantiles as torch.quantile.
Peak memory (MiB, reported as "MB"): the peak of allocated tensor memory while the measured
callable runs, minus what was allocated just before it (the resident inputs, weights and
parameters), so it counts activations, temporaries, gradients and optimizer state created
inside the call.
  CUDA: torch.cuda.reset_peak_memory_stats / max_memory_allocated - memory_allocated.
  CPU:  the allocation events of torch.profiler (profile_memory=True): each carries the
        allocator's running total, whose maximum over the call is the peak.

A benchmark row (`make_row`) has the keys of ROW_KEYS; the runner adds device and version
metadata to each row when it writes the results.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from spp_kernels.utils.io import atomic_write_text

ROW_KEYS = (
    "kernel",
    "provider",
    "mode",
    "metric",
    "unit",
    "x_name",
    "x_value",
    "median",
    "p20",
    "p80",
    "extra",
)
MODES = ("forward", "backward", "full")
METRIC_UNITS = {"time": "ms", "memory": "MB"}
MIB = 2**20


@dataclass(frozen=True)
class Stats:
    """Median and 20th/80th percentiles of one measurement."""

    median: float
    p20: float
    p80: float

    @classmethod
    def single(cls, value: float) -> Stats:
        """A deterministic measurement (peak memory): all three quantiles equal."""
        return cls(value, value, value)


def make_row(
    kernel: str,
    provider: str,
    mode: str,
    metric: str,
    x_name: str,
    x_value: int | float,
    stats: Stats,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One result row of the shared schema; the unit follows from the metric."""
    if mode not in MODES:
        raise ValueError(f"make_row: mode must be one of {MODES}, got {mode!r}")
    if metric not in METRIC_UNITS:
        raise ValueError(f"make_row: metric must be one of {tuple(METRIC_UNITS)}, got {metric!r}")
    values = (stats.median, stats.p20, stats.p80)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"make_row: non-finite measurement {stats} for {kernel}/{provider}")
    return {
        "kernel": kernel,
        "provider": provider,
        "mode": mode,
        "metric": metric,
        "unit": METRIC_UNITS[metric],
        "x_name": x_name,
        "x_value": x_value,
        "median": stats.median,
        "p20": stats.p20,
        "p80": stats.p80,
        "extra": dict(extra or {}),
    }


# ---------------------------------------------------------------- time budget and notes
_deadline: float | None = None
_notes: list[dict[str, str]] = []


class Interrupted(BaseException):
    """SIGTERM arrived (e.g. from `timeout`): stop measuring, keep what was measured.

    A BaseException so that the benchmarks' `except RuntimeError` (OOM, unsupported shape)
    does not swallow it; benchmarks may catch it to return their partial rows.
    """


_interrupted = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _interrupted
    _interrupted = True
    raise Interrupted(f"signal {signum}")


def interrupted() -> bool:
    """True once SIGTERM has arrived."""
    return _interrupted


def interrupt_on_sigterm() -> None:
    """Turn SIGTERM into `Interrupted` in the main thread (the runner calls this)."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def set_deadline(seconds: float | None) -> None:
    """Give the benchmarks `seconds` from now (None: no limit); see `out_of_time`."""
    global _deadline
    _deadline = None if seconds is None else time.monotonic() + seconds


def time_left() -> float:
    """Seconds until the deadline set by the runner (inf without one)."""
    return math.inf if _deadline is None else _deadline - time.monotonic()


def out_of_time() -> bool:
    """True once the runner's time budget is spent (or SIGTERM came): start no new case."""
    return _interrupted or time_left() <= 0.0


def note(bench: str, message: str) -> None:
    """Record something the results should say (a provider not measured, a skipped case)."""
    _notes.append({"bench": bench, "note": message})
    print(f"[{bench}] note: {message}", flush=True)


def peek_notes() -> list[dict[str, str]]:
    """The notes so far, without clearing them."""
    return list(_notes)


def take_notes() -> list[dict[str, str]]:
    """The notes recorded since the last call, and forget them."""
    notes = list(_notes)
    _notes.clear()
    return notes


# ---------------------------------------------------------------- timing
@dataclass(frozen=True)
class TimingPlan:
    """How long to warm up and measure one callable."""

    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int


def timing_plan(quick: bool, device: str) -> TimingPlan:
    if device.startswith("cuda"):
        return TimingPlan(warmup_ms=10, rep_ms=40 if quick else 60, min_reps=5, max_reps=10_000)
    if quick:
        return TimingPlan(warmup_ms=5, rep_ms=25, min_reps=5, max_reps=200)
    return TimingPlan(warmup_ms=50, rep_ms=500, min_reps=10, max_reps=1000)


def quantile_stats(times_ms: Sequence[float]) -> Stats:
    t = torch.tensor(times_ms, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return Stats(*q)


def interleaved_times(
    steps: dict[str, Callable[[], Any]], warmup: int, reps: int
) -> dict[str, list[float]]:
    """{name: [ms per timed call]} (CPU wall time): `warmup` untimed rounds, then `reps`
    rounds in which every function runs once in turn, so machine load hits all alike."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _reset_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _cuda_times(
    fn: Callable[[], Any], plan: TimingPlan, grad_to_none: list[torch.Tensor] | None
) -> list[float]:
    """Per-call times (ms) from triton.testing.do_bench: L2 flushed before every call.

    do_bench runs as many calls as fit in rep_ms; when a call is slower than rep_ms /
    min_reps, a second do_bench tops the sample up to min_reps calls.
    """
    import triton.testing

    times = list(
        triton.testing.do_bench(
            fn,
            warmup=plan.warmup_ms,
            rep=plan.rep_ms,
            grad_to_none=grad_to_none,
            return_mode="all",
        )
    )
    missing = plan.min_reps - len(times)
    if missing > 0:
        rep = missing * float(torch.tensor(times).median())
        times += triton.testing.do_bench(
            fn, warmup=0, rep=rep, grad_to_none=grad_to_none, return_mode="all"
        )
    return times


def measure_time(
    fn: Callable[[], Any],
    device: str,
    *,
    quick: bool,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> Stats:
    """Median and 20/80 percentiles of fn's wall time in ms; gradients of grad_to_none are
    reset before every call so a backward pass never times gradient accumulation."""
    plan = timing_plan(quick, device)
    if device.startswith("cuda"):
        return quantile_stats(_cuda_times(fn, plan, list(grad_to_none) or None))
    _reset_grads(grad_to_none)
    fn()  # first call: lazy initialisation, never timed
    warm_end = time.perf_counter() + plan.warmup_ms / 1e3
    while time.perf_counter() < warm_end:
        _reset_grads(grad_to_none)
        fn()
    times: list[float] = []
    end = time.perf_counter() + plan.rep_ms / 1e3
    while len(times) < plan.max_reps and (len(times) < plan.min_reps or time.perf_counter() < end):
        _reset_grads(grad_to_none)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return quantile_stats(times)


# ---------------------------------------------------------------- memory
def _cpu_allocation_events(result: Any) -> list[tuple[int, int, int]]:
    """(time, size, running total) of every CPU allocation and free the profiler recorded."""
    events = []
    stack = list(result.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        fields = event.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((event.start_time_ns, fields.alloc_size, fields.total_allocated))
    return sorted(events)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = _cpu_allocation_events(prof.profiler.kineto_results)
    if not events:
        return 0
    _, first_size, first_total = events[0]
    baseline = first_total - first_size
    return max(0, max(total for _, _, total in events) - baseline)


def measure_peak_memory(fn: Callable[[], Any], device: str) -> float:
    """Peak tensor memory (MiB) allocated while fn runs, above what was allocated before."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - baseline) / MIB
    return _cpu_peak_bytes(fn) / MIB


def release_memory(device: str) -> None:
    """Return cached device memory so the next case starts from the same state."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def triton_unavailable(device: str) -> str | None:
    """Why the fused Triton kernels cannot be timed on `device`, or None when they can."""
    if not device.startswith("cuda"):
        return (
            "triton: not measured on CPU (the fused kernels run there only under "
            "TRITON_INTERPRET=1, far too slow to time meaningfully)"
        )
    try:
        from spp_kernels.ops import triton_backend  # noqa: F401
    except ImportError as e:
        return f"triton: not measured, spp_kernels.ops.triton_backend does not import ({e})"
    return None


# ---------------------------------------------------------------- test data
def generator(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def random_tensor(
    shape: Sequence[int], *, dtype: torch.dtype, device: str, gen: torch.Generator, std: float = 1.0
) -> torch.Tensor:
    """Normal random data (never zeros, so no kernel is flattered by trivial inputs)."""
    return (torch.randn(*shape, device=device, generator=gen) * std).to(dtype)


def pruned_weight(
    m: int,
    n: int,
    sparsity: str,
    *,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
) -> torch.Tensor:
    """A random (m, n) weight magnitude-pruned to `sparsity` ("2:4", "50%", ...)."""
    from spp_kernels.pruning.masks import keep_mask, parse_sparsity

    target = parse_sparsity(float(sparsity[:-1]) / 100 if sparsity.endswith("%") else sparsity)
    w = torch.randn(m, n, device=device, generator=gen) / math.sqrt(n)
    return w.masked_fill_(~keep_mask(w.abs(), target), 0.0).to(dtype)


# ---------------------------------------------------------------- metadata
def device_name(device: str) -> str:
    """The GPU's name, or the CPU model for "cpu"."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    return "CPU " + (platform.processor() or platform.machine())


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


# The libraries whose versions can move a committed number (model code, tokenisation,
# adapters, data, evaluation); recorded in every result file's meta. The versions the
# committed numbers were made with are pinned in constraints.txt (installed by the Makefile).
LIBRARIES = ("transformers", "peft", "accelerate", "safetensors", "tokenizers", "numpy",
             "datasets", "lm-eval", "trl", "bitsandbytes")  # fmt: skip


def library_versions() -> dict[str, str | None]:
    """{distribution: installed version, or None when it is not installed} of LIBRARIES."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def versions_line(meta: dict[str, Any]) -> str:
    """'torch 2.13.0+cpu, transformers 5.23.0, ...' for a result file's header."""
    libs = [f"{k} {v}" for k, v in meta.get("libraries", {}).items() if v is not None]
    return ", ".join([f"torch {meta['torch']}", *libs])


def metadata(device: str, quick: bool) -> dict[str, Any]:
    """Device, versions and time of a run; `label` says how to read the numbers."""
    now = datetime.now(timezone.utc)
    on_cpu = not device.startswith("cuda")
    if quick and on_cpu:
        label = (
            "CPU quick mode: tiny shapes on a CPU; not the issue's configuration. Fused "
            "Triton kernels are not measured on CPU (interpreter only). Timings are noisy."
        )
    elif quick:
        label = "GPU quick mode: tiny shapes; not the issue's configuration."
    elif on_cpu:
        label = "CPU full mode: the issue's shapes on a CPU; Triton kernels not measured."
    else:
        label = "GPU full mode: the issue's shapes (within the time budget, see notes)."
    return {
        "device": device_name(device),
        "device_type": "cuda" if not on_cpu else "cpu",
        "quick": quick,
        "label": label,
        "date": now.strftime("%Y-%m-%d"),
        "timestamp": now.isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "libraries": library_versions(),
        "cuda": torch.version.cuda if not on_cpu else None,
        "driver": _driver_version() if not on_cpu else None,
        "gpu": torch.cuda.get_device_name(0) if not on_cpu else None,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
    }


def _driver_version() -> str | None:
    """The NVIDIA driver version (nvidia-smi), or None."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (
        out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    )


def git_commit() -> str | None:
    """The commit being measured: $SPP_GIT_COMMIT (a copied tree has no .git), else git's."""
    import subprocess

    if os.environ.get("SPP_GIT_COMMIT"):
        return os.environ["SPP_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20,
            cwd=Path(__file__).resolve().parent,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def commit_state() -> str | None:
    """What a long run's result file names as its source: the short commit of this
    checkout, with '-dirty' when tracked files differ from it; None outside git."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=here, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, cwd=here).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() + ("-dirty" if dirty else "")) if done.returncode == 0 else None


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command a run was started with: `python -m module` and its arguments."""
    import sys

    return " ".join([f"python -m {module}", *(argv if argv is not None else sys.argv[1:])])


def model_benchmark_parser(module: str, doc: str | None, out: Path, *, threads: int = 1,
                           threads_help: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """The options every embedded-model benchmark (recovery, its protocol, low-bit quality)
    shares: --quick (a tiny random model), --threads and --out."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--threads", type=int, default=threads,
                        help=threads_help or f"CPU threads (default {threads})")  # fmt: skip
    parser.add_argument("--out", default=str(out), help="results directory")
    return parser


def slug(text: str) -> str:
    """Lower-case file-name form: "NVIDIA H200" -> "nvidia-h200"."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(part for part in out.split("-") if part)


def result_stem(meta: dict[str, Any]) -> str:
    """<device>-<date>, with "cpu" for any CPU and "-quick" for quick mode."""
    device = "cpu" if meta["device_type"] == "cpu" else slug(meta["device"])
    return f"{device}{'-quick' if meta['quick'] else ''}-{meta['date']}"


# ---------------------------------------------------------------- files
def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """JSON to `path` atomically (temporary file, fsync, os.replace)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(obj, indent=1) + "\n")


class ResultLog:
    """The rows of a long benchmark run: each is printed as a JSON line and the file
    {"meta", "rows"} rewritten atomically after it (a crash keeps the partial results)."""

    def __init__(self, path: str | os.PathLike, meta: dict) -> None:
        self.path, self.meta, self.rows = Path(path), meta, []

    def __call__(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.write()

    def write(self, **extra: Any) -> None:
        write_json_atomic(self.path, {"meta": self.meta, "rows": self.rows, **extra})
