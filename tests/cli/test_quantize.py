"""`spp quantize`: a pruned model saved with its N:M values as low-bit codes, as a user meets
it: transformers' own from_pretrained opens it in a fresh process (no spp_kernels import),
`spp train` trains SPP adapters on it, `spp merge` merges into its decoded weights, and bad
input is refused before --out holds anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_user_error, cli_json, make_cli_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_cli_models(tmp_path_factory.mktemp("quantize"))


@pytest.fixture(scope="module")
def quantized(models, tmp_path_factory):
    """models/pruned quantized to int4 codes (group 16: the tiny model's rows are 32 / 48)."""
    out = tmp_path_factory.mktemp("q") / "q-int4"
    from spp_kernels.cli import main

    code = main(["quantize", "--model", str(models / "pruned"), "--out", str(out),
                 "--weight-dtype", "int4", "--weight-group-size", "16", "--quiet"])  # fmt: skip
    assert code == 0
    return out


def test_quantize_writes_a_checkpoint_transformers_opens_without_our_import(models, quantized):
    info = json.loads((quantized / "spp_quantize.json").read_text())
    assert info["layers"] == 14 and info["patterns"] == ["2:4"] and info["weight_dtype"] == "int4"
    assert info["fraction_of_dense_bf16"] < 0.25
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "spp_nm_lowbit" and len(config["modules"]) == 14
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(quantized)!r})
        layer = model.model.layers[0].self_attn.q_proj
        assert type(layer).__name__ == "QuantizedPackedLinear", type(layer)
        assert layer.weight_codes.dtype == torch.uint8 and layer.weight_scales.dtype == torch.bfloat16
        assert "spp_kernels.adapters" not in sys.modules  # the start-up hook registered it
        ids = torch.arange(12).view(1, 12)
        torch.save(model(input_ids=ids).logits, sys.argv[1])
    """)  # fmt: skip
    path = quantized.parent / "logits.pt"
    env = {k: v for k, v in os.environ.items() if k != "SPP_KERNELS_NO_HOOK"}
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                         env=env, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    from spp_kernels.sparsity.lowbit import quantize_model

    reference = AutoModelForCausalLM.from_pretrained(models / "pruned")
    quantize_model(reference, "int4", 16, modules=sorted(config["modules"]))
    with torch.no_grad():
        expected = reference(input_ids=torch.arange(12).view(1, 12)).logits
    assert torch.equal(torch.load(path), expected)


def test_spp_trains_on_the_quantized_base_and_merges_into_its_decoded_weights(
    models, quantized, tmp_path, capsys
):
    out = tmp_path / "run"
    info = cli_json(capsys, "train", "--model", quantized, "--data", models / "text.txt",
                    "--max-len", "32", "--spp-r", "4", "--max-steps", "3", "--out", out)  # fmt: skip
    assert info["steps"] == 3 and info["base_quantization"] == "nm-int4"
    fingerprints = json.loads((out / "adapter_config.json").read_text())["base_fingerprint"]
    assert all(fp.endswith(":-:-:nm-int4") for fp in fingerprints.values())
    merged = tmp_path / "merged"
    report = cli_json(capsys, "merge", "--model", quantized, "--adapter", out, "--out", merged)
    assert report["sparsity_preserved"] and report["layers"] == 14
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    from safetensors.torch import load_file

    weights = load_file(merged / "model.safetensors")
    w = weights["model.layers.0.mlp.down_proj.weight"]
    assert ((w.view(-1, 4) != 0).sum(-1) <= 2).all()
    # the adapter also opens on the float pruned model (shapes compared, not values)
    report = cli_json(capsys, "merge", "--model", models / "pruned", "--adapter", out, "--out",
                      tmp_path / "merged-float")  # fmt: skip
    assert report["sparsity_preserved"]


def test_bad_input_is_refused_before_out_holds_anything(models, tmp_path, capsys):
    out = tmp_path / "q"
    assert_user_error(capsys, "row length divisible by the group", "quantize", "--model",
                      models / "pruned", "--out", out, "--weight-dtype", "int4")  # fmt: skip
    assert not out.exists() or not any(out.iterdir())
    assert_user_error(capsys, "cannot be quantized, nothing changed; first: model.layers.0", "quantize", "--model",
                      models / "dense", "--out", out, "--weight-dtype", "int8")  # fmt: skip
    assert not out.exists() or not any(out.iterdir())


def test_a_checkpoint_with_non_finite_scales_is_refused_naming_the_layer(quantized, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    tensors = load_file(bad / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.weight_scales"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"bad: model\.layers\.1\.mlp\.up_proj\.weight_scales holds non-finite"
    ):
        AutoModelForCausalLM.from_pretrained(bad)


@pytest.mark.parametrize(
    "argv",
    [("prune", "--method", "magnitude", "--sparsity", "2:4"), ("export-2to4",),
     ("quantize", "--weight-dtype", "int8")],
    ids=lambda a: a[0],
)  # fmt: skip
def test_commands_that_need_float_weights_refuse_a_quantized_model(quantized, argv, tmp_path,
                                                                   capsys):  # fmt: skip
    out = tmp_path / "out"
    assert_user_error(capsys, "holds int4 N:M codes (written by spp quantize)", argv[0],
                      "--model", quantized, "--out", out, *argv[1:])  # fmt: skip
    assert not out.exists() or not any(out.iterdir())


def test_train_refuses_to_quantize_or_shard_a_quantized_base_again(models, quantized, tmp_path,
                                                                   capsys):  # fmt: skip
    out = tmp_path / "run"
    base = ("train", "--model", quantized, "--data", models / "text.txt", "--out", out)
    assert_user_error(capsys, "cannot also be quantized by --load-in-4bit", *base,
                      "--load-in-4bit")  # fmt: skip
    config = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero2.json"
    assert_user_error(capsys, "do not combine with --fsdp or --deepspeed", *base, "--deepspeed",
                      config)  # fmt: skip
    assert not out.exists()


def test_unload_gives_a_loaded_quantized_base_back(quantized):
    from transformers import AutoModelForCausalLM

    from spp_kernels import SPPConfig, get_spp_model
    from spp_kernels.sparsity.lowbit import QuantizedPackedLinear

    model = AutoModelForCausalLM.from_pretrained(quantized)
    base = model.model.layers[0].mlp.up_proj
    other = SPPConfig(r=4, weight_format="nm", weight_dtype="int8")
    with pytest.raises(ValueError, match="self_attn.q_proj holds int4 N:M values already"):
        get_spp_model(model, other)  # refused before any layer changes
    assert model.model.layers[0].mlp.up_proj is base
    plain = get_spp_model(model, SPPConfig(r=4)).unload()
    assert plain.model.layers[0].mlp.up_proj is base
    assert isinstance(base, QuantizedPackedLinear)
    assert plain.config.quantization_config.quant_method == "spp_nm_lowbit"  # still true


def test_fp8_nan_codes_and_bad_patterns_in_a_checkpoint_are_refused(models, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from spp_kernels.cli import main
    from spp_kernels.sparsity.lowbit_hf import SppLowbitConfig

    out = tmp_path / "q-fp8"
    assert main(["quantize", "--model", str(models / "pruned"), "--out", str(out),
                 "--weight-dtype", "fp8", "--quiet"]) == 0  # fmt: skip
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight_codes"][1, 2] = 0x7F
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"o_proj\.weight_codes holds fp8 NaN codes"):
        AutoModelForCausalLM.from_pretrained(bad)
    with pytest.raises(ValueError, match="with M in"):
        SppLowbitConfig(weight_dtype="int8", modules={"model.layers.0.mlp.up_proj": [2, 0]})
