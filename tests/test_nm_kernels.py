"""Packed N:M SPP kernels (csrc_triton/nm_tiles.py, csrc_triton/spp_nm.py) under the interpreter.

Oracles: nm_decompress (the format's one definition) for the tile decoder, bitwise; the
torch backend in float64 on the decompressed weight for the fused kernels, with
dtype-specific tolerances; the dense Triton kernels when they are importable.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from csrc_triton.nm_tiles import nm_dense_tile
from csrc_triton.spp_nm import nm_backward, nm_forward
from spp_kernels import torch_backend
from spp_kernels.nm import nm_compress, nm_decompress

# The Triton 3.6 interpreter turns 1-element loop bounds into ints via a deprecated numpy path.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Max |error| / max |reference| against the float64 oracle: fp32 (no TF32) is exact up to
# summation order; half types are bounded by rounding of inputs, W_eff and the output.
TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def nm_sparse(m: int, n: int, n_keep: int, m_group: int, dtype: torch.dtype) -> torch.Tensor:
    """Random (m, n) weight with exactly n_keep nonzeros at random positions per group."""
    w = torch.randn(m, n, dtype=torch.float32)
    kept = torch.rand(m, n // m_group, m_group).argsort(-1)[..., :n_keep]
    mask = torch.zeros(m, n // m_group, m_group, dtype=torch.bool).scatter_(2, kept, True)
    return (w * mask.view(m, n)).to(dtype)


@triton.jit
def _decode_kernel(
    values_ptr,
    meta_ptr,
    out_ptr,
    m,
    n,
    stride_values,
    stride_meta,
    N: tl.constexpr,
    M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    tile = nm_dense_tile(values_ptr, meta_ptr, rows, cols, mask, stride_values, stride_meta, N, M)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], tile, mask=mask)


def _device_decode(values, meta, n_keep, m_group, cols):
    rows = values.shape[0]
    out = torch.full((rows, cols), float("nan"), dtype=values.dtype)
    grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 32))
    _decode_kernel[grid](
        values, meta, out, rows, cols, values.stride(0), meta.stride(0), n_keep, m_group, 16, 32
    )
    return out


@pytest.mark.parametrize("n_keep,m_group", [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (7, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_decoder_is_bitwise_nm_decompress(n_keep, m_group, dtype):
    rows, cols = 19, 5 * 8 * m_group  # ragged rows; cols spans several meta words
    w = nm_sparse(rows, cols, n_keep, m_group, dtype)
    # Fewer nonzeros than N in some groups (padding), signed zeros, and a top-bit-set word.
    w[0, : 2 * m_group] = 0
    w[1, 3] = -0.0
    w[2] = 0
    w[2, m_group - 1 :: m_group] = 1.5
    values, meta = nm_compress(w, n_keep, m_group)
    out = _device_decode(values, meta, n_keep, m_group, cols)
    ref = nm_decompress(values, meta, n_keep, m_group, cols)
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    assert torch.equal(out.view(bits[dtype]), ref.view(bits[dtype]))
    assert torch.equal(out, w)  # value-exact round trip of the weight itself
    if (n_keep, m_group) == (2, 4):
        assert bool((meta < 0).any()), "test should cover meta words with the top bit set"


def _case(n_keep, m_group, dtype, m=37, tokens=21, n=None, r=5, bias=True):
    n = n or 12 * m_group
    w = nm_sparse(m, n, n_keep, m_group, dtype)
    values, meta = nm_compress(w, n_keep, m_group)
    x = torch.randn(tokens, n, dtype=dtype)
    alpha = torch.randn(r, n, dtype=torch.float32)  # fp32 adapters on half weights
    beta = torch.randn(m, dtype=dtype)
    b = torch.randn(m, dtype=dtype) if bias else None
    dy = torch.randn(tokens, m, dtype=dtype)
    return w, values, meta, x, alpha, beta, b, dy


def _rel(out, ref):
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


@pytest.mark.parametrize("n_keep,m_group", [(2, 4), (2, 8), (4, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_fused_kernels_match_float64_oracle(n_keep, m_group, dtype, dropout_p):
    w, values, meta, x, alpha, beta, b, dy = _case(n_keep, m_group, dtype)
    seed, scale = 1234, 1.5
    y = nm_forward(x, values, meta, alpha, beta, b, n_keep, m_group, scale, dropout_p, seed)
    dx, dalpha, dbeta = nm_backward(
        dy, x, values, meta, alpha, beta, n_keep, m_group, scale, dropout_p, seed
    )
    w64, x64, a64, be64, b64, dy64 = _f64(w, x, alpha, beta, b, dy)
    y_ref = torch_backend.forward(x64, w64, a64, be64, b64, scale, dropout_p, seed)
    dx_ref, da_ref, db_ref = torch_backend.backward(
        dy64, x64, w64, a64, be64, scale, dropout_p, seed
    )
    assert y.dtype == dtype and dx.dtype == dtype
    assert dalpha.dtype == alpha.dtype and dbeta.dtype == beta.dtype
    tol = TOL[dtype]
    assert _rel(y, y_ref) < tol
    assert _rel(dx, dx_ref) < tol
    assert _rel(dalpha, da_ref) < tol
    assert _rel(dbeta, db_ref) < tol


@pytest.mark.parametrize("tokens,m,r", [(1, 16, 16), (33, 50, 3), (17, 9, 1)])
def test_ragged_shapes_and_group_maps(tokens, m, r):
    # r == m (one row per group), r not dividing m, r == 1; a single token.
    w, values, meta, x, alpha, beta, b, dy = _case(2, 4, torch.float32, m=m, tokens=tokens, r=r)
    y = nm_forward(x, values, meta, alpha, beta, b, 2, 4, 2.0, 0.0, 0)
    dx, dalpha, dbeta = nm_backward(dy, x, values, meta, alpha, beta, 2, 4, 2.0, 0.0, 0)
    w64, x64, a64, be64, b64, dy64 = _f64(w, x, alpha, beta, b, dy)
    dx_ref, da_ref, db_ref = torch_backend.backward(dy64, x64, w64, a64, be64, 2.0, 0.0, 0)
    assert _rel(y, torch_backend.forward(x64, w64, a64, be64, b64, 2.0, 0.0, 0)) < 2e-6
    assert _rel(dx, dx_ref) < 2e-6
    assert _rel(dalpha, da_ref) < 2e-6
    assert _rel(dbeta, db_ref) < 2e-6


def test_backward_flags_strided_x_and_empty_tokens():
    w, values, meta, x, alpha, beta, b, dy = _case(2, 8, torch.float32, n=64)
    wide = torch.randn(x.shape[0], 2 * x.shape[1])
    x_strided = wide[:, ::2]  # column stride 2
    y = nm_forward(x_strided, values, meta, alpha, beta, None, 2, 8, 1.0, 0.0, 0)
    y_ref = torch_backend.forward(x_strided.contiguous(), w, alpha, beta, None, 1.0, 0.0, 0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dx, dalpha, dbeta = nm_backward(
        dy, x, values, meta, alpha, beta, 2, 8, 1.0, 0.0, 0, True, False
    )
    assert dx is not None and dalpha is None and dbeta is None
    dx, dalpha, dbeta = nm_backward(
        dy, x, values, meta, alpha, beta, 2, 8, 1.0, 0.0, 0, False, True
    )
    assert dx is None and dalpha.shape == alpha.shape and dbeta.shape == beta.shape
    empty = nm_forward(x[:0], values, meta, alpha, beta, b, 2, 8, 1.0, 0.0, 0)
    assert empty.shape == (0, w.shape[0])


def test_packed_kernels_match_dense_triton_kernels():
    """Same math as the dense-weight kernels: equal to rounding (fp16, with dropout)."""
    dense = pytest.importorskip("spp_kernels.triton_backend")
    w, values, meta, x, alpha, beta, b, dy = _case(2, 4, torch.float16)
    args = (1.5, 0.25, 99)
    y = nm_forward(x, values, meta, alpha, beta, b, 2, 4, *args)
    y_dense = dense.forward(x, w, alpha, beta, b, *args)
    grads = nm_backward(dy, x, values, meta, alpha, beta, 2, 4, *args)
    grads_dense = dense.backward(dy, x, w, alpha, beta, *args, True, True)
    assert _rel(y, y_dense) < 2e-3
    for g, g_dense in zip(grads, grads_dense):
        assert g.dtype == g_dense.dtype
        assert _rel(g, g_dense) < 2e-3


def test_malformed_packed_inputs_raise_before_launch():
    _, values, meta, x, alpha, beta, b, _ = _case(2, 4, torch.float32)
    with pytest.raises(ValueError, match="unsupported N:M"):
        nm_forward(x, values, meta, alpha, beta, b, 4, 4, 1.0, 0.0, 0)
    with pytest.raises(TypeError, match="int32"):
        nm_forward(x, values, meta.to(torch.int64), alpha, beta, b, 2, 4, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="meta shape"):
        nm_forward(x, values, meta[:, :1], alpha, beta, b, 2, 4, 1.0, 0.0, 0)
    with pytest.raises(ValueError, match="x must be"):
        nm_forward(x[:, :-4], values, meta, alpha, beta, b, 2, 4, 1.0, 0.0, 0)


_COMPILE_FOR_HOPPER = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from csrc_triton import spp_nm

dropout = sys.argv[1] == "1"


def signature(kernel, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "meta_ptr":
            sig[name] = "*i32"
        elif name in ("alpha_ptr", "dalpha_ptr", "dbeta_ptr"):
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp16"
        else:
            sig[name] = {"scale": "fp32", "dropout_p": "fp32", "seed": "i64"}.get(name, "i32")
    return sig


base = dict(N=2, M=4, DROPOUT=dropout, PRECISION="tf32", UPCAST=False, BLOCK_T=64)
kernels = (
    (spp_nm._spp_nm_forward_kernel, dict(base, HAS_BIAS=True, BLOCK_M=64, BLOCK_K=64)),
    (spp_nm._spp_nm_dx_kernel, dict(base, BLOCK_M=64, BLOCK_N=64)),
    (spp_nm._spp_nm_dalpha_dbeta_kernel, dict(base, BLOCK_M=64, BLOCK_N=64)),
)
for kernel, constexprs in kernels:
    consts = {(kernel.arg_names.index(k),): v for k, v in constexprs.items()}
    src = ASTSource(fn=kernel, signature=signature(kernel, constexprs), constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"] and "mma" in compiled.asm["ptx"], kernel
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [False, True])
def test_kernels_compile_for_hopper(dropout):
    """Without a GPU: the three packed fp16 kernels lower to sm_90 cubins with MMAs.

    Runs in a subprocess without TRITON_INTERPRET (under it @triton.jit gives interpreted
    functions, which cannot be compiled); Triton ships ptxas, so no CUDA install is needed.
    """
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER, "1" if dropout else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
