"""Training checkpoints: atomic, verified, the last N kept, a corrupt one falls back.

Layout under OUT/checkpoints/:
  step-<N:08d>/adapter.safetensors     trainable tensors (full, gathered), by parameter name
  step-<N:08d>/optimizer.safetensors   AdamW moments and step counts, "<name>::<slot>"
  step-<N:08d>/trainer_state.json      step, configs, fingerprint, losses, param groups, and
                                       the sha256 of both tensor files (verified on load)
  latest.json                          {"step": N, "dir": "step-<N:08d>"}, switched last
Every file is written atomically (temp file, fsync, rename), latest.json after the step's
three files, and only then are checkpoints beyond the newest `keep` deleted, so a crash
at any moment leaves at least the previous checkpoint usable. Loading verifies sizes and
hashes; a checkpoint that fails is skipped with a warning naming the bad file, and the next
newest is tried. latest.json may only name a step directory inside checkpoints/.
Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..utils.io import atomic_save_safetensors, atomic_write_text, file_sha256

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not belong to this run."""


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(
    out_dir: str | os.PathLike,
    params: dict[str, torch.Tensor],
    optim: dict[str, Any],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write a complete checkpoint for `state["step"]`, make it the latest, keep `keep`.

    params: {name: tensor}; optim: torch.distributed.checkpoint's full optimizer state
    ({"state": {name: {slot: tensor}}, "param_groups": [...]}). Call on the writing rank.
    """
    root = checkpoint_root(out_dir)
    step = int(state["step"])
    directory = root / f"step-{step:08d}"
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"step": str(step), "format": str(CHECKPOINT_FORMAT)}
    atomic_save_safetensors(params, directory / "adapter.safetensors", meta)
    moments = {
        f"{name}::{slot}": torch.as_tensor(value)
        for name, slots in optim.get("state", {}).items()
        for slot, value in slots.items()
    }
    atomic_save_safetensors(moments, directory / "optimizer.safetensors", meta)
    full = dict(state, format=CHECKPOINT_FORMAT, param_groups=optim.get("param_groups", []))
    # Strict JSON: a skipped non-finite step's loss is stored as null (read back as NaN).
    full["losses"] = [x if math.isfinite(x) else None for x in state.get("losses", [])]
    full["sha256"] = {
        name: file_sha256(directory / name)
        for name in ("adapter.safetensors", "optimizer.safetensors")
    }
    atomic_write_text(directory / "trainer_state.json", json.dumps(full, indent=2, allow_nan=False))
    atomic_write_text(root / "latest.json", json.dumps({"step": step, "dir": directory.name}))
    for old in step_dirs(out_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def step_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint directories under out_dir, newest step first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def _pointer(out_dir: str | os.PathLike) -> Path | None:
    """The step directory latest.json names, if it is a valid name inside checkpoints/."""
    path = checkpoint_root(out_dir) / "latest.json"
    if not path.exists():
        return None
    try:
        name = json.loads(path.read_text())["dir"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable checkpoint pointer %s (%s)", path, e)
        return None
    if not isinstance(name, str) or not _STEP_DIR.match(name):
        log.warning(
            "ignoring checkpoint pointer %s: %r is not a step directory of checkpoints/", path, name
        )
        return None
    return checkpoint_root(out_dir) / name


def has_checkpoint(out_dir: str | os.PathLike) -> bool:
    return bool(step_dirs(out_dir))


def read_checkpoint(
    directory: Path,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(trainer state, params, optimizer state) of one checkpoint, verified: ValueError naming
    the bad file otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state_path = directory / "trainer_state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{state_path}: unreadable ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{state_path}: not a trainer state")
    if state.get("format") != CHECKPOINT_FORMAT or not isinstance(state.get("sha256"), dict):
        raise ValueError(
            f"{state_path}: checkpoint format {state.get('format')!r}, expected "
            f"{CHECKPOINT_FORMAT} with the files' sha256"
        )
    for name, digest in state["sha256"].items():
        path = directory / name
        if not path.is_file() or file_sha256(path) != digest:
            raise ValueError(
                f"{path}: missing or corrupt (its sha256 differs from the checkpoint's)"
            )
    tensors = {}
    for name in ("adapter.safetensors", "optimizer.safetensors"):
        path = directory / name
        try:
            tensors[name] = load_file(str(path))
        except (OSError, SafetensorError, ValueError) as e:
            raise ValueError(
                f"{path}: unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
            ) from None
    state["losses"] = [math.nan if x is None else float(x) for x in state.get("losses", [])]
    optim: dict[str, Any] = {"state": {}, "param_groups": state.get("param_groups", [])}
    for key, value in tensors["optimizer.safetensors"].items():
        name, _, slot = key.rpartition("::")
        optim["state"].setdefault(name, {})[slot] = value
    return state, tensors["adapter.safetensors"], optim


def load_latest(
    out_dir: str | os.PathLike, tidy: bool = True
) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(directory, state, params, optimizer) of the newest usable checkpoint: the one
    latest.json names first, then the others newest first; each bad one is skipped with a
    warning naming the file, and (tidy: the writing process) renamed to "<dir>.unusable" when
    newer than the one used, so that retention never deletes the good one and keeps a bad
    one. CheckpointError when none is usable."""
    candidates = step_dirs(out_dir)
    pointer = _pointer(out_dir)
    if pointer is not None and pointer in candidates:
        candidates.remove(pointer)
        candidates.insert(0, pointer)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {checkpoint_root(out_dir)}")
    problems = []
    for directory in candidates:
        try:
            state, params, optim = read_checkpoint(directory)
        except ValueError as e:
            log.warning("checkpoint %s is not usable: %s; trying an older one", directory.name, e)
            problems.append(str(e))
            continue
        for newer in candidates[: candidates.index(directory)] if tidy else []:
            if newer.name > directory.name:  # retention must not keep it over the good one
                aside = newer.with_name(newer.name + ".unusable")
                shutil.rmtree(aside, ignore_errors=True)
                newer.rename(aside)
                log.warning("renamed the unusable checkpoint %s to %s", newer.name, aside.name)
        return directory, state, params, optim
    raise CheckpointError(f"no usable checkpoint in {checkpoint_root(out_dir)}: {problems[0]}")


def fingerprint_diff(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """'key: old -> new' for every (nested) key whose value differs between saved and now."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
