"""Issue 18 (reliability, round two) through the `spp` command: merged bases, absurd
adapters, clear one-line errors, one length rule, no stale lock files.

Each test is named after the numbered item of the issue it covers.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from spp_kernels.cli import main
from tests.helpers import assert_user_error, cli_json, cli_run, make_cli_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny dense/pruned model dirs, data files, a trained adapter and its merged model."""
    root = make_cli_models(tmp_path_factory.mktemp("reliability2"), adapter=True)
    assert main(["merge", "--model", str(root / "pruned"), "--adapter", str(root / "adapter"),
                 "--out", str(root / "merged"), "--quiet"]) == 0  # fmt: skip
    return root


def adapter_copy(models, tmp_path, config=None, tensors=None):
    """A copy of the trained adapter with its config updated by `config` and its tensors
    replaced through `tensors(dict) -> dict`."""
    target = tmp_path / "adapter"
    shutil.copytree(models / "adapter", target, ignore=shutil.ignore_patterns("checkpoint-*"))
    if config is not None:
        data = json.loads((target / "adapter_config.json").read_text())
        data.update(config)
        (target / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        path = target / "adapter_model.safetensors"
        save_file(tensors(load_file(path)), path, metadata={"format": "pt"})
    return target


def merge(models, adapter, out, *extra):
    return ("merge", "--model", models / "pruned", "--adapter", adapter, "--out", out, *extra)


# ---- 5. an adapter is refused on a base it was already merged into -------------------------


# ---- 2. nothing under --out is followed out of it ------------------------------------------

# Every path `spp train --out run` writes, replaces or deletes (the final adapter, the
# checkpoint folder and its files) and the whole of --out for the commands that
# replace it (prune, merge, export-2to4).
TRAIN_PATHS = [
    "checkpoint-2",
    "checkpoint-2/adapter_model.safetensors",
    "checkpoint-2/optimizer.pt",
    "checkpoint-2/trainer_state.json",
    "checkpoint-2/spp-manifest.json",
    "adapter_model.safetensors",
    "adapter_config.json",
    "README.md",
]


def _run_with_a_link(models, tmp_path, inside: str):
    """A copy of a trained run whose `inside` is a symbolic link to another run's copy."""
    other, run = tmp_path / "other", tmp_path / "run"
    shutil.copytree(models / "adapter", other)
    shutil.copytree(models / "adapter", run)
    victim = run / inside
    shutil.rmtree(victim) if victim.is_dir() else victim.unlink()
    victim.symlink_to(other / inside, target_is_directory=(other / inside).is_dir())
    snapshot = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    return run, other, snapshot


@pytest.mark.parametrize("inside", TRAIN_PATHS)
@pytest.mark.parametrize("flags", [["--force"], ["--resume"]], ids=["force", "resume"])
def test_2_train_never_follows_a_link_inside_out(models, tmp_path, capsys, inside, flags):
    run, other, snapshot = _run_with_a_link(models, tmp_path, inside)
    assert_user_error(capsys, "is a symbolic link", "train", "--model", models / "pruned",
                      "--data", models / "text.txt", "--max-len", "32", "--spp-r", "4",
                      "--max-steps", "3", "--save-every", "1", "--out", run, *flags)  # fmt: skip
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == snapshot
    assert (run / inside).is_symlink()  # refused before anything changed


@pytest.mark.parametrize("command", ["prune", "merge", "export-2to4"])
def test_2_commands_replacing_out_refuse_a_link_inside_it(models, tmp_path, capsys, command):
    run, other, snapshot = _run_with_a_link(models, tmp_path, "checkpoint-2")
    argv = {
        "prune": ["prune", "--model", models / "dense", "--method", "magnitude",
                  "--sparsity", "2:4"],
        "merge": ["merge", "--model", models / "pruned", "--adapter", models / "adapter"],
        "export-2to4": ["export-2to4", "--model", models / "merged"],
    }[command]  # fmt: skip
    assert_user_error(capsys, "is a symbolic link", *argv, "--out", run, "--force")
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == snapshot


# ---- 7. bounded memory on big data ---------------------------------------------------------

PEAK_SCRIPT = """
import resource, sys
from spp_kernels.cli import main
code = main(sys.argv[1:])
print("PEAK_MB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, file=sys.stderr)
sys.exit(code)
"""


def _word_model(root):
    """A tiny LLaMA with a 4,004-word WordLevel tokenizer (fast to tokenize, so a 300 MB
    file is read in about half a minute), and one line of its words."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = sorted({"".join(rng.choice(letters) for _ in range(rng.randint(3, 9)))
                    for _ in range(4000)})  # fmt: skip
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    return (" ".join(rng.choice(words) for _ in range(20000)) + "\n").encode()


def _peak_mb(root, data):
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, "train", "--model", str(root / "model"), "--data",
         str(data), "--out", str(root / f"out-{data.stem}"), "--max-steps", "1", "--spp-r",
         "2", "--quiet", "--json"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return float(run.stderr.rsplit("PEAK_MB", 1)[1].split()[0])


def test_7_a_300_mb_text_file_trains_within_2_gb_above_the_model(tmp_path):
    line = _word_model(tmp_path)
    (tmp_path / "small.txt").write_bytes(line)
    with open(tmp_path / "big.txt", "wb") as f:  # 300 MiB, many lines
        for _ in range(300 * 2**20 // len(line) + 1):
            f.write(line)
    base, big = _peak_mb(tmp_path, tmp_path / "small.txt"), _peak_mb(tmp_path, tmp_path / "big.txt")
    print(f"peak RSS: {base:.0f} MB with one line, {big:.0f} MB with 300 MiB of text")
    assert big - base < 2048


def test_7_a_file_of_one_long_line_is_cut_into_pieces(tmp_path):
    from spp_kernels.training import tokens
    from tests.helpers import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    text = "abc de " * 40000  # one line of 280,000 characters: pieces cut at spaces
    (tmp_path / "one.txt").write_text(text)
    ids = tokens.encode_text_file(tokenizer, tmp_path / "one.txt")
    assert ids.tolist() == tokenizer(text)["input_ids"]


def test_5_merging_twice_is_refused_naming_the_layer(models, tmp_path, capsys):
    line = assert_user_error(capsys, "already merged", "merge", "--model", models / "merged",
                             "--adapter", models / "adapter", "--out", tmp_path / "m2")  # fmt: skip
    assert "model.layers.0.self_attn.q_proj" in line
    assert not (tmp_path / "m2").exists()


# ---- 6. absurd adapters: refused before anything is written --------------------------------


def test_6_a_huge_scale_in_the_file_is_refused(models, tmp_path, capsys):
    adapter = adapter_copy(models, tmp_path, config={"scale": 1e38})
    assert_user_error(
        capsys, "scale must be a finite number", *merge(models, adapter, tmp_path / "m")
    )
    assert not (tmp_path / "m").exists()


def test_6_finite_weights_with_overflowing_outputs_fail_the_probe(models, tmp_path, capsys):
    def huge(state):
        return {k: (torch.full_like(v, 1e8) if k.endswith("spp_beta") else v.sign() * 1e8)
                for k, v in state.items()}  # fmt: skip

    adapter = adapter_copy(models, tmp_path, config={"scale": 1e4}, tensors=huge)
    assert_user_error(
        capsys, "non-finite logits on a probe batch", *merge(models, adapter, tmp_path / "m")
    )
    assert not (tmp_path / "m").exists()


# ---- 11. one line naming the file and the problem ------------------------------------------


def test_11_an_adapter_of_the_wrong_shape_names_the_tensor(models, tmp_path, capsys):
    def narrower(state):
        return {k: (v[:2] if k.endswith("spp_alpha") else v) for k, v in state.items()}

    adapter = adapter_copy(models, tmp_path, tensors=narrower)
    line = assert_user_error(capsys, "has shape (2, 64)", *merge(models, adapter, tmp_path / "m"))
    assert str(adapter) in line and "needs (4, 64)" in line


def test_11_a_missing_weights_file_names_the_directory(models, tmp_path, capsys):
    adapter = adapter_copy(models, tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    line = assert_user_error(
        capsys, "no adapter_model.safetensors", *merge(models, adapter, tmp_path / "m")
    )
    assert str(adapter) in line


def test_11_a_lora_adapter_is_named_as_such(models, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(models / "pruned"), LoraConfig(r=2))
    lora.save_pretrained(tmp_path / "lora")
    for command in (merge(models, tmp_path / "lora", tmp_path / "m"),
                    ("eval", "--model", models / "pruned", "--adapter", tmp_path / "lora",
                     "--data", models / "text.txt")):  # fmt: skip
        assert_user_error(capsys, "a LORA adapter, not SPP", *command)


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"r": 4}', "no peft_type"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("{garbage", "not valid JSON"),
    ],
    ids=["no peft_type", "deeply nested", "garbage"],
)
def test_11_bad_adapter_configs_name_the_file(models, tmp_path, capsys, text, words):
    adapter = adapter_copy(models, tmp_path)
    (adapter / "adapter_config.json").write_text(text)
    line = assert_user_error(capsys, words, *merge(models, adapter, tmp_path / "m"))
    assert str(adapter / "adapter_config.json") in line


def test_11_a_truncated_token_cache_is_rebuilt_naming_the_file(tmp_path, caplog):
    from spp_kernels.datasets import wikipedia_tokens
    from tests.helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    first = wikipedia_tokens(tok, "heldout", max_tokens=200, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.safetensors")
    cached.write_bytes(cached.read_bytes()[:-40])
    again = wikipedia_tokens(tok, "heldout", max_tokens=200, cache_dir=tmp_path)
    assert torch.equal(first, again)
    assert str(cached) in caplog.text and "tokenizing again" in caplog.text
    assert torch.equal(wikipedia_tokens(tok, "heldout", max_tokens=200, cache_dir=tmp_path), first)


def test_11_a_full_disk_inside_a_library_writer_names_the_file(
    models, tmp_path, capsys, monkeypatch
):
    import errno

    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # no file name, as from write()

    import peft.peft_model

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", full)  # the adapter's writer
    line = assert_user_error(capsys, "no space left on the device (ENOSPC)", "train", "--model",
                             models / "pruned", "--data", models / "text.txt", "--max-steps", "1",
                             "--max-len", "32", "--out", tmp_path / "run")  # fmt: skip
    assert str(tmp_path / "run") in line


def test_11_a_file_size_limit_names_the_file(models, tmp_path):
    """A real EFBIG: the process may not write files over 64 KiB (RLIMIT_FSIZE)."""
    script = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        from spp_kernels.cli import main
        sys.exit(main(["merge", "--model", "{models / "pruned"}", "--adapter",
                       "{models / "adapter"}", "--out", "{tmp_path / "m"}", "--quiet"]))
    """)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("spp merge: error:")]
    assert len(lines) == 1 and "file too large (EFBIG)" in lines[0], run.stderr
    assert str(tmp_path / "m") in lines[0] and "Traceback" not in run.stderr
    assert not (tmp_path / "m").exists()


