"""SPPConfig, get_spp_model, SPPModel (train, merge, save/load) and the authors' format."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import spp_kernels
from spp_kernels import SPPConfig, SPPLinear, SPPModel, get_spp_model, load_authors_checkpoint
from spp_kernels.adapters.config import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    LLAMA_TARGET_MODULES,
)
from spp_kernels.ops.groups import row_groups
from spp_kernels.utils import shapes
from spp_kernels.utils.io import atomic_save_safetensors, atomic_write_text
from tests.helpers import make_tiny_llama

TARGETS = LLAMA_TARGET_MODULES


def pruned_llama(seed: int = 0, sparsity: float = 0.5, **overrides) -> nn.Module:
    """Tiny LLaMA whose targeted projections are magnitude-pruned per row (some -0.0 too)."""
    model = make_tiny_llama(seed=seed, **overrides)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                w = module.weight
                k = int(w.shape[1] * sparsity)
                idx = w.abs().argsort(dim=1)[:, :k]
                w.scatter_(1, idx, 0.0)
                w[0, idx[0, 0]] = -0.0
    return model


def batch(seed: int = 1, size: tuple[int, int] = (2, 12)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, size, generator=g)


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if n.endswith(".weight") and any(t in n for t in TARGETS)
    }


def _plain(name: str) -> str:
    """A parameter's name in the unwrapped model (peft adds base_model.model. and .base_layer)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def assert_zeros_bitwise(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    params = {_plain(n): p for n, p in model.named_parameters()}
    for name, old in before.items():
        new = params[_plain(name)]
        zeros = old == 0
        assert torch.equal(new == 0, zeros), name
        # Bitwise, so -0.0 stays -0.0.
        assert torch.equal(new[zeros].view(torch.int32), old[zeros].view(torch.int32)), name


def expected_trainable(model: nn.Module, r: int, targets=TARGETS) -> int:
    return sum(
        r * m.in_features + m.out_features
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
    )


# ---- config -------------------------------------------------------------------------------


