"""`spp train` on transformers' Trainer, as a Hugging Face user meets it: trackers, Trainer's
checkpoints opened by peft in a fresh process (no spp_kernels import), DeepSpeed options,
and the refusals that come before anything in --out changes."""

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
    return make_cli_models(tmp_path_factory.mktemp("trainer"))


def train_argv(models, out, *extra):
    return ("train", "--model", models / "pruned", "--data", models / "text.txt",
            "--max-len", "32", "--spp-r", "4", "--max-steps", "3", "--save-steps", "2",
            "--out", out, *extra)  # fmt: skip


def test_report_to_tensorboard_writes_loss_and_learning_rate(models, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    info = cli_json(capsys, *train_argv(models, out, "--report-to", "tensorboard"))
    assert info["steps"] == 3
    events = list(out.glob("runs/*/events.out.tfevents.*"))
    assert len(events) == 1  # inside --out
    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "train/learning_rate" in tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]


def test_a_checkpoint_opens_with_peft_in_a_fresh_process(models, tmp_path, capsys):
    """PeftModel.from_pretrained(base, out/checkpoint-N) as a user types it, in a process
    that never imports spp_kernels (the start-up hook registers SPP with peft)."""
    out = tmp_path / "run"
    cli_json(capsys, *train_argv(models, out))
    script = textwrap.dedent(f"""
        import sys
        from peft import PeftModel
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(models / "pruned")!r})
        model = PeftModel.from_pretrained(base, {str(out / "checkpoint-2")!r})
        saved = load_file({str(out / "checkpoint-2" / "adapter_model.safetensors")!r})
        state = model.state_dict()
        for key, value in saved.items():
            live = key.replace(".spp_alpha", ".spp_alpha.default").replace(
                ".spp_beta", ".spp_beta.default")
            assert (state[live] == value).all(), key
        print(type(model).__name__, len(saved))
    """)
    env = {k: v for k, v in os.environ.items() if k != "SPP_KERNELS_NO_HOOK"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["PeftModel", "28"]  # alpha and beta of 14 layers


def test_refusals_come_before_out_changes(models, tmp_path, capsys):
    out = tmp_path / "run"
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    line = assert_user_error(capsys, f"--deepspeed {bad}: not a readable JSON file",
                             *train_argv(models, out, "--deepspeed", bad))  # fmt: skip
    assert "\n" not in line
    good = tmp_path / "zero2.json"
    good.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    assert_user_error(capsys, "--skip-nonfinite", *train_argv(models, out, "--deepspeed", good,
                                                              "--skip-nonfinite", "2"))  # fmt: skip
    assert_user_error(capsys, "--fsdp needs several processes", *train_argv(models, out, "--fsdp"))
    assert not out.exists()


def test_a_run_of_spp_kernels_0_2_is_refused_on_resume(models, tmp_path, capsys):
    out = tmp_path / "old"
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "checkpoints" / "latest.json").write_text('{"step": 2, "dir": "step-00000002"}')
    line = assert_user_error(capsys, "spp-kernels 0.2's own training loop",
                             *train_argv(models, out, "--resume"))  # fmt: skip
    assert "--force" in line and "spp-kernels==0.2" in line


