"""SPPLinear with a packed N:M frozen weight (weight_format "nm"/"auto") and spp_linear_packed.

Checks: packed storage replaces the dense Parameter; packed and dense layers agree (bitwise
on the torch backend, to rounding on the Triton kernels under the interpreter); merge
keeps every zero; frozen-weight bytes at the expected fraction; the Triton path never
allocates an (m, n) tensor; get_spp_model(weight_format="auto") packs a pruned LLaMA.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from spp_kernels import SPPConfig, SPPLinear, get_spp_model, spp_linear_packed
from spp_kernels.pruning.masks import nm_mask
from spp_kernels.sparsity.nm import nm_packed_nbytes
from spp_kernels.sparsity.packed import PackedWeight, packed_fraction
from tests.helpers import HAS_CUDA, assert_close, make_tiny_llama, train_adapters

# The Triton 3.6 interpreter turns 1-element loop bounds into ints via a deprecated numpy path.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

DEVICE = "cuda" if HAS_CUDA else "cpu"  # the Triton path: GPU, or CPU under the interpreter
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def nm_linear(n=64, m=37, n_keep=2, group=4, dtype=torch.float32, bias=True) -> nn.Linear:
    """nn.Linear pruned to n_keep:group by magnitude; row 0 holds one -0.0 per group.

    The packed format keeps a -0.0 bitwise only where its group has a free slot (as in
    row 0); elsewhere pruned entries are set to +0.0 so that round trips are bit-exact.
    """
    lin = nn.Linear(n, m, bias=bias, dtype=dtype)
    with torch.no_grad():
        w = lin.weight
        w.masked_fill_(~nm_mask(w.abs().float(), n_keep, group), 0.0)
        w[0] = 0.0
        w[0, ::group] = -0.0
    return lin


def layer_pair(lin: nn.Linear, backend: str, r: int = 5, dropout: float = 0.0, fmt="nm"):
    """(dense layer, packed layer) sharing one random alpha/beta."""
    kwargs = dict(r=r, dropout=dropout, init="both_random", backend=backend)
    dense = SPPLinear.from_linear(lin, **kwargs)
    packed = SPPLinear.from_linear(lin, **kwargs, weight_format=fmt)
    with torch.no_grad():
        packed.alpha.copy_(dense.alpha)
        packed.beta.copy_(dense.beta)
    return dense, packed


def test_packed_storage_replaces_dense_weight():
    lin = nm_linear(dtype=torch.float16)
    layer = SPPLinear.from_linear(lin, r=4, weight_format="nm")
    assert layer.weight is None and layer.weight_format == "nm" and layer.nm == (2, 4)
    buffers = dict(layer.named_buffers())
    assert set(buffers) == {"base_layer.weight_values", "base_layer.weight_meta"}
    assert layer.weight_values.shape == (37, 32) and layer.weight_meta.dtype == torch.int32
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"spp_alpha.default", "spp_beta.default"}
    assert not layer.bias.requires_grad
    assert set(layer.state_dict()) == {
        "base_layer.weight_values", "base_layer.weight_meta", "base_layer.bias",
        "spp_alpha.default", "spp_beta.default",
    }  # fmt: skip
    assert torch.equal(layer.dense_weight().view(torch.int16), lin.weight.view(torch.int16))
    assert layer.sparsity() == pytest.approx((lin.weight == 0).float().mean().item())
    assert "weight_format=nm(2:4)" in repr(layer)
    # A state dict round-trips into another packed layer.
    other = SPPLinear.from_linear(nm_linear(dtype=torch.float16), r=4, weight_format="nm")
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.dense_weight(), lin.weight)


def test_auto_packs_sparsest_pattern_and_keeps_others_dense(caplog):
    with caplog.at_level(logging.INFO, logger="spp_kernels.adapters"):
        packed = SPPLinear.from_linear(nm_linear(n_keep=2, group=8), r=2, weight_format="auto")
        unstructured = nn.Linear(64, 16)
        with torch.no_grad():
            unstructured.weight.mul_(torch.rand(16, 64) > 0.5)
        dense = SPPLinear.from_linear(unstructured, r=2, weight_format="auto")
    assert packed.weight_format == "nm" and packed.nm == (2, 8)
    assert dense.weight_format == "dense" and dense.nm is None
    assert dense.weight.data_ptr() == unstructured.weight.data_ptr()
    assert "as 2:8" in caplog.text and "dense (not N:M sparse" in caplog.text
    # An explicit pattern: honoured when it holds, dense under "auto" when it does not.
    assert SPPLinear.from_linear(nm_linear(), r=2, weight_format="auto", nm=(4, 8)).nm == (4, 8)
    assert SPPLinear.from_linear(nm_linear(), r=2, weight_format="auto", nm=(1, 4)).nm is None


def test_bad_weight_formats_raise_clearly():
    with pytest.raises(ValueError, match="weight_format must be one of"):
        SPPLinear.from_linear(nm_linear(), weight_format="csr")
    with pytest.raises(ValueError, match="not N:M sparse"):
        SPPLinear.from_linear(nn.Linear(64, 8), r=2, weight_format="nm")
    with pytest.raises(ValueError, match="not 1:4 sparse: row 1, group 0"):
        SPPLinear.from_linear(nm_linear(), r=2, weight_format="nm", nm=(1, 4))
    with pytest.raises(ValueError, match="nm must be a tuple"):
        SPPLinear.from_linear(nm_linear(), r=2, weight_format="nm", nm=[2, 4])
    with pytest.raises(TypeError, match="PackedWeight"):
        spp_linear_packed(torch.randn(2, 64), torch.randn(8, 64), torch.randn(1, 64), torch.ones(8))
    layer = SPPLinear.from_linear(nm_linear(), r=2, weight_format="nm")
    with pytest.raises(ValueError, match="last dimension"):
        layer(torch.randn(3, 60))
    with pytest.raises(TypeError, match="differs from weight dtype"):
        layer(torch.randn(3, 64, dtype=torch.float16))


@pytest.mark.parametrize("n_keep,group", [(2, 4), (2, 8)])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_packed_torch_fallback_equals_dense_layer_bitwise(n_keep, group, dropout):
    dense, packed = layer_pair(nm_linear(n_keep=n_keep, group=group), "torch", dropout=dropout)
    x = torch.randn(3, 7, 64)
    outs = []
    for layer in (dense, packed):
        xi = x.clone().requires_grad_()
        torch.manual_seed(5)  # the same dropout seed for both calls
        y = layer(xi)
        y.backward(torch.ones_like(y))
        outs.append((y, xi.grad, layer.alpha.grad, layer.beta.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_keep,group", [(2, 4), (2, 8)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_triton_layer_matches_dense_layer(n_keep, group, dtype):
    lin = nm_linear(n=64, m=37, n_keep=n_keep, group=group, dtype=dtype)
    dense, packed = layer_pair(lin, "torch", dropout=0.1)
    packed.backend = "triton"
    packed.to(DEVICE)
    x = torch.randn(2, 9, 64, dtype=dtype)  # 18 tokens: ragged against every block size
    dy = torch.randn(2, 9, 37, dtype=dtype)
    results = []
    for layer in (dense.double(), packed):
        device = layer.alpha.device
        xi = x.to(device, layer.alpha.dtype).requires_grad_()
        torch.manual_seed(11)
        y = layer(xi)
        y.backward(dy.to(device, y.dtype))
        results.append([t.cpu() for t in (y, xi.grad, layer.alpha.grad, layer.beta.grad)])
    (y64, dx64, da64, db64), (y, dx, da, db) = results
    assert y.dtype == dtype and dx.dtype == dtype and da.dtype == dtype
    for out, ref in ((y, y64), (dx, dx64), (da, da64), (db, db64)):
        assert_close(out, ref, dtype=dtype)


def test_merge_is_the_dense_merge_bitwise_packed_or_not():
    dense, packed = layer_pair(nm_linear(dtype=torch.bfloat16), "torch")
    ref = dense.merged_weight()
    merged = packed.merged_weight()
    assert torch.equal(merged.view(torch.int16), ref.view(torch.int16))  # -0.0 kept too
    as_packed = packed.merged_weight(packed=True)
    assert isinstance(as_packed, PackedWeight) and (as_packed.n_keep, as_packed.group) == (2, 4)
    assert torch.equal(as_packed.dense().view(torch.int16), ref.view(torch.int16))
    assert torch.equal(as_packed.meta, packed.weight_meta)  # same positions, new values
    assert torch.equal(dense.merged_weight(packed=True).values, as_packed.values)
    linear = packed.merged_linear()
    assert isinstance(linear, nn.Linear)
    assert torch.equal(linear.weight.view(torch.int16), ref.view(torch.int16))
    assert torch.equal(linear.bias, packed.bias)
    # In-place merge keeps the packed base (new values, same metadata); unmerge restores it.
    values = packed.weight_values.clone()
    packed.merge()
    assert torch.equal(packed.dense_weight().view(torch.int16), ref.view(torch.int16))
    packed.unmerge()
    assert torch.equal(packed.weight_values.view(torch.int16), values.view(torch.int16))


def test_training_steps_leave_packed_weight_untouched():
    layer = SPPLinear.from_linear(
        nm_linear(), r=3, dropout=0.1, init="both_random", weight_format="nm"
    )
    values0, meta0 = layer.weight_values.clone(), layer.weight_meta.clone()
    train_adapters(layer, 64, steps=3, tokens=6)
    assert torch.equal(layer.weight_values.view(torch.int32), values0.view(torch.int32))
    assert torch.equal(layer.weight_meta, meta0)
    assert layer.alpha.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "n_keep,group,n,fraction",
    [(2, 4, 256, 0.5625), (2, 8, 320, 0.30), (4, 8, 256, 0.625), (1, 4, 320, 0.28125)],
)
def test_frozen_weight_bytes_at_expected_fraction(n_keep, group, n, fraction):
    m = 64
    lin = nm_linear(n=n, m=m, n_keep=n_keep, group=group, dtype=torch.float16, bias=False)
    dense = SPPLinear.from_linear(lin, r=8)
    packed = SPPLinear.from_linear(lin, r=8, weight_format="nm", nm=(n_keep, group))

    def frozen_bytes(layer):
        tensors = [*layer.buffers(), *(p for p in layer.parameters() if not p.requires_grad)]
        return sum(t.nbytes for t in tensors)

    def all_bytes(layer):
        return sum(t.nbytes for t in (*layer.parameters(), *layer.buffers()))

    assert frozen_bytes(dense) == m * n * 2
    assert frozen_bytes(packed) == nm_packed_nbytes(m, n, n_keep, group, torch.float16)
    assert frozen_bytes(packed) / frozen_bytes(dense) == pytest.approx(fraction)
    assert packed_fraction(n_keep, group, torch.float16) == pytest.approx(fraction)
    adapters = (8 * n + m) * 2
    assert all_bytes(packed) - frozen_bytes(packed) == adapters == all_bytes(dense) - m * n * 2


def _allocation_sizes(fn) -> list[int]:
    """Bytes of every allocation torch's allocator makes on DEVICE while fn() runs, at any
    depth (inside the custom ops and launchers too)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if HAS_CUDA:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        fn()
    if HAS_CUDA:
        return [e.cuda_memory_usage for e in prof.events() if e.cuda_memory_usage > 0]
    return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_packed_triton_path_allocates_no_dense_weight(dropout):
    m, n = 48, 64
    layer = SPPLinear.from_linear(
        nm_linear(n=n, m=m), r=4, dropout=dropout, init="both_random", weight_format="nm"
    ).to(DEVICE)
    x = torch.randn(10, n, device=DEVICE, requires_grad=True)
    dense_bytes = m * n * 4

    def step(backend):
        layer.backend = backend
        if HAS_CUDA:  # compilation and autotuning (whose benchmarks allocate) happen here
            layer(x).sum().backward()
        layer.alpha.grad = layer.beta.grad = x.grad = None
        return _allocation_sizes(lambda: layer(x).sum().backward())

    triton_sizes = step("triton")
    assert triton_sizes, "the profiler saw no allocations"
    assert max(triton_sizes) < dense_bytes
    assert x.grad is not None and layer.alpha.grad is not None
    # The same probe does see the torch fallback's decompressed (m, n) weight.
    assert dense_bytes in step("torch")


