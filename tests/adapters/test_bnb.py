"""SPP on bitsandbytes bases, the way peft's LoRA supports them: a model loaded with
BitsAndBytesConfig (NF4 / FP4, double quantization, 8-bit), prepare_model_for_kbit_training,
get_peft_model(model, SPPConfig(...)): training, merging into a dequantized model, saving
and loading adapters, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from spp_kernels.adapters import SPPConfig  # noqa: E402
from spp_kernels.adapters.bnb_layer import DequantizedLinear, SPPBnbLinear  # noqa: E402
from spp_kernels.ops.quantized import BnbWeight  # noqa: E402
from spp_kernels.ops.reference import spp_linear_naive  # noqa: E402
from tests.helpers import assert_close, make_tiny_llama  # noqa: E402

FORMATS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}  # fmt: skip


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    """A tiny LLaMA pruned 2:4 (magnitude), saved as a Hugging Face model directory."""
    from spp_kernels.pruning import prune

    model = make_tiny_llama(seed=0, hidden_size=128, intermediate_size=256)
    prune(model, "magnitude", "2:4", progress=False)
    path = tmp_path_factory.mktemp("pruned-2-4")
    model.save_pretrained(path)
    return path


def load(path, fmt: str) -> nn.Module:
    config = BitsAndBytesConfig(**FORMATS[fmt])
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32
    )


def spp_layers(model: nn.Module) -> dict[str, SPPBnbLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SPPBnbLinear)}


def train(model: nn.Module, steps: int = 3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_kbit_training_trains_merges_and_keeps_the_zeros(pruned_dir, fmt):
    model = prepare_model_for_kbit_training(load(pruned_dir, fmt))
    peft_model = get_peft_model(model, SPPConfig(r=4, dropout=0.05))
    layers = spp_layers(peft_model)
    assert len(layers) == 7 * 2  # seven projections, two decoder layers
    name, layer = next(iter(layers.items()))
    assert layer.quantization == fmt.split("-")[0]
    assert layer.spp_alpha["default"].dtype == torch.float32
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".spp_alpha." in n or ".spp_beta." in n for n in trainable)
    losses = train(peft_model)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(float(layer.spp_beta["default"].abs().max()) > 0 for layer in layers.values())

    # the layer's output: the base layer's quantized matmul + the float64 adapter term on
    # the dequantized weight
    layer.eval()
    x = torch.randn(5, layer.in_features)
    w = BnbWeight.of_layer(layer.base_layer).dense().double()
    alpha, beta = layer.spp_alpha["default"].double(), layer.spp_beta["default"].double()
    x64 = x.double()
    adapter64 = spp_linear_naive(x64, w, alpha, beta, scale=2.0) - x64 @ w.t()
    with torch.no_grad():
        got = layer(x) - layer.base_layer(x)
    assert_close(got, adapter64, tol=1e-4, name=f"{name} adapter term")

    dequantized = {n: BnbWeight.of_layer(m.base_layer).dense() for n, m in layers.items()}
    ids = torch.randint(0, 100, (1, 12))
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    merged = peft_model.merge_and_unload()
    for n, w in dequantized.items():
        plain = merged.get_submodule(n.removeprefix("base_model.model."))
        assert isinstance(plain, nn.Linear) and not isinstance(plain, bnb.nn.Linear4bit), n
        assert torch.equal(plain.weight == 0, w == 0) or bool((plain.weight[w == 0] == 0).all())
        assert bool((plain.weight[w == 0] == 0).all()), f"{n}: a zero of the base became nonzero"
        groups = (plain.weight.view(-1, 4) != 0).sum(1)
        assert bool((groups <= 2).all()), f"{n}: the merged weight is not 2:4"
    with torch.no_grad():
        after = merged(input_ids=ids).logits
    # the merged model runs dense float32 matmuls where the base ran bitsandbytes' own
    tol = 1e-4 if fmt != "int8" else 5e-2  # LLM.int8() quantizes activations too
    assert_close(after, before, tol=tol, name="logits after merge")


def test_unmerge_restores_the_quantized_layer(pruned_dir):
    model = get_peft_model(load(pruned_dir, "nf4-dq"), SPPConfig(r=4, init="both_random"))
    layer = next(iter(spp_layers(model).values()))
    quantized = layer.base_layer
    x = torch.randn(3, layer.in_features)
    layer.eval()
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert isinstance(layer.base_layer, DequantizedLinear) and layer.merged
        assert_close(layer(x), y, tol=1e-4, name="merged output")
        layer.unmerge()
    assert layer.base_layer is quantized and not layer.merged
    with torch.no_grad():
        assert torch.equal(layer(x), y)


def test_adapter_saved_on_nf4_loads_on_nf4_and_on_the_float_base(pruned_dir, tmp_path):
    """QLoRA's path: train on the 4-bit base, then load the adapter on the 4-bit base again
    (same outputs) or on the float model it was quantized from (shapes are compared, not
    the quantized values)."""
    model = get_peft_model(load(pruned_dir, "nf4-dq"), SPPConfig(r=4, init="both_random"))
    model.save_pretrained(tmp_path / "adapter")
    fingerprint = next(iter(model.peft_config["default"].base_fingerprint.values()))
    assert fingerprint.endswith(":nf4")
    ids = torch.randint(0, 100, (1, 10))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        again = PeftModel.from_pretrained(load(pruned_dir, "nf4-dq"), tmp_path / "adapter")
        assert torch.equal(again(input_ids=ids).logits, expected)
        base = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
        on_float = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        # the float model differs from its NF4 copy by the quantization error only
        assert_close(on_float(input_ids=ids).logits, expected, tol=0.2, name="float base")


def test_refusals_come_before_any_change(pruned_dir):
    model = load(pruned_dir, "nf4-dq")
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="weight_format='nm'.*bitsandbytes"):
        get_peft_model(model, SPPConfig(r=4, weight_format="nm"))
    assert {n: type(m) for n, m in model.named_modules()} == before
    with pytest.raises(ValueError, match="has_fp16_weights"):
        SPPBnbLinear(bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=True), "default", SPPConfig(r=2))


def test_merged_model_of_a_prepared_bfloat16_base_runs():
    """After prepare_model_for_kbit_training the activations are float32 while the NF4
    weight was bfloat16: the merged layer takes them as the quantized one did."""
    # in_features >= 64: bitsandbytes 0.50.2's CPU 4-bit matmul disagrees with its own
    # quantization when a row is shorter than one 64-block (its kernel, not SPP's decode)
    layer = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(32, 64, dtype=torch.bfloat16),
                                     requires_grad=False, quant_type="nf4")  # fmt: skip
    layer.bias = nn.Parameter(torch.randn(32), requires_grad=False)
    spp = SPPBnbLinear(layer.to("cpu"), "default", SPPConfig(r=2, init="both_random")).eval()
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = spp(x)
        merged = spp.unload_and_optionally_merge_module()
        assert merged.weight.dtype == torch.bfloat16
        out = merged(x)
    assert out.dtype == torch.float32
    assert_close(out, y.double(), tol=3e-2, name="merged bf16 layer")


def nf4_layer(m: int = 32, n: int = 64, dtype=torch.bfloat16, bias=True, **kw) -> nn.Module:
    layer = bnb.nn.Linear4bit(n, m, bias=bias, compute_dtype=dtype, quant_type="nf4", **kw)
    layer.weight = bnb.nn.Params4bit(torch.randn(m, n, dtype=dtype), requires_grad=False,
                                     quant_type="nf4", **kw)  # fmt: skip
    if bias:
        layer.bias = nn.Parameter(torch.randn(m), requires_grad=False)  # float32, as prepared
    return layer.to("cpu")


def test_a_float32_bias_merges_before_any_forward():
    """peft's kbit preparation leaves a bf16 NF4 layer's bias in float32: the merged layer
    holds it in the weight's dtype."""
    spp = SPPBnbLinear(nf4_layer(), "default", SPPConfig(r=2, init="both_random"))
    merged = spp.unload_and_optionally_merge_module()
    assert merged.bias.dtype == merged.weight.dtype == torch.bfloat16
    assert merged(torch.randn(3, 64)).dtype == torch.float32


