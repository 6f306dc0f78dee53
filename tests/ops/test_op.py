"""spp_linear (torch backend) and the references against float64 oracles; input validation."""

import math

import pytest
import torch

from spp_kernels import dropout_mask, spp_linear
from spp_kernels.ops.groups import group_sum, row_groups, times_alpha_rows
from spp_kernels.ops.reference import spp_linear_blocked, spp_linear_naive
from tests.helpers import assert_close

SHAPES = [  # (tokens, m, n, r)
    (1, 16, 16, 16),
    (7, 37, 29, 5),
    (13, 40, 24, 8),
    (5, 33, 48, 1),
]


def _inputs(tokens, m, n, r, dtype=torch.float64, adapter_dtype=None, sparse="unstructured"):
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(2, tokens, n, dtype=dtype)
    w = torch.randn(m, n, dtype=dtype)
    if sparse == "unstructured":
        w = w * (torch.rand(m, n) > 0.5)
    elif sparse == "2:4":
        keep = torch.rand(m, n // 4, 4).argsort(-1) < 2
        w = w * keep.view(m, n).to(dtype)
    alpha = torch.randn(r, n, dtype=adapter_dtype) / math.sqrt(n)
    beta = torch.randn(m, dtype=adapter_dtype)
    bias = torch.randn(m, dtype=adapter_dtype)
    return x, w, alpha, beta, bias


def _outputs_and_grads(fn, x, w, alpha, beta, bias, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, alpha, beta, bias)]
    y = fn(leaves[0], w, leaves[1], leaves[2], leaves[3], **kw)
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("tokens,m,n,r", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_torch_backend_matches_references_float64(tokens, m, n, r, dropout_p):
    args = _inputs(tokens, m, n, r)
    kw = dict(scale=1.7, dropout_p=dropout_p, seed=1234)
    ours = _outputs_and_grads(lambda *a, **k: spp_linear(*a, backend="torch", **k), *args, **kw)
    for ref in (spp_linear_naive, spp_linear_blocked):
        torch.manual_seed(0)
        theirs = _outputs_and_grads(ref, *args, **kw)
        for a, b in zip(ours, theirs):
            assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("adapter_fp32", [False, True])
def test_low_precision_against_float64(dtype, adapter_fp32):
    tokens, m, n, r = 9, 40, 36, 6
    adapter_dtype = torch.float32 if adapter_fp32 else dtype
    x, w, alpha, beta, bias = _inputs(tokens, m, n, r, dtype, adapter_dtype, sparse="2:4")
    kw = dict(scale=2.0, dropout_p=0.1, seed=7)
    ours = _outputs_and_grads(
        lambda *a, **k: spp_linear(*a, backend="torch", **k), x, w, alpha, beta, bias, **kw
    )
    ref = _outputs_and_grads(
        spp_linear_naive, *(t.double() for t in (x, w, alpha, beta, bias)), **kw
    )
    assert ours[0].dtype == dtype
    assert ours[1].dtype == dtype
    assert ours[2].dtype == adapter_dtype and ours[3].dtype == adapter_dtype
    for a, b in zip(ours, ref):
        assert_close(a, b, dtype=dtype)


def test_noncontiguous_and_3d_input():
    tokens, m, n, r = 6, 20, 24, 4
    x, w, alpha, beta, bias = _inputs(tokens, m, n, r)
    xt = torch.randn(n, 3, tokens, dtype=torch.float64).permute(
        1, 2, 0
    )  # non-contiguous (3, tokens, n)
    assert not xt.is_contiguous()
    y = spp_linear(xt, w, alpha, beta, bias, scale=0.5, backend="torch")
    ref = spp_linear_naive(xt.contiguous(), w, alpha, beta, bias, scale=0.5)
    assert y.shape == (3, tokens, m)
    assert_close(y, ref)


def test_gradcheck_torch_backend_float64():
    x, w, alpha, beta, bias = _inputs(3, 10, 8, 3)
    leaves = [t.clone().requires_grad_(True) for t in (x, alpha, beta, bias)]

    def fn(x, a, b, bias):
        return spp_linear(x, w, a, b, bias, scale=1.3, dropout_p=0.3, seed=99, backend="torch")

    assert torch.autograd.gradcheck(fn, leaves)


def test_weight_gets_no_gradient_and_one_that_asks_for_it_is_refused():
    x, w, alpha, beta, _ = _inputs(4, 8, 8, 2)
    alpha.requires_grad_(True)
    spp_linear(x, w, alpha, beta, backend="torch").sum().backward()
    assert w.grad is None
    assert alpha.grad is not None
    w.requires_grad_(True)  # was silently left without a gradient (issue 18 item 12)
    with pytest.raises(ValueError, match="frozen weight requires grad"):
        spp_linear(x, w, alpha, beta, backend="torch")


def test_eval_mode_disables_dropout():
    x, w, alpha, beta, bias = _inputs(5, 12, 16, 3)
    a = spp_linear(x, w, alpha, beta, bias, dropout_p=0.5, training=False, backend="torch")
    b = spp_linear(x, w, alpha, beta, bias, dropout_p=0.0, backend="torch")
    assert torch.equal(a, b)


def test_dropout_mask_statistics_and_determinism():
    keep = dropout_mask((256, 128), 0.3, seed=5)
    assert keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - 0.7) < 0.01
    assert torch.equal(keep, dropout_mask((256, 128), 0.3, seed=5))
    assert not torch.equal(keep, dropout_mask((256, 128), 0.3, seed=6))