def _nm_pruned_llama(n_keep: int, group: int) -> nn.Module:
    model = make_tiny_llama()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "layers" in name:
                module.weight.mul_(nm_mask(module.weight.abs(), n_keep, group))
    return model


def test_get_spp_model_auto_packs_pruned_llama_and_matches_dense():
    config = dict(r=2, dropout=0.0, init="both_random", backend="torch")
    torch.manual_seed(0)
    dense = get_spp_model(_nm_pruned_llama(2, 8), SPPConfig(**config))
    torch.manual_seed(0)
    packed = get_spp_model(_nm_pruned_llama(2, 8), SPPConfig(**config, weight_format="auto"))
    layers = packed.spp_layers()
    assert len(layers) == 14 and all(layer.nm == (2, 8) for layer in layers.values())
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(packed(input_ids=ids).logits, dense(input_ids=ids).logits)

    def frozen_linear_bytes(model):
        return sum(
            t.nbytes
            for layer in model.spp_layers().values()
            for t in (*layer.buffers(), *(p for p in layer.parameters() if not p.requires_grad))
        )

    expected = sum(  # LLaMA projections have no bias
        nm_packed_nbytes(layer.out_features, layer.in_features, 2, 8, torch.float32)
        for layer in layers.values()
    )
    assert frozen_linear_bytes(packed) == expected
    fraction = frozen_linear_bytes(packed) / frozen_linear_bytes(dense)
    assert fraction == pytest.approx(packed_fraction(2, 8, torch.float32), abs=0.01)  # ~28 %
    merged = packed.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


