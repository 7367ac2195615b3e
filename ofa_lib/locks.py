"""One lock file per run, safe on one machine and on a shared filesystem.

A lock is created atomically (``os.link`` of a fully written temp file: atomic on local disks and
NFS) and holds who took it: host, pid, the process's start time and a scheduler job id. It is
*stale*, and may be broken by the next runner, when its holder is gone: on the same host, when
that process (pid + start time) no longer exists; on another host, when the holder stopped
refreshing the file's mtime (a heartbeat thread refreshes it every ``HEARTBEAT_S``). So a runner
killed with SIGKILL never blocks a run for longer than it takes to notice. A lock taken by an earlier
start of the same SLURM job (the job was requeued: same job id, a lower ``SLURM_RESTART_COUNT``) is this
job's own: SLURM runs one start of a job at a time, so the earlier one is gone, wherever it ran.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # another host's lock without a heartbeat for this long is stale


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/<pid>/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def job_id() -> str | None:
    """This process's SLURM job id (``<array job>_<task>`` inside a job array), else ``None``."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID")


def restart_count() -> int:
    """How often SLURM has requeued this job (``SLURM_RESTART_COUNT``; 0 outside SLURM or on its first start)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _identity() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "job_id": job_id(), "restart": restart_count(), "since": time.time()}


def read(path: str | Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file, or ``None`` if there is no (readable) lock."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def is_stale(path: str | Path, info: dict[str, Any] | None = None) -> bool:
    """True when the lock's holder is gone (see module docstring)."""
    path = Path(path)
    info = info if info is not None else read(path)
    if info is None:
        return True
    if info.get("job_id") and info["job_id"] == job_id() and int(info.get("restart") or 0) < restart_count():
        return True  # an earlier start of this (requeued) job
    if info.get("host") == socket.gethostname():
        start = _start_time(int(info.get("pid", -1)))
        return start is None or (info.get("start") is not None and start != info["start"])
    try:
        return time.time() - path.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return True


def holder(path: str | Path) -> dict[str, Any] | None:
    """The live holder of the lock, ``None`` when it is free or stale."""
    info = read(path)
    return None if info is None or is_stale(path, info) else info


@dataclass
class Lock:
    """A held lock; :meth:`release` (or leaving the ``with`` block) removes it."""

    path: Path
    info: dict[str, Any]
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if read(self.path) == self.info:  # never remove a lock someone else took after ours went stale
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Lock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _break_stale(path: Path, info: dict[str, Any] | None) -> None:
    """Move a stale lock aside; if it changed under us (someone else broke and retook it), put it back."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if read(aside) != info:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


def acquire(path: str | Path) -> Lock | None:
    """Take the lock at ``path``; ``None`` when a live holder has it. Breaks stale locks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = _identity()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(info))
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)
            except FileExistsError:
                current = read(path)
                if not is_stale(path, current):
                    return None
                _break_stale(path, current)
                continue
            lock = Lock(path, info)
            threading.Thread(target=lock._beat, daemon=True, name=f"lock-heartbeat {path.name}").start()
            return lock
        return None
    finally:
        tmp.unlink(missing_ok=True)
