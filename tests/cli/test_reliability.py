"""Issue 11: no lost work, no foreign code, no silent NaN, one-line errors.

Each test is named after the numbered item it covers; every one failed on 0.1 (before
this change) and passes now. Commands are called in-process (`main`) unless a signal,
stdin or a fresh interpreter is part of the case.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spp_kernels.cli import main
from spp_kernels.training.train import latest_checkpoint
from tests.helpers import assert_user_error, cli_json, cli_run, make_cli_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny dense/pruned model dirs, data files and one trained adapter (read-only here)."""
    root = make_cli_models(tmp_path_factory.mktemp("reliability"), adapter=True)
    return root


def copy_model(models: Path, tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(models / "pruned", target)
    return target


def spp(*argv: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "spp_kernels", *map(str, argv)],
        input=stdin, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# ---- 1. outputs are replaced atomically, never the cwd, an ancestor, home or an input -----


def test_1_export_refuses_cwd_ancestors_root_home_and_inputs(models, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("precious")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    model = models / "pruned"
    for out, pattern in (
        (".", "current directory"),
        ("..", "current directory"),
        ("/", "current directory or one of its parents"),
        (str(tmp_path / "home"), "refusing"),
    ):
        assert_user_error(capsys, pattern, "export-2to4", "--model", model, "--out", out, "--force")
    assert (work / "keep.txt").read_text() == "precious"
    assert_user_error(capsys, "contains --model", "export-2to4", "--model", model, "--out",
                      models, "--force")  # fmt: skip
    inputs = tmp_path / "inputs"
    shutil.copytree(models / "adapter", inputs / "adapter", ignore=shutil.ignore_patterns("ch*"))
    shutil.copy(models / "text.txt", inputs / "text.txt")
    assert_user_error(capsys, "contains --adapter", "merge", "--model", model, "--adapter",
                      inputs / "adapter", "--out", inputs, "--force")  # fmt: skip
    assert_user_error(capsys, "contains --data", "train", "--model", model, "--data",
                      inputs / "text.txt", "--out", inputs, "--force")  # fmt: skip
    assert sorted(p.name for p in inputs.iterdir()) == ["adapter", "text.txt"]
    assert (model / "config.json").is_file() and (models / "adapter").is_dir()


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on the device (ENOSPC)"),
                                         (errno.EROFS, "read-only file system (EROFS)"),
                                         (errno.EFBIG, "file too large (EFBIG)")])  # fmt: skip
def test_1_10_a_failed_replacement_keeps_the_old_output(models, tmp_path, capsys, monkeypatch,
                                                        code, words):  # fmt: skip
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    from transformers import PreTrainedModel

    def full_disk(self, directory, *a, **k):
        (Path(directory) / "partial.bin").write_bytes(b"x" * 10)
        raise OSError(code, os.strerror(code), str(Path(directory) / "model.safetensors"))

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    assert_user_error(capsys, words, "merge", "--model", models / "pruned", "--adapter",
                      models / "adapter", "--out", out, "--force")  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    # no temporary directory left behind, nor the lock file (issue 18 item 12)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.")] == []


def test_1_10_export_onto_a_symlink_is_refused(models, tmp_path, capsys):
    target = tmp_path / "real"
    target.mkdir()
    (target / "data.txt").write_text("kept")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert_user_error(capsys, "symbolic link", "export-2to4", "--model", models / "pruned",
                      "--out", link, "--force")  # fmt: skip
    assert (target / "data.txt").read_text() == "kept" and link.is_symlink()


# ---- 2. one writer per output ------------------------------------------------------------


def test_2_a_second_writer_fails_at_once_naming_the_holder(models, tmp_path, capsys):
    from spp_kernels.utils.io import output_lock

    out = tmp_path / "run"
    with output_lock(out):
        line = assert_user_error(capsys, f"pid {os.getpid()}", "train", "--model",
                                 models / "pruned", "--data", models / "text.txt", "--out", out,
                                 "--max-steps", "1", "--spp-r", "2")  # fmt: skip
        assert "in use by another spp process" in line
        assert_user_error(capsys, "in use", "merge", "--model", models / "pruned", "--adapter",
                          models / "adapter", "--out", out)  # fmt: skip
    info = cli_json(capsys, "train", "--model", models / "pruned", "--data", models / "text.txt",
                    "--out", out, "--max-steps", "1", "--spp-r", "2", "--max-len", "32")  # fmt: skip
    assert info["steps"] == 1  # the lock is released when its holder is done


# ---- 3. SIGTERM / SIGUSR1 save a checkpoint ------------------------------------------------


