"""SPPLinear: init, freezing, training keeps zeros bitwise, merge."""

import math

import pytest
import torch
from torch import nn

from spp_kernels import SPPLinear
from spp_kernels.ops.reference import spp_linear_naive
from tests.helpers import train_adapters


def _pruned_linear(n=24, m=40, dtype=torch.float32, bias=True):
    lin = nn.Linear(n, m, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(m, n) > 0.5)
        lin.weight[0, :3] = -0.0  # negative zeros must survive too
    return lin


def test_fresh_layer_equals_pruned_layer():
    lin = _pruned_linear()
    layer = SPPLinear.from_linear(lin, r=4, scale=2.0)
    x = torch.randn(3, 5, 24)
    assert torch.equal(layer.beta, torch.zeros(40))
    bound = 1 / math.sqrt(24)
    assert layer.alpha.abs().max() <= bound and layer.alpha.abs().max() > 0
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-6, atol=1e-6)


def test_from_linear_shares_and_freezes_weight():
    lin = _pruned_linear()
    layer = SPPLinear.from_linear(lin, r=8)
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"spp_alpha.default", "spp_beta.default"}
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == 8 * 24 + 40


@pytest.mark.parametrize("init", ["both_random", "alpha_zero"])
def test_ablation_inits(init):
    layer = SPPLinear(16, 12, r=3, init=init)
    assert layer.beta.abs().sum() > 0
    assert (layer.alpha.abs().sum() == 0) == (init == "alpha_zero")


def test_training_preserves_zeros_bitwise_and_merge_matches():
    torch.manual_seed(1)
    lin = _pruned_linear()
    w0 = lin.weight.detach().clone()
    layer = SPPLinear.from_linear(lin, r=5, scale=2.0, dropout=0.1, init="both_random")
    train_adapters(layer, 24, steps=5)
    assert torch.equal(layer.weight.view(torch.int32), w0.view(torch.int32))
    merged = layer.merged_linear()  # a new nn.Linear; the layer is unchanged
    zeros = w0 == 0
    assert torch.equal(merged.weight[zeros].view(torch.int32), w0[zeros].view(torch.int32))
    assert int((merged.weight != 0).sum()) == int((w0 != 0).sum())
    layer.eval()
    x = torch.randn(4, 24)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    ref = spp_linear_naive(x, layer.weight, layer.alpha, layer.beta, layer.bias, scale=2.0)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    # merge() is peft's in-place merge: the base now holds the merged weight, and unmerge()
    # restores the frozen one exactly (kept aside, never divided back).
    base = layer.merge()
    assert base is layer.base_layer and layer.merged
    assert torch.equal(base.weight, merged.weight)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged and torch.equal(layer.weight.view(torch.int32), w0.view(torch.int32))


def test_merged_weight_keeps_zeros_with_extreme_factors():
    layer = SPPLinear.from_linear(_pruned_linear(dtype=torch.bfloat16), r=2)
    with torch.no_grad():
        layer.alpha.fill_(1e30)
        layer.beta.fill_(1e30)
    merged = layer.merged_weight()
    zeros = layer.weight == 0
    assert torch.equal(merged[zeros].view(torch.int16), layer.weight[zeros].view(torch.int16))


def test_extra_repr_and_bad_args():
    text = repr(SPPLinear.from_linear(_pruned_linear(), r=4, scale=1.5))
    assert "r=4" in text and "scale=1.5" in text and "sparsity=0.5" in text
    with pytest.raises(ValueError, match="r must be"):
        SPPLinear(8, 4, r=5)
    with pytest.raises(ValueError, match="r must be"):
        SPPLinear(8, 4, r=0)
    with pytest.raises(ValueError, match="dropout"):
        SPPLinear(8, 4, r=2, dropout=1.0)
    with pytest.raises(ValueError, match="scale"):
        SPPLinear(8, 4, r=2, scale=float("nan"))
    with pytest.raises(ValueError, match="init"):
        SPPLinear(8, 4, r=2, init="lora")
    with pytest.raises(TypeError, match="nn.Linear"):
        SPPLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_fp32_adapters_on_bf16_weight():
    lin = _pruned_linear(dtype=torch.bfloat16)
    layer = SPPLinear.from_linear(lin, r=4, adapter_dtype=torch.float32, init="both_random")
    assert layer.alpha.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    y = layer(torch.randn(3, 24, dtype=torch.bfloat16))
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16
    assert layer.alpha.grad.dtype == torch.float32 and layer.beta.grad.dtype == torch.float32


@pytest.mark.parametrize("training", [True, False])
def test_from_linear_and_merge_keep_training_mode(training):
    lin = nn.Linear(32, 8).train(training)
    layer = SPPLinear.from_linear(lin, r=2)
    assert layer.training is training
    assert layer.merge().training is training
    assert layer.merged_linear().training is training
