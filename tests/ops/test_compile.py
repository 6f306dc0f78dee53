"""torch.compile on SPPLinear and on an SPP model: one graph, no breaks, same gradients.

CPU-cheap backends only: "eager" for graph capture (torch._dynamo.explain) and "aot_eager"
for the traced forward + backward through the custom op's registered autograd.
"""

from __future__ import annotations

import pytest
import torch

from spp_kernels import SPPConfig, SPPLinear, get_spp_model
from tests.helpers import make_tiny_llama


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def spp_ops(explain_output) -> list[str]:
    return [
        str(op) for ops in explain_output.ops_per_graph for op in ops if "spp_kernels" in str(op)
    ]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_spplinear_captures_in_one_graph(dropout):
    layer = SPPLinear(16, 24, r=5, dropout=dropout, init="both_random", backend="torch")
    out = torch._dynamo.explain(layer)(torch.randn(2, 3, 16))
    assert out.graph_break_count == 0, out.break_reasons
    assert out.graph_count == 1
    assert spp_ops(out) == ["spp_kernels.spp_linear_fwd.default"]


def test_spp_llama_has_no_graph_breaks():
    spp = get_spp_model(make_tiny_llama(num_hidden_layers=1), SPPConfig(r=4, dropout=0.05))
    spp.train()
    out = torch._dynamo.explain(spp)(input_ids=torch.randint(0, 128, (2, 8)))
    assert out.graph_break_count == 0, [str(b.reason) for b in out.break_reasons]
    assert len(spp_ops(out)) == len(spp.spp_layers()) == 7


def test_compiled_model_matches_eager_loss_and_gradients():
    spp = get_spp_model(
        make_tiny_llama(num_hidden_layers=1), SPPConfig(r=4, dropout=0.0, init="both_random")
    )
    spp.train()
    ids = torch.randint(0, 128, (2, 8))
    eager_loss = spp(input_ids=ids, labels=ids).loss
    eager_loss.backward()
    eager = {n: p.grad.clone() for n, p in spp.named_parameters() if p.requires_grad}
    spp.zero_grad()
    # fullgraph=True makes any graph break an error.
    compiled = torch.compile(spp, backend="aot_eager", fullgraph=True)
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-6)
    grads = {n: p.grad for n, p in spp.named_parameters() if p.requires_grad}
    assert grads.keys() == eager.keys() and len(grads) == 14
    for name, g in grads.items():
        assert g is not None, name
        torch.testing.assert_close(g, eager[name], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in spp.parameters() if not p.requires_grad)


def test_compiled_dropout_draws_fresh_masks_and_trains():
    layer = SPPLinear(32, 16, r=4, dropout=0.5, init="both_random", backend="torch")
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 32)
    torch.manual_seed(1)
    a = compiled(x)
    b = compiled(x)
    assert not torch.equal(a, b)  # the seed is traced as data, not baked into the graph
    torch.manual_seed(1)
    torch.testing.assert_close(compiled(x), a, rtol=0, atol=0)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), a, rtol=1e-6, atol=1e-6)  # same mask as eager
    a.sum().backward()
    assert layer.alpha.grad is not None and layer.beta.grad.abs().sum() > 0
    assert layer.weight.grad is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize(
    "dropout_p,given_mask,with_base",
    [(0.0, False, True), (0.1, False, True), (0.1, True, True), (0.1, False, False)],
)
def test_op_family_passes_opcheck(backend, packed, dropout_p, given_mask, with_base):
    """torch.library.opcheck on the one custom-op family: schema, fake (meta) impls, autograd
    registration and aot dispatch, for dense and N:M packed weights, with the mask drawn by
    the op or given by the caller, with and without the frozen product."""
    from spp_kernels.ops.dropout import draw_keep_bits
    from spp_kernels.ops.linear import spp_linear_fwd
    from spp_kernels.sparsity.packed import PackedWeight
    from tests.helpers import DEVICE

    device = DEVICE if backend == "triton" else "cpu"
    w = torch.randn(12, 32, device=device) * (
        torch.rand(12, 8, 4, device=device).argsort(-1) < 2
    ).reshape(12, 32)
    x = torch.randn(5, 32, device=device, requires_grad=True)
    alpha = torch.randn(3, 32, device=device, requires_grad=True)
    beta = torch.randn(12, device=device, requires_grad=True)
    if packed:
        pw = PackedWeight.from_dense(w, 2, 4)
        weight, meta, pattern = pw.values, pw.meta, (2, 4)
    else:
        weight, meta, pattern = w, None, (0, 0)
    keep = draw_keep_bits(5, 32, dropout_p, 3, device) if given_mask else None
    args = (x, weight, meta, alpha, beta, None, *pattern, 2.0, dropout_p, torch.tensor(7), keep)
    torch.library.opcheck(spp_linear_fwd, (*args, backend, with_base))