def test_packed_layer_compiles_without_graph_breaks():
    layer = SPPLinear.from_linear(nm_linear(), r=2, dropout=0.1, weight_format="nm")
    layer.backend = "torch"
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 64, requires_grad=True)
    torch.manual_seed(3)
    y = compiled(x)
    y.sum().backward()
    assert y.shape == (4, 37) and layer.alpha.grad is not None


def test_benchmark_accounting_rows():
    """benchmarks/bench_nm's exact byte accounting: shared row schema and the issue's numbers."""
    from benchmarks import bench_nm, common

    rows = bench_nm.weight_bytes_rows()
    assert all(tuple(row) == common.ROW_KEYS and row["unit"] == "MB" for row in rows)
    projections = [row for row in rows if row["kernel"] == "nm_weight_bytes"]
    by_provider = {row["provider"]: row["extra"]["fraction"] for row in projections}
    assert by_provider["dense"] == 1.0 and by_provider["nm-2:4"] == 0.5625
    assert 0.29 < by_provider["nm-2:8"] < 0.31
    models = {
        (row["extra"]["model"], row["provider"]): row["extra"]["total_gb"]
        for row in rows
        if row["kernel"] == "nm_model_weights"
    }
    # LLaMA-2-70B in fp16: ~138 GB dense, ~78 GB with 2:4-packed projections.
    assert models[("llama-2-70b", "dense")] == pytest.approx(138.0, abs=0.5)
    assert models[("llama-2-70b", "nm-2:4")] == pytest.approx(78.1, abs=0.5)


def test_sparsity_report_reads_packed_layers():
    from spp_kernels.pruning import sparsity_report

    model = nn.Sequential(SPPLinear.from_linear(nm_linear(), r=2, weight_format="nm"))
    report = sparsity_report(model)
    (layer,) = report.layers
    assert layer.shape == (37, 64)
    assert layer.nonzeros == int(torch.count_nonzero(model[0].dense_weight()))
    assert (2, 4) in layer.satisfies