def test_gradient_checkpointing_gives_the_same_adapters(models, tmp_path, capsys):
    from safetensors.torch import load_file

    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    cli_json(capsys, *train_argv(models, plain, "--dropout", "0"))
    cli_json(capsys, *train_argv(models, ckpt, "--dropout", "0", "--gradient-checkpointing"))
    a = load_file(plain / "adapter_model.safetensors")
    b = load_file(ckpt / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # recomputation changes no number (non-reentrant checkpointing)
        assert (a[key] - b[key]).abs().max() <= 1e-6 * a[key].abs().max(), key


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_the_shipped_deepspeed_configs_reach_trainer(name):
    """configs/deepspeed/*.json as Trainer reads them: "auto" values filled from the
    arguments (zero2 and zero3 also run on CPU in tests/training/test_distributed.py; the
    offload file needs DeepSpeed's CPU Adam op, compiled on first use, so it is read here)."""
    pytest.importorskip("deepspeed")
    from pathlib import Path

    from spp_kernels.training.config import TrainConfig
    from spp_kernels.training.train import training_arguments

    path = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / f"{name}.json"
    config = TrainConfig(batch_size=3, grad_accum=2, max_grad_norm=0.5)
    args = training_arguments(config, "/nonexistent", saves=False, use_cpu=True,
                              deepspeed=str(path))  # fmt: skip
    ds = args.hf_deepspeed_config
    c = ds.config
    assert (c["train_micro_batch_size_per_gpu"], c["gradient_accumulation_steps"]) == (3, 2)
    assert c["gradient_clipping"] == 0.5
    assert ds.is_zero3() == name.startswith("zero3")
    assert ds.is_offload() == name.endswith("offload")


def test_the_sparsity_check_after_training_sees_one_changed_zero():
    import torch

    from spp_kernels.cli.output import UserError
    from spp_kernels.cli.train import _check_zeros_kept, _zero_masks
    from tests.helpers import make_tiny_llama

    model = make_tiny_llama(seed=0)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.weight[:, ::2] = 0
    masks = _zero_masks(model)
    assert all(isinstance(v, tuple) and len(v) == 2 for v in masks.values())  # no layer held
    _check_zeros_kept(model, masks)  # unchanged: passes
    with torch.no_grad():
        layer.weight[3, 4] = 1.0
    with pytest.raises(UserError, match="changed the zeros of model.layers.0.self_attn.q_proj"):
        _check_zeros_kept(model, masks)


def test_quiet_commands_print_no_deepspeed_accelerator_warning(models, tmp_path):
    """With DeepSpeed installed, accelerate imports it in every command; on a machine
    without GPUs it used to warn (on stdout) that it fell back to the CPU, even with
    --quiet."""
    pytest.importorskip("deepspeed")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    proc = subprocess.run(
        [sys.executable, "-m", "spp_kernels", "prune", "--model", str(models / "dense"),
         "--method", "magnitude", "--sparsity", "2:4", "--out", str(tmp_path / "p"),
         "--quiet", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accelerator" not in proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["method"] == "magnitude"
    assert "DS_ACCELERATOR" not in os.environ


@pytest.mark.parametrize("option", ["--load-in-4bit", "--load-in-8bit"])
def test_low_bit_base_trains_and_the_adapter_merges_into_the_float_model(option, models, tmp_path,
                                                                          capsys):  # fmt: skip
    """QLoRA's path for SPP: train on a bitsandbytes base, merge the adapter into the float
    pruned model it was quantized from; the merged model keeps every zero."""
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    info = cli_json(capsys, *train_argv(models, out, option))
    assert info["steps"] == 3 and info["base_quantization"] == ("nf4" if "4" in option else "int8")
    config = json.loads((out / "adapter_config.json").read_text())
    assert all(fp.endswith((":nf4", ":int8")) for fp in config["base_fingerprint"].values())
    cli_json(capsys, "merge", "--model", models / "pruned", "--adapter", out, "--out",
             tmp_path / "merged")  # fmt: skip
    from safetensors.torch import load_file

    before, after = load_file(models / "pruned" / "model.safetensors"), {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        after.update(load_file(f))
    projections = [k for k in before if k.endswith("proj.weight")]
    assert projections
    for key in projections:
        assert bool((after[key][before[key] == 0] == 0).all()), f"{key}: a zero became nonzero"
    assert any(not torch.equal(after[k], before[k]) for k in projections)


def test_low_bit_base_with_deepspeed_is_refused_before_out_changes(models, tmp_path, capsys):
    out = tmp_path / "run"
    config = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero2.json"
    argv = train_argv(models, out, "--load-in-4bit", "--deepspeed", config)
    assert_user_error(capsys, "does not combine with --fsdp or --deepspeed", *argv)
    assert_user_error(capsys, "needs --load-in-4bit", *train_argv(models, out, "--load-in-8bit",
                      "--quant-type", "fp4"))  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["int4", "fp8"])
def test_low_bit_nm_values_train_and_the_adapter_merges_into_the_float_model(dtype, models,
                                                                           tmp_path, capsys):  # fmt: skip
    """--weight-dtype: the 2:4 values kept as low-bit codes while training; the adapter
    merges into the float pruned model, every zero kept."""
    out = tmp_path / "run"
    extra = ("--weight-format", "nm", "--weight-dtype", dtype, "--weight-group-size", "16")
    info = cli_json(capsys, *train_argv(models, out, *extra))
    assert info["steps"] == 3 and info["base_quantization"] == f"nm-{dtype}"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["weight_dtype"] == dtype and config["weight_group_size"] == 16
    cli_json(capsys, "merge", "--model", models / "pruned", "--adapter", out, "--out",
             tmp_path / "merged")  # fmt: skip
    from safetensors.torch import load_file

    before, after = load_file(models / "pruned" / "model.safetensors"), {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        after.update(load_file(f))
    for key in [k for k in before if k.endswith("proj.weight")]:
        assert bool((after[key][before[key] == 0] == 0).all()), f"{key}: a zero became nonzero"


def test_low_bit_nm_values_refusals_come_before_out_changes(models, tmp_path, capsys):
    out = tmp_path / "run"
    assert_user_error(capsys, "set weight_format='nm'", *train_argv(models, out,
                      "--weight-dtype", "int8"))  # fmt: skip
    assert_user_error(capsys, "cannot also be quantized by --load-in-4bit", *train_argv(
        models, out, "--weight-format", "nm", "--weight-dtype", "int8", "--load-in-4bit"))  # fmt: skip
    assert not out.exists()
    # found once the model is loaded: --out holds nothing
    assert_user_error(capsys, "row length divisible by the group", *train_argv(
        models, out, "--weight-format", "nm", "--weight-dtype", "int4"))  # fmt: skip
    assert not out.exists() or not any(out.iterdir())
