"""The checkpoints of `spp train`: transformers' Trainer's, verified before a resume.

`out/checkpoint-N/` is Trainer's own checkpoint: adapter_config.json and
adapter_model.safetensors (peft's layout: `PeftModel.from_pretrained(base, out/checkpoint-N)`
opens it), optimizer.pt, scheduler.pt, rng_state*.pth and trainer_state.json (with
`log_history`). Trainer writes the directory in place and checks nothing when it resumes,
so once every process has written its files the writing process adds
`spp-manifest.json` (`utils.io.write_manifest`, atomically, last): the size and sha256 of
every file, the run's fingerprint (the options a resume must not change) and the
non-finite step counters. A checkpoint without a manifest (a crash while saving) or whose
files differ from it (a bad disk, a truncated copy) is skipped with a warning naming the
file, and the next newest is used; the newer unusable one is renamed out of Trainer's
`checkpoint-*` pattern so that rotation never keeps it in place of a good one. Rotation
(`rotate`, in place of Trainer's save_total_limit, which deletes older checkpoints before
the new one is sealed) runs after sealing and counts sealed checkpoints only. Trainer
loads the .pt files with `torch.load(weights_only=True)`: no code runs from them.

Runs written by spp-kernels 0.2 (`checkpoints/step-N/`, its own loop) are recognised and
refused on resume.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..utils.io import MANIFEST_NAME, manifest_problem, write_manifest

log = logging.getLogger(__name__)

_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
LEGACY_ROOT = "checkpoints"  # spp-kernels 0.2: checkpoints/step-NNNNNNNN/
UNUSABLE_PREFIX = "unusable-"


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not belong to this run."""


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    """Where the checkpoint-N directories live: --out itself, as Trainer's output_dir."""
    return Path(out_dir)


def checkpoint_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint-N directories under out_dir, newest step first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _CHECKPOINT_DIR.match(p.name)) and p.is_dir() and not p.is_symlink()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def has_checkpoint(out_dir: str | os.PathLike) -> bool:
    return bool(checkpoint_dirs(out_dir))


def legacy_run(out_dir: str | os.PathLike) -> Path | None:
    """out_dir/checkpoints when it holds spp-kernels 0.2 step directories, else None."""
    root = Path(out_dir) / LEGACY_ROOT
    if root.is_dir() and any(re.match(r"^step-\d{8}$", p.name) for p in root.iterdir()):
        return root
    return None


def legacy_message(root: Path) -> str:
    return (
        f"--resume: {root} holds checkpoints of spp-kernels 0.2's own training loop, which "
        "this version (Trainer checkpoints, checkpoint-N/) cannot continue: finish that run "
        "with spp-kernels 0.2 (pip install 'spp-kernels==0.2.*'), or start again with --force"
    )


def write_checkpoint_manifest(directory: str | os.PathLike, run: dict[str, Any]) -> Path:
    """Seal a complete checkpoint directory: sizes and sha256 of its files plus `run`
    (JSON values: the fingerprint and counters). Call on one process, after every process
    has written its files."""
    return write_manifest(directory, {"spp_run": run})


def read_checkpoint_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The `run` values of a checkpoint whose files all match its manifest; ValueError
    naming the bad file otherwise."""
    problem = manifest_problem(directory)
    if problem is not None:
        raise ValueError(problem)
    manifest = json.loads((Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8"))
    run = manifest.get("spp_run")
    if not isinstance(run, dict):
        raise ValueError(f"{Path(directory) / MANIFEST_NAME}: not a checkpoint of `spp train`")
    return run


def latest_usable(out_dir: str | os.PathLike, tidy: bool = True) -> tuple[Path, dict[str, Any]]:
    """(directory, run values) of the newest verified checkpoint. Each unusable newer one is
    skipped with a warning naming the file and (tidy: the writing process) renamed to
    "unusable-checkpoint-N". CheckpointError when none is usable."""
    candidates = checkpoint_dirs(out_dir)
    if not candidates:
        raise CheckpointError(f"no checkpoint-N directory in {checkpoint_root(out_dir)}")
    problems = []
    for directory in candidates:
        try:
            run = read_checkpoint_manifest(directory)
        except ValueError as e:
            log.warning("checkpoint %s is not usable: %s; trying an older one", directory.name, e)
            problems.append(str(e))
            continue
        for newer in candidates[: candidates.index(directory)] if tidy else []:
            aside = _free_name(newer.with_name(UNUSABLE_PREFIX + newer.name))
            newer.rename(aside)
            log.warning("renamed the unusable checkpoint %s to %s", newer.name, aside.name)
        return directory, run
    raise CheckpointError(f"no usable checkpoint in {checkpoint_root(out_dir)}: {problems[0]}")


def _free_name(path: Path) -> Path:
    """`path`, or `path`-2, -3, ... : the first name not taken (a second crash at the same
    step must not leave the bad directory in Trainer's checkpoint-* pattern)."""
    candidate, k = path, 1
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    return candidate


def rotate(out_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` sealed checkpoints (a manifest present); returns
    the deleted ones. Unsealed directories are left alone (their files may still be in
    use); resume ignores them. Call on the writing process after sealing."""
    sealed = [d for d in checkpoint_dirs(out_dir) if (d / MANIFEST_NAME).is_file()]
    removed = sealed[keep:]
    for directory in removed:
        shutil.rmtree(directory, ignore_errors=True)
    return removed


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
