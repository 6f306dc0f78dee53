"""The fused SPP kernels reading N:M packed weights (csrc_triton/nm_tiles.py, _tiles.py).

Oracles: nm_decompress (the format's one definition) for the tile decoder, bitwise; the
torch backend in float64 on the decompressed weight, with dtype-specific tolerances; the
same kernels on the dense weight (bitwise under the interpreter, where both run one
config). On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest).
"""

from __future__ import annotations

import pytest
import torch

from csrc_triton.weight_chunks import weight_chunk
from spp_kernels.ops import torch_backend, triton_backend
from spp_kernels.ops.dropout import draw_keep_bits
from spp_kernels.sparsity.nm import nm_compress, nm_decompress
from spp_kernels.sparsity.packed import PackedWeight
from tests.helpers import HAS_CUDA, assert_close

# The Triton 3.6 interpreter turns 1-element loop bounds into ints via a deprecated numpy path.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Max |error| / max |reference| against the float64 oracle: fp32 (no TF32) is exact up to
# summation order; half types are bounded by rounding of inputs, W_eff and the output.


def _bits(x, dropout_p, seed):
    """The keep bits the op would draw for (seed, x's device), or None without dropout."""
    return draw_keep_bits(*x.shape, dropout_p, seed, x.device) if dropout_p > 0 else None


def nm_forward(x, values, meta, alpha, beta, bias, n_keep, group, scale, dropout_p, seed):
    """Y from the packed weight through the fused forward kernel."""
    frozen = PackedWeight(values, meta, n_keep, group, x.shape[1])
    bits = _bits(x, dropout_p, seed)
    return triton_backend.forward(
        x, frozen, alpha, beta, bias, scale, dropout_p, bits, path="fused"
    )


def nm_backward(dy, x, values, meta, alpha, beta, n_keep, group, scale, dropout_p, seed, *flags):
    """(dX, dalpha, dbeta) from the packed weight through the fused backward kernels."""
    frozen = PackedWeight(values, meta, n_keep, group, x.shape[1])
    bits = _bits(x, dropout_p, seed)
    return triton_backend.backward(
        dy, x, frozen, alpha, beta, scale, dropout_p, bits, *flags, path="fused"
    )


def dense_forward(backend, x, w, alpha, beta, bias, scale, dropout_p, seed, **kw):
    frozen = w
    return backend.forward(
        x, frozen, alpha, beta, bias, scale, dropout_p, _bits(x, dropout_p, seed), **kw
    )


def dense_backward(backend, dy, x, w, alpha, beta, scale, dropout_p, seed, *flags, **kw):
    frozen = w
    bits = _bits(x, dropout_p, seed)
    return backend.backward(dy, x, frozen, alpha, beta, scale, dropout_p, bits, *flags, **kw)


