"""Atomic file writes: a crash mid-write leaves the previous file intact.

Each helper writes to a temporary file in the destination's directory (so the final
`os.replace` is a same-filesystem rename, atomic on POSIX and Windows), flushes and fsyncs
it, renames it over the destination and then fsyncs the directory so the rename itself
survives a power loss. On any error the temporary file is removed and the destination is
untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "OutputLocked",
    "apply_umask",
    "atomic_directory",
    "check_output_dir",
    "output_lock",
    "atomic_save_safetensors",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_writer",
    "manifest_problem",
    "write_manifest",
]


def parse_json(text: str, where: str, expected: type, error: type[Exception] = ValueError) -> Any:
    """json.loads(text), which must be a JSON object (`expected` dict) or list (list); else
    `error` with one line naming `where` (and the line and column of a syntax error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(value, expected):
        kind = "a JSON object" if expected is dict else "a JSON list"
        raise error(f"{where}: expected {kind}, got {type(value).__name__}")
    return value


def fsync_dir(directory: Path) -> None:
    """Make the renames inside `directory` durable (a no-op on Windows)."""
    # Directory fsync makes the rename durable; not supported on Windows (nor needed there).
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on clean exit it atomically replaces `path`.

    The caller writes the complete file to the yielded path (by any means: a library's
    `save_file`, `open(...)`); this context manager fsyncs it, renames it over `path` and
    fsyncs the directory. If the body raises, the temporary file is deleted and `path`
    keeps its previous content (or stays absent).
    """
    dest = Path(path)
    if dest.is_dir():
        raise IsADirectoryError(f"atomic write: {dest} is a directory")
    directory = dest.parent if str(dest.parent) else Path(".")
    if not directory.is_dir():
        raise FileNotFoundError(f"atomic write: directory {directory} does not exist")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with naming_errors(dest):
            yield tmp
            apply_umask(tmp)  # after the write: some writers (safetensors) recreate the file
            with open(tmp, "rb+") as f:
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(directory)


# "Os { code: 28, ... }" or "(os error 28)": how Rust writers (safetensors, tokenizers)
# report an OS error inside their own exception type.
_RUST_OS_ERROR = re.compile(r"Os \{ code: (\d+)|\(os error (\d+)\)")


@contextlib.contextmanager
def naming_errors(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OS error that names no file (a full disk inside a library's writer, a
    file-size limit) as an OSError naming `path`: every error of a write says where."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
    except Exception as e:  # a Rust writer's own error type carrying an OS error code
        match = _RUST_OS_ERROR.search(str(e))
        if match is None:
            raise
        code = int(match.group(1) or match.group(2))
        raise OSError(code, os.strerror(code), str(path)) from e


def _atomic_write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    with atomic_writer(path) as tmp:
        write(tmp)
    return Path(path)


def cache_root() -> Path:
    """Where spp-kernels keeps derived files (the converted embedded model, lm-eval task
    data): $SPP_CACHE_DIR, else $XDG_CACHE_HOME/spp-kernels, else ~/.cache/spp-kernels."""
    if os.environ.get("SPP_CACHE_DIR"):
        return Path(os.environ["SPP_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spp-kernels"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


MANIFEST_NAME = "spp-manifest.json"


def write_manifest(directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write MANIFEST_NAME in `directory`: the sha256 and size of every other regular file
    under it (and `extra` values). Written last, atomically: its presence says the directory
    was complete when it was written."""
    import json

    root = Path(directory)
    files = {
        str(p.relative_to(root)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name != MANIFEST_NAME
    }
    text = json.dumps({"format": 1, "files": files, **(extra or {})}, indent=1, sort_keys=True)
    return atomic_write_text(root / MANIFEST_NAME, text + "\n")


def manifest_problem(directory: str | os.PathLike, expect: dict | None = None) -> str | None:
    """None when `directory` matches its MANIFEST_NAME (every listed file present with its
    size and sha256, and the manifest's values for the keys of `expect` equal to them),
    else what is wrong, naming the file."""
    import json

    root = Path(directory)
    path = root / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return f"{path}: missing or unreadable ({type(e).__name__})"
    for key, value in (expect or {}).items():
        if manifest.get(key) != value:
            return f"{path}: {key} is {manifest.get(key)!r}, expected {value!r}"
    for name, entry in files.items():
        item = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{path}: lists a file outside the directory ({name!r})"
        try:
            if item.is_symlink() or not item.is_file() or item.stat().st_size != entry["bytes"]:
                return f"{item}: missing or of the wrong size"
            if file_sha256(item) != entry["sha256"]:
                return f"{item}: its sha256 differs from the manifest's"
        except (OSError, KeyError, TypeError) as e:
            return f"{item}: unreadable ({type(e).__name__})"
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path` as a Path."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes: data must be bytes, got {type(data).__name__}")
    return _atomic_write_with(path, lambda tmp: tmp.write_bytes(bytes(data)))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (UTF-8 by default); returns `path` as a Path."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text: text must be str, got {type(text).__name__}")
    return _atomic_write_with(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Save `tensors` to a safetensors file at `path` atomically; returns `path` as a Path.

    Tensors are made contiguous and moved to CPU first (safetensors needs both); tensors
    sharing storage are cloned so that safetensors does not refuse them. `metadata` must map
    str to str (a safetensors rule), checked before anything is written.
    """
    from safetensors.torch import save_file

    if not isinstance(tensors, dict):
        raise TypeError(f"atomic_save_safetensors: tensors must be a dict, got {type(tensors)}")
    for key, value in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"atomic_save_safetensors: key {key!r} is not a str")
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"atomic_save_safetensors: value of {key!r} is a {type(value).__name__}, "
                "not a torch.Tensor"
            )
    if metadata is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise TypeError("atomic_save_safetensors: metadata must map str to str")
    # clone() gives each tensor its own storage: safetensors rejects shared storage.
    ready = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return _atomic_write_with(path, lambda tmp: save_file(ready, str(tmp), metadata=metadata))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new empty sibling directory; on clean exit it atomically replaces `path`.

    The caller writes the complete output into the yielded directory. Then: the old `path`
    (if any) is renamed aside, the new directory is renamed to `path`, and only then is the
    old one deleted, so at every moment either the old or the new complete output exists
    under a name the user can find. If the body raises, the new directory is deleted and
    `path` is untouched. `path` must not be a symbolic link (refused before anything is
    written: replacing a link would silently move the data behind it).
    """
    dest = Path(path)
    if dest.is_symlink():
        raise ValueError(f"{dest} is a symbolic link; give the directory it points to")
    if dest.exists() and not dest.is_dir():
        raise NotADirectoryError(f"{dest} exists and is not a directory")
    parent = dest.parent if str(dest.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=parent))
    apply_umask(tmp, directory=True)
    try:
        with naming_errors(dest):
            yield tmp
        # Library writers (safetensors writes through a 0600 temp file) ignore the umask.
        for item in tmp.rglob("*"):
            if not item.is_symlink():
                apply_umask(item, directory=item.is_dir())
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=parent))
            os.replace(dest, old)  # an empty directory is replaced by the rename
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give `path` the permissions a plain open()/mkdir() would (0666 / 0777 minus the
    umask): mkstemp and mkdtemp create 0600 / 0700, which would hide outputs from the
    user's group."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def check_output_dir(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> Path:
    """`out` resolved, or ValueError when replacing it could destroy something: it is the
    current directory or one of its ancestors, "/", the home directory, or it contains one of
    the command's `inputs` ({option: path})."""
    dest = Path(out).expanduser()
    resolved = dest.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"--out {out}: is the current directory or one of its parents")
    if resolved == Path(resolved.anchor) or resolved == Path.home().resolve():
        raise ValueError(f"--out {out}: refusing to write to {resolved}")
    for option, path in inputs.items():
        if path is None or str(path).startswith("embedded:"):
            continue
        source = Path(path).expanduser().resolve()
        if source == resolved or resolved in source.parents:
            raise ValueError(f"--out {out}: contains {option} {path}; choose another directory")
    return dest


class OutputLocked(RuntimeError):
    """Another process holds the lock on an output directory."""


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Exclusive lock on output directory `out` for the duration of a command.

    flock on a sibling file `.<name>.spp-lock` (so the lock exists before `out` does); the
    file holds the holder's pid. A second writer fails at once with OutputLocked naming that
    pid. The holder deletes the file when it is done (refused or not), still holding the
    lock; a process that locked a file already deleted that way tries again on the new one.
    The kernel releases the lock on every exit, signals and crashes included (a file left
    by a killed process is reused by the next one).
    """
    import fcntl
    import stat

    dest = Path(out)
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output lock: directory {parent} does not exist")
    lock_path = parent / f".{dest.name}.spp-lock"
    for _ in range(100):
        # O_NOFOLLOW: a planted symlink must not make us truncate the file it points to.
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~_umask())
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OutputLocked(f"{lock_path} is not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLocked(
                f"{dest} is in use by another spp process (pid {holder}); wait for it or "
                "choose another --out"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder deleted this file after we opened it
    else:  # pragma: no cover - a hundred holders in a row
        raise OutputLocked(f"{lock_path}: could not be locked")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still holding the lock
        os.close(fd)  # releases the flock
