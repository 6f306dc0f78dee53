"""Fused SPP forward and backward kernels that read an N:M packed frozen weight.

Math (the same as spp_kernels.torch_backend, on 2-D X (tokens, n), W (m, n), alpha (r, n),
beta (m,), g(o) = floor(o * r / m)):

    forward, no dropout:  Y  = X W_eff^T + b,   W_eff = W * (1 + scale * alpha[g] * beta)
    forward, dropout:     Y  = X W^T + scale * (D(X) (W * alpha[g])^T) * beta + b
    dX, no dropout:       dX = dY W_eff
    dX, dropout:          dX = dY W + D'(scale * (dY * beta) (W * alpha[g]))
    G  = dY^T D(X)  (m, n), fp32, one tile at a time, never stored
    dbeta[o]     = scale * sum_i alpha[g(o), i] W[o, i] G[o, i]
    dalpha[j, i] = scale * sum_{g(o) = j} beta[o] W[o, i] G[o, i]

W is never in memory densely. It arrives as `values` (m, n // M * N) and `meta` (int32
bit-packed positions, see csrc_triton/nm_tiles.py for the format) and each program expands
the (BLOCK_M, BLOCK_K) tile it needs in registers with `nm_dense_tile`, then multiplies it
by its alpha/beta factor and feeds it to `tl.dot` with fp32 accumulation. Global reads of
the frozen weight therefore shrink to the packed bytes (56% of fp16 for 2:4, 31% for 2:8).

Dropout D is the counter-based mask of spp_kernels.dropout: element (t, i) is kept when
tl.rand(seed, t * n + i) >= p, regenerated in every kernel instead of stored.

Tiling:
  forward      grid (tokens / BLOCK_T, m / BLOCK_M), loop over n in BLOCK_K steps
  dX           grid (tokens / BLOCK_T, n / BLOCK_N), loop over m in BLOCK_M steps
  dalpha/dbeta grid (m / BLOCK_M, n / BLOCK_N), loop over tokens in BLOCK_T steps; the
               tile of G is then contracted with W, alpha and beta in registers and the
               row/group partial sums are added with fp32 atomics into (m,) and (r, n)
               buffers (so their summation order, not their value, depends on scheduling).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .nm_tiles import nm_dense_tile

# Every N:M of spp_kernels.nm: M in {4, 8}, 1 <= N < M.
SUPPORTED_NM = tuple((n, m) for m in (4, 8) for n in range(1, m))
_MAX_BLOCK = 64


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: multiply in fp32 (exact for bf16 inputs), because the
    Triton 3.6 interpreter returns garbage for tl.dot on bfloat16 operands."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _spp_nm_forward_kernel(
    x_ptr,
    values_ptr,
    meta_ptr,
    alpha_ptr,
    beta_ptr,
    bias_ptr,
    y_ptr,
    tokens,
    m,
    n,
    r,
    stride_xt,
    stride_xk,
    stride_values,
    stride_meta,
    stride_alpha,
    stride_yt,
    scale,
    dropout_p,
    seed,
    N: tl.constexpr,
    M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Y[t, o] for a (BLOCK_T, BLOCK_M) tile: one pass over n with the packed W expanded per tile."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    t_ok = offs_t < tokens
    m_ok = offs_m < m
    offs_t64 = offs_t.to(tl.int64)
    groups = (offs_m.to(tl.int64) * r) // m
    beta_scaled = tl.load(beta_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32) * scale
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    acc_adapter = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, n, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < n
        x = tl.load(
            x_ptr + offs_t64[:, None] * stride_xt + offs_k[None, :] * stride_xk,
            mask=t_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = m_ok[:, None] & k_ok[None, :]
        w = nm_dense_tile(
            values_ptr, meta_ptr, offs_m, offs_k, w_mask, stride_values, stride_meta, N, M
        )
        alpha = tl.load(
            alpha_ptr + groups[:, None] * stride_alpha + offs_k[None, :], mask=w_mask, other=0.0
        ).to(tl.float32)
        if DROPOUT:
            acc = _dot(x, tl.trans(w), acc, PRECISION, UPCAST)
            keep = tl.rand(seed, offs_t64[:, None] * n + offs_k[None, :]) >= dropout_p
            x_kept = tl.where(keep, x, tl.zeros_like(x))
            w_alpha = (w.to(tl.float32) * alpha).to(w.dtype)
            acc_adapter = _dot(x_kept, tl.trans(w_alpha), acc_adapter, PRECISION, UPCAST)
        else:
            factor = alpha * beta_scaled[:, None] + 1.0
            w32 = w.to(tl.float32)
            w_eff = tl.where(w32 == 0.0, w32, w32 * factor).to(w.dtype)
            acc = _dot(x, tl.trans(w_eff), acc, PRECISION, UPCAST)
    if DROPOUT:
        # 1 / (1 - p) of Dropout(X) is applied once here, in fp32, not to every X element.
        acc = acc + acc_adapter * (beta_scaled * (1.0 / (1.0 - dropout_p)))[None, :]
    if HAS_BIAS:
        # Added in fp32 (one rounding); the Triton 3.6 interpreter also mis-adds bfloat16.
        acc = acc + tl.load(bias_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[None, :]
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(
        y_ptr + offs_t64[:, None] * stride_yt + offs_m[None, :],
        y,
        mask=t_ok[:, None] & m_ok[None, :],
    )


@triton.jit
def _spp_nm_dx_kernel(
    dy_ptr,
    values_ptr,
    meta_ptr,
    alpha_ptr,
    beta_ptr,
    dx_ptr,
    tokens,
    m,
    n,
    r,
    stride_dyt,
    stride_values,
    stride_meta,
    stride_alpha,
    stride_dxt,
    scale,
    dropout_p,
    seed,
    N: tl.constexpr,
    M: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dX[t, i] for a (BLOCK_T, BLOCK_N) tile: one pass over m with W expanded per tile."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_ok = offs_t < tokens
    n_ok = offs_n < n
    offs_t64 = offs_t.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    acc_adapter = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for m0 in range(0, m, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m
        groups = (offs_m.to(tl.int64) * r) // m
        beta_scaled = tl.load(beta_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32) * scale
        dy = tl.load(
            dy_ptr + offs_t64[:, None] * stride_dyt + offs_m[None, :],
            mask=t_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        w_mask = m_ok[:, None] & n_ok[None, :]
        w = nm_dense_tile(
            values_ptr, meta_ptr, offs_m, offs_n, w_mask, stride_values, stride_meta, N, M
        )
        alpha = tl.load(
            alpha_ptr + groups[:, None] * stride_alpha + offs_n[None, :], mask=w_mask, other=0.0
        ).to(tl.float32)
        if DROPOUT:
            acc = _dot(dy, w, acc, PRECISION, UPCAST)
            w_alpha = (w.to(tl.float32) * alpha).to(w.dtype)
            dy_beta = (dy.to(tl.float32) * beta_scaled[None, :]).to(dy.dtype)
            acc_adapter = _dot(dy_beta, w_alpha, acc_adapter, PRECISION, UPCAST)
        else:
            factor = alpha * beta_scaled[:, None] + 1.0
            w32 = w.to(tl.float32)
            w_eff = tl.where(w32 == 0.0, w32, w32 * factor).to(w.dtype)
            acc = _dot(dy, w_eff, acc, PRECISION, UPCAST)
    if DROPOUT:
        keep = tl.rand(seed, offs_t64[:, None] * n + offs_n[None, :]) >= dropout_p
        acc = acc + tl.where(keep, acc_adapter * (1.0 / (1.0 - dropout_p)), 0.0)
    tl.store(
        dx_ptr + offs_t64[:, None] * stride_dxt + offs_n[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=t_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _spp_nm_dalpha_dbeta_kernel(
    dy_ptr,
    x_ptr,
    values_ptr,
    meta_ptr,
    alpha_ptr,
    beta_ptr,
    dalpha_ptr,
    dbeta_ptr,
    tokens,
    m,
    n,
    r,
    stride_dyt,
    stride_xt,
    stride_xk,
    stride_values,
    stride_meta,
    stride_alpha,
    scale,
    dropout_p,
    seed,
    N: tl.constexpr,
    M: tl.constexpr,
    DROPOUT: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Adds this (BLOCK_M, BLOCK_N) tile's share of dbeta (m,) and dalpha (r, n), both fp32."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < m
    n_ok = offs_n < n
    g_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t0 in range(0, tokens, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < tokens
        offs_t64 = offs_t.to(tl.int64)
        dy = tl.load(
            dy_ptr + offs_t64[:, None] * stride_dyt + offs_m[None, :],
            mask=t_ok[:, None] & m_ok[None, :],
            other=0.0,
        )
        x = tl.load(
            x_ptr + offs_t64[:, None] * stride_xt + offs_n[None, :] * stride_xk,
            mask=t_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if DROPOUT:
            keep = tl.rand(seed, offs_t64[:, None] * n + offs_n[None, :]) >= dropout_p
            x = tl.where(keep, x, tl.zeros_like(x))
        g_tile = _dot(tl.trans(dy), x, g_tile, PRECISION, UPCAST)
    w_mask = m_ok[:, None] & n_ok[None, :]
    w = nm_dense_tile(
        values_ptr, meta_ptr, offs_m, offs_n, w_mask, stride_values, stride_meta, N, M
    )
    groups = (offs_m.to(tl.int64) * r) // m
    alpha = tl.load(
        alpha_ptr + groups[:, None] * stride_alpha + offs_n[None, :], mask=w_mask, other=0.0
    ).to(tl.float32)
    beta = tl.load(beta_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)
    if DROPOUT:
        g_tile = g_tile * (1.0 / (1.0 - dropout_p))
    p = g_tile * w.to(tl.float32) * scale
    tl.atomic_add(dbeta_ptr + offs_m, tl.sum(p * alpha, axis=1), mask=m_ok)
    p_beta = p * beta[:, None]
    # Rows of a group are contiguous, so this tile spans groups g(first row)..g(last row):
    # one reduction and one row of atomics per group instead of one atomic per element.
    first_group = (pid_m * BLOCK_M).to(tl.int64) * r // m
    last_row = tl.minimum(pid_m * BLOCK_M + BLOCK_M, m) - 1
    last_group = last_row.to(tl.int64) * r // m
    for j in range(first_group, last_group + 1):
        part = tl.sum(tl.where((groups == j)[:, None], p_beta, 0.0), axis=0)
        tl.atomic_add(dalpha_ptr + j * n + offs_n, part, mask=n_ok)


def _block(size: int) -> int:
    """Power-of-two block for a dimension: at least 16 (tl.dot's minimum), at most _MAX_BLOCK."""
    return max(16, min(_MAX_BLOCK, triton.next_power_of_2(size)))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting, so the kernels round like F.linear would.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_packed(
    values: torch.Tensor, meta: torch.Tensor, n_keep: int, m_group: int
) -> tuple[int, int]:
    """(m, n) of the dense weight that values/meta encode; raises on a malformed pair."""
    if (n_keep, m_group) not in SUPPORTED_NM:
        raise ValueError(f"spp_nm: unsupported N:M {n_keep}:{m_group}; supported: {SUPPORTED_NM}")
    if values.dim() != 2 or values.shape[1] % n_keep:
        raise ValueError(
            f"spp_nm: values must be 2-D (m, n // {m_group} * {n_keep}), got {tuple(values.shape)}"
        )
    if meta.dtype != torch.int32 or meta.dim() != 2:
        raise TypeError(f"spp_nm: meta must be a 2-D int32 tensor, got {meta.dtype} {meta.dim()}-D")
    m, groups = values.shape[0], values.shape[1] // n_keep
    per_word = 32 // (n_keep * (2 if m_group == 4 else 3))
    if meta.shape != (m, -(-groups // per_word)):
        raise ValueError(
            f"spp_nm: meta shape {tuple(meta.shape)} does not match values {tuple(values.shape)} "
            f"for {n_keep}:{m_group} (expected {(m, -(-groups // per_word))})"
        )
    if values.stride(1) != 1 or meta.stride(1) != 1:
        raise ValueError("spp_nm: values and meta need unit column stride")
    return m, groups * m_group


def nm_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    bias: torch.Tensor | None,
    n_keep: int,
    m_group: int,
    scale: float,
    dropout_p: float,
    seed: int,
) -> torch.Tensor:
    """Y (tokens, m) in x's dtype for x (tokens, n) and a packed W (m, n); see module docstring."""
    m, n = _check_packed(values, meta, n_keep, m_group)
    tokens = x.shape[0]
    if x.dim() != 2 or x.shape[1] != n:
        raise ValueError(f"spp_nm: x must be (tokens, {n}), got {tuple(x.shape)}")
    alpha, beta = alpha.contiguous(), beta.contiguous()
    y = torch.empty(tokens, m, device=x.device, dtype=x.dtype)
    if tokens == 0:
        return y
    block_t, block_m, block_k = _block(tokens), _block(m), _block(n)
    grid = (triton.cdiv(tokens, block_t), triton.cdiv(m, block_m))
    _spp_nm_forward_kernel[grid](
        x,
        values,
        meta,
        alpha,
        beta,
        bias if bias is not None else beta,
        y,
        tokens,
        m,
        n,
        alpha.shape[0],
        x.stride(0),
        x.stride(1),
        values.stride(0),
        meta.stride(0),
        alpha.stride(0),
        y.stride(0),
        float(scale),
        float(dropout_p),
        int(seed),
        N=n_keep,
        M=m_group,
        HAS_BIAS=bias is not None,
        DROPOUT=dropout_p > 0.0,
        PRECISION=_precision(x.dtype),
        UPCAST=_upcast(x.dtype),
        BLOCK_T=block_t,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
    )
    return y


def nm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    n_keep: int,
    m_group: int,
    scale: float,
    dropout_p: float,
    seed: int,
    need_dx: bool = True,
    need_dalpha_dbeta: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dX in x's dtype, dalpha in alpha's dtype, dbeta in beta's dtype); None where not needed."""
    m, n = _check_packed(values, meta, n_keep, m_group)
    tokens = x.shape[0]
    if dy.shape != (tokens, m) or x.shape != (tokens, n):
        raise ValueError(
            f"spp_nm: dy {tuple(dy.shape)} and x {tuple(x.shape)} must be (tokens, {m}) and "
            f"(tokens, {n})"
        )
    dy, alpha, beta = dy.contiguous(), alpha.contiguous(), beta.contiguous()
    r = alpha.shape[0]
    precision = _precision(x.dtype)
    block_t, block_m, block_n = _block(tokens), _block(m), _block(n)
    dx = dalpha = dbeta = None
    if need_dx:
        dx = torch.empty(tokens, n, device=x.device, dtype=x.dtype)
        if tokens:
            grid = (triton.cdiv(tokens, block_t), triton.cdiv(n, block_n))
            _spp_nm_dx_kernel[grid](
                dy,
                values,
                meta,
                alpha,
                beta,
                dx,
                tokens,
                m,
                n,
                r,
                dy.stride(0),
                values.stride(0),
                meta.stride(0),
                alpha.stride(0),
                dx.stride(0),
                float(scale),
                float(dropout_p),
                int(seed),
                N=n_keep,
                M=m_group,
                DROPOUT=dropout_p > 0.0,
                PRECISION=precision,
                UPCAST=_upcast(x.dtype),
                BLOCK_T=block_t,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
            )
    if need_dalpha_dbeta:
        dalpha32 = torch.zeros(r, n, device=x.device, dtype=torch.float32)
        dbeta32 = torch.zeros(m, device=x.device, dtype=torch.float32)
        if tokens:
            grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
            _spp_nm_dalpha_dbeta_kernel[grid](
                dy,
                x,
                values,
                meta,
                alpha,
                beta,
                dalpha32,
                dbeta32,
                tokens,
                m,
                n,
                r,
                dy.stride(0),
                x.stride(0),
                x.stride(1),
                values.stride(0),
                meta.stride(0),
                alpha.stride(0),
                float(scale),
                float(dropout_p),
                int(seed),
                N=n_keep,
                M=m_group,
                DROPOUT=dropout_p > 0.0,
                PRECISION=precision,
                UPCAST=_upcast(x.dtype),
                BLOCK_T=block_t,
                BLOCK_M=block_m,
                BLOCK_N=block_n,
            )
        dalpha, dbeta = dalpha32.to(alpha.dtype), dbeta32.to(beta.dtype)
    return dx, dalpha, dbeta
