"""Output directories of the commands: refused when non-empty (unless --force), locked
against a second writer, replaced atomically."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .output import UserError


def prepare_out_dir(
    out: str | os.PathLike, force: bool, inputs: dict[str, Any] | None = None
) -> Path:
    """Check --out before anything is loaded: never the current directory, an ancestor,
    "/", home or a directory holding one of `inputs` ({option: path}); a non-empty
    directory only with `force`; not a symbolic link and holding none (a link inside --out
    would let a write or a --force deletion escape it); its parent must exist."""
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
    link = _first_symlink(p) if p.is_dir() else None
    if link is not None:
        raise UserError(
            f"--out {p}: {link} is a symbolic link (to {os.readlink(link)}); spp never follows "
            "links inside --out: remove it, or choose another --out"
        )
    if not p.parent.exists():
        raise UserError(f"--out {p}: parent directory {p.parent} does not exist")
    return p


def _first_symlink(root: Path) -> Path | None:
    """The first symbolic link found under `root` (links are not followed), else None."""
    for here, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            if os.path.islink(os.path.join(here, name)):
                return Path(here) / name
    return None


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