def test_adapters_stay_float32_on_a_bfloat16_compute_base():
    spp = SPPBnbLinear(nf4_layer(), "default", SPPConfig(r=2))
    spp._move_adapter_to_device_of_base_layer("default")
    assert spp.spp_alpha["default"].dtype == spp.spp_beta["default"].dtype == torch.float32


def test_codes_stored_in_bfloat16_decode_like_uint8():
    """bnb_4bit_quant_storage=torch.bfloat16 (FSDP-QLoRA's setting) packs four codes per
    element: rows read bytes."""
    layer = nf4_layer(m=64, n=128, dtype=torch.float32, bias=False, quant_storage=torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    full = bnb.functional.dequantize_4bit(layer.weight.data.view(torch.uint8),
                                          layer.weight.quant_state)  # fmt: skip
    operand = BnbWeight.of_layer(layer)
    for row0, rows in ((0, 64), (0, 1), (10, 5), (63, 1)):
        assert torch.equal(operand.rows(row0, rows), full[row0 : row0 + rows])


def test_peft_adapter_operations_on_a_quantized_base(pruned_dir, tmp_path):
    """Two adapters, merged together; disable_adapter; delete_adapter; unload; and
    merge_and_unload giving a model that saves and reloads unquantized."""
    model = get_peft_model(load(pruned_dir, "nf4-dq"), SPPConfig(r=4, init="both_random"))
    model.add_adapter("other", SPPConfig(r=2, init="both_random"))
    ids = torch.randint(0, 100, (1, 10))
    model.eval()
    layer = next(iter(spp_layers(model).values()))
    with torch.no_grad():
        base = model.get_base_model()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        one = model(input_ids=ids).logits
        layer.set_adapter(["default", "other"])
        for spp in spp_layers(model).values():
            spp.set_adapter(["default", "other"])
        both = model(input_ids=ids).logits
        assert not torch.equal(one, plain) and not torch.equal(both, one)
        model.base_model.merge_adapter(["default", "other"])
        assert "_unmerged" not in "".join(layer.state_dict())  # the kept-aside layer is hidden
        assert_close(model(input_ids=ids).logits, both.double(), tol=1e-4, name="merged two")
        model.base_model.unmerge_adapter()
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
        assert torch.equal(model(input_ids=ids).logits, both)
    model.delete_adapter("other")
    assert "other" not in layer.spp_alpha
    merged = model.merge_and_unload()
    assert merged is base and not getattr(merged, "is_loaded_in_4bit", False)
    assert not hasattr(merged.config, "quantization_config")
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in again.modules())


def test_unload_gives_back_the_quantized_layers(pruned_dir):
    model = get_peft_model(load(pruned_dir, "int8"), SPPConfig(r=4))
    plain = model.unload()
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in plain.modules())
    assert not any(isinstance(m, SPPBnbLinear) for m in plain.modules())


def test_an_adapter_from_an_fp32_loaded_nf4_base_opens_on_a_bf16_loaded_one(pruned_dir, tmp_path):
    """NF4 codes depend on the dtype the weights were quantized from: quantized bases are
    compared by shape, so the adapter is not refused."""
    model = get_peft_model(load(pruned_dir, "nf4-dq"), SPPConfig(r=4, init="both_random"))
    model.save_pretrained(tmp_path / "adapter")
    config = BitsAndBytesConfig(**{**FORMATS["nf4-dq"], "bnb_4bit_compute_dtype": torch.bfloat16})
    bf16 = AutoModelForCausalLM.from_pretrained(pruned_dir, quantization_config=config,
                                                device_map="cpu", dtype=torch.bfloat16)  # fmt: skip
    loaded = PeftModel.from_pretrained(bf16, tmp_path / "adapter")
    assert len(spp_layers(loaded)) == 14
