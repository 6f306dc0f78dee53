"""Host-side launch preamble shared by every kernel: operand checks, dtype flags, autotuning.

`prepare` is the one preamble of every launch: it validates the operands (dense or N:M
packed frozen weight, adapters, activations, dropout bits) before anything is launched and
returns the derived launch arguments (`Launch`). The host op prepares once per call,
without checking again what it checked where it was called, and hands the same `Launch`
to each kernel of that call (`launch=`); a direct caller of a launcher gets the checks. Config pinning: with the environment
variable SPP_TRITON_CONFIGS=first, every autotuned kernel uses only its first GPU config
(no benchmarking: the GPU test run then compiles one kernel per specialisation).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import triton

# Read once at import: @triton.jit picks interpreter or compiler when the module loads.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_DOT = 16  # smallest tl.dot dimension the GPU accepts
PIN_FIRST_CONFIG = os.environ.get("SPP_TRITON_CONFIGS", "all") == "first"


@dataclass(frozen=True)
class Launch:
    """What `prepare` derived for the launches of one op call (shared by its kernels).

    m, n: the dense weight's shape (out_features, in_features); r: alpha's rows; tokens.
    w, stride_wm, stride_wn: the frozen weight's tensor (W itself, or the packed values) and
    its strides. meta, stride_meta, n_keep, group: its N:M metadata argument, row stride and
    constexpr pattern (meta is `w` itself, never read, and n_keep = group = 0 when W is
    dense). scales, stride_scale, values_kind, scale_group: low-bit codes' scales and the
    VALUES / SCALE_GROUP constexprs of nm_tiles (`w`, 0, 0, 1 for float values). dtype: the
    compute dtype W's tiles are decoded to. keep, stride_keep: the dropout bits argument
    (`w`, never read, when there is no dropout). upcast, precision: `dot_flags`.
    """

    m: int
    n: int
    r: int
    tokens: int
    w: torch.Tensor
    stride_wm: int
    stride_wn: int
    meta: torch.Tensor
    stride_meta: int
    n_keep: int
    group: int
    scales: torch.Tensor
    stride_scale: int
    values_kind: int
    scale_group: int
    dtype: torch.dtype
    keep: torch.Tensor
    stride_keep: int
    upcast: bool
    precision: str


def weight_parts(weight: Any) -> tuple[torch.Tensor, torch.Tensor | None, int, int, int]:
    """(values, meta or None, n_keep, group, n) of the frozen-weight operand: a dense (m, n)
    tensor, or a packed N:M weight, any object with `values`, `meta`, `n_keep`, `group` and
    `in_features` (spp_kernels.sparsity.PackedWeight; this package cannot import it)."""
    if isinstance(weight, torch.Tensor):
        return weight, None, 0, 0, weight.shape[-1] if weight.dim() else 0
    return weight.values, weight.meta, weight.n_keep, weight.group, weight.in_features


# nm_tiles' VALUES constexpr of each low-bit value format (spp_kernels.sparsity.lowbit)
VALUE_KINDS = {"int8": 1, "fp8": 2, "int4": 3}


@dataclass(frozen=True)
class LowBit:
    """The low-bit part of a quantized packed operand: codes' scales, VALUES, SCALE_GROUP
    and the compute dtype."""

    scales: torch.Tensor
    kind: int
    scale_group: int
    dtype: torch.dtype


def low_bit_parts(weight: Any) -> LowBit | None:
    """The LowBit of an operand with `value_format` (spp_kernels.sparsity.lowbit's
    QuantizedPackedWeight, duck-typed: this package cannot import it), else None."""
    value_format = getattr(weight, "value_format", None)
    if value_format is None:
        return None
    if value_format not in VALUE_KINDS:
        raise ValueError(f"csrc_triton: unsupported low-bit value format {value_format!r}")
    group = weight.group_size if value_format == "int4" else 1
    return LowBit(weight.scales, VALUE_KINDS[value_format], group, weight.dtype)


def _check_low_bit(w: torch.Tensor, low: LowBit, n_keep: int, group: int, n: int) -> torch.Tensor:
    """Codes and scales against their format; returns a stand-in with the shape (m, K) and
    compute dtype of float values (K elements of storage) for the packed-layout check."""
    m, kept = w.shape[0], n // group * n_keep if group else 0
    if low.kind == 3:
        code_dtype, code_cols, scale_shape = torch.uint8, kept // 2, (m, kept // low.scale_group)
        scale_dtype = torch.bfloat16
        if low.scale_group <= 0 or kept % low.scale_group or low.scale_group % max(n_keep, 1):
            raise ValueError(
                f"csrc_triton: int4 group {low.scale_group} must divide K={kept} and be a "
                f"multiple of N={n_keep}"
            )
    else:
        code_dtype = torch.int8 if low.kind == 1 else torch.uint8
        code_cols, scale_shape, scale_dtype = kept, (m,), torch.float32
    if w.dtype != code_dtype or w.dim() != 2 or w.shape[1] != code_cols:
        raise ValueError(
            f"csrc_triton: low-bit codes must be {code_dtype} (m, {code_cols}), got "
            f"{w.dtype} {tuple(w.shape)}"
        )
    if low.scales.dtype != scale_dtype or tuple(low.scales.shape) != scale_shape:
        raise ValueError(
            f"csrc_triton: low-bit scales must be {scale_dtype} {scale_shape}, got "
            f"{low.scales.dtype} {tuple(low.scales.shape)}"
        )
    if low.scales.device != w.device or w.stride(1) != 1 or low.scales.stride(-1) != 1:
        raise ValueError("csrc_triton: codes and scales on W's device with unit column stride")
    return torch.empty(kept, dtype=low.dtype, device=w.device).as_strided((m, kept), (0, 1))


def prepare(
    weight: Any,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    x: torch.Tensor | None = None,
    dy: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    check: bool = True,
) -> Launch:
    """Derive the launch arguments of an SPP kernel call, checking every operand first
    (`check`; the host op checks its operands once where it is called and passes
    check=False).

    weight: the frozen-weight operand, dense W (m, n) or a packed N:M weight (its values
    (m, n/M*N) and metadata in spp_kernels.sparsity.nm's format). x (tokens, n) and dy
    (tokens, m) share W's dtype; alpha (r, n), beta (m,), bias (m,) are that dtype or
    float32; keep (tokens, ceil(n/8)) uint8 dropout bits, required when dropout_p > 0.
    """
    w, meta, n_keep, group, n = weight_parts(weight)
    low = low_bit_parts(weight)
    if check:
        values = w if low is None else _check_low_bit(w, low, n_keep, group, n)
        dense_like = _dense_like(values, meta, n_keep, group, n)
        _check_operands(dense_like, alpha, beta, x=x, dy=dy, bias=bias)
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"csrc_triton: dropout_p must be in [0, 1), got {dropout_p}")
    m = w.shape[0]
    tokens = x.shape[0] if x is not None else (dy.shape[0] if dy is not None else 0)
    keep_arg, stride_keep = w, 0
    if dropout_p > 0.0:
        if check:
            shape = (tokens, (n + 7) // 8)
            if keep is None or keep.dtype != torch.uint8 or tuple(keep.shape) != shape:
                got = None if keep is None else f"{keep.dtype} {tuple(keep.shape)}"
                raise ValueError(f"csrc_triton: dropout needs uint8 keep bits {shape}, got {got}")
            if keep.device != w.device or keep.stride(1) != 1:
                raise ValueError("csrc_triton: keep bits must be on W's device with unit stride")
        keep_arg, stride_keep = keep, keep.stride(0)
    dtype = w.dtype if low is None else low.dtype
    upcast, precision = dot_flags(dtype)
    scales, stride_scale, kind, scale_group = (
        (w, 0, 0, 1)
        if low is None
        else (low.scales, low.scales.stride(0), low.kind, low.scale_group)
    )
    return Launch(
        m, n, alpha.shape[0], tokens, w, w.stride(0), w.stride(1),
        w if meta is None else meta, 0 if meta is None else meta.stride(0), n_keep, group,
        scales, stride_scale, kind, scale_group, dtype, keep_arg, stride_keep, upcast, precision,
    )  # fmt: skip


def _check_operands(
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    x: torch.Tensor | None = None,
    dy: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices the kernels rely on; raises before anything is launched.

    Strides are free: every kernel takes them as arguments.
    """
    if weight.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"csrc_triton: dtype {weight.dtype} is not supported by the Triton kernels "
            "(float32, float16, bfloat16); use the torch backend for float64"
        )
    if weight.dim() != 2:
        raise ValueError(f"csrc_triton: weight must be 2-D (m, n), got {tuple(weight.shape)}")
    m, n = weight.shape
    tokens = None
    for name, t, width in (("x", x, n), ("dy", dy, m)):
        if t is None:
            continue
        if t.dtype != weight.dtype:
            raise TypeError(
                f"csrc_triton: {name} dtype {t.dtype} differs from weight dtype {weight.dtype}"
            )
        if t.dim() != 2 or t.shape[1] != width or tokens not in (None, t.shape[0]):
            raise ValueError(
                f"csrc_triton: {name} must be 2-D (tokens, {width}) with the same tokens as "
                f"the other operands, got {tuple(t.shape)}"
            )
        tokens = t.shape[0]
    if alpha.dim() != 2 or alpha.shape[1] != n or not 1 <= alpha.shape[0] <= m:
        raise ValueError(
            f"csrc_triton: alpha must be (r, {n}) with 1 <= r <= {m}, got {tuple(alpha.shape)}"
        )
    for name, t, shape in (
        ("alpha", alpha, tuple(alpha.shape)),
        ("beta", beta, (m,)),
        ("bias", bias, (m,)),
    ):
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"csrc_triton: {name} must have shape {shape}, got {tuple(t.shape)}")
        if t.dtype not in (weight.dtype, torch.float32):
            raise TypeError(
                f"csrc_triton: {name} dtype {t.dtype} must be {weight.dtype} or torch.float32"
            )
    devices = {t.device for t in (weight, alpha, beta, x, dy, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(
            f"csrc_triton: all operands must be on one device, got {sorted(map(str, devices))}"
        )
    device = devices.pop()
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(
            f"csrc_triton: the kernels need CUDA tensors (got {device}); "
            "set TRITON_INTERPRET=1 before importing triton to run them on CPU"
        )


def _dense_like(
    w: torch.Tensor, meta: torch.Tensor | None, n_keep: int, group: int, n: int
) -> torch.Tensor:
    """A tensor with W's (m, n) shape, dtype and device for the operand checks: W itself
    when dense, a zero-stride view of one element when packed (never a dense copy). This
    is the device tier's check of the packed layout; the format itself is defined (and
    validated for users) in spp_kernels.sparsity.nm, which this package cannot import."""
    if meta is None:
        return w
    if group not in (4, 8) or not isinstance(n_keep, int) or not 1 <= n_keep < group:
        raise ValueError(
            f"csrc_triton: the N:M pattern must have M in (4, 8), 1 <= N < M; got {n_keep}:{group}"
        )
    if w.dim() != 2 or w.shape[1] % n_keep or w.shape[1] // n_keep * group != n:
        raise ValueError(
            f"csrc_triton: packed values must be 2-D (m, {n} // {group} * {n_keep}), got "
            f"{tuple(w.shape)}"
        )
    m, groups = w.shape[0], w.shape[1] // n_keep
    per_word = 32 // (n_keep * (2 if group == 4 else 3))
    expected = (m, -(-groups // per_word))
    if meta.dtype != torch.int32 or tuple(meta.shape) != expected:
        raise ValueError(
            f"csrc_triton: packed meta must be int32 of shape {expected} for values "
            f"{tuple(w.shape)} and {n_keep}:{group}, got {meta.dtype} {tuple(meta.shape)}"
        )
    if meta.device != w.device:
        raise ValueError(
            f"csrc_triton: values on {w.device} but meta on {meta.device}; use one device"
        )
    if w.stride(1) != 1 or meta.stride(1) != 1:
        raise ValueError("csrc_triton: packed values and meta need unit column stride")
    return w.new_empty(()).expand(m, n)


def check_out(out: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor, name: str) -> None:
    """`out` must be a tensor of `shape` with `like`'s dtype and device (any strides)."""
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"csrc_triton: {name} must be a {like.dtype} tensor of shape {tuple(shape)} on "
            f"{like.device}, got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) constexprs for `_tiles.mma` on operands of `dtype`.

    UPCAST only under the interpreter for bf16 (its bf16 tl.dot is wrong in triton 3.6).
    float32 uses IEEE products: the kernels then match the float64 reference to fp32
    accuracy instead of TF32's 10-bit mantissa.
    """
    upcast = INTERPRET and dtype == torch.bfloat16
    return upcast, ("ieee" if upcast or dtype == torch.float32 else "tf32")


def alpha_groups(block_rows: int, r: int, m: int) -> int:
    """NUM_GROUPS constexpr of `_tiles.alpha_rows_tile` for tiles of `block_rows` rows.

    block_rows consecutive rows o0.. touch at most (block_rows - 1) * r // m + 2 groups
    (floor(a + b) - floor(a) <= floor(b) + 1), and never more than r. Up to 4 such alpha
    rows are loaded as vectors and selected per row; beyond that (r close to m) 0 selects
    the 2-D gather.
    """
    bound = min((block_rows - 1) * r // m + 2, r, block_rows)
    return bound if bound <= 4 else 0


def tokens_bucket(tokens: int) -> int:
    """Autotuning key for the token count: the next power of two, so variable batch sizes
    reuse a tuned config instead of re-benchmarking every new length."""
    return triton.next_power_of_2(max(int(tokens), 1))


# Config tables by architecture. "sm_90a": Hopper (H100/H200: wgmma, 228 KB shared memory
# per SM); "sm_80": Ampere and Ada (A100: mma.sync, 164 KB; sm_86/89 have 100 KB, which
# every sm_80 config fits). Each table's configs compile without spills for its
# architecture (benchmarks/kernel_report.py --arch).
ARCHS = ("sm_80", "sm_90a")


def arch_of(capability: tuple[int, int]) -> str:
    """The config table of a CUDA compute capability: sm_90a from 9.0, else sm_80."""
    return "sm_90a" if tuple(capability) >= (9, 0) else "sm_80"


def _launch_device(named_args: dict, kwargs: dict) -> torch.device | None:
    for value in (*named_args.values(), *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return None


def config_label(config: triton.Config) -> str:
    """'64x128x32 w8 s3': a config's BLOCK_* sizes (in order), warps and stages, as the
    kernel report's labels print them."""
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK_"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def without(
    tables: dict[str, list[triton.Config]], drop: dict[str, list[str]]
) -> dict[str, list[triton.Config]]:
    """Each architecture's table less the configs labelled (`config_label`) in `drop`: the
    subset a variant uses where the others spill (the same objects, not copies)."""
    for arch, labels in drop.items():
        unknown = set(labels) - {config_label(c) for c in tables[arch]}
        if unknown:
            raise ValueError(f"csrc_triton: no {arch} config {sorted(unknown)} to drop")
    return {a: [c for c in t if config_label(c) not in drop.get(a, ())] for a, t in tables.items()}


def arch_pruner(
    tables: dict[str, list[triton.Config]],
    low_bit_tables: dict[str, list[triton.Config]] | None = None,
) -> Callable:
    """triton.autotune's early_config_prune: keep the configs of the launch device's table
    (the device of the first tensor argument; the current CUDA device if none), its
    low-bit subset when the weight holds low-bit codes (constexpr VALUES > 0)."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list:
        device = _launch_device(named_args, kwargs)
        arch = arch_of(torch.cuda.get_device_capability(device))
        low_bit = low_bit_tables is not None and kwargs.get("VALUES", named_args.get("VALUES"))
        keep = low_bit_tables[arch] if low_bit else tables[arch]
        return [c for c in configs if any(c is k for k in keep)]

    return prune


def autotune(
    gpu_configs: dict[str, list[triton.Config]],
    interpreter_config: triton.Config,
    key: list[str],
    dot_blocks: tuple[str, ...],
    low_bit_configs: dict[str, list[triton.Config]] | None = None,
) -> Callable:
    """triton.autotune over the launch device's table of `gpu_configs` ({arch: configs},
    see ARCHS; only each table's first with SPP_TRITON_CONFIGS=first), or its subset
    `low_bit_configs` for low-bit weights (VALUES > 0), or the single `interpreter_config`
    under TRITON_INTERPRET=1 (the interpreter cannot benchmark: do_bench needs a GPU).

    Every block size named in `dot_blocks` feeds a tl.dot and must be >= 16 on the GPU;
    the interpreter would accept less, so all configs are checked here, at import.
    """
    if set(gpu_configs) != set(ARCHS):
        raise ValueError(f"csrc_triton: config tables for {ARCHS}, got {sorted(gpu_configs)}")
    for config in [*(c for table in gpu_configs.values() for c in table), interpreter_config]:
        small = {b: config.kwargs[b] for b in dot_blocks if config.kwargs[b] < MIN_DOT}
        if small:
            raise ValueError(f"csrc_triton: tl.dot blocks must be >= {MIN_DOT}, got {small}")
    if INTERPRET:
        return triton.autotune(configs=[interpreter_config], key=key)
    tables = {a: t[:1] if PIN_FIRST_CONFIG else list(t) for a, t in gpu_configs.items()}
    low_bit = None
    if low_bit_configs is not None:
        low_bit = {a: t[:1] if PIN_FIRST_CONFIG else list(t) for a, t in low_bit_configs.items()}
    configs = [c for t in gpu_configs.values() for c in t]
    configs = [c for i, c in enumerate(configs) if not any(c is d for d in configs[:i])]
    return triton.autotune(
        configs=configs, key=key,
        prune_configs_by={"early_config_prune": arch_pruner(tables, low_bit)},
    )  # fmt: skip


def chosen_configs() -> dict[str, str]:
    """{kernel: its autotuned config per key} for every kernel that ran (benchmark rows)."""
    from . import spp_backward, spp_forward

    out = {}
    for name, kernel in (
        ("forward", spp_forward._spp_forward_kernel),
        ("dx", spp_backward._spp_dx_kernel),
        ("dalpha_dbeta", spp_backward._spp_dalpha_dbeta_kernel),
    ):
        cache = getattr(kernel, "cache", {})
        out[name] = {str(k): str(v) for k, v in cache.items()}
    return out
