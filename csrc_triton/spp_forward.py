"""SPP forward, fused: Y in one pass over the frozen weight W (the small-token path).

Math
----
Inputs X (T, n) (any strides), W (m, n), alpha (r, n), beta (m,), bias (m,), scale s,
dropout rate p with the packed keep-mask bits (T, ceil(n/8)) drawn once per forward call
(spp_kernels.ops.dropout), g(o) = floor(o * r / m):

    Y[t, o] = sum_i X[t, i] W[o, i]
            + s * beta[o] / (1 - p) * sum_i keep(t, i) X[t, i] W[o, i] alpha[g(o), i]
            + bias[o]

When p == 0 both sums share X and collapse into one product with the merged weight

    Y = X W_eff^T + bias,   W_eff[o, i] = W[o, i] * (1 + s * alpha[g(o), i] * beta[o]).

Tiling
------
Program (pid_t, pid_m) owns the output tile Y[t0:t0+BLOCK_T, o0:o0+BLOCK_M] and walks the
reduction dimension i in steps of BLOCK_K. At each step it loads the X tile and the W tile
once and forms alpha[g(o), i] for the tile's rows in registers (the group offsets of the
tile's rows are computed once per program; the at most NUM_GROUPS alpha rows a row tile
touches are loaded as vectors and selected per row, or gathered when r is close to m):

* p == 0: W_eff tile = W * (1 + s*beta*alpha[g]) in float32 registers, rounded to the
  input dtype, one tl.dot:  acc += W_eff_tile @ X_tile^T.
* p > 0:  W'' = W * alpha[g] * s*beta/(1-p) from the same W tile; W'' carries the whole
  per-row adapter scale, so acc += W X^T and acc += W'' (keep*X)^T share one accumulator
  (the same registers as p == 0; the keep-mask comes from the forward's bits).

The weight tile rebuilt in registers is stored to shared memory once per step and is the
second MMA operand (the X tile, the first, is pipelined through shared memory by cp.async):
with it as Hopper's register operand instead, ptxas serialised every wgmma (C7515).
Programs are launched in grouped order so a W panel is reused from L2. Epilogue: + bias,
one store.

N:M packed weights (constexpr NM_GROUP > 0): W arrives as values (m, n/M*N) and int32
metadata and each W tile is decoded in registers by _tiles.frozen_weight_tile; the rest
is the same code, so packed and dense weights give the same results, and W's global
traffic drops to the packed bytes.

Never written to memory: Repeat(alpha), W', W_eff, W * alpha, X * alpha, Dropout(X). The
only global writes are Y's elements. For many tokens the host uses the chunked cuBLAS
path instead (spp_kernels.ops.triton_backend): this kernel rebuilds W_eff per token tile.

Status (2026-12-01): tested under the Triton 3.6 interpreter on CPU against float64
oracles (tests/ops); compiled for sm_90a and sm_80 with triton 3.6's ptxas, every shipped
config spill-free (python -m benchmarks.kernel_report); not yet run on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._launch import Launch, alpha_groups, autotune, check_out, prepare, tokens_bucket, without
from ._tiles import (
    adapter_tile,
    alpha_rows_tile,
    effective_tile,
    frozen_weight_tile,
    group_offsets,
    grouped_tile,
    keep_tile,
    mma,
)


def _config(bt: int, bm: int, bk: int, warps: int, stages: int, group: int = 8) -> triton.Config:
    return triton.Config(
        {"BLOCK_T": bt, "BLOCK_M": bm, "BLOCK_K": bk, "GROUP_T": group},
        num_warps=warps,
        num_stages=stages,
    )


# GPU configs by architecture, first = the pinned one (SPP_TRITON_CONFIGS=first). Each
# compiles without spills for its architecture in every variant (benchmarks/kernel_report.py
# --arch, benchmarks/NOTES.md); the forward's three spill on neither, so both tables hold
# them (as separate objects: the tables are tuned independently).
FORWARD_CONFIGS = {
    arch: [
        _config(64, 64, 64, 4, 4),
        _config(128, 128, 64, 8, 3),
        _config(128, 128, 32, 8, 4),
    ]
    for arch in ("sm_90a", "sm_80")
}
# Low-bit weights (nm_tiles VALUES > 0: int8 / fp8 / int4 codes decoded beside the tile)
# skip the 64-wide K tiles: they spill with int4 codes on both architectures (32-836 B,
# benchmarks/results/kernel-report-*.md), the 32-wide one does not.
FORWARD_LOW_BIT_CONFIGS = without(
    FORWARD_CONFIGS, {a: ["64x64x64 w4 s4", "128x128x64 w8 s3"] for a in FORWARD_CONFIGS}
)
# Small tiles under the interpreter: tests then cross many tile and group boundaries.
FORWARD_INTERPRETER_CONFIG = _config(16, 16, 16, 4, 1, group=2)


def _num_groups(args: dict) -> int:
    return alpha_groups(args["BLOCK_M"], args["r"], args["m"])


@autotune(
    FORWARD_CONFIGS,
    FORWARD_INTERPRETER_CONFIG,
    key=["tokens_bucket", "m", "n", "r", "DROPOUT", "N_KEEP", "NM_GROUP", "VALUES"],
    dot_blocks=("BLOCK_T", "BLOCK_M", "BLOCK_K"),
    low_bit_configs=FORWARD_LOW_BIT_CONFIGS,
)
@triton.heuristics({"NUM_GROUPS": _num_groups})
@triton.jit
def _spp_forward_kernel(
    # pointers: activations, frozen weight (+ N:M metadata), adapters, bias, dropout bits, output
    x_ptr,
    w_ptr,
    meta_ptr,
    scale_ptr,
    alpha_ptr,
    beta_ptr,
    bias_ptr,
    keep_ptr,
    y_ptr,
    # sizes: X (tokens, n), W (m, n), alpha (r, n)
    tokens,
    m,
    n,
    r,
    # strides (elements)
    stride_xt,
    stride_xn,
    stride_wm,
    stride_wn,
    stride_meta,
    stride_scale,
    stride_ar,
    stride_an,
    stride_beta,
    stride_bias,
    stride_keep,
    stride_yt,
    stride_ym,
    # scalars: the adapter scale s and 1 / (1 - p)
    scale,
    keep_scale,
    tokens_bucket,  # autotuning key only
    # meta-parameters: variant switches, dot flags, tile sizes
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    N_KEEP: tl.constexpr,
    NM_GROUP: tl.constexpr,
    VALUES: tl.constexpr,
    SCALE_GROUP: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
    NUM_GROUPS: tl.constexpr,
):
    pid_t, pid_m = grouped_tile(tl.program_id(0), tokens, m, BLOCK_T, BLOCK_M, GROUP_T)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = offs_t < tokens
    m_ok = offs_m < m
    # int64 offsets wherever a token index or a strided token axis enters: tokens * n
    # may pass 2**31 (x, y may be transposed views).
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
    first_group, offsets = group_offsets(pid_m * BLOCK_M, tl.arange(0, BLOCK_M), r, m)
    beta = tl.load(beta_ptr + offs_m * stride_beta, mask=m_ok, other=0.0).to(tl.float32)
    row_scale = scale * beta
    adapter_scale = row_scale * keep_scale

    # Y tile (BLOCK_T, BLOCK_M) = X tile @ W_eff tile^T: the rebuilt weight tile is the second
    # MMA operand, which Hopper's wgmma reads from shared memory, so no non-wgmma instruction
    # touches the accumulator inside the wgmma pipeline (with the tile as the register
    # operand ptxas serialised every wgmma: benchmarks/NOTES.md).
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_ok = cols < n
        x_mask = t_ok[:, None] & k_ok[None, :]
        x = tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xn, mask=x_mask, other=0.0)
        w = frozen_weight_tile(
            w_ptr, meta_ptr, scale_ptr, offs_m, m_ok, k0, n, stride_wm, stride_wn,
            stride_meta, stride_scale, BLOCK_K, N_KEEP, NM_GROUP, VALUES, SCALE_GROUP,
            x_ptr.dtype.element_ty,
        )  # fmt: skip
        alpha_g = alpha_rows_tile(
            alpha_ptr, first_group, offsets, m, m_ok, cols, k_ok, r, stride_ar, stride_an,
            NUM_GROUPS,
        )  # fmt: skip
        if DROPOUT:
            x_kept = tl.where(keep_tile(keep_ptr, offs_t, cols, stride_keep, x_mask), x, 0.0)
            # W'' carries s * beta / (1 - p) per row, so both products share one accumulator.
            acc = mma(x, tl.trans(w), acc, UPCAST, PRECISION)
            w_ad = adapter_tile(w, alpha_g, adapter_scale)
            acc = mma(x_kept.to(x.dtype), tl.trans(w_ad), acc, UPCAST, PRECISION)
        else:
            acc = mma(x, tl.trans(effective_tile(w, alpha_g, row_scale)), acc, UPCAST, PRECISION)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_m * stride_bias, mask=m_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    y_ptrs = (
        y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + offs_m.to(tl.int64)[None, :] * stride_ym
    )
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & m_ok[None, :])


def spp_linear_forward(
    x: torch.Tensor,
    weight: Any,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float,
    keep: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    *,
    launch: Launch | None = None,
) -> torch.Tensor:
    """Y (tokens, m) in x's dtype for x (tokens, n) with any strides, the frozen weight W
    (m, n) (a dense tensor, or an N:M packed weight whose tiles are decoded in registers,
    never densified: see `_launch.weight_parts`), alpha (r, n), beta (m,), bias (m,) or
    None; see the module docstring for the math.

    keep: the packed dropout bits (tokens, ceil(n/8)) uint8, required when dropout_p > 0.
    `out` (tokens, m), x's dtype, any strides: written instead of a new tensor. `launch`:
    this call's prepared (already checked) launch arguments, else `prepare` checks here.
    """
    if launch is None:
        launch = prepare(weight, alpha, beta, x=x, bias=bias, keep=keep, dropout_p=dropout_p)
    tokens, m = launch.tokens, launch.m
    if out is None:
        out = torch.empty((tokens, m), dtype=x.dtype, device=x.device)
    else:
        check_out(out, (tokens, m), x, "out")
    if tokens == 0 or m == 0:
        return out

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_T"]) * triton.cdiv(m, meta["BLOCK_M"]),)

    _spp_forward_kernel[grid](
        x_ptr=x,
        w_ptr=launch.w,
        meta_ptr=launch.meta,
        scale_ptr=launch.scales,
        alpha_ptr=alpha,
        beta_ptr=beta,
        bias_ptr=bias if bias is not None else beta,  # never read when HAS_BIAS is False
        keep_ptr=launch.keep,
        y_ptr=out,
        tokens=tokens,
        m=m,
        n=launch.n,
        r=launch.r,
        stride_xt=x.stride(0),
        stride_xn=x.stride(1),
        stride_wm=launch.stride_wm,
        stride_wn=launch.stride_wn,
        stride_meta=launch.stride_meta,
        stride_scale=launch.stride_scale,
        stride_ar=alpha.stride(0),
        stride_an=alpha.stride(1),
        stride_beta=beta.stride(0),
        stride_bias=bias.stride(0) if bias is not None else 0,
        stride_keep=launch.stride_keep,
        stride_yt=out.stride(0),
        stride_ym=out.stride(1),
        scale=float(scale),
        keep_scale=1.0 / (1.0 - dropout_p),
        tokens_bucket=tokens_bucket(tokens),
        HAS_BIAS=bias is not None,
        DROPOUT=dropout_p > 0.0,
        N_KEEP=launch.n_keep,
        NM_GROUP=launch.group,
        VALUES=launch.values_kind,
        SCALE_GROUP=launch.scale_group,
        UPCAST=launch.upcast,
        PRECISION=launch.precision,
    )
    return out