def test_config_json_round_trip_and_defaults():
    cfg = SPPConfig(r=8, scale=1.5, target_modules=["q_proj"], adapter_dtype=torch.float32)
    assert cfg.adapter_dtype == "float32" and cfg.torch_adapter_dtype == torch.float32
    assert SPPConfig.from_json(cfg.to_json()) == cfg
    # A regex is the user's own choice in Python; read back from a file it is refused.
    regex = SPPConfig(target_modules="model\\..*_proj")
    with pytest.raises(ValueError, match="patterns are never read from files"):
        SPPConfig.from_json(regex.to_json())
    default = SPPConfig()
    assert default.target_modules == list(TARGETS) and default.r == 16 and default.scale == 2.0
    assert default.dropout == 0.05 and default.weight_format == "dense"
    assert SPPConfig.from_dict(json.loads(default.to_json())) == default


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "r must"),
        (dict(dropout=1.0), "dropout"),
        (dict(target_modules=[]), "empty"),
        (dict(target_modules="(unclosed"), "regular expression"),
        (dict(init="zeros"), "init"),
        (dict(backend="cuda"), "backend"),
        (dict(adapter_dtype="int8"), "adapter_dtype"),
        (dict(weight_format="csr"), "weight_format"),
        (dict(scale=float("inf")), "finite"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPPConfig(**kwargs)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys.*lora_alpha"):
        SPPConfig.from_dict({"r": 4, "lora_alpha": 8})


# ---- targeting ----------------------------------------------------------------------------


def test_default_targets_count_and_frozen_base():
    model = pruned_llama()
    want = expected_trainable(model, r=4)
    spp = get_spp_model(model, SPPConfig(r=4))
    layers = spp.spp_layers()
    assert len(layers) == 7 * 2
    assert spp.trainable_parameters().trainable == want
    for name, p in spp.named_parameters():
        is_adapter = ".spp_alpha." in name or ".spp_beta." in name
        assert p.requires_grad == is_adapter, name
    assert not isinstance(spp.get_base_model().lm_head, SPPLinear)
    # The tiny model is in eval mode; new layers inherit it (no adapter dropout at eval).
    assert not any(layer.training for layer in layers.values())


def test_regex_and_all_linear_targets():
    regex = get_spp_model(make_tiny_llama(), SPPConfig(r=2, target_modules=r".*\.1\.mlp\..*"))
    assert sorted(regex.spp_layers()) == [
        f"model.layers.1.mlp.{p}" for p in ("down_proj", "gate_proj", "up_proj")
    ]
    every = get_spp_model(make_tiny_llama(), SPPConfig(r=2, target_modules="all-linear"))
    assert len(every.spp_layers()) == 14 and "lm_head" not in every.spp_layers()
    suffix = get_spp_model(make_tiny_llama(), SPPConfig(r=2, target_modules=["mlp.up_proj"]))
    assert sorted(suffix.spp_layers()) == [f"model.layers.{i}.mlp.up_proj" for i in (0, 1)]


def test_clear_errors_twice_no_match_and_r_too_large():
    model = make_tiny_llama()
    spp = get_spp_model(model, SPPConfig(r=2))
    with pytest.raises(ValueError, match="already an SPPModel"):
        get_spp_model(spp, SPPConfig(r=2))
    with pytest.raises(ValueError, match="already has SPP adapters"):
        get_spp_model(model, SPPConfig(r=2))
    fresh = make_tiny_llama()
    with pytest.raises(ValueError, match="matched no nn.Linear.*q_proj"):
        get_spp_model(fresh, SPPConfig(target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match=r"r=97 exceeds out_features=\d+ of model.layers.0"):
        get_spp_model(fresh, SPPConfig(r=97))
    # Nothing was changed by the failed calls.
    assert not any(isinstance(m, SPPLinear) for m in fresh.modules())
    assert all(p.requires_grad for p in fresh.parameters())


def test_weight_format_decides_the_base_layer():
    dense = get_spp_model(make_tiny_llama(), SPPConfig(r=2, target_modules=["q_proj"]))
    assert all(layer.weight_format == "dense" for layer in dense.spp_layers().values())
    packed = get_spp_model(
        two_four_llama(), SPPConfig(r=2, target_modules=["q_proj"], weight_format="nm")
    )
    layers = packed.spp_layers()
    assert len(layers) == 2 and all(layer.nm == (2, 4) for layer in layers.values())


def test_llama_7b_trainable_count_on_meta_device(capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shapes.LLAMA_7B)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    total_before = sum(p.numel() for p in model.parameters())
    spp = get_spp_model(model, SPPConfig(r=16))
    per_layer = 4 * (16 * 4096 + 4096) + 2 * (16 * 4096 + 11008) + (16 * 11008 + 4096)
    count = spp.trainable_parameters()
    assert count.trainable == 32 * per_layer == 19_578_880  # ~2.0e7, the paper's Table 1
    assert count.total == total_before + count.trainable
    spp.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line == (
        f"trainable params: 19,578,880 || all params: {count.total:,d} || "
        f"trainable%: {100 * 19_578_880 / count.total:.4f}"
    )


# ---- forward, training, merge --------------------------------------------------------------


def train_steps(spp: SPPModel, steps: int = 3, lr: float = 1e-2) -> None:
    # A naive optimizer over all parameters: frozen ones have no grad and must not move.
    opt = torch.optim.AdamW(spp.parameters(), lr=lr, weight_decay=0.1)
    spp.train()
    for step in range(steps):
        ids = batch(seed=10 + step)
        loss = spp(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    spp.eval()


def test_training_changes_only_alpha_beta_and_merge_keeps_zeros():
    model = pruned_llama()
    ids = batch()
    with torch.no_grad():
        pruned_logits = model(input_ids=ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zeros_before = zero_masks(model)
    spp = get_spp_model(model, SPPConfig(r=4, dropout=0.0))
    with torch.no_grad():  # paper init: beta = 0, so the wrapped model equals the pruned one
        assert torch.equal(spp(input_ids=ids).logits, pruned_logits)
    adapters0 = {k: v.clone() for k, v in spp.adapter_state_dict().items()}
    train_steps(spp)
    for name, p in spp.get_base_model().named_parameters():
        if ".spp_" in name:
            layer, part = name.split(".spp_")
            key = f"{layer}.{part.split('.')[0]}"
            assert not torch.equal(p, adapters0[key]), f"{name} did not train"
        else:
            assert torch.equal(p, before[_plain(name)]), f"frozen {name} changed"
    with torch.no_grad():
        trained_logits = spp(input_ids=ids).logits
    assert not torch.allclose(trained_logits, pruned_logits)

    merged = spp.merge_and_unload()
    assert merged is model
    assert not any(isinstance(m, SPPLinear) for m in merged.modules())
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert all(p.requires_grad for p in merged.parameters())  # restored
    assert_zeros_bitwise(zeros_before, merged)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, trained_logits, rtol=1e-4, atol=1e-4)


def test_merge_matches_float64_formula_on_ragged_r():
    # r = 3 does not divide m = 64 or 96: the group map floor(o * r / m) is ragged.
    model = pruned_llama(seed=3).double()
    spp = get_spp_model(model, SPPConfig(r=3, scale=1.7, dropout=0.0, init="both_random"))
    expected = {}
    for name, layer in spp.spp_layers().items():
        g = row_groups(layer.out_features, 3)
        w = layer.weight.detach()
        expected[name] = w * (1 + 1.7 * layer.alpha.detach()[g] * layer.beta.detach()[:, None])
    merged = spp.merge_and_unload()
    for name, w in expected.items():
        got = merged.get_submodule(name).weight
        torch.testing.assert_close(got, w, rtol=1e-12, atol=1e-12)
        assert torch.equal(got == 0, w == 0)


def test_gradient_checkpointing_gives_same_gradients():
    ids = batch()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        spp = get_spp_model(pruned_llama(), SPPConfig(r=4, dropout=0.0, init="both_random"))
        if checkpointing:
            with pytest.warns(FutureWarning):
                spp.gradient_checkpointing_enable()
            assert spp.get_base_model().model.gradient_checkpointing
        spp.train()
        spp(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in spp.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 28
    for name in plain:
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_bf16_model_with_fp32_adapters_and_autocast():
    ids = batch()
    ref = get_spp_model(pruned_llama(), SPPConfig(r=4, dropout=0.0, init="both_random"))
    ref.train()
    ref(input_ids=ids, labels=ids).loss.backward()

    bf16 = pruned_llama().to(torch.bfloat16)
    zeros_before = zero_masks(bf16)
    spp = get_spp_model(bf16, SPPConfig(r=4, dropout=0.0, adapter_dtype="float32"))
    spp.load_adapter_state_dict(ref.adapter_state_dict())
    layer = spp.spp_layers()["model.layers.0.self_attn.q_proj"]
    assert layer.weight.dtype == torch.bfloat16 and layer.alpha.dtype == torch.float32
    spp.train()
    spp(input_ids=ids, labels=ids).loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for name, p in spp.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name
            cos = torch.nn.functional.cosine_similarity(
                p.grad.flatten(), ref_grads[name].flatten(), dim=0
            )
            assert cos > 0.95, (name, float(cos))
    merged = spp.merge_and_unload()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert_zeros_bitwise(zeros_before, merged)

    # fp32 model under CPU autocast: weights and activations run in bf16, adapters stay fp32.
    auto = get_spp_model(pruned_llama(), SPPConfig(r=4, dropout=0.0, init="both_random"))
    auto.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = auto(input_ids=ids, labels=ids).loss
    loss.backward()
    for name, p in auto.named_parameters():
        if p.requires_grad:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def test_dropout_trains_and_eval_is_deterministic():
    spp = get_spp_model(pruned_llama(), SPPConfig(r=4, dropout=0.3, init="both_random"))
    ids = batch()
    spp.eval()
    with torch.no_grad():
        assert torch.equal(spp(input_ids=ids).logits, spp(input_ids=ids).logits)
    train_steps(spp, steps=2)


def test_hf_trainer_trains_spp_model(tmp_path):
    from transformers import Trainer, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = batch(seed=100 + i, size=(1, 12))[0]
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    spp = get_spp_model(pruned_llama(), SPPConfig(r=4, dropout=0.0))
    beta0 = spp.spp_layers()["model.layers.0.mlp.down_proj"].beta.detach().clone()
    zeros_before = zero_masks(pruned_llama())
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=spp, args=args, train_dataset=Rows()).train()
    assert not torch.equal(spp.spp_layers()["model.layers.0.mlp.down_proj"].beta, beta0)
    assert_zeros_bitwise(zeros_before, spp)


# ---- save / load ---------------------------------------------------------------------------


def trained_spp(seed: int = 0, **cfg) -> SPPModel:
    cfg = dict(r=4, dropout=0.0, init="both_random") | cfg
    spp = get_spp_model(pruned_llama(seed=seed), SPPConfig(**cfg))
    train_steps(spp, steps=1)
    return spp


def test_save_load_round_trip_bit_exact(tmp_path):
    spp = trained_spp(target_modules="all-linear")
    spp.save_pretrained(tmp_path / "adapter")
    # peft's own writer: its model card, the config, the weights
    assert sorted(os.listdir(tmp_path / "adapter")) == [
        "README.md",
        ADAPTER_CONFIG_NAME,
        ADAPTER_WEIGHTS_NAME,
    ]
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_NAME).read_text())
    assert saved["peft_type"] == "SPP" and saved["r"] == 4
    # The exact wrapped names are saved and used as targets on load (no pattern from a file).
    assert (
        saved["wrapped_modules"] == sorted(spp.spp_layers()) and len(saved["wrapped_modules"]) == 14
    )
    assert set(saved["base_fingerprint"]) == set(saved["wrapped_modules"])

    loaded = SPPModel.from_pretrained(pruned_llama(), tmp_path / "adapter")
    assert sorted(loaded.spp_layers()) == sorted(spp.spp_layers())
    assert loaded.spp_config.r == 4 and loaded.spp_config.scale == spp.spp_config.scale
    want, got = spp.adapter_state_dict(), loaded.adapter_state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key].view(torch.int32), want[key].view(torch.int32)), key
    assert not loaded.training and loaded.trainable_parameters().trainable == 0
    ids = batch()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, spp(input_ids=ids).logits)

    trainable = SPPModel.from_pretrained(pruned_llama(), tmp_path / "adapter", is_trainable=True)
    assert trainable.trainable_parameters().trainable == sum(v.numel() for v in want.values())


