"""The training loop: schedule, losses, checkpoints, bit-exact resume, Ctrl-C, fingerprints."""

import copy
import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from spp_kernels.adapters import SPPConfig, get_spp_model
from spp_kernels.training.data import Example
from spp_kernels.training.train import (
    NonFiniteError,
    TrainConfig,
    latest_checkpoint,
    lr_factor,
    token_loss,
    total_steps,
    train,
)
from tests.helpers import make_tiny_llama


def examples(n=10, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 6 + i % 5
        ids = torch.randint(0, vocab, (length,), generator=g).tolist()
        labels = [-100, -100] + ids[2:] if i % 3 == 0 else ids
        out.append(Example(tuple(ids), tuple(labels)))
    return out


def spp_model(dropout=0.1, seed=0):
    model = make_tiny_llama(seed=seed)
    torch.manual_seed(1)
    return get_spp_model(model, SPPConfig(r=4, dropout=dropout, backend="torch"))


def adapters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


CFG = dict(lr=1e-2, epochs=2, batch_size=3, grad_accum=2, seed=3, save_every=1)


def test_lr_schedule_warms_up_then_decays_linearly():
    total = 100
    values = [lr_factor(s, total, 0.03) for s in range(total)]
    assert values[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    assert values[50] == pytest.approx(50 / 97)
    assert values[-1] == pytest.approx(1 / 97)
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
    assert lr_factor(0, 10, 0.0) == 1.0


def test_the_logged_learning_rates_follow_lr_factor(tmp_path):
    config = TrainConfig(**{**CFG, "warmup_ratio": 0.3})
    result = train(spp_model(), examples(), config, progress=False)
    logged = [e["learning_rate"] for e in result.log_history if "learning_rate" in e]
    expected = [config.lr * lr_factor(s, 4, 0.3) for s in range(4)]
    assert logged == pytest.approx(expected)


def test_total_steps():
    assert total_steps(10, TrainConfig(epochs=3, batch_size=4, grad_accum=1)) == 9
    assert total_steps(10, TrainConfig(epochs=3, batch_size=4, grad_accum=2)) == 6
    assert total_steps(10, TrainConfig(epochs=3, batch_size=4, max_steps=2)) == 2


def test_total_steps_is_what_trainer_runs():
    config = TrainConfig(epochs=3, batch_size=4, grad_accum=2, lr=1e-3)
    result = train(spp_model(), examples(10), config, progress=False)
    assert result.step == result.total_steps == total_steps(10, config) == 6


@pytest.mark.parametrize(
    "bad", [dict(lr=0), dict(epochs=0), dict(warmup_ratio=1.0), dict(kd_weight=2)]
)
def test_train_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="TrainConfig"):
        TrainConfig(**bad)


def test_token_loss_matches_cross_entropy_and_kl_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    teacher = torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :3] = -100
    ce, n = token_loss(logits, labels, None, TrainConfig())
    tgt = labels[:, 1:].reshape(-1)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), tgt, ignore_index=-100, reduction="sum")
    assert n == int((tgt != -100).sum()) == 6
    torch.testing.assert_close(ce.double(), ref)
    cfg = TrainConfig(kd_weight=0.75, kd_temperature=2.0)
    kd_loss, _ = token_loss(logits, labels, teacher, cfg)
    keep = tgt != -100
    s = logits[:, :-1].reshape(-1, 11)[keep] / 2
    t = teacher[:, :-1].reshape(-1, 11)[keep] / 2
    kl = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum() * 4
    torch.testing.assert_close(kd_loss.double(), 0.75 * kl + 0.25 * ref, rtol=1e-5, atol=1e-6)


def test_training_lowers_the_loss_and_keeps_zeros():
    model = spp_model(dropout=0.0)
    layer = next(iter(model.spp_layers().values()))
    with torch.no_grad():
        layer.weight[:, ::2] = 0
    zeros = layer.weight == 0
    frozen = layer.weight.detach().clone()
    data = examples(4)
    result = train(model, data, TrainConfig(lr=2e-2, epochs=12, batch_size=4), progress=False)
    assert result.step == 12 and result.losses[-1] < result.losses[0]
    assert torch.equal(layer.weight, frozen)
    assert torch.equal(layer.merged_weight() == 0, zeros)


