"""SPP's op on N:M packed weights with low-bit values (QuantizedPackedWeight: int8, int4,
fp8), on every backend and path: the Triton tile decoder against the host chunk decoder
(bitwise), the op against a float64 oracle on the decoded weight, zeros kept, bad input
refused before anything is made, allocations bounded by the chunk budget. On CPU the
kernels run under TRITON_INTERPRET=1 (set by conftest)."""

from __future__ import annotations

import pytest
import torch

from csrc_triton._launch import INTERPRET
from csrc_triton.weight_chunks import weight_chunk
from spp_kernels import spp_linear
from spp_kernels.ops import chunked
from spp_kernels.ops.reference import spp_linear_naive
from spp_kernels.sparsity.lowbit import QuantizedPackedLinear, QuantizedPackedWeight
from spp_kernels.sparsity.nm import nm_compress
from tests.helpers import (
    DEVICE,
    INTERPRETER_WARNINGS,
    TOL,
    NaNEmptyTorch,
    assert_allocations_bounded,
    assert_close,
)

pytestmark = pytest.mark.filterwarnings(INTERPRETER_WARNINGS)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FORMATS = ("int8", "int4", "fp8")
# The rounding error of each format, relative to the largest |value| of a row or group:
# half a code step (int8 1/254, int4 1/14) or e4m3's 3-bit mantissa (2**-4 of the value).
RTN_ERROR = {"int8": 0.5 / 127, "int4": 0.5 / 7, "fp8": 2.0**-4}