def test_adapters_are_float32_on_a_bf16_model_and_round_trip_bit_exact(tmp_path):
    # peft's rule (autocast_adapter_dtype): float32 adapters on a half-precision model.
    spp = get_spp_model(pruned_llama().to(torch.bfloat16), SPPConfig(r=2, init="both_random"))
    assert all(v.dtype == torch.float32 for v in spp.adapter_state_dict().values())
    # An explicit adapter_dtype is kept: bf16 adapters, saved and reloaded bit for bit.
    cfg = SPPConfig(r=2, init="both_random", dropout=0.0, adapter_dtype="bfloat16")
    spp = get_spp_model(pruned_llama().to(torch.bfloat16), cfg)
    spp.save_pretrained(tmp_path)
    loaded = SPPModel.from_pretrained(pruned_llama().to(torch.bfloat16), tmp_path)
    for key, value in spp.adapter_state_dict().items():
        other = loaded.adapter_state_dict()[key]
        assert value.dtype == other.dtype == torch.bfloat16
        assert torch.equal(other.view(torch.int16), value.view(torch.int16)), key


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1),
            "layer model.layers.0.self_attn.q_proj has shape 64x64 there, 32x32 here",
        ),
        (
            dict(intermediate_size=80),
            "layer model.layers.0.mlp.gate_proj has shape 96x64 there, 80x64 here",
        ),
        (
            dict(num_hidden_layers=1),
            "layer model.layers.1.mlp.down_proj, which this model lacks",
        ),
        (dict(seed=5), "the zero pattern of layer model.layers.0.self_attn.q_proj differs"),
    ],
)
def test_load_onto_another_base_fails_naming_layer(tmp_path, overrides, match):
    trained_spp().save_pretrained(tmp_path)
    wrong = pruned_llama(**overrides)
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        SPPModel.from_pretrained(wrong, tmp_path)
    assert not any(isinstance(m, SPPLinear) for m in wrong.modules())  # untouched