def optimizer_state(directory):
    return torch.load(directory / "optimizer.pt", weights_only=True)["state"]


def test_resume_is_bit_exact_with_dropout(tmp_path):
    data = examples()
    full = spp_model()
    ref = train(full, data, TrainConfig(**CFG), tmp_path / "a", progress=False)
    assert not ref.interrupted and ref.step == total_steps(len(data), TrainConfig(**CFG)) == 4

    part = spp_model()
    first = train(part, data, TrainConfig(**CFG, stop_after=2), tmp_path / "b", progress=False)
    assert first.interrupted and first.step == 2
    again = spp_model()  # a fresh process: new model, adapters restored from the checkpoint
    second = train(again, data, TrainConfig(**CFG), tmp_path / "b", resume=True, progress=False)
    assert second.step == 4 and not second.interrupted
    assert second.losses == ref.losses  # the log of steps 1-2 comes from the checkpoint
    a, b = adapters(full), adapters(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The checkpoints on disk agree too, tensor for tensor.
    sa = optimizer_state(latest_checkpoint(tmp_path / "a"))
    sb = optimizer_state(latest_checkpoint(tmp_path / "b"))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k][s], sb[k][s]) for k in sa for s in sa[k])


def test_checkpoints_are_trainers_and_open_in_peft(tmp_path):
    from peft import PeftModel

    model = spp_model()
    train(model, examples(), TrainConfig(**CFG, logging_steps=1), tmp_path, progress=False)
    # The newest keep_checkpoints (2) stay, older ones are rotated away by Trainer.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-4"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt",
            "rng_state.pth", "trainer_state.json", "spp-manifest.json"} <= names  # fmt: skip
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]
    assert all("learning_rate" in e for e in state["log_history"] if "loss" in e)
    saved = load_file(ckpt / "adapter_model.safetensors")
    live = adapters(model)
    assert len(saved) == len(live) > 0
    opened = PeftModel.from_pretrained(make_tiny_llama(seed=0), ckpt)
    reopened = {n: p for n, p in opened.named_parameters() if "spp_" in n}
    ours = {n.replace(".default", ""): p for n, p in live.items()}
    assert len(reopened) == len(ours)
    assert all(torch.equal(p, ours[n.replace(".default", "")]) for n, p in reopened.items())