def nm_sparse(m: int, n: int, n_keep: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Random (m, n) weight with exactly n_keep nonzeros at random positions per group."""
    w = torch.randn(m, n, dtype=torch.float32)
    kept = torch.rand(m, n // group, group).argsort(-1)[..., :n_keep]
    mask = torch.zeros(m, n // group, group, dtype=torch.bool).scatter_(2, kept, True)
    return (w * mask.view(m, n)).to(dtype).to(DEVICE)


def _device_decode(values, meta, n_keep, group, cols):
    """The tile decoder (csrc_triton/nm_tiles.py) through the chunk launcher's "weight"
    mode, into a NaN-poisoned output."""
    rows = values.shape[0]
    out = torch.full((rows, cols), float("nan"), dtype=values.dtype, device=values.device)
    weight = PackedWeight(values, meta, n_keep, group, cols)
    ones_a = torch.ones(1, cols, device=values.device)
    return weight_chunk(weight, ones_a, torch.ones(rows, device=values.device), 1.0, 0, rows,
                        "weight", out=out)  # fmt: skip


@pytest.mark.parametrize("n_keep,group", [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8), (7, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_decoder_is_bitwise_nm_decompress(n_keep, group, dtype):
    rows, cols = 19, 5 * 8 * group  # ragged rows; cols spans several meta words
    w = nm_sparse(rows, cols, n_keep, group, dtype)
    # Fewer nonzeros than N in some groups (padding), signed zeros, and a top-bit-set word.
    w[0, : 2 * group] = 0
    w[1, 3] = -0.0
    w[2] = 0
    w[2, group - 1 :: group] = 1.5
    values, meta = nm_compress(w, n_keep, group)
    out = _device_decode(values, meta, n_keep, group, cols)
    ref = nm_decompress(values, meta, n_keep, group, cols)
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    assert torch.equal(out.view(bits[dtype]), ref.view(bits[dtype]))
    assert torch.equal(out, w)  # value-exact round trip of the weight itself
    if (n_keep, group) == (2, 4):
        assert bool((meta < 0).any()), "test should cover meta words with the top bit set"


def _case(n_keep, group, dtype, m=20, tokens=18, n=None, r=5, bias=True):
    # Ragged against the interpreter's 16-blocks; several meta words per row; r not | m.
    n = n or {4: 40, 8: 48}[group]
    w = nm_sparse(m, n, n_keep, group, dtype)
    values, meta = nm_compress(w, n_keep, group)
    x = torch.randn(tokens, n, dtype=dtype, device=DEVICE)
    alpha = torch.randn(r, n, dtype=torch.float32, device=DEVICE)  # fp32 adapters, half W
    beta = torch.randn(m, dtype=dtype, device=DEVICE)
    b = torch.randn(m, dtype=dtype, device=DEVICE) if bias else None
    dy = torch.randn(tokens, m, dtype=dtype, device=DEVICE)
    return w, values, meta, x, alpha, beta, b, dy


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


ORACLE_CASES = [
    (n_keep, group, dtype, p)
    for n_keep, group in ((2, 4), (2, 8))
    for dtype in DTYPES
    for p in (0.0, 0.25)
] + [(4, 8, torch.float16, 0.25)]


@pytest.mark.parametrize("n_keep,group,dtype,dropout_p", ORACLE_CASES)
def test_fused_kernels_match_float64_oracle(n_keep, group, dtype, dropout_p):
    w, values, meta, x, alpha, beta, b, dy = _case(n_keep, group, dtype)
    seed, scale = 1234, 1.5
    y = nm_forward(x, values, meta, alpha, beta, b, n_keep, group, scale, dropout_p, seed)
    dx, dalpha, dbeta = nm_backward(
        dy, x, values, meta, alpha, beta, n_keep, group, scale, dropout_p, seed
    )
    w64, x64, a64, be64, b64, dy64 = _f64(w, x, alpha, beta, b, dy)
    y_ref = dense_forward(torch_backend, x64, w64, a64, be64, b64, scale, dropout_p, seed)
    dx_ref, da_ref, db_ref = dense_backward(
        torch_backend, dy64, x64, w64, a64, be64, scale, dropout_p, seed
    )
    assert y.dtype == dtype and dx.dtype == dtype
    assert dalpha.dtype == alpha.dtype and dbeta.dtype == beta.dtype
    assert_close(y, y_ref, dtype=dtype)
    assert_close(dx, dx_ref, dtype=dtype)
    assert_close(dalpha, da_ref, dtype=dtype)
    assert_close(dbeta, db_ref, dtype=dtype)


@pytest.mark.parametrize("tokens,m,r", [(1, 16, 16), (33, 40, 3), (17, 9, 1)])
def test_ragged_shapes_and_group_maps(tokens, m, r):
    # r == m (one row per group), r not dividing m, r == 1; a single token.
    w, values, meta, x, alpha, beta, b, dy = _case(2, 4, torch.float32, m=m, tokens=tokens, r=r)
    y = nm_forward(x, values, meta, alpha, beta, b, 2, 4, 2.0, 0.0, 0)
    dx, dalpha, dbeta = nm_backward(dy, x, values, meta, alpha, beta, 2, 4, 2.0, 0.0, 0)
    w64, x64, a64, be64, b64, dy64 = _f64(w, x, alpha, beta, b, dy)
    dx_ref, da_ref, db_ref = dense_backward(torch_backend, dy64, x64, w64, a64, be64, 2.0, 0.0, 0)
    assert_close(y, dense_forward(torch_backend, x64, w64, a64, be64, b64, 2.0, 0.0, 0), tol=2e-6)
    assert_close(dx, dx_ref, tol=2e-6)
    assert_close(dalpha, da_ref, tol=2e-6)
    assert_close(dbeta, db_ref, tol=2e-6)


def test_backward_flags_strided_x_and_empty_tokens():
    w, values, meta, x, alpha, beta, b, dy = _case(2, 8, torch.float32, n=64)
    wide = torch.randn(x.shape[0], 2 * x.shape[1], device=DEVICE)
    x_strided = wide[:, ::2]  # column stride 2
    y = nm_forward(x_strided, values, meta, alpha, beta, None, 2, 8, 1.0, 0.0, 0)
    y_ref = dense_forward(torch_backend, x_strided.contiguous(), w, alpha, beta, None, 1.0, 0.0, 0)
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


@pytest.mark.parametrize("n_keep,group,dropout_p", [(2, 4, 0.25), (2, 8, 0.0)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_equals_dense_weight_kernels(n_keep, group, dtype, dropout_p):
    """Same kernels, only the tile load differs: bitwise equal where both run the same
    config (the interpreter), equal to rounding where autotuning may pick differently."""
    w, values, meta, x, alpha, beta, b, dy = _case(n_keep, group, dtype)
    args = (1.5, dropout_p, 99)
    packed = (
        nm_forward(x, values, meta, alpha, beta, b, n_keep, group, *args),
        *nm_backward(dy, x, values, meta, alpha, beta, n_keep, group, *args),
    )
    dense = (
        dense_forward(triton_backend, x, w, alpha, beta, b, *args, path="fused"),
        *dense_backward(triton_backend, dy, x, w, alpha, beta, *args, path="fused"),
    )
    for got, ref in zip(packed, dense):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        if HAS_CUDA:
            assert_close(got, ref, dtype=dtype)
        else:
            assert torch.equal(got, ref)


def test_malformed_packed_inputs_raise_before_launch():
    """The device tier's own checks (a direct launcher call; the op checks at its boundary)."""
    from csrc_triton.spp_forward import spp_linear_forward

    _, values, meta, x, alpha, beta, b, _ = _case(2, 4, torch.float32)
    n = x.shape[1]

    def launch(x, values, meta, n_keep, group):
        weight = PackedWeight(values, meta, n_keep, group, n)
        return spp_linear_forward(x, weight, alpha, beta, b, 1.0, 0.0)

    with pytest.raises(ValueError, match="N:M pattern must have"):
        launch(x, values, meta, 4, 4)
    with pytest.raises(ValueError, match="int32 of shape"):
        launch(x, values, meta.to(torch.int64), 2, 4)
    with pytest.raises(ValueError, match="int32 of shape"):
        launch(x, values, meta[:, :1], 2, 4)
    with pytest.raises(ValueError, match="unit column stride"):
        wide = torch.zeros(values.shape[0], 2 * values.shape[1], device=values.device)
        launch(x, wide[:, ::2], meta, 2, 4)
    with pytest.raises(ValueError, match="x must be 2-D"):
        launch(x[:, :-4], values, meta, 2, 4)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_operands_checked_once_and_prepared_once_per_op_call(monkeypatch, packed, path):
    """Issue 20 item 2: one check at the ops boundary (check_spp_args, PackedWeight.check)
    and one launch preparation per op call, shared by the backward's two kernels."""
    from spp_kernels import spp_linear
    from spp_kernels.ops import chunked, linear

    if path == "chunked":
        monkeypatch.setattr(triton_backend, "CHUNKED_MIN_TOKENS", 1)
        monkeypatch.setattr(chunked, "CHUNK_BYTES", 8 * 64 * 4)
    else:
        monkeypatch.setattr(triton_backend, "CHUNKED_MIN_TOKENS", 10**9)
    calls = {"check": 0, "prepare": 0, "packed_check": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(linear, "check_spp_args", counting("check", linear.check_spp_args))
    monkeypatch.setattr(triton_backend, "prepare", counting("prepare", triton_backend.prepare))
    monkeypatch.setattr(PackedWeight, "check", counting("packed_check", PackedWeight.check))
    gen = torch.Generator().manual_seed(5)
    dense = torch.randn(24, 64, generator=gen)
    dense[:, 2::4] = 0
    dense[:, 3::4] = 0
    values, meta = nm_compress(dense, 2, 4)
    weight = PackedWeight(values, meta, 2, 4, 64) if packed else dense
    x = torch.randn(16, 64, generator=gen, requires_grad=True)
    alpha = torch.randn(4, 64, generator=gen, requires_grad=True)
    beta = torch.randn(24, generator=gen, requires_grad=True)
    y = spp_linear(x, weight, alpha, beta, None, dropout_p=0.1, seed=3, backend="triton")
    assert calls == {"check": 1, "prepare": 1, "packed_check": int(packed)}
    y.sum().backward()
    assert calls == {"check": 1, "prepare": 2, "packed_check": int(packed)}
