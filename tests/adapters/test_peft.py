"""SPP as a peft method: peft's own entry points, file layout and loaders, on a pruned tiny LLaMA.

Everything here goes through peft (get_peft_model, PeftModel, AutoPeftModelForCausalLM),
transformers (load_adapter) or TRL, never through spp_kernels' compatibility names.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import spp_kernels
from spp_kernels import SPPConfig, SPPLinear
from tests.helpers import make_tiny_llama, tiny_tokenizer

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def prune_half(model: nn.Module, nm: bool = False) -> nn.Module:
    """Zero the smaller half of every projection (2:4 along rows when nm)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and "lm_head" not in name:
                w = module.weight
                if nm:
                    groups = w.view(w.shape[0], -1, 4)
                    drop = groups.abs().argsort(dim=-1)[..., :2]
                    groups.scatter_(-1, drop, 0.0)
                else:
                    w.masked_fill_(w.abs() < w.abs().median(), 0.0)
    return model


def pruned(seed: int = 0, nm: bool = False) -> nn.Module:
    return prune_half(make_tiny_llama(seed=seed), nm=nm)


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: (m.weight == 0).clone()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and "lm_head" not in n
    }


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained(model: nn.Module, steps: int = 3) -> nn.Module:
    """A few AdamW steps so the adapters are not at their initial values."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(base dir, adapter dir, logits of the adapted model) with the base saved to disk, so
    the adapter's base_model_name_or_path points at it."""
    root = tmp_path_factory.mktemp("peft")
    base_dir = root / "base"
    pruned().save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(1)
    model = trained(get_peft_model(base, SPPConfig(r=4, dropout=0.0)))
    model.save_pretrained(root / "adapter")
    return base_dir, root / "adapter", logits(model)


def test_import_registers_spp_with_peft():
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    assert PeftType.SPP.value == "SPP" and isinstance(PeftType.SPP, PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPP] is SPPConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SPP] == "spp_"
    assert spp_kernels.adapters.registration.SPP_PEFT_TYPE is PeftType.SPP


def test_get_peft_model_wraps_targets_and_counts_parameters(capsys):
    model = get_peft_model(pruned(), SPPConfig(r=4))
    assert isinstance(model, PeftModel)
    layers = [m for m in model.modules() if isinstance(m, SPPLinear)]
    assert len(layers) == 14
    expected = sum(4 * m.in_features + m.out_features for m in layers)
    model.print_trainable_parameters()
    assert f"trainable params: {expected:,d}" in capsys.readouterr().out
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".spp_alpha." in n or ".spp_beta." in n for n in trainable)


def test_saved_layout_is_peft_standard(saved):
    _, adapter, _ = saved
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPP"
    assert len(config["wrapped_modules"]) == 14 and len(config["base_fingerprint"]) == 14
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.") and ".spp_" in k for k in keys)
    assert not any(".default." in k for k in keys)  # peft strips the adapter name


