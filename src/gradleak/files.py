"""Atomic file writes (a file is either absent, the old one, or complete: temp file + ``os.replace``), and
the check of an output target that every command makes before it does any work.

Written files get the mode ``open()`` would give them (``0o666`` less the umask), not the private ``0o600``
of a temporary file, so that colleagues and web servers can read reports where the umask allows it.
"""

from __future__ import annotations

import os
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask: from /proc where the system shows it, else by setting it and putting it back
    (under a lock; files other threads create in that instant get 0o022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder created) to write to; on success it replaces
    ``path`` with the mode ``0o666 & ~umask``, on any error it is removed. ``suffix`` keeps writers that
    append one (``np.savez``) happy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or its nearest ancestor that exists (the current folder for a relative path)."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path.cwd()


def _writable_folder(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: permissions say so and a probe file can be made (which
    also catches read-only file systems and privileged users on protected trees)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=".gradleak-probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def check_output(path: str | os.PathLike, kind: str = "file", what: str = "--out") -> Path:
    """Refuse, in one line, an output target that cannot be written, before any work is done.

    ``kind`` is ``"file"`` (the path must not be a folder) or ``"folder"`` (the path must not be a file).
    Whatever of the path exists must be a folder down to the target, and the nearest existing folder must
    be writable. Nothing is created: a refused command leaves the output location as it was."""
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    text = os.fspath(path)
    if not str(text).strip():
        raise UserError(f"{what}: empty path")
    path = Path(text).expanduser()
    if path.is_dir() and kind == "file":
        raise UserError(f"{what}: {path} is a folder; give the path of a file to write")
    if path.exists() and not path.is_dir() and kind == "folder":
        raise UserError(f"{what}: {path} is a file; give the path of a folder")
    if os.path.lexists(path) and not path.exists():
        raise UserError(f"{what}: {path} is a broken symbolic link")
    base = _nearest_existing(path if kind == "folder" else path.parent)
    if not base.is_dir():
        raise UserError(f"{what}: cannot write {path}: {base} is a file, not a folder")
    if not _writable_folder(base):
        raise UserError(f"{what}: cannot write {path}: the folder {base} is not writable")
    return path


def absent_parts(path: str | os.PathLike) -> list[Path]:
    """``path`` and those of its folders that do not exist yet, deepest first: what writing it creates."""
    out = []
    for p in (Path(path), *Path(path).parents):
        if os.path.lexists(p):
            break
        out.append(p)
    return out


def remove_new(paths: Iterable[Path]) -> None:
    """After a failed command, remove what it created among ``paths`` (each absent before it ran): files,
    and folders left empty, deepest first. A folder with something in it stays."""
    for p in sorted(set(map(Path, paths)), key=lambda q: len(q.parts), reverse=True):
        try:
            if p.is_file() or p.is_symlink():
                p.unlink()
            elif p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        except OSError:
            pass
