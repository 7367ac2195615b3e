"""Where things live: the shared data directory, the outputs tree, caches."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The benchmark data directory: ``$OFA_DATA_DIR`` or ``../shared/data`` beside the repo."""
    env = os.environ.get("OFA_DATA_DIR")
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {path} does not exist; set OFA_DATA_DIR to the folder that holds "
            "nli/, ner/, qa/, cls/ and results/ (e.g. export OFA_DATA_DIR=/path/to/shared/data)"
        )
    return path


def outputs_dir() -> Path:
    """Root of everything the study writes: ``$OFA_OUTPUTS`` or ``<repo>/outputs``."""
    env = os.environ.get("OFA_OUTPUTS")
    return Path(env).expanduser() if env else REPO_ROOT / "outputs"


def cache_dir(*parts: str) -> Path:
    """A folder under ``outputs/cache`` (created): converted models, featurized data."""
    path = outputs_dir().joinpath("cache", *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_relative(path: str | os.PathLike) -> str:
    """``path`` as reports show it: relative to the repository when it lies inside it (so a report
    reads the same on every machine), else as given."""
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    try:
        return str(p.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