def test_peft_model_from_pretrained_gives_identical_logits(saved):
    _, adapter, expected = saved
    loaded = PeftModel.from_pretrained(pruned(), adapter)
    assert torch.equal(logits(loaded), expected)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_fresh_process_loads_with_peft_and_transformers(saved, tmp_path):
    base_dir, adapter, expected = saved
    script = textwrap.dedent(f"""
        import torch
        import spp_kernels  # registers SPP with peft
        from peft import AutoPeftModelForCausalLM, PeftModel
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        ids = torch.tensor({IDS.tolist()})
        out = {{}}
        with torch.no_grad():
            m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(adapter)!r})
            out["peft"] = m(input_ids=ids).logits
            m = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r})
            out["auto"] = m(input_ids=ids).logits
            m = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
            m.load_adapter({str(adapter)!r})
            out["hf"] = m(input_ids=ids).logits
        save_file(out, {str(tmp_path / "out.safetensors")!r})
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(tmp_path / "out.safetensors")
    for name in ("peft", "auto", "hf"):
        assert torch.equal(got[name], expected), name


def test_merge_unmerge_disable_are_exact():
    base = pruned()
    reference = logits(base)
    weights = {n: m.weight.clone() for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    torch.manual_seed(2)
    model = trained(get_peft_model(base, SPPConfig(r=4, dropout=0.0)))
    adapted = logits(model)
    assert not torch.equal(adapted, reference)
    with model.disable_adapter():
        assert torch.equal(logits(model), reference)
    model.merge_adapter()
    torch.testing.assert_close(logits(model), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert torch.equal(logits(model), adapted)
    for name, layer in model.base_model.spp_layers().items():
        assert torch.equal(layer.base_layer.weight, weights[name]), name


def test_merge_and_unload_gives_plain_linears_with_zeros_bitwise():
    base = pruned()
    masks = zero_masks(base)
    torch.manual_seed(3)
    model = trained(get_peft_model(base, SPPConfig(r=4, dropout=0.0)))
    adapted = logits(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SPPLinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    for name, mask in zero_masks(merged).items():
        assert torch.equal(mask, masks[name]), name
    torch.testing.assert_close(logits(merged), adapted, rtol=1e-5, atol=1e-5)


def test_merge_refuses_non_finite_naming_the_layer_before_changing_anything():
    model = get_peft_model(pruned(), SPPConfig(r=4))
    layer = model.base_model.model.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.spp_alpha["default"][0, :3] = float("inf")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError, match=r"\d+ non-finite weights in layer model\.layers\.1\.mlp\.up_proj"
    ):
        model.merge_and_unload()
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert not any(m.merged for m in model.modules() if isinstance(m, SPPLinear))


def test_several_named_adapters():
    base = pruned()
    torch.manual_seed(4)
    model = trained(get_peft_model(base, SPPConfig(r=4, dropout=0.0)))
    first = logits(model)
    model.add_adapter("second", SPPConfig(r=2, init="both_random", dropout=0.0))
    assert logits(model).equal(first)  # add_adapter does not activate it
    model.set_adapter("second")
    second = logits(model)
    assert not second.equal(first)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second" in n for n in trainable)
    model.set_adapter("default")
    assert logits(model).equal(first)
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    assert not any("second" in n for n, _ in model.named_parameters())


def test_packed_nm_layers_match_dense_layers():
    dense = get_peft_model(pruned(nm=True), SPPConfig(r=4, init="both_random"))
    torch.manual_seed(5)
    packed = get_peft_model(pruned(nm=True), SPPConfig(r=4, weight_format="nm"))
    packed.load_state_dict(dense.state_dict(), strict=False)
    layer = packed.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.weight_format == "nm"
    torch.testing.assert_close(logits(packed), logits(dense), rtol=1e-5, atol=1e-5)
    masks = zero_masks(pruned(nm=True))
    merged = packed.merge_and_unload()
    for name, mask in zero_masks(merged).items():
        assert torch.equal(mask, masks[name]), name


def test_torch_compile_without_graph_breaks():
    import torch._dynamo

    model = get_peft_model(pruned(), SPPConfig(r=4, dropout=0.0, init="both_random")).eval()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda ids: model(input_ids=ids).logits)(IDS)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(lambda ids: model(input_ids=ids).logits, fullgraph=True)
    torch.testing.assert_close(compiled(IDS), logits(model), rtol=1e-5, atol=1e-5)


def test_refusals_int_adapters_saved_regex_and_save_after_unload(saved, tmp_path):
    _, adapter, _ = saved
    # integer adapter tensors
    bad = tmp_path / "int"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file(
        {k: v.round().to(torch.int32) for k, v in tensors.items()},
        bad / "adapter_model.safetensors",
    )
    with pytest.raises(ValueError, match="dtype torch.int32"):
        PeftModel.from_pretrained(pruned(), bad)
    # a pattern read from a file, without the explicit module list
    regex = tmp_path / "regex"
    regex.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(target_modules="(a+)+$", wrapped_modules=None)
    (regex / "adapter_config.json").write_text(json.dumps(config))
    (regex / "adapter_model.safetensors").write_bytes(
        (adapter / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ValueError, match="patterns are never read from files"):
        PeftModel.from_pretrained(pruned(), regex)
    # save_pretrained of an SPPModel whose layers were merged away
    spp = spp_kernels.get_spp_model(pruned(), SPPConfig(r=4))
    spp.merge_and_unload()
    with pytest.raises(ValueError, match="no SPP layers"):
        spp.save_pretrained(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_trl_sft_trainer_trains_spp_and_keeps_zeros(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    base = pruned()
    masks = zero_masks(base)
    tokenizer = tiny_tokenizer()
    data = Dataset.from_list([{"text": "the quick brown fox jumps over the lazy dog"}] * 8)
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, max_length=32, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=base, args=args, train_dataset=data, processing_class=tokenizer,
        peft_config=SPPConfig(r=4, dropout=0.05),
    )  # fmt: skip
    assert isinstance(trainer.model, PeftModel)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 3
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    merged = trainer.model.merge_and_unload()
    for name, mask in zero_masks(merged).items():
        assert torch.equal(mask, masks[name]), name
