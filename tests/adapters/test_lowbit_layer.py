"""SPP adapters on N:M packed frozen weights with low-bit values: SPPConfig(weight_format="nm",
weight_dtype="int8" | "int4" | "fp8") through peft, the layer, merge and unload, saved
adapters, and bad input refused before the model changes."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from torch import nn

from spp_kernels import SPPConfig, SPPLinear, get_spp_model
from spp_kernels.adapters.lowbit_layer import SPPQuantizedPackedLinear
from spp_kernels.pruning.masks import nm_mask
from spp_kernels.sparsity.lowbit import QuantizedPackedLinear
from spp_kernels.sparsity.nm import is_nm
from tests.helpers import assert_close, make_tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

FORMATS = ("int8", "int4", "fp8")
GROUP = 16  # divides the tiny model's packed rows (32 and 48 kept values)


def pruned_llama(seed: int = 0, dtype=torch.float32):
    """The tiny LLaMA with every projection pruned 2:4 by magnitude."""
    model = make_tiny_llama(seed).to(dtype)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.endswith("proj"):
                w = module.weight
                w.masked_fill_(~nm_mask(w.abs().float(), 2, 4), 0.0)
    return model


def config(fmt: str, **kw) -> SPPConfig:
    return SPPConfig(r=4, dropout=0.0, weight_format="nm", weight_dtype=fmt,
                     weight_group_size=GROUP, init="both_random", backend="torch", **kw)  # fmt: skip


def zero_masks(model) -> dict[str, torch.Tensor]:
    return {n: m.weight == 0 for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.endswith("proj")}  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
def test_train_merge_and_unload_keep_every_zero(fmt):
    model = pruned_llama()
    zeros = zero_masks(model)
    ids = torch.randint(0, 128, (2, 12))
    spp = get_spp_model(model, config(fmt))
    layers = {n: m for n, m in spp.named_modules() if isinstance(m, SPPQuantizedPackedLinear)}
    assert len(layers) == 14 and all(m.weight_dtype == fmt for m in layers.values())
    layer = next(iter(layers.values()))
    assert isinstance(layer.base_layer, QuantizedPackedLinear) and layer.weight_format == "nm"
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "spp_alpha.default", "spp_beta.default"}  # fmt: skip
    # the layer computes X W^T + adapter term with W the decoded weight (float64 oracle)
    x = torch.randn(3, layer.in_features)
    w = layer.dense_weight().double()
    alpha, beta = layer.alpha.detach().double(), layer.beta.detach().double()
    g = torch.arange(w.shape[0]) * alpha.shape[0] // w.shape[0]
    ref = x.double() @ (w + 2.0 * w * alpha[g] * beta[:, None]).t()
    assert_close(layer(x), ref, dtype=torch.float32)

    opt = torch.optim.AdamW([p for p in spp.parameters() if p.requires_grad], lr=1e-2)
    codes = {n: m.base_layer.weight_codes.clone() for n, m in layers.items()}
    for _ in range(2):
        spp(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(m.base_layer.weight_codes, codes[n]) for n, m in layers.items())
    logits = spp(input_ids=ids).logits.detach()

    quantized = layer.base_layer
    spp.merge_adapter()
    assert isinstance(layer.base_layer, nn.Module) and layer.base_layer is not quantized
    assert_close(spp(input_ids=ids).logits, logits.double(), tol=1e-4, name="merged")
    spp.unmerge_adapter()
    assert layer.base_layer is quantized

    merged = spp.merge_and_unload()
    for name, module in merged.named_modules():
        if name in zeros:
            assert type(module) is nn.Linear
            assert bool(module.weight[zeros[name]].eq(0).all()), f"{name}: a zero moved"
            assert is_nm(module.weight, 2, 4)
    assert_close(merged(input_ids=ids).logits, logits.double(), tol=1e-4, name="unloaded")


def test_saved_adapter_opens_on_the_float_model_and_on_another_quantized_one(tmp_path):
    spp = get_spp_model(pruned_llama(), config("int4"))
    with torch.no_grad():
        for p in spp.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    ids = torch.randint(0, 128, (1, 10))
    expected = spp(input_ids=ids).logits
    spp.save_pretrained(tmp_path)
    saved = SPPConfig.from_pretrained(tmp_path)
    assert saved.weight_dtype == "int4" and saved.weight_group_size == GROUP
    # recorded from the float weights it was quantized from (a float base opens it too)
    assert not any(fp.endswith("nm-int4") for fp in saved.base_fingerprint.values())
    # peft's own loader: the base is quantized again from the same float weights
    loaded = PeftModel.from_pretrained(pruned_llama(), tmp_path)
    layer = next(m for m in loaded.modules() if isinstance(m, SPPQuantizedPackedLinear))
    assert layer.weight_dtype == "int4"
    assert torch.equal(loaded(input_ids=ids).logits, expected)
    # a second adapter onto the quantized layers: shapes compared, not decoded values
    loaded.load_adapter(tmp_path, adapter_name="again")
    assert "again" in layer.spp_alpha


def test_model_casts_keep_the_codes():
    spp = get_spp_model(pruned_llama(), config("fp8"))
    layer = next(m for m in spp.modules() if isinstance(m, SPPQuantizedPackedLinear))
    codes, scales = layer.base_layer.weight_codes.clone(), layer.base_layer.weight_scales.clone()
    spp.to(torch.bfloat16)
    assert layer.base_layer.compute_dtype == torch.bfloat16
    assert torch.equal(layer.base_layer.weight_codes, codes)
    assert torch.equal(layer.base_layer.weight_scales, scales)
    out = spp(input_ids=torch.randint(0, 128, (1, 6))).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_from_linear_and_frozen_bytes():
    lin = nn.Linear(256, 40)
    with torch.no_grad():
        lin.weight.masked_fill_(~nm_mask(lin.weight.abs(), 2, 4), 0.0)
    dense_bytes = lin.weight.numel() * 2  # bf16
    sizes = {}
    for fmt in FORMATS:
        layer = SPPLinear.from_linear(lin, r=4, weight_format="nm", weight_dtype=fmt)
        assert isinstance(layer, SPPQuantizedPackedLinear)
        sizes[fmt] = layer.frozen_operand().nbytes
        assert f"weight_dtype={fmt}" in repr(layer.base_layer)
    kept, meta = 40 * 128, 40 * 8 * 4  # 2:4 meta: 8 four-bit codes per int32 word
    assert sizes["int8"] == sizes["fp8"] == kept + meta + 4 * 40
    assert sizes["int4"] == kept // 2 + meta + 2 * 40 * (128 // 128)
    assert sizes["int4"] / dense_bytes < 0.2  # about 19 % of the dense bfloat16 bytes


def test_bad_input_is_refused_before_the_model_changes():
    with pytest.raises(ValueError, match="set weight_format='nm'"):
        SPPConfig(weight_dtype="int8")
    with pytest.raises(ValueError, match="weight_dtype must be None or one of"):
        SPPConfig(weight_format="nm", weight_dtype="int3")
    with pytest.raises(ValueError, match="weight_group_size must be a positive int"):
        SPPConfig(weight_format="nm", weight_dtype="int4", weight_group_size=0)
    model = pruned_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad_group = config("int4")
    bad_group.weight_group_size = 128
    with pytest.raises(ValueError, match=r"SPP: model\.layers\.0\..*row length divisible"):
        get_spp_model(model, bad_group)
    assert not any(isinstance(m, SPPLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    dense = make_tiny_llama()
    with pytest.raises(ValueError, match="not N:M sparse"):
        get_spp_model(dense, config("int8"))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"SPP: model\.layers\.1\.mlp\.up_proj: the weight has non-finite"
    ):
        get_spp_model(model, config("int8"))
    assert not any(isinstance(m, SPPLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fmt", ["int8", None], ids=["int8 N:M", "dense"])
def test_a_merged_layer_cast_or_moved_unmerges_where_it_now_is(fmt):
    """The frozen storage kept aside while merged follows model.to(): unmerge() then
    restores it in the model's new dtype (the quantized base's compute dtype, or W's)."""
    model = pruned_llama()
    spp = get_spp_model(model, config(fmt) if fmt else SPPConfig(r=4, init="both_random",
                                                                  dropout=0.0))  # fmt: skip
    spp.merge_adapter()
    spp.to(torch.float64)
    spp.unmerge_adapter()
    layer = spp.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.dense_weight().dtype == torch.float64
    out = spp(input_ids=torch.randint(0, 128, (1, 6))).logits
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