def test_allow_other_base_loads_onto_a_different_zero_pattern(tmp_path):
    trained_spp().save_pretrained(tmp_path)
    config = SPPConfig.from_pretrained(str(tmp_path))
    config.allow_other_base = True
    loaded = SPPModel.from_pretrained(pruned_llama(seed=5), tmp_path, config=config)
    assert len(loaded.spp_layers()) == 14
    # Layers of a base the adapter never saw are not wrapped: the saved names are the targets.
    deeper = SPPModel.from_pretrained(pruned_llama(num_hidden_layers=3), tmp_path, config=config)
    assert sorted(deeper.spp_layers()) == sorted(trained_spp().spp_layers())


def test_legacy_adapter_directories_still_load(tmp_path):
    """spp-kernels 0.1's files: spp_config.json and "<module>.alpha/.beta" tensors."""
    spp = trained_spp()
    state = spp.adapter_state_dict()
    config = {
        "r": 4,
        "scale": 2.0,
        "dropout": 0.0,
        "target_modules": "(?:" * 30 + "x)",
        "init": "paper",
    }
    atomic_save_safetensors(
        state, tmp_path / ADAPTER_WEIGHTS_NAME, {"spp_config": json.dumps(config)}
    )
    (tmp_path / "spp_config.json").write_text(json.dumps(config))
    with pytest.warns(DeprecationWarning, match="spp-kernels 0.1 adapter"):
        loaded = SPPModel.from_pretrained(pruned_llama(), tmp_path)
    # The old file's pattern is never compiled: the module names come from the tensor keys.
    assert sorted(loaded.spp_layers()) == sorted(spp.spp_layers())
    for key, value in state.items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key


