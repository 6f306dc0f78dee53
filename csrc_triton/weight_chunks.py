"""A row chunk of the frozen weight, the merged weight or the scaled adapter weight, written
once for the chunked cuBLAS path (many tokens).

For rows o in [row0, row0 + rows) of W (m, n) (dense, or N:M packed and decoded here) and
g(o) = floor(o * r / m), the kernel writes into out (rows, n):

    MODE 0  W[o, i]                                        (a packed W decompressed)
    MODE 1  W[o, i] * (1 + scale * beta[o] * alpha[g(o), i])   (W_eff = W + scale * W')
    MODE 2  W[o, i] * alpha[g(o), i] * scale * beta[o]      (the adapter weight, scaled)

each computed in float32 and rounded once to out's dtype. The host bounds `rows` so that a
chunk stays under a fixed byte budget (spp_kernels.ops.chunked); the chunk lives only
inside the op call that needs it and is never saved for backward.

Status (2026-12-01): tested under the Triton 3.6 interpreter on CPU (tests/ops); compiled
for sm_90a (benchmarks/kernel_report.py); not yet run on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._launch import INTERPRET, Launch, alpha_groups, prepare
from ._tiles import alpha_rows_tile, frozen_weight_tile, group_offsets

CHUNK_BLOCK_M, CHUNK_BLOCK_N = (16, 16) if INTERPRET else (32, 128)


def _num_groups(args: dict) -> int:
    return alpha_groups(args["BLOCK_M"], args["r"], args["m"])


@triton.heuristics({"NUM_GROUPS": _num_groups})
@triton.jit
def _weight_chunk_kernel(
    # pointers: frozen weight (+ N:M metadata), adapters, output chunk
    w_ptr,
    meta_ptr,
    scale_ptr,
    alpha_ptr,
    beta_ptr,
    out_ptr,
    # sizes: W (m, n), alpha (r, n); the chunk's first row and row count
    m,
    n,
    r,
    row0,
    rows,
    # strides (elements)
    stride_wm,
    stride_wn,
    stride_meta,
    stride_scale,
    stride_ar,
    stride_an,
    stride_beta,
    stride_om,
    # scalars
    scale,
    # meta-parameters
    MODE: tl.constexpr,
    N_KEEP: tl.constexpr,
    NM_GROUP: tl.constexpr,
    VALUES: tl.constexpr,
    SCALE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
):
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_N
    cols = col0 + tl.arange(0, BLOCK_N)
    rows_ok = local < rows
    n_ok = cols < n
    offs_m = row0 + local
    w = frozen_weight_tile(
        w_ptr, meta_ptr, scale_ptr, offs_m, rows_ok, col0, n, stride_wm, stride_wn,
        stride_meta, stride_scale, BLOCK_N, N_KEEP, NM_GROUP, VALUES, SCALE_GROUP,
        out_ptr.dtype.element_ty,
    )  # fmt: skip
    if MODE == 0:
        out = w
    else:
        first_group, offsets = group_offsets(
            row0 + tl.program_id(0) * BLOCK_M, tl.arange(0, BLOCK_M), r, m
        )
        alpha_g = alpha_rows_tile(
            alpha_ptr, first_group, offsets, m, rows_ok, cols, n_ok, r, stride_ar, stride_an,
            NUM_GROUPS,
        )  # fmt: skip
        row_scale = scale * tl.load(beta_ptr + offs_m * stride_beta, mask=rows_ok, other=0.0).to(
            tl.float32
        )
        if MODE == 1:
            out = w.to(tl.float32) * (1.0 + row_scale[:, None] * alpha_g)
        else:
            out = w.to(tl.float32) * alpha_g * row_scale[:, None]
    ptrs = out_ptr + local.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & n_ok[None, :])


MODES = {"weight": 0, "merged": 1, "adapter": 2}


def weight_chunk(
    weight: Any,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    row0: int,
    rows: int,
    mode: str,
    out: torch.Tensor | None = None,
    *,
    launch: Launch | None = None,
) -> torch.Tensor:
    """Rows [row0, row0 + rows) of W, W_eff or scale * W * alpha[g] * beta (`mode` "weight",
    "merged", "adapter") as a contiguous (rows, n) tensor in W's dtype; W is the frozen
    weight, dense or N:M packed. `out` (rows, n) contiguous, W's dtype: reused instead of a
    new allocation. `launch`: the call's prepared launch, else `prepare` checks here."""
    if launch is None:
        launch = prepare(weight, alpha, beta)
    m, n = launch.m, launch.n
    if not 0 <= row0 <= row0 + rows <= m:
        raise ValueError(f"csrc_triton: chunk rows [{row0}, {row0 + rows}) outside [0, {m})")
    if out is None:
        out = torch.empty((rows, n), dtype=launch.dtype, device=launch.w.device)
    elif tuple(out.shape) != (rows, n) or out.dtype != launch.dtype or out.stride(1) != 1:
        raise ValueError(f"csrc_triton: chunk out must be ({rows}, {n}) {launch.dtype}")
    if rows == 0 or n == 0:
        return out
    grid = (triton.cdiv(rows, CHUNK_BLOCK_M), triton.cdiv(n, CHUNK_BLOCK_N))
    _weight_chunk_kernel[grid](
        w_ptr=launch.w,
        meta_ptr=launch.meta,
        scale_ptr=launch.scales,
        alpha_ptr=alpha,
        beta_ptr=beta,
        out_ptr=out,
        m=m,
        n=n,
        r=launch.r,
        row0=row0,
        rows=rows,
        stride_wm=launch.stride_wm,
        stride_wn=launch.stride_wn,
        stride_meta=launch.stride_meta,
        stride_scale=launch.stride_scale,
        stride_ar=alpha.stride(0),
        stride_an=alpha.stride(1),
        stride_beta=beta.stride(0),
        stride_om=out.stride(0),
        scale=float(scale),
        MODE=MODES[mode],
        N_KEEP=launch.n_keep,
        NM_GROUP=launch.group,
        VALUES=launch.values_kind,
        SCALE_GROUP=launch.scale_group,
        BLOCK_M=CHUNK_BLOCK_M,
        BLOCK_N=CHUNK_BLOCK_N,
    )
    return out
