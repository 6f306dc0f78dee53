"""Host-side helpers shared by the kernel launchers: operand checks, dot flags, autotuning."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton

# Read once at import: @triton.jit picks interpreter or compiler when the module loads.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_DOT = 16  # smallest tl.dot dimension the GPU accepts


def check_operands(
    weight: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    *,
    x: torch.Tensor | None = None,
    dy: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """Shapes, dtypes and devices the kernels rely on; raises before anything is launched.

    weight (m, n) has a dtype in KERNEL_DTYPES; x (tokens, n) and dy (tokens, m) share it;
    alpha (r, n) with 1 <= r <= m, beta (m,) and bias (m,) are that dtype or float32.
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


def check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"csrc_triton: dropout_p must be in [0, 1), got {dropout_p}")


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


def alpha_groups(block_m: int, r: int, m: int) -> int:
    """NUM_GROUPS constexpr of `_tiles.alpha_rows_tile` for row tiles of `block_m` rows.

    block_m consecutive rows o0.. touch at most (block_m - 1) * r // m + 2 groups
    (floor(a + b) - floor(a) <= floor(b) + 1), and never more than r. Up to 4 such alpha
    rows are loaded as vectors and selected per row; beyond that (r close to m) 0 selects
    the 2-D gather.
    """
    bound = min((block_m - 1) * r // m + 2, r, block_m)
    return bound if bound <= 4 else 0


def alpha_groups_heuristic(args: dict) -> int:
    """triton.heuristics hook: NUM_GROUPS from the launch's BLOCK_M, r and m."""
    return alpha_groups(args["BLOCK_M"], args["r"], args["m"])


def tokens_bucket(tokens: int) -> int:
    """Autotuning key for the token count: the next power of two, so variable batch sizes
    reuse a tuned config instead of re-benchmarking every new length."""
    return triton.next_power_of_2(max(int(tokens), 1))


def autotune(
    gpu_configs: list[triton.Config],
    interpreter_config: triton.Config,
    key: list[str],
    dot_blocks: tuple[str, ...],
) -> Callable:
    """triton.autotune over `gpu_configs`, or the single `interpreter_config` under
    TRITON_INTERPRET=1 (the interpreter cannot benchmark: do_bench needs a GPU).

    Every block size named in `dot_blocks` feeds a tl.dot and must be >= 16 on the GPU;
    the interpreter would accept less, so all configs are checked here, at import.
    """
    for config in [*gpu_configs, interpreter_config]:
        small = {b: config.kwargs[b] for b in dot_blocks if config.kwargs[b] < MIN_DOT}
        if small:
            raise ValueError(f"csrc_triton: tl.dot blocks must be >= {MIN_DOT}, got {small}")
    configs = [interpreter_config] if INTERPRET else gpu_configs
    return triton.autotune(configs=configs, key=key)


def frozen_weight_args(
    weight: torch.Tensor, meta: torch.Tensor | None, nm: tuple[int, int] | None
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """Launch arguments for the frozen weight, dense or N:M packed (`_tiles.frozen_weight_tile`).

    Returns (dense_like, meta_arg, stride_meta, NM_N, NM_M). dense_like has W's (m, n)
    shape, dtype and device for `check_operands` and the grid: W itself when dense, a
    zero-stride view of one element when packed (never a dense copy).
    Dense: meta and nm are None; meta_arg is W (never read), NM_N = NM_M = 0.
    Packed: weight is the values (m, n // M * N) with unit column stride, meta the int32
    metadata (m, ceil((n // M) / G)), G = 32 // (N * log2(M)), nm = (N, M), M in {4, 8}.
    """
    if meta is None:
        if nm is not None:
            raise ValueError("csrc_triton: nm=(N, M) given without the packed metadata `meta`")
        return weight, weight, 0, 0, 0
    if (
        not isinstance(nm, tuple)
        or len(nm) != 2
        or nm[1] not in (4, 8)
        or not isinstance(nm[0], int)
        or not 1 <= nm[0] < nm[1]
    ):
        raise ValueError(f"csrc_triton: nm must be (N, M) with M in (4, 8), 1 <= N < M; got {nm!r}")
    n_keep, m_group = nm
    if weight.dim() != 2 or weight.shape[1] % n_keep:
        raise ValueError(
            f"csrc_triton: packed values must be 2-D (m, n // {m_group} * {n_keep}), got "
            f"{tuple(weight.shape)}"
        )
    m, groups = weight.shape[0], weight.shape[1] // n_keep
    per_word = 32 // (n_keep * (2 if m_group == 4 else 3))
    expected = (m, -(-groups // per_word))
    if meta.dtype != torch.int32 or tuple(meta.shape) != expected:
        raise ValueError(
            f"csrc_triton: packed meta must be int32 of shape {expected} for values "
            f"{tuple(weight.shape)} and {n_keep}:{m_group}, got {meta.dtype} {tuple(meta.shape)}"
        )
    if meta.device != weight.device:
        raise ValueError(
            f"csrc_triton: values on {weight.device} but meta on {meta.device}; use one device"
        )
    if weight.stride(1) != 1 or meta.stride(1) != 1:
        raise ValueError("csrc_triton: packed values and meta need unit column stride")
    dense_like = weight.new_empty(()).expand(m, groups * m_group)
    return dense_like, meta, meta.stride(0), n_keep, m_group
