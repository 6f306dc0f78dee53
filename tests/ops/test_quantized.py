"""SPP's op on a bitsandbytes weight (BnbWeight): NF4 / FP4 (with and without double
quantization) and int8, rows dequantized chunk by chunk, checked against a float64 oracle
on the dequantized weight; zeros kept; allocations bounded by the chunk budget."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from spp_kernels import spp_linear  # noqa: E402
from spp_kernels.ops import chunked  # noqa: E402
from spp_kernels.ops.quantized import BnbWeight  # noqa: E402
from spp_kernels.ops.reference import spp_linear_naive  # noqa: E402
from tests.helpers import TOL, NaNEmptyTorch, assert_allocations_bounded, assert_close  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


def pruned_2_4(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A random (m, n) weight with the two smallest magnitudes of every 4 columns zeroed
    (n a multiple of 4)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    groups = w.view(m, n // 4, 4)
    drop = groups.abs().argsort(-1)[..., :2]
    return groups.scatter(-1, drop, 0.0).view(m, n)


def quantized_layer(weight: torch.Tensor, kind: str, dtype: torch.dtype = F32, nested=True):
    """A bitsandbytes layer holding `weight` quantized as `kind` ("nf4", "fp4", "int8")."""
    m, n = weight.shape
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(n, m, bias=False, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False,
                                         has_fp16_weights=False)  # fmt: skip
    else:
        layer = bnb.nn.Linear4bit(n, m, bias=False, compute_dtype=dtype, quant_type=kind,
                                  compress_statistics=nested)  # fmt: skip
        layer.weight = bnb.nn.Params4bit(weight.clone().to(dtype), requires_grad=False,
                                         quant_type=kind, compress_statistics=nested)  # fmt: skip
    return layer.to("cpu")


# (kind, nested, m, n, r, lead, dtype, dropout): ragged n (blocks of 64 cross rows), r not
# dividing m, several chunks (the budget is set below), every activation dtype.
CASES = [
    ("nf4", True, 300, 100, 7, (2, 11), F32, 0.3),
    ("nf4", True, 96, 128, 4, (13,), BF16, 0.0),
    ("nf4", False, 44, 36, 5, (9,), F16, 0.1),
    ("fp4", False, 70, 64, 3, (17,), F32, 0.0),
    ("fp4", True, 33, 52, 33, (5,), BF16, 0.2),
    ("int8", False, 40, 72, 5, (6,), F16, 0.2),
    ("int8", False, 57, 20, 1, (3, 4), F32, 0.0),
]


@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: f"{c[0]}{'-dq' if c[1] else ''}-{c[2]}x{c[3]}-r{c[4]}-{str(c[6])[6:]}-p{c[7]}",
)
def test_adapter_term_matches_float64_on_the_dequantized_weight(case, monkeypatch):
    kind, nested, m, n, r, lead, dtype, p = case
    fake = NaNEmptyTorch()
    monkeypatch.setattr(chunked, "torch", fake)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", max(1, m * n * dtype.itemsize // 3))
    weight = pruned_2_4(m, n)
    layer = quantized_layer(weight, kind, dtype if kind != "int8" else F32, nested)
    operand = BnbWeight.of_layer(layer, dtype)
    w = operand.dense()
    assert w.dtype == dtype and w.shape == (m, n)
    assert (w[weight == 0] == 0).all(), "a pruned zero became nonzero through quantization"
    packed_before = layer.weight.data.clone()

    x = torch.randn(*lead, n, dtype=dtype, requires_grad=True)
    alpha = (torch.randn(r, n) * 0.5).requires_grad_()
    beta = torch.randn(m).requires_grad_()
    kw = dict(scale=1.5, dropout_p=p, seed=7)
    y = spp_linear(x, operand, alpha, beta, **kw, with_base=False)
    dy = torch.randn_like(y)
    y.backward(dy)

    leaves = [t.detach().double().requires_grad_() for t in (x, alpha, beta)]
    w64 = w.double()
    y64 = spp_linear_naive(leaves[0], w64, leaves[1], leaves[2], **kw)
    y64 = y64 - leaves[0] @ w64.t()  # the adapter term alone
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == (*lead, m)
    assert_close(y, y64, dtype=dtype, name="y")
    assert_close(x.grad, leaves[0].grad, dtype=dtype, name="dx")
    for got, ref, name in (
        (alpha.grad, leaves[1].grad, "dalpha"),
        (beta.grad, leaves[2].grad, "dbeta"),
    ):
        assert_close(got, ref, tol=max(TOL[dtype], TOL[F32]), name=name)
    assert fake.poisoned >= 2
    assert torch.equal(layer.weight.data, packed_before), "the quantized weight was written"


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_rows_decode_exactly_what_bitsandbytes_decodes(kind):
    m, n = 257, 72  # 72 columns: 4-bit blocks of 64 straddle rows; > 256 blocks (nested)
    layer = quantized_layer(pruned_2_4(m, n, seed=3), kind)
    if kind == "int8":
        scb = layer.weight.SCB
        full = layer.weight.data.to(F32).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))
    else:
        full = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    operand = BnbWeight.of_layer(layer)
    for row0, rows in ((0, m), (0, 1), (5, 17), (m - 3, 3), (100, 150)):
        assert torch.equal(operand.rows(row0, rows), full[row0 : row0 + rows])


def test_int8_layer_after_its_first_forward_still_decodes():
    """bitsandbytes moves the row scales from the weight to the layer state at the first
    forward; the operand finds them there."""
    layer = quantized_layer(pruned_2_4(16, 32), "int8")
    before = BnbWeight.of_layer(layer).dense()
    layer(torch.randn(2, 32))
    assert layer.weight.SCB is None
    assert torch.equal(BnbWeight.of_layer(layer).dense(), before)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_no_allocation_beyond_the_chunk_budget(kind, dropout_p, monkeypatch):
    """Forward + backward allocate no (m, n) tensor: with the budget at an eighth of W's
    float32 bytes, nothing exceeds a quarter of them (W is never dequantized whole)."""
    m, n, r, tokens = 128, 192, 4, 4
    weight_bytes = m * n * 4
    monkeypatch.setattr(chunked, "CHUNK_BYTES", weight_bytes // 8)
    layer = quantized_layer(pruned_2_4(m, n), kind)
    operand = BnbWeight.of_layer(layer, F32)
    x = torch.randn(tokens, n, requires_grad=True)
    alpha = torch.randn(r, n, requires_grad=True)
    beta = torch.randn(m, requires_grad=True)
    kw = dict(dropout_p=dropout_p, seed=1, with_base=False)
    spp_linear(x, operand, alpha, beta, **kw).sum().backward()  # warm-up
    assert_allocations_bounded(
        lambda: spp_linear(x, operand, alpha, beta, **kw).sum().backward(),
        weight_bytes // 4,
        operand.dense,
        weight_bytes,
    )


def test_refusals_name_the_problem():
    layer = quantized_layer(pruned_2_4(16, 32), "nf4")
    operand = BnbWeight.of_layer(layer)
    x, alpha, beta = torch.randn(2, 32), torch.randn(2, 32), torch.randn(16)
    with pytest.raises(ValueError, match="torch backend"):
        spp_linear(x, operand, alpha, beta, backend="triton", with_base=False)
    # fullgraph: dynamo reports our refusal (without it, the call graph-breaks and runs eager)
    with pytest.raises(Exception, match="eager mode only"):
        torch.compile(lambda t: spp_linear(t, operand, alpha, beta, with_base=False),
                      backend="eager", fullgraph=True)(x)  # fmt: skip
    fp16_weights = bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=True)
    with pytest.raises(ValueError, match="has_fp16_weights"):
        BnbWeight.of_layer(fp16_weights)
    with pytest.raises(ValueError, match="unsupported bitsandbytes layer"):
        BnbWeight.of_layer(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="outside"):
        operand.rows(10, 7)


def test_a_layer_repacked_for_cpu_inference_is_read_in_the_layout_it_computes_with():
    """bitsandbytes repacks a 4-bit weight at its first CPU inference call on AVX512-BF16
    machines; the operand puts it back in the standard layout (bitsandbytes' own inverse),
    and the layer's output and the dequantized rows still agree."""
    layer = quantized_layer(pruned_2_4(64, 128), "nf4", F32).eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        layer(x)  # may repack (CPU with AVX512-BF16)
        operand = BnbWeight.of_layer(layer, F32)
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        y = layer(x)
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert_close(y, x.double() @ operand.dense().double().t(), tol=1e-5, name="layer vs rows")
