"""The embedded model's converted copy in the cache (cli.embedded.embedded_model_dir): made
once, reused, complete or absent, verified against its manifest on every use (a bad entry
is converted again, issue 18 item 10), and skipped (never an error) where it cannot be
written."""

from __future__ import annotations

import logging

import pytest
from safetensors.torch import load_file, save_file

from spp_kernels.cli import embedded, models
from spp_kernels.utils.io import MANIFEST_NAME, file_sha256, write_manifest
from tests.helpers import make_tiny_llama, tiny_tokenizer


@pytest.fixture
def fake_embedded(tmp_path, monkeypatch):
    """A fake GGUF file, the cache under tmp_path and a converter that writes a tiny LLaMA,
    counting its calls."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF fake payload")
    monkeypatch.setattr(embedded, "embedded_model_file", lambda: gguf)
    monkeypatch.setenv("SPP_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def convert(src, out):
        calls.append(out)
        make_tiny_llama().save_pretrained(out)
        tiny_tokenizer().save_pretrained(out)

    monkeypatch.setattr(embedded, "_convert_gguf", convert)
    return gguf, calls


def test_converted_once_then_reused_and_loaded(fake_embedded, tmp_path):
    gguf, calls = fake_embedded
    first = embedded.embedded_model_dir()
    assert first.parent == tmp_path / "cache" and (first / "config.json").is_file()
    assert embedded.embedded_model_dir() == first and len(calls) == 1
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp dir left
    model, tokenizer = models.load_model(embedded.EMBEDDED)
    assert model.config.hidden_size == make_tiny_llama().config.hidden_size
    assert tokenizer is not None
    gguf.write_bytes(b"GGUF another payload")  # another GGUF: another key, a new copy
    assert embedded.embedded_model_dir() != first and len(calls) == 2


def test_a_failed_conversion_leaves_nothing_behind(fake_embedded, tmp_path, monkeypatch):
    def broken(src, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert_gguf", broken)
    with pytest.raises(KeyboardInterrupt):
        embedded.embedded_model_dir()
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_concurrent_writer_s_copy_is_kept(fake_embedded, monkeypatch):
    gguf, calls = fake_embedded
    convert = embedded._convert_gguf

    def racing(src, out):  # another process renames its complete copy in meanwhile
        convert(src, out)
        winner = out.parent / out.name.split(".new-")[0].lstrip(".")
        convert(src, winner)
        (winner / "winner").touch()
        write_manifest(winner, {"gguf_sha256": file_sha256(src)})

    monkeypatch.setattr(embedded, "_convert_gguf", racing)
    dest = embedded.embedded_model_dir()
    assert (dest / "winner").is_file() and len(list(dest.parent.iterdir())) == 1


def test_an_unwritable_cache_falls_back_to_the_gguf(fake_embedded, tmp_path, caplog):
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING):
        assert embedded.embedded_model_dir() is None
    assert "cannot cache" in caplog.text


def _tamper_truncate(entry):
    path = entry / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _tamper_edit(entry):
    path = entry / "model.safetensors"
    weights = load_file(path)
    key = sorted(weights)[0]
    weights[key] = weights[key] + 1.0  # same size, other values
    save_file(weights, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "tamper",
    [
        _tamper_truncate,
        _tamper_edit,
        lambda entry: (entry / "config.json").unlink(),
        lambda entry: (entry / MANIFEST_NAME).unlink(),
    ],
    ids=["truncated", "modified tensor", "no config.json", "no manifest"],
)
def test_18_10_a_bad_entry_is_converted_again_once(fake_embedded, tmp_path, caplog, tamper):
    gguf, calls = fake_embedded
    first = embedded.embedded_model_dir()
    tamper(first)
    with caplog.at_level(logging.WARNING):
        again = embedded.embedded_model_dir()
    assert again == first and len(calls) == 2
    assert "not usable" in caplog.text and str(first) in caplog.text
    assert embedded.embedded_model_dir() == first and len(calls) == 2  # and only once
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # nothing left aside
    models.load_model(embedded.EMBEDDED)