# ---- 12. smaller ----------------------------------------------------------------------------


def test_11_other_ranks_do_not_add_a_misleading_gloo_error(monkeypatch, capsys):
    """A rank whose collective fails because rank 0 already exited with its real error says
    so in one line, without gloo's "Connection closed by peer"."""
    import spp_kernels.cli.merge as merge_cmd

    def lost_peer(args):
        raise RuntimeError(
            "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
            "[127.0.0.1]:41579"
        )

    monkeypatch.setattr(merge_cmd, "cmd_merge", lost_peer)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["merge", "--model", "m", "--adapter", "a", "--out", "o"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("spp merge: process 1 of 2 stopped because another process ended first "
                   "(that process's error is the cause)")  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: the error as it is
    assert main(["merge", "--model", "m", "--adapter", "a", "--out", "o"]) == 1
    assert "Connection closed by peer" in capsys.readouterr().err


def test_12_max_len_beyond_the_model_is_refused_like_seqlen(models, tmp_path, capsys):
    assert_user_error(capsys, "--max-len 4096 exceeds the model's maximum of 256 positions",
                      "train", "--model", models / "pruned", "--data", models / "text.txt",
                      "--max-len", "4096", "--out", tmp_path / "run")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_12_a_file_named_wikipedia_is_not_silently_ignored(models, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wikipedia").write_text("a local file\n")
    code, _, err = cli_run(capsys, "eval", "--model", models / "pruned", "--data", "wikipedia",
                           "--max-tokens", "64", "--seqlen", "32")  # fmt: skip
    assert code == 0 and "built-in Wikipedia corpus" in err and "--data ./wikipedia" in err


def test_12_no_lock_file_is_left_behind(models, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("not empty")
    assert_user_error(capsys, "not empty", *merge(models, models / "adapter", tmp_path / "out"))
    cli_json(capsys, *merge(models, models / "adapter", tmp_path / "ok"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok", "out"]


def test_12_spp_linear_refuses_a_weight_that_requires_grad():
    from spp_kernels import spp_linear

    w = torch.randn(8, 16, requires_grad=True)
    alpha, beta = torch.randn(2, 16, requires_grad=True), torch.zeros(8, requires_grad=True)
    with pytest.raises(ValueError, match="frozen weight requires grad"):
        spp_linear(torch.randn(3, 16), w, alpha, beta)
    with torch.no_grad():
        spp_linear(torch.randn(3, 16), w, alpha, beta)  # no gradient asked: fine
    spp_linear(torch.randn(3, 16), w.detach(), alpha, beta).sum().backward()
