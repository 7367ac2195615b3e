"""Atomic file writes: a temp file in the same folder, then ``os.replace``; and the other changes a run
makes to its files (renames, removals), all through one place.

Every completed change is a *file-system event*. For the kill-point tests (``tests/test_training.py``)
two environment variables instrument them: ``OFA_IO_TRACE=<file>`` appends one line per event
(``<kind> <path>``), and ``OFA_IO_KILL_AT=<n>`` SIGKILLs the process right after its n-th event.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)
_events = 0  # file-system events of this process so far (see the module docstring)


def _event(kind: str, path: Path) -> None:
    """Count one completed change; trace it, or die here, when the test hooks ask for it."""
    global _events
    _events += 1
    trace = os.environ.get("OFA_IO_TRACE")
    if trace:
        with open(trace, "a") as fh:
            fh.write(f"{kind} {path}\n")
    if os.environ.get("OFA_IO_KILL_AT") == str(_events):
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``.

    A crash or exception leaves ``path`` untouched (old content or absent) and removes the temp.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp_path
        # again after writing: writers that replace the file (safetensors' save_file) leave it 0600
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _event("write", path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def is_temp(path: Path) -> bool:
    """A temp file :func:`atomic_path` makes (``.<name>.<random>.tmp``): litter when its writer was killed."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def replace(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` onto ``dst`` (atomic)."""
    os.replace(src, dst)
    _event("rename", Path(dst))


def link(src: str | os.PathLike, dst: str | os.PathLike) -> bool:
    """Make ``dst`` the same file as ``src`` without writing its bytes again: a hard link made beside ``dst`` and
    renamed onto it (atomic: ``dst`` keeps its old content or has the new one). Where a hard link is impossible
    (another file system, a file system without links, the link limit) ``src`` is copied atomically instead.
    Returns whether it linked. Safe because every writer here replaces files (a new inode) rather than writing
    into them: changing one name never changes the other."""
    src, dst = Path(src), Path(dst)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link.tmp"  # is_temp(): litter a kill leaves is cleaned
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # EXDEV, EPERM, EMLINK, ENOTSUP, ...: bytes instead of a link
        with atomic_path(dst) as out:
            shutil.copyfile(src, out)
        return False
    try:
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    _event("link", dst)
    return True


def unique_bytes(paths: "Iterator[Path] | list[Path]") -> int:
    """Bytes the files take once hard links are counted once (as ``du`` does): the sum over distinct inodes."""
    seen: dict[tuple[int, int], int] = {}
    for p in paths:
        st = Path(p).stat()
        seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def remove(path: str | os.PathLike) -> None:
    """Remove a file if it exists."""
    path = Path(path)
    if path.exists():
        path.unlink()
        _event("remove", path)


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a folder and everything in it, if it exists."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
        _event("remove", path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text`` to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | os.PathLike, frame: "Any") -> None:
    """Atomically write a pandas DataFrame as Parquet."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 (hex) of a file's bytes, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