def _train_until_checkpoint(models, out, *extra):
    """Start `spp train` (effectively endless) and wait for its first checkpoint."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "spp_kernels", "train", "--model", str(models / "pruned"),
         "--data", str(models / "text.txt"), "--max-len", "16", "--spp-r", "2",
         "--batch-size", "1", "--max-steps", "100000", "--save-every", "1", "--out", str(out),
         "--json", "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while latest_checkpoint(out) is None:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_3_sigterm_and_sigusr1_checkpoint_then_exit_128_plus_signal(models, tmp_path, sig):
    out = tmp_path / "run"
    proc = _train_until_checkpoint(models, out)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr
    info = json.loads(stdout)
    assert info["interrupted"] is True and info["stop_signal"] == sig
    assert latest_checkpoint(out).name == f"checkpoint-{info['steps']}"
    assert info["steps"] >= 1
    assert (out / "adapter_model.safetensors").is_file()
    if sig == signal.SIGTERM:  # and the run resumes from it
        resumed = spp("train", "--model", models / "pruned", "--data", models / "text.txt",
                      "--max-len", "16", "--spp-r", "2", "--batch-size", "1", "--max-steps",
                      "100000", "--save-every", "1", "--out", out, "--json", "--quiet",
                      "--resume", "--stop-after", info["steps"] + 2)  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr  # --stop-after: a requested stop
        assert json.loads(resumed.stdout)["steps"] == info["steps"] + 2


# ---- 4. resume: backend may change, mismatches name the keys --------------------------------


def test_4_backend_change_does_not_block_resume(models, tmp_path, capsys):
    common = ["train", "--model", models / "pruned", "--data", models / "text.txt",
              "--max-len", "32", "--spp-r", "2", "--max-steps", "3", "--out", tmp_path / "run"]  # fmt: skip
    assert cli_json(capsys, *common, "--backend", "torch", "--stop-after", "1")["steps"] == 1
    assert cli_json(capsys, *common, "--backend", "auto", "--resume")["steps"] == 3
    line = assert_user_error(capsys, "spp_config.r: 2 -> 3", *common[:-8], "--max-len", "32",
                             "--spp-r", "3", "--max-steps", "3", "--out", tmp_path / "run",
                             "--resume")  # fmt: skip
    assert "{" not in line  # the changed keys, not two whole dicts


# ---- 5. foreign code is never run, stdin never read ----------------------------------------


def test_5_model_needing_custom_code_is_refused_without_a_prompt(models, tmp_path):
    model = copy_model(models, tmp_path)
    marker = tmp_path / "executed"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"}
    (model / "config.json").write_text(json.dumps(config))
    proc = spp("eval", "--model", model, "--data", models / "text.txt", "--seqlen", "32",
               stdin="y\ny\n")  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "needs custom code" in proc.stderr and "never runs code" in proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert not marker.exists()


def test_5_tokenizer_with_custom_code_is_not_run(models, tmp_path, capsys, monkeypatch):
    model = copy_model(models, tmp_path)
    marker = tmp_path / "executed"
    (model / "evil_tok.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil_tok.EvilTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(config))

    class NoStdin:
        def read(self, *a):
            raise AssertionError("stdin was read")

        readline = read

    monkeypatch.setattr(sys, "stdin", NoStdin())
    code, out, err = cli_run(capsys, "eval", "--model", model, "--data", models / "text.txt",
                             "--seqlen", "32", "--json")  # fmt: skip
    assert "[y/N]" not in out + err and not marker.exists()
    assert "Traceback" not in err


# ---- 6. a pattern from an adapter file is never compiled ------------------------------------


def test_6_saved_regex_is_refused_quickly(models, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(models / "adapter", adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(target_modules="^(a|a?)+(a|a?)+(a|a?)+(a|a?)+b$", wrapped_modules=None)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    assert_user_error(capsys, "patterns are never read from files", "merge", "--model",
                      models / "pruned", "--adapter", adapter, "--out", tmp_path / "m")  # fmt: skip
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "m").exists()


# ---- 7. pickles are refused in one line ----------------------------------------------------


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_7_pickle_bin_files_give_one_line_errors(models, tmp_path, capsys):
    marker = tmp_path / "executed"
    model = copy_model(models, tmp_path)
    (model / "model.safetensors").unlink()
    torch.save({"x": _Payload(str(marker))}, model / "pytorch_model.bin")
    assert_user_error(capsys, "cannot be loaded", "eval", "--model", model, "--data",
                      models / "text.txt")  # fmt: skip
    from spp_kernels.adapters.authors import _read_state

    authors = tmp_path / "authors"
    authors.mkdir()
    torch.save({"x": _Payload(str(marker))}, authors / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickled objects are refused"):
        _read_state(authors)
    assert not marker.exists()


# ---- 8. non-finite numbers stop training and are never merged, packed or loaded -------------


def test_8_diverging_training_stops_with_an_error_and_keeps_the_checkpoint(models, tmp_path,
                                                                          capsys):  # fmt: skip
    out = tmp_path / "run"
    line = assert_user_error(capsys, "non-finite", "train", "--model", models / "pruned",
                             "--data", models / "text.txt", "--max-len", "32", "--spp-r", "2",
                             "--lr", "1e10", "--max-steps", "20", "--save-every", "1",
                             "--out", out)  # fmt: skip
    assert "lower --lr" in line
    kept = int(latest_checkpoint(out).name.removeprefix("checkpoint-"))
    assert kept >= 1 and f"step {kept}" in line
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter from NaNs


def _poisoned_adapter(models: Path, tmp_path: Path) -> Path:
    adapter = tmp_path / "nan-adapter"
    shutil.copytree(models / "adapter", adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "layers.1.mlp.up_proj.spp_alpha" in k)
    tensors[key][0, :5] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    return adapter


def test_8_merge_export_prune_refuse_non_finite_naming_the_layer(models, tmp_path, capsys):
    adapter = _poisoned_adapter(models, tmp_path)
    assert_user_error(capsys, "non-finite weights in layer model.layers.1.mlp.up_proj", "merge", "--model",
                      models / "pruned", "--adapter", adapter, "--out", tmp_path / "m")  # fmt: skip
    assert not (tmp_path / "m").exists()
    model = copy_model(models, tmp_path)
    weights = load_file(model / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    w = weights[key]
    w[w != 0] = w[w != 0].masked_fill(torch.arange(int((w != 0).sum())) < 3, float("inf"))
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    for argv in (["export-2to4", "--model", model, "--out", tmp_path / "e"],
                 ["prune", "--model", model, "--method", "magnitude", "--sparsity", "0.5",
                  "--out", tmp_path / "p"]):  # fmt: skip
        line = assert_user_error(capsys, "3 non-finite values", *argv)
        assert "q_proj" in line
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()


def test_8_save_and_load_compressed_refuse_non_finite(models, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from spp_kernels.sparsity import sparse24

    model = AutoModelForCausalLM.from_pretrained(models / "pruned")
    sparse24.save_compressed(model, tmp_path / "good")
    with torch.no_grad():
        w = model.model.layers[0].mlp.down_proj.weight
        w[w != 0] = float("nan")
    with pytest.raises(ValueError, match=r"down_proj.weight holds \d+ non-finite"):
        sparse24.save_compressed(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    from spp_kernels.sparsity import compressed

    monkeypatch.setattr(compressed, "check_finite", lambda *a: None)
    sparse24.save_compressed(model, tmp_path / "bad")  # written as a corrupt file would be
    monkeypatch.undo()
    fresh = AutoModelForCausalLM.from_pretrained(models / "pruned")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match="load_compressed: .*down_proj.weight holds"):
        sparse24.load_compressed(fresh, tmp_path / "bad")
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


# ---- 9. strict JSON ------------------------------------------------------------------------


def test_9_json_has_no_bare_nan(models, tmp_path, capsys):
    code, out, err = cli_run(capsys, "train", "--model", models / "pruned", "--data",
                             models / "text.txt", "--max-len", "32", "--spp-r", "2", "--lr",
                             "1e10", "--max-steps", "4", "--skip-nonfinite", "10", "--out",
                             tmp_path / "run", "--json", "--quiet")  # fmt: skip
    # Issue 18 item 6: a run whose last (or every) step was skipped produced nothing usable.
    assert code == 1 and "was skipped as non-finite" in err and "lower --lr" in err, err
    assert "NaN" not in out and "Infinity" not in out
    info = json.loads(out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert info["final_loss"] is None and info["nonfinite"]["final_loss"] in ("nan", "inf")
    assert info["skipped_nonfinite_steps"] >= 1 and info["unusable"]


def test_6_a_run_that_recovers_after_a_skipped_step_exits_0():
    from spp_kernels.training.config import TrainResult

    assert TrainResult(step=6, total_steps=6, skipped_nonfinite=2).unusable is None
    assert "every step (3)" in TrainResult(step=3, total_steps=6, skipped_nonfinite=3).unusable
    last = TrainResult(step=6, total_steps=6, skipped_nonfinite=4, last_skipped=True)
    assert "the last step (6 of 6)" in last.unusable


# ---- 10. garbage files and bad values: one line naming the file ------------------------------


def test_10_truncated_and_garbage_files_give_one_line_errors(models, tmp_path, capsys):
    model = copy_model(models, tmp_path)
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(capsys, f"model {model}: cannot be loaded", "eval", "--model", model,
                      "--data", models / "text.txt")  # fmt: skip
    (model / "model.safetensors").write_bytes(b"garbage" * 100)
    assert_user_error(capsys, "cannot be loaded", "eval", "--model", model, "--data",
                      models / "text.txt")  # fmt: skip
    adapter = tmp_path / "adapter"
    shutil.copytree(models / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_user_error(capsys, f"--adapter {adapter}", "merge", "--model", models / "pruned",
                      "--adapter", adapter, "--out", tmp_path / "m")  # fmt: skip
    for step in adapter.glob("checkpoint-*"):
        (step / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    line = assert_user_error(capsys, "no usable checkpoint", "train", "--model",
                             models / "pruned", "--data", models / "text.txt", "--out", adapter,
                             "--max-steps", "2", "--spp-r", "4", "--max-len", "32", "--resume")  # fmt: skip
    assert "adapter_model.safetensors" in line


def test_10_wrong_typed_config_field_and_unknown_device(models, tmp_path, capsys):
    model = copy_model(models, tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = "two"
    (model / "config.json").write_text(json.dumps(config))
    assert_user_error(capsys, "cannot be loaded", "eval", "--model", model, "--data",
                      models / "text.txt")  # fmt: skip
    assert_user_error(capsys, "--device tpu: unknown device", "eval", "--model",
                      models / "pruned", "--data", models / "text.txt", "--device", "tpu")  # fmt: skip


def test_10_debug_shows_the_traceback(models, capsys):
    with pytest.raises(Exception, match="unknown device"):
        main(["eval", "--model", str(models / "pruned"), "--data", str(models / "text.txt"),
              "--device", "tpu", "--debug"])  # fmt: skip


# ---- 11. silently accepted inputs ----------------------------------------------------------


def test_11_int_adapters_are_refused(models, tmp_path, capsys):
    adapter = tmp_path / "int"
    shutil.copytree(models / "adapter", adapter, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v.round().to(torch.int64) for k, v in tensors.items()},
              adapter / "adapter_model.safetensors")  # fmt: skip
    assert_user_error(capsys, "dtype torch.int64", "merge", "--model", models / "pruned",
                      "--adapter", adapter, "--out", tmp_path / "m")  # fmt: skip


def test_11_sparsity_leaving_empty_rows_is_refused(models, tmp_path, capsys):
    line = assert_user_error(capsys, "leaves no weight in the rows", "prune", "--model",
                             models / "dense", "--method", "magnitude", "--sparsity", "0.9999",
                             "--out", tmp_path / "p")  # fmt: skip
    assert "lower sparsity" in line and not (tmp_path / "p").exists()


def test_11_scale_zero_warns(models, tmp_path, capsys):
    code, _, err = cli_run(capsys, "train", "--model", models / "pruned", "--data",
                           models / "text.txt", "--max-len", "32", "--spp-r", "2",
                           "--max-steps", "1", "--scale", "0", "--out", tmp_path / "run")  # fmt: skip
    assert code == 0 and "--scale 0" in err and "changes nothing" in err


def test_11_adapter_on_another_base_needs_allow_other_base(models, tmp_path, capsys):
    other = copy_model(models, tmp_path, "other")
    weights = load_file(other / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    weights[key] = weights[key].flip(1)  # same shape and sparsity, another zero pattern
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    line = assert_user_error(capsys, "trained on another base", "merge", "--model", other,
                             "--adapter", models / "adapter", "--out", tmp_path / "m")  # fmt: skip
    assert "model.layers.0.self_attn.q_proj" in line and "--allow-other-base" in line
    info = cli_json(capsys, "merge", "--model", other, "--adapter", models / "adapter",
                    "--out", tmp_path / "m", "--allow-other-base")  # fmt: skip
    assert info["sparsity_preserved"] is True


def test_11_eval_seqlen_beyond_the_maximum_is_refused_like_prune(models, tmp_path, capsys):
    for argv in (["eval", "--data", models / "text.txt"],
                 ["prune", "--method", "wanda", "--sparsity", "0.5", "--calib",
                  models / "text.txt", "--out", tmp_path / "p"]):  # fmt: skip
        assert_user_error(capsys, "--seqlen 4096 exceeds the model's maximum of 256 positions",
                          argv[0], "--model", models / "dense", *argv[1:], "--seqlen", "4096")  # fmt: skip


def test_11_outputs_follow_the_umask(models, tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        cli_json(capsys, "train", "--model", models / "pruned", "--data", models / "text.txt",
                 "--max-len", "32", "--spp-r", "2", "--max-steps", "1", "--out", tmp_path / "a")  # fmt: skip
        cli_json(capsys, "merge", "--model", models / "pruned", "--adapter", tmp_path / "a",
                 "--out", tmp_path / "m")  # fmt: skip
    finally:
        os.umask(previous)
    for path in [tmp_path / "a", tmp_path / "m", *(tmp_path / "a").rglob("*"),
                 *(tmp_path / "m").rglob("*")]:  # fmt: skip
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_11_version(capsys):
    import spp_kernels

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"spp-kernels {spp_kernels.__version__}"