def test_half_written_checkpoint_does_not_break_resume(tmp_path, caplog):
    data = examples()
    model = spp_model()
    train(model, data, TrainConfig(**CFG, stop_after=2), tmp_path, progress=False)
    # A crash while Trainer wrote step 3: its directory exists, without a manifest.
    broken = tmp_path / "checkpoint-3"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes(b"partial")
    (tmp_path / "unusable-checkpoint-3").mkdir()  # set aside by an earlier crash at step 3
    again = spp_model()
    with caplog.at_level("WARNING", logger="spp_kernels.training"):
        result = train(again, data, TrainConfig(**CFG), tmp_path, resume=True, progress=False)
    assert "checkpoint-3 is not usable" in caplog.text and result.step == 4
    assert (tmp_path / "unusable-checkpoint-3-2" / "adapter_model.safetensors").is_file()


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    data = examples()
    ref = spp_model()
    train(ref, data, TrainConfig(**CFG), tmp_path / "ref", progress=False)
    train(spp_model(), data, TrainConfig(**CFG, stop_after=3), tmp_path / "run", progress=False)
    root = tmp_path / "run"
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    bad = root / "checkpoint-3" / "adapter_model.safetensors"
    bad.write_bytes(bad.read_bytes()[:-8] + b"\xff" * 8)  # same size, other bytes
    again = spp_model()
    with caplog.at_level("WARNING", logger="spp_kernels.training"):
        result = train(again, data, TrainConfig(**CFG), root, resume=True, progress=False)
    assert str(bad) in caplog.text and "trying an older one" in caplog.text
    assert result.step == 4  # resumed from step 2, bit-exact
    a, b = adapters(ref), adapters(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path):
    data = examples()
    model = spp_model()

    def interrupt(step, loss):
        if step == 1:
            signal.raise_signal(signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    result = train(model, data, TrainConfig(**CFG), out, progress=False, callback=interrupt)
    assert signal.getsignal(signal.SIGINT) is previous
    assert result.interrupted and result.step == 1 and result.stop_signal == signal.SIGINT
    assert latest_checkpoint(out).name == "checkpoint-1"
    again = spp_model()
    done = train(again, data, TrainConfig(**CFG), out, resume=True, progress=False)
    assert done.step == 4
    # Bit-identical to a run never interrupted (dropout 0.1: the RNG state is restored).
    ref = spp_model()
    train(ref, data, TrainConfig(**CFG), tmp_path / "ref", progress=False)
    a, b = adapters(ref), adapters(again)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_on_a_process_count_not_dividing_the_global_batch_is_refused(
    tmp_path, monkeypatch
):
    data = examples()
    train(spp_model(), data, TrainConfig(**CFG, stop_after=1), tmp_path, progress=False)
    monkeypatch.setenv("WORLD_SIZE", "2")  # global batch 3 (batch 3, one process)
    with pytest.raises(ValueError, match="global batches of 3 examples, which 2 processes"):
        train(spp_model(), data, TrainConfig(**CFG), tmp_path, resume=True, progress=False)


def test_resume_refuses_changed_settings_or_data(tmp_path):
    data = examples()
    train(spp_model(), data, TrainConfig(**CFG, stop_after=1), tmp_path, progress=False)
    # The message names the changed key with its old and new values, not two whole dicts.
    with pytest.raises(ValueError, match=r"resume: .* train_config\.lr: 0\.01 -> 0\.02$"):
        train(
            spp_model(),
            data,
            TrainConfig(**{**CFG, "lr": 2e-2}),
            tmp_path,
            resume=True,
            progress=False,
        )
    with pytest.raises(ValueError, match="n_examples"):
        train(spp_model(), data[:-1], TrainConfig(**CFG), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="no checkpoint"):
        train(spp_model(), data, TrainConfig(**CFG), tmp_path / "none", resume=True, progress=False)


def test_a_run_of_the_old_loop_is_refused_on_resume(tmp_path):
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    with pytest.raises(ValueError, match="spp-kernels 0.2's own training loop.*--force"):
        train(spp_model(), examples(), TrainConfig(**CFG), tmp_path, resume=True, progress=False)


def test_skipped_non_finite_steps_leave_the_adapters_unchanged(tmp_path):
    model = spp_model(dropout=0.0)
    before = adapters(model)
    poisoned = {"on": True}

    def nan_hook(module, args, output):
        return output * float("nan") if poisoned["on"] else output

    handle = model.get_base_model().lm_head.register_forward_hook(nan_hook)
    config = TrainConfig(**{**CFG, "skip_nonfinite": 4, "max_steps": 2})
    result = train(model, examples(), config, tmp_path, progress=False)
    handle.remove()
    assert result.skipped_nonfinite == 2 and result.last_skipped and result.unusable
    after = adapters(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Without --skip-nonfinite the first non-finite step stops the run.
    model = spp_model(dropout=0.0)
    model.get_base_model().lm_head.register_forward_hook(lambda m, a, o: o * float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite loss .* at step 1; no checkpoint"):
        train(model, examples(), TrainConfig(**CFG), tmp_path / "b", progress=False)


def test_distillation_from_identical_teacher_starts_at_zero_loss():
    model = spp_model(dropout=0.0)
    teacher = copy.deepcopy(model.get_base_model())  # paper init: beta = 0, student == teacher
    result = train(
        model,
        examples(3),
        TrainConfig(epochs=1, batch_size=3, max_grad_norm=None),
        teacher=teacher,
        progress=False,
    )
    assert result.losses[0] == pytest.approx(0.0, abs=1e-5)
    assert math.isfinite(result.final_loss)


def test_model_without_trainable_parameters_is_rejected():
    model = make_tiny_llama().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, examples(2), TrainConfig(), progress=False)