def nm_sparse(m: int, n: int, n_keep: int, group: int, seed: int = 0) -> torch.Tensor:
    """A random (m, n) float32 weight with n_keep nonzeros at random positions per group."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) * torch.rand(m, 1, generator=g).add(0.1)
    kept = torch.rand(m, n // group, group, generator=g).argsort(-1)[..., :n_keep]
    mask = torch.zeros(m, n // group, group, dtype=torch.bool).scatter_(2, kept, True)
    return w * mask.view(m, n)


def quantized(w, n_keep, group, fmt, dtype, group_size=None):
    kept = w.shape[1] // group * n_keep
    group_size = group_size or (32 * n_keep if kept % (32 * n_keep) == 0 else kept)
    return QuantizedPackedWeight.from_dense(w.to(dtype).to(DEVICE), n_keep, group, fmt,
                                            group_size)  # fmt: skip


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({F32: torch.int32, F16: torch.int16, BF16: torch.int16}[t.dtype])


# int4 "narrow": scale groups of 2N kept values, narrower than a tile (scales gathered per
# N:M group) instead of one scale per row and tile
LOW_BIT = ["int8", "fp8", "int4", "int4-narrow"]


@pytest.mark.parametrize("n_keep,group", [(2, 4), (1, 4), (3, 4), (2, 8), (4, 8)])
@pytest.mark.parametrize("fmt", LOW_BIT)
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
def test_tile_decoder_equals_the_host_decoder_bitwise(n_keep, group, fmt, dtype):
    rows, cols = 19, 12 * 8 * group  # ragged rows, several meta words, several int4 groups
    w = nm_sparse(rows, cols, n_keep, group)
    w[0, : 2 * group] = 0  # fewer nonzeros than N: padding decodes to +0.0
    w[3, :] *= 1e-3  # a row of small values (subnormal fp8 codes)
    narrow = fmt == "int4-narrow"
    q = quantized(
        w, n_keep, group, fmt[:4] if narrow else fmt, dtype, 2 * n_keep if narrow else None
    )
    out = torch.full((rows, cols), float("nan"), dtype=dtype, device=DEVICE)
    ones = torch.ones(1, cols, device=DEVICE), torch.ones(rows, device=DEVICE)
    weight_chunk(q, *ones, 1.0, 0, rows, "weight", out=out)
    if INTERPRET and dtype == BF16:
        # the interpreter truncates float32 -> bfloat16 (the GPU rounds): compare with the
        # host decode in float32, truncated the same way
        exact = _bits(q.to(F32).dense()) & ~0xFFFF
        assert torch.equal(_bits(out).to(torch.int32) << 16, exact)
    else:
        assert torch.equal(_bits(out), _bits(q.dense()))
    assert bool((q.dense()[w == 0] == 0).all()), "a pruned zero decoded nonzero"


@pytest.mark.parametrize("fmt", FORMATS)
def test_rounding_is_nearest_and_zeros_stay_pruned(fmt):
    m, n = 24, 512
    w = nm_sparse(m, n, 2, 4, seed=1)
    q = quantized(w, 2, 4, fmt, F32, group_size=128)
    d = q.dense()
    assert torch.equal(d[w == 0], torch.zeros_like(d[w == 0]))  # +0.0, bitwise
    assert not bool(torch.signbit(d[w == 0]).any())
    values, _ = nm_compress(w, 2, 4)
    if fmt == "int4":
        absmax = values.view(m, -1, 128).abs().amax(-1).repeat_interleave(128, 1)
    else:
        absmax = values.abs().amax(-1, keepdim=True).expand_as(values)
    err = (q.kept_values(0, m) - values).abs()
    if fmt == "fp8":
        assert bool((err <= RTN_ERROR[fmt] * values.abs() + absmax * 2.0**-9 / 448).all())
    else:
        # int4's bfloat16 scale adds its own rounding (2**-8 of the scale)
        slack = 1.0 + (2.0**-7 if fmt == "int4" else 1e-6)
        assert bool((err <= RTN_ERROR[fmt] * absmax * slack).all())
    assert q.nbytes < values.nbytes // (2 if fmt == "int4" else 1)


# (fmt, n_keep, group, m, n, r, lead, dtype, dropout, path): ragged m, r not dividing m,
# every compute dtype, fused and chunked Triton paths and the torch backend.
CASES = [
    ("int8", 2, 4, 37, 128, 5, (2, 9), F32, 0.0, "fused"),
    ("int8", 2, 8, 20, 256, 3, (17,), BF16, 0.2, "chunked"),
    ("int4", 2, 4, 33, 256, 7, (11,), F16, 0.1, "fused"),
    ("int4", 1, 4, 18, 512, 4, (3, 5), F32, 0.3, "torch"),
    ("int4", 4, 8, 21, 128, 21, (13,), BF16, 0.0, "chunked"),
    ("int4", 2, 4, 26, 128, 5, (10,), F32, 0.2, "fused"),  # narrow scale groups (4)
    ("fp8", 2, 4, 29, 64, 6, (9,), F32, 0.2, "fused"),
    ("fp8", 3, 4, 16, 96, 3, (7,), F16, 0.0, "torch"),
    ("fp8", 2, 4, 40, 192, 9, (19,), BF16, 0.1, "chunked"),
]


def _run(path, x, q, alpha, beta, bias, kw, monkeypatch):
    if path == "torch":
        return spp_linear(x, q, alpha, beta, bias, backend="torch", **kw)
    monkeypatch.setattr(
        "spp_kernels.ops.triton_backend.CHUNKED_MIN_TOKENS", 1 if path == "chunked" else 10**9
    )
    return spp_linear(x, q, alpha, beta, bias, backend="triton", **kw)


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: f"{c[0]}-{c[1]}:{c[2]}-{c[3]}x{c[4]}-r{c[5]}-{str(c[7])[6:]}-p{c[8]}-{c[9]}",
)
def test_op_matches_float64_on_the_decoded_weight(case, monkeypatch):
    fmt, n_keep, group, m, n, r, lead, dtype, p, path = case
    fake = NaNEmptyTorch()
    monkeypatch.setattr(chunked, "torch", fake)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", max(1, m * n * dtype.itemsize // 3))
    w = nm_sparse(m, n, n_keep, group, seed=m)
    q = quantized(w, n_keep, group, fmt, dtype, 4 if m == 26 else None)
    codes_before = q.codes.clone()
    x = torch.randn(*lead, n, dtype=dtype, device=DEVICE, requires_grad=True)
    alpha = (torch.randn(r, n, device=DEVICE) * 0.3).requires_grad_()
    beta = torch.randn(m, device=DEVICE).requires_grad_()
    bias = torch.randn(m, device=DEVICE, dtype=dtype)
    kw = dict(scale=1.5, dropout_p=p, seed=3)
    y = _run(path, x, q, alpha, beta, bias, kw, monkeypatch)
    dy = torch.randn_like(y)
    y.backward(dy)

    leaves = [t.detach().double().requires_grad_() for t in (x, alpha, beta)]
    y64 = spp_linear_naive(leaves[0], q.dense().double(), *leaves[1:], bias.double(), **kw)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == (*lead, m)
    assert_close(y, y64, dtype=dtype, name="y")
    assert_close(x.grad, leaves[0].grad, dtype=dtype, name="dx")
    for got, ref, name in ((alpha.grad, leaves[1].grad, "dalpha"), (beta.grad, leaves[2].grad,
                                                                     "dbeta")):  # fmt: skip
        assert_close(got, ref, tol=max(TOL[dtype], TOL[F32]), name=name)
    if path != "fused":
        assert fake.poisoned >= 1
    assert torch.equal(q.codes, codes_before), "the codes were written"


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_no_allocation_beyond_the_chunk_budget(dropout_p, monkeypatch):
    """Forward + backward on the torch backend never decode W whole: with the budget at an
    eighth of W's float32 bytes, nothing allocated exceeds a quarter of them."""
    m, n, r, tokens = 128, 256, 4, 4
    weight_bytes = m * n * 4
    monkeypatch.setattr(chunked, "CHUNK_BYTES", weight_bytes // 8)
    q = QuantizedPackedWeight.from_dense(nm_sparse(m, n, 2, 4), 2, 4, "int4", 64)
    x = torch.randn(tokens, n, requires_grad=True)
    alpha, beta = torch.randn(r, n, requires_grad=True), torch.randn(m, requires_grad=True)
    kw = dict(dropout_p=dropout_p, seed=1, backend="torch")
    spp_linear(x, q, alpha, beta, **kw).sum().backward()  # warm-up
    assert_allocations_bounded(
        lambda: spp_linear(x, q, alpha, beta, **kw).sum().backward(),
        weight_bytes // 4,
        q.dense,
        weight_bytes,
    )


def test_bad_input_is_refused_before_anything_is_made():
    w = nm_sparse(8, 96, 2, 4)
    with pytest.raises(ValueError, match="row length divisible by the group: 48 kept values"):
        QuantizedPackedWeight.from_dense(w, 2, 4, "int4", 128)
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        QuantizedPackedWeight.from_dense(w, 2, 4, "int2")
    with pytest.raises(ValueError, match="multiple of N=3"):
        QuantizedPackedWeight.from_dense(nm_sparse(8, 96, 3, 4), 3, 4, "int4", 8)
    dense = torch.randn(8, 96)
    with pytest.raises(ValueError, match="not 2:4"):
        QuantizedPackedWeight.from_dense(dense, 2, 4, "int8", name="layer.q")
    w[1, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        QuantizedPackedWeight.from_dense(w, 2, 4, "int8")
    q = QuantizedPackedWeight.from_dense(nm_sparse(8, 96, 2, 4), 2, 4, "int8")
    x, alpha, beta = torch.randn(2, 96), torch.randn(2, 96), torch.randn(8)
    with pytest.raises(TypeError, match="x dtype torch.float16 differs"):
        spp_linear(x.half(), q, alpha, beta)
    # fullgraph: dynamo reports the refusal (without it the call graph-breaks, runs eager)
    with pytest.raises(Exception, match="eager mode only"):
        torch.compile(lambda t: spp_linear(t, q, alpha, beta), backend="eager",
                      fullgraph=True)(x)  # fmt: skip
    broken = QuantizedPackedWeight(q.codes.float(), q.scales, q.meta, 2, 4, 96, "int8", 0, F32)
    with pytest.raises(ValueError, match="codes must be torch.int8"):
        spp_linear(x, broken, alpha, beta)


def test_layer_keeps_codes_and_scales_through_model_casts_and_state_dicts():
    linear = torch.nn.Linear(256, 12)
    linear.weight.data = nm_sparse(12, 256, 2, 4)
    layer = QuantizedPackedLinear.from_linear(linear, 2, 4, "int4", 64)
    codes, scales = layer.weight_codes.clone(), layer.weight_scales.clone()
    layer.to(BF16)
    assert layer.compute_dtype == BF16 and layer.bias.dtype == BF16
    assert torch.equal(layer.weight_codes, codes) and torch.equal(layer.weight_scales, scales)
    layer.float()
    assert layer.compute_dtype == F32 and layer.weight_scales.dtype == BF16
    x = torch.randn(3, 256)
    y = layer(x)
    ref = x.double() @ layer.dense_weight().double().t() + linear.bias.double()
    assert_close(y, ref, dtype=F32)
    linear.weight.data = nm_sparse(12, 256, 2, 4, seed=5)
    other = QuantizedPackedLinear.from_linear(linear, 2, 4, "int4", 64)
    other.weight_meta.copy_(layer.weight_meta)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other(x), y)
    assert "weight_dtype=int4, group_size=64" in repr(layer)
    # from a PackedLinear (values already packed): the same codes as from the dense layer
    from spp_kernels.sparsity.packed import PackedLinear

    again = QuantizedPackedLinear.from_linear(
        PackedLinear.from_linear(linear, 2, 4), 2, 4, "int4", 64
    )
    direct = QuantizedPackedLinear.from_linear(linear, 2, 4, "int4", 64)
    assert torch.equal(again.weight_codes, direct.weight_codes)
    assert torch.equal(again.weight_scales, direct.weight_scales)