def test_group_helpers_match_gather():
    for m, r in [(12, 4), (13, 5), (7, 7), (9, 1)]:
        g = row_groups(m, r)
        assert torch.equal(g, torch.tensor([o * r // m for o in range(m)]))
        w = torch.randn(m, 6, dtype=torch.float64)
        alpha = torch.randn(r, 6, dtype=torch.float64)
        assert torch.equal(times_alpha_rows(w, alpha), w * alpha[g])
        expected = torch.zeros(r, 6, dtype=torch.float64).index_add_(0, g, w)
        assert torch.allclose(group_sum(w, r), expected, rtol=0, atol=1e-12)


def _bad_call(**overrides):
    x, w, alpha, beta, bias = _inputs(3, 8, 8, 2, dtype=torch.float32)
    args = dict(x=x, weight=w, alpha=alpha, beta=beta, bias=bias)
    kw = dict(scale=1.0, dropout_p=0.0, backend="torch")
    for k, v in overrides.items():
        (args if k in args else kw)[k] = v
    return spp_linear(
        args.pop("x"),
        args.pop("weight"),
        args.pop("alpha"),
        args.pop("beta"),
        args.pop("bias"),
        **kw,
    )


@pytest.mark.parametrize(
    "overrides,exc,match",
    [
        (dict(x=torch.randn(3, 7)), ValueError, "last dimension"),
        (dict(alpha=torch.randn(2, 7)), ValueError, "alpha must have shape"),
        (dict(alpha=torch.randn(9, 8)), ValueError, "r = alpha.shape"),
        (dict(alpha=torch.randn(0, 8)), ValueError, "r = alpha.shape"),
        (dict(beta=torch.randn(7)), ValueError, "beta must have shape"),
        (dict(bias=torch.randn(9)), ValueError, "bias must have shape"),
        (dict(dropout_p=1.0), ValueError, "dropout_p"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(scale=float("inf")), ValueError, "scale"),
        (
            dict(x=torch.ones(3, 8, dtype=torch.int8), weight=torch.ones(8, 8, dtype=torch.int8)),
            TypeError,
            "unsupported x dtype",
        ),
        (dict(x=torch.randn(3, 8, dtype=torch.float16)), TypeError, "differs from weight dtype"),
        (dict(alpha=torch.randn(2, 8, dtype=torch.float64)), TypeError, "alpha dtype"),
        (dict(beta=torch.randn(8, device="meta")), ValueError, "one device"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
    ],
)
def test_bad_input_is_named(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _bad_call(**overrides)


def test_float64_refused_on_triton_backend():
    x, w, alpha, beta, bias = _inputs(3, 8, 8, 2)
    with pytest.raises(TypeError, match="not supported by the triton backend"):
        spp_linear(x, w, alpha, beta, bias, backend="triton")


def test_eager_calls_skip_the_custom_op_dispatch_and_match_it_bitwise(monkeypatch):
    """Issue 24 part 2: eager calls on plain tensors run the custom ops' bodies through one
    autograd.Function (no torch.library dispatch, ~0.1 ms per layer call); outputs and
    every gradient equal the custom op's bit for bit (dropout, bias, 3-D input). The op is
    still what torch.compile traces (tests/ops/test_compile.py) and what meta tensors and
    tensor subclasses reach."""
    from spp_kernels.ops import linear

    calls = []
    real_op = linear.spp_linear_fwd

    def counting_op(*args):
        calls.append(args[0].device.type)
        return real_op(*args)

    monkeypatch.setattr(linear, "spp_linear_fwd", counting_op)
    x, w, alpha, beta, bias = _inputs(9, 40, 24, 8, dtype=torch.float32)
    kw = dict(dropout_p=0.2, seed=7, scale=1.5)
    eager = _outputs_and_grads(spp_linear, x, w, alpha, beta, bias, **kw)
    assert calls == []
    monkeypatch.setattr(linear, "_eager", lambda *tensors: False)
    dispatched = _outputs_and_grads(spp_linear, x, w, alpha, beta, bias, **kw)
    assert calls == ["cpu"]
    for a, b in zip(eager, dispatched, strict=True):
        assert torch.equal(a, b)
    monkeypatch.undo()

    class Subclass(torch.Tensor):
        pass

    assert not linear._eager(x.to("meta")) and not linear._eager(x, alpha.as_subclass(Subclass))
    assert linear._eager(x, None, torch.nn.Parameter(alpha))


def test_traced_transformed_and_twice_differentiated_calls_keep_the_ops_behaviour():
    """Review of issue 24 part 2: make_fx (a dispatch mode over real tensors) records the
    custom op, not its body with the seed baked in; inside torch.func transforms a call
    goes to the custom op as before; a second derivative is refused, as the op refuses it,
    instead of being silently wrong."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from spp_kernels.ops import linear

    x, w, alpha, beta, _ = _inputs(5, 16, 8, 4)
    graph = make_fx(lambda x2: spp_linear(x2, w, alpha, beta, dropout_p=0.1, seed=3))(x[0])
    assert "spp_kernels.spp_linear_fwd" in graph.code
    seen = []

    def record(a):
        seen.append(linear._eager(x, a))
        return (a * 2).sum()

    torch.func.grad(record)(alpha)
    assert seen == [False] and linear._eager(x, alpha)
    xr = x.clone().requires_grad_()
    y = spp_linear(xr, w, alpha.clone().requires_grad_(), beta)
    (gx,) = torch.autograd.grad(y.sum(), xr, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()
