"""Progress a run proves by itself: the training loop and every evaluation batch call :func:`beat`, which
rewrites a small JSON file (pid, step, what, time) named by ``$OFA_PROGRESS_FILE``, at most once a second.

A runner (:mod:`ofa_lib.grid`) points the variable at a file per notebook execution and watches it: a
kernel that is stopped, deadlocked or stuck in a hung collective writes nothing, whatever threads of
the runner still do, and is killed after ``stall_timeout`` seconds. Without the variable ``beat`` is a no-op.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

ENV = "OFA_PROGRESS_FILE"
MIN_INTERVAL_S = 1.0
_state: dict[str, Any] = {"step": None, "total": None, "what": "", "written": 0.0}


def beat(*, step: int | None = None, what: str | None = None, total: int | None = None) -> None:
    """Record progress: a new ``step`` is always written, other beats at most once a second (``total``: the
    number of steps the run will take, for the runner's display)."""
    path = os.environ.get(ENV)
    if not path:
        return
    now = time.monotonic()
    new_step = step is not None and step != _state["step"]
    if not new_step and now - _state["written"] < MIN_INTERVAL_S and (what is None or what == _state["what"]):
        return
    if step is not None:
        _state["step"] = step
    if what is not None:
        _state["what"] = what
    if total is not None:
        _state["total"] = total
    _state["written"] = now
    tmp = f"{path}.{os.getpid()}.tmp"
    try:  # no fsync: a heartbeat, not an output; os.replace keeps a reader from seeing half a file
        with open(tmp, "w") as fh:
            json.dump({"pid": os.getpid(), "step": _state["step"], "total": _state["total"], "what": _state["what"],
                       "time": time.time()}, fh)
        os.replace(tmp, path)
    except OSError:
        pass


def read(path: str | Path) -> dict[str, Any]:
    """The last progress recorded in ``path`` (``{}`` when there is none yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def describe(info: dict[str, Any]) -> str:
    """``step 34/88 (training)`` / ``loading the model`` / ``starting``: a running run's state, for the grid's bar."""
    if info.get("step") is not None:
        steps = f"{info['step']}/{info['total']}" if info.get("total") else str(info["step"])
        return f"step {steps}" + (f" ({info['what']})" if info.get("what") else "")
    return info.get("what") or "starting"


def where(info: dict[str, Any]) -> str:
    """``at step 12`` / ``in evaluating`` / ``before its first step``, for messages."""
    if info.get("step") is not None:
        return f"at step {info['step']}" + (f" ({info['what']})" if info.get("what") else "")
    return f"in {info['what']}" if info.get("what") else "before any progress"
