"""Issue 18 (reliability, round two) on the peft path: nothing a user trained is lost, no
hang and no silent garbage from a hostile adapter file, adapters made on the meta device.

Each test is named after the numbered item of the issue it covers.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from spp_kernels import SPPConfig, SPPLinear
from tests.adapters.test_peft import IDS, logits, pruned, trained


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base dir, adapter dir) of a pruned tiny LLaMA and a trained SPP adapter on it."""
    root = tmp_path_factory.mktemp("reliability")
    base_dir = root / "base"
    pruned().save_pretrained(base_dir)
    spp = trained(get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), SPPConfig(r=4)))
    spp.save_pretrained(root / "adapter")
    return base_dir, root / "adapter"


def files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name.startswith("adapter")}


def copy_adapter(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


# ---- 1. saving after merging never overwrites the trained adapter ------------------------


@pytest.mark.parametrize("unload", ["merge_and_unload", "unload"])
def test_1_save_after_merge_and_unload_is_refused_before_writing(saved, tmp_path, unload):
    base_dir, adapter = saved
    mine = tmp_path / "adapter"
    shutil.copytree(adapter, mine)
    before = files(mine)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), mine)
    getattr(model, unload)()
    with pytest.raises(ValueError, match="has no SPP layers left"):
        model.save_pretrained(mine)
    assert files(mine) == before
    assert len(load_file(mine / "adapter_model.safetensors")) == 28  # 14 layers x (alpha, beta)


# ---- 3. no pattern from a file is ever compiled --------------------------------------------

HOSTILE = "(.|.)*Z"  # match time doubles with every character of a module name


def test_3_file_patterns_of_a_saved_adapter_are_dropped(saved, tmp_path):
    base_dir, adapter = saved
    hostile = copy_adapter(adapter, tmp_path / "a", exclude_modules=HOSTILE, layers_pattern=HOSTILE,
                           layers_to_transform=[0])  # fmt: skip
    start = time.perf_counter()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), hostile)
    assert time.perf_counter() - start < 30
    config = model.peft_config["default"]
    assert config.exclude_modules is None and config.layers_pattern is None
    assert config.layers_to_transform is None
    assert len([m for m in model.modules() if isinstance(m, SPPLinear)]) == 14


@pytest.mark.parametrize("field", ["exclude_modules", "target_modules", "layers_pattern"])
def test_3_a_pattern_without_wrapped_modules_is_refused(saved, tmp_path, field):
    base_dir, adapter = saved
    hostile = copy_adapter(adapter, tmp_path / "a", wrapped_modules=None, **{field: HOSTILE})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"{field}=.*patterns are never read from files"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), hostile)
    from peft import PeftConfig

    with pytest.raises(ValueError, match="patterns are never read from files"):
        PeftConfig.from_pretrained(str(hostile))
    assert time.perf_counter() - start < 30


def test_3_the_users_own_pattern_still_works():
    model = get_peft_model(
        pruned(), SPPConfig(target_modules=r".*\.q_proj", exclude_modules=r".*\.1\..*")
    )
    names = [n for n, m in model.named_modules() if isinstance(m, SPPLinear)]
    assert names == ["base_model.model.model.layers.0.self_attn.q_proj"]


# ---- 4. allow_other_base is the loading user's choice, never the file's ------------------


def test_4_allow_other_base_is_not_read_from_or_written_to_a_file(saved, tmp_path):
    base_dir, adapter = saved
    hostile = copy_adapter(adapter, tmp_path / "a", allow_other_base=True)
    other = pruned(seed=1)
    with (
        pytest.warns(UserWarning, match="ignored allow_other_base"),
        pytest.raises(ValueError, match="trained on another base"),
    ):
        PeftModel.from_pretrained(other, hostile)
    config = SPPConfig.from_pretrained(str(adapter))
    config.allow_other_base = True
    model = PeftModel.from_pretrained(pruned(seed=1), adapter, config=config)
    model.save_pretrained(tmp_path / "resaved")
    assert "allow_other_base" not in json.loads(
        (tmp_path / "resaved/adapter_config.json").read_text()
    )
    with pytest.raises(ValueError, match="trained on another base"):
        PeftModel.from_pretrained(pruned(seed=1), tmp_path / "resaved")


