"""Issue 19 item 5: what peft's generic tuner tests found, each reproduced in a few lines
(the whole suite runs in test_peft_suite.py). Letters follow the issue."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from spp_kernels.adapters import SPPConfig, SPPLinear
from tests.helpers import make_tiny_llama

LLAMA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _nm_pruned_llama(dtype=torch.float32):
    from spp_kernels.pruning.masks import nm_mask

    model = make_tiny_llama(3, attention_bias=True, mlp_bias=True).to(dtype)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] in LLAMA_TARGETS:
                module.weight.mul_(nm_mask(module.weight.abs(), 2, 4))
    return model


def _ids():
    return torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def test_a_target_modules_none_uses_the_model_types_default():
    model = get_peft_model(make_tiny_llama(), SPPConfig(target_modules=None))
    wrapped = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, SPPLinear)}
    assert wrapped == LLAMA_TARGETS


@pytest.mark.parametrize("weight_format", ["nm", "auto"])
def test_b_packed_base_loads_with_low_cpu_mem_usage(tmp_path, weight_format):
    config = SPPConfig(r=4, weight_format=weight_format, init="both_random")
    trained = get_peft_model(_nm_pruned_llama(), config)
    with torch.no_grad():
        want = trained(input_ids=_ids()).logits
    trained.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_nm_pruned_llama(), tmp_path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, want)


def test_d_explicit_adapter_dtype_survives_low_cpu_mem_usage(tmp_path):
    base = make_tiny_llama().to(torch.bfloat16)
    get_peft_model(base, SPPConfig(r=4, adapter_dtype="float32")).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        make_tiny_llama().to(torch.bfloat16), tmp_path, low_cpu_mem_usage=True
    )
    dtypes = {p.dtype for n, p in loaded.named_parameters() if "spp_" in n}
    assert dtypes == {torch.float32}


def test_e_dense_layers_have_no_packed_attributes():
    layer = SPPLinear(nn.Linear(16, 8), "default", SPPConfig(r=2))
    assert not hasattr(layer, "weight_meta") and not hasattr(layer, "weight_values")
    with pytest.raises(AttributeError):
        layer.weight_meta  # noqa: B018


def test_f_safe_merge_of_a_broken_adapter_uses_peafts_words():
    model = get_peft_model(make_tiny_llama(), SPPConfig(r=4, init="both_random"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.spp_beta["default"].fill_(float("nan"))
    with pytest.raises(
        ValueError,
        match="NaNs detected in the merged weights. The adapter default seems to be broken",
    ):
        model.merge_and_unload(safe_merge=True)


class _ConvAndLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(1, 2, 3)
        self.lin0 = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin0(x)


def test_g_an_explicit_target_spp_cannot_wrap_is_refused():
    with pytest.raises(ValueError, match=r"conv2d.*Conv2d"):
        get_peft_model(_ConvAndLinear(), SPPConfig(r=2, target_modules=["conv2d", "lin0"]))


def test_h_several_active_adapters_sum_their_terms_and_mixed_batches_are_refused():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12))
    model = get_peft_model(
        base, SPPConfig(r=3, dropout=0.0, init="both_random", target_modules=["0"])
    )
    model.add_adapter("b", SPPConfig(r=2, dropout=0.0, init="both_random", target_modules=["0"]))
    x = torch.randn(5, 16)
    layer = model.base_model.model[0]
    with torch.no_grad():
        plain = layer.base_layer(x)
        model.base_model.set_adapter("default")
        only_a = model(x) - plain
        model.base_model.set_adapter("b")
        only_b = model(x) - plain
        model.base_model.set_adapter(["default", "b"])
        both = model(x)
    torch.testing.assert_close(both, plain + only_a + only_b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="mixed adapter batches"):
        model(x, adapter_names=["default"] * 5)


def test_i_the_standalone_signature_with_bias_works():
    layer = SPPLinear(64, 32, bias=False)
    assert layer.base_layer.bias is None and layer.base_layer.weight.shape == (32, 64)
    assert SPPLinear(64, 32).base_layer.bias is not None