def test_crash_mid_save_keeps_previous_adapter(tmp_path, monkeypatch):
    import peft.peft_model

    first = trained_spp()
    first.save_pretrained(tmp_path)
    files = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    second = trained_spp(seed=0, r=2, scale=3.0)
    real_save_file = peft.peft_model.safe_save_file  # peft's own writer

    def crash_mid_write(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half a file on disk, then the process "dies"
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", crash_mid_write)
    with pytest.raises(OSError, match="simulated crash"):
        second.save_pretrained(tmp_path)
    monkeypatch.undo()
    # No temp files left; the weights file (the commit point) is the old one, bitwise.
    assert sorted(os.listdir(tmp_path)) == sorted(files)
    assert (tmp_path / ADAPTER_WEIGHTS_NAME).read_bytes() == files[ADAPTER_WEIGHTS_NAME]


def test_non_finite_adapters_are_refused_before_writing(tmp_path):
    spp = trained_spp()
    with torch.no_grad():
        spp.spp_layers()["model.layers.1.mlp.up_proj"].beta[:3] = float("nan")
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.spp_beta.* holds 3 non-finite values"
    ):
        spp.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_atomic_write_text_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "notes.txt"
    atomic_write_text(path, "old")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["notes.txt"]
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        atomic_save_safetensors({"a": [1.0]}, tmp_path / "x.safetensors")
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_adapter_file_holds_no_pickle(tmp_path):
    trained_spp().save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / ADAPTER_WEIGHTS_NAME), framework="pt") as f:
        keys = list(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.spp_alpha" in keys and len(keys) == 28


# ---- authors' checkpoint format -------------------------------------------------------------


def write_authors_checkpoint(directory, model: nn.Module, fmt: str, rows: int = 16):
    """A directory as the authors' peft-0.2.0 fork saves it: r=8 in the config, 16-row alpha."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
    config["target_modules"] = list(TARGETS)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(7)
    state = {}
    for i, (name, module) in enumerate(
        (n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS
    ):
        m, n = module.out_features, module.in_features
        key = f"base_model.model.{name}.lora_A"
        state[f"{key}.weight"] = torch.randn(rows, n, generator=g)
        col = torch.randn(m, generator=g)
        state[f"{key}.weight_col"] = col[:, None] if i % 2 else col[None, :]
    if fmt == "bin":
        torch.save(state, directory / "adapter_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(directory / "adapter_model.safetensors"))
    return state


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_load_authors_checkpoint_and_merge(tmp_path, fmt):
    model = pruned_llama()
    state = write_authors_checkpoint(tmp_path, model, fmt)
    zeros_before = zero_masks(model)
    ids = batch()
    spp = load_authors_checkpoint(model, tmp_path)
    assert isinstance(spp, SPPModel) and spp_kernels.load_authors_checkpoint is not None
    assert spp.spp_config.r == 16 and spp.spp_config.scale == 2.0  # lora_alpha 16 / config r 8
    assert len(spp.spp_layers()) == 14
    expected = {}
    for name, layer in spp.spp_layers().items():
        alpha = state[f"base_model.model.{name}.lora_A.weight"]
        beta = state[f"base_model.model.{name}.lora_A.weight_col"].reshape(-1)
        assert torch.equal(layer.alpha, alpha) and torch.equal(layer.beta, beta)
        g = row_groups(layer.out_features, 16)
        w = layer.weight.detach().double()
        expected[name] = w * (1 + 2.0 * alpha.double()[g] * beta.double()[:, None])
    with torch.no_grad():
        logits = spp(input_ids=ids).logits
    assert spp.trainable_parameters().trainable > 0  # can continue training
    merged = spp.merge_and_unload()
    assert_zeros_bitwise(zeros_before, merged)
    for name, w in expected.items():
        torch.testing.assert_close(
            merged.get_submodule(name).weight.double(), w, rtol=1e-6, atol=1e-6
        )
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)


def test_load_authors_checkpoint_into_inner_model_and_errors(tmp_path):
    # A checkpoint of LlamaForCausalLM loads into the bare LlamaModel (names lack "model.").
    write_authors_checkpoint(tmp_path / "ok", make_tiny_llama(), "safetensors", rows=4)
    inner = make_tiny_llama().model
    spp = load_authors_checkpoint(inner, tmp_path / "ok")
    assert "layers.0.self_attn.q_proj" in spp.spp_layers() and spp.spp_config.r == 4

    write_authors_checkpoint(tmp_path / "big", make_tiny_llama(hidden_size=32), "bin")
    wrong = make_tiny_llama()
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj: alpha"):
        load_authors_checkpoint(wrong, tmp_path / "big")
    assert not any(isinstance(m, SPPLinear) for m in wrong.modules())

    from safetensors.torch import load_file, save_file

    extra = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
    extra["base_model.model.lm_head.lora_B.weight"] = torch.zeros(2, 2)
    (tmp_path / "extra").mkdir()
    save_file(extra, str(tmp_path / "extra" / "adapter_model.safetensors"))
    (tmp_path / "extra" / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    with pytest.raises(ValueError, match="unexpected key.*lora_B"):
        load_authors_checkpoint(make_tiny_llama(), tmp_path / "extra")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_authors_checkpoint(make_tiny_llama(), tmp_path)


# ---- packed N:M frozen weights --------------------------------------------------------------


def two_four_llama() -> nn.Module:
    """Tiny LLaMA whose targeted projections are 2:4 sparse (2 largest of every 4 columns)."""
    model = make_tiny_llama()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
                w = module.weight.view(module.out_features, -1, 4)
                drop = w.abs().argsort(dim=-1)[..., :2]
                w.scatter_(-1, drop, 0.0)
    return model


def test_packed_nm_weights_train_save_and_merge_like_dense(tmp_path):
    cfg = dict(r=4, dropout=0.0, init="both_random")
    dense = get_spp_model(two_four_llama(), SPPConfig(**cfg))
    packed = get_spp_model(two_four_llama(), SPPConfig(**cfg, weight_format="nm"))
    packed.load_adapter_state_dict(dense.adapter_state_dict())
    layers = packed.spp_layers()
    assert all(layer.weight is None and layer.nm == (2, 4) for layer in layers.values())
    assert packed.trainable_parameters() == dense.trainable_parameters()
    ids = batch()
    with torch.no_grad():
        torch.testing.assert_close(
            packed(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )
    train_steps(packed, steps=1)
    packed.save_pretrained(tmp_path)
    assert json.loads((tmp_path / ADAPTER_CONFIG_NAME).read_text())["weight_format"] == "nm"
    reloaded = SPPModel.from_pretrained(two_four_llama(), tmp_path)
    zeros_before = zero_masks(two_four_llama())
    for key, value in packed.adapter_state_dict().items():
        assert torch.equal(reloaded.adapter_state_dict()[key], value), key
    with torch.no_grad():
        want = packed(input_ids=ids).logits
    merged = reloaded.merge_and_unload()
    assert_zeros_bitwise(zeros_before, merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)


def test_nm_on_unstructured_weights_fails_and_leaves_model_unchanged():
    model = two_four_llama()
    with torch.no_grad():  # the last targeted layer is dense: fails after 13 layers were wrapped
        model.model.layers[1].mlp.down_proj.weight.normal_()
    before = {n: (type(m), m.training) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match="N:M|not .*sparse"):
        get_spp_model(model, SPPConfig(r=2, weight_format="nm"))
    assert {n: (type(m), m.training) for n, m in model.named_modules()} == before
    assert all(p.requires_grad for p in model.parameters())