# ---- 5. the fingerprint covers the values: an adapter is refused on its merged base ---------


def test_5_an_adapter_is_refused_on_a_base_it_was_merged_into(saved, tmp_path):
    base_dir, adapter = saved
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    merged = merged.merge_and_unload()
    with pytest.raises(
        ValueError, match="weights of layer model.layers.0.self_attn.q_proj differ.*already merged"
    ):
        PeftModel.from_pretrained(merged, adapter)


def test_5_the_fingerprint_is_the_same_in_float32_and_bfloat16(saved):
    base_dir, adapter = saved
    bf16 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(bf16, adapter)  # trained in float32: same base
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj, SPPLinear)


def test_5_a_0_2_fingerprint_compares_the_zero_mask_only(saved, tmp_path):
    base_dir, adapter = saved
    config = json.loads((adapter / "adapter_config.json").read_text())
    old = {k: v.rsplit(":", 1)[0] for k, v in config["base_fingerprint"].items()}
    legacy = copy_adapter(adapter, tmp_path / "a", base_fingerprint=old)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), legacy)


# ---- 6. non-finite and absurd values are refused ---------------------------------------------


def test_6_a_nan_adapter_is_not_saved_on_the_peft_path(tmp_path):
    model = get_peft_model(pruned(), SPPConfig(r=4))
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.spp_beta["default"][3] = float("nan")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*1 non-finite"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("scale", [1e38, -1e5, float("nan")])
def test_6_an_absurd_scale_is_refused(scale):
    with pytest.raises(ValueError, match="scale must be a finite number"):
        SPPConfig(scale=scale)


# ---- 9. adapters made on the meta device start at the paper's init --------------------------


def test_9_meta_device_adapters_are_initialised_once_materialised(tmp_path):
    from accelerate import init_empty_weights

    reference = pruned()
    with init_empty_weights():
        empty = type(reference)(reference.config)
    model = get_peft_model(empty, SPPConfig(r=4))
    assert model.peft_config["default"].base_fingerprint is None  # weights not there yet
    model.to_empty(device="cpu")
    inner = model.base_model.model
    wrapped = {k.replace(".base_layer", ""): k for k in inner.state_dict()}
    state = {wrapped[k]: v for k, v in reference.state_dict().items()}
    missing = inner.load_state_dict(state, strict=False).missing_keys
    assert missing and all("spp_" in k for k in missing)
    with torch.no_grad():  # rotary tables are non-persistent buffers: not in a state dict
        for name, buffer in reference.named_buffers():
            inner.get_buffer(name).copy_(buffer)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, logits(reference))  # beta = 0 exactly
    for layer in (m for m in model.modules() if isinstance(m, SPPLinear)):
        assert torch.isfinite(layer.spp_alpha["default"]).all()
        assert not layer.spp_beta["default"].any()
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert len(config["base_fingerprint"]) == 14
    reloaded = PeftModel.from_pretrained(pruned(), tmp_path / "a")  # the same base: accepted
    assert isinstance(reloaded, PeftModel)


def test_9_reset_parameters_initialises_every_adapter_and_loaded_ones_are_kept():
    from accelerate import init_empty_weights

    with init_empty_weights():
        empty = type(pruned())(pruned().config)
    model = get_peft_model(empty, SPPConfig(r=4, init="both_random"))
    model.to_empty(device="cpu")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.reset_parameters()
    assert layer.spp_beta["default"].abs().max() <= 1 / layer.out_features**0.5
    assert not layer._uninitialised
    other = model.base_model.model.model.layers[0].self_attn.k_proj
    state = {"spp_alpha.default": torch.ones_like(other.spp_alpha["default"]),
             "spp_beta.default": torch.ones_like(other.spp_beta["default"])}  # fmt: skip
    other.load_state_dict(state, strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other(torch.randn(2, other.in_features))
    assert torch.equal(other.spp_beta["default"], torch.ones_like(other.spp_beta["default"]))
