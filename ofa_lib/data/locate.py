"""Where a split is read from — one rule everywhere: the mirror, else the dataset's public hub copy.

:func:`locate` gives the place: the mirror (``$OFA_DATA_DIR``, else ``../shared/data`` beside the repository)
when it holds the files of that dataset × language × split; else the dataset's public hub copy
(:mod:`ofa_lib.data.hub`; ``$OFA_HUB_ROOT/org/name`` when that local clone exists, else the hub itself unless
``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` is set); else a :class:`~ofa_lib.data.catalog.DataUnavailableError`
naming the dataset, the places tried and the ``ofa-data fetch`` command that fixes it. :func:`require` checks
many splits at once before any expensive work; :func:`languages` and :func:`available_splits` say what can be
read now.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ofa_lib.data import hub
from ofa_lib.data.catalog import (
    DATASETS,
    DatasetInfo,
    DataUnavailableError,
    check_dataset,
)
from ofa_lib.paths import REPO_ROOT

# File name of each API split, per dataset (a callable gives the path from (root, lang)).
_FILE_SPLIT = {"train": "train", "validation": "dev", "test": "test"}
_UMSAB_SPLIT = {"train": "train", "validation": "val", "test": "test"}
_SINGLE_LANG = ("mnli15k", "multinli", "conll2003")  # English only: no language in the path


def mirror_files(name: str, root: Path, lang: str, split: str) -> list[Path]:
    """The file(s) of one (dataset, lang, split) in a mirror rooted at ``root``; they may not exist."""
    folder = root / DATASETS[name].folder
    if name == "mnli15k":
        return [folder / "multinli.train.en.15k.tsv"]
    if name == "multinli":
        return [folder / f"{split}.tsv"]
    if name in ("xnli", "indicxnli"):
        return [folder / split / f"{lang}.tsv"]
    if name == "wikiann":
        return [folder / lang / f"{split}.conllu"]
    if name in ("masakhaner", "masakhaner2"):
        return [folder / lang / f"{_FILE_SPLIT[split]}.txt"]
    if name == "conll2003":
        return [folder / f"{_FILE_SPLIT[split]}.txt"]
    if name == "tydiqa_goldp":
        return [folder / lang / f"{split}.json"]
    if name == "xquad":
        return [folder / f"{lang}.json"]
    if name == "sib200":
        return [folder / lang / f"{_FILE_SPLIT[split]}.tsv"]
    if name == "umsab":
        stem = _UMSAB_SPLIT[split]
        return [folder / lang / f"{stem}_text.txt", folder / lang / f"{stem}_labels.txt"]
    raise AssertionError(name)


def mirror_root() -> Path:
    """The mirror folder: ``$OFA_DATA_DIR``, else ``../shared/data`` beside the repository (may not exist)."""
    env = os.environ.get("OFA_DATA_DIR")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


@functools.lru_cache(maxsize=None)
def discover_languages(name: str, root: str) -> tuple[str, ...]:
    """Languages with at least one split file of ``name`` under the mirror ``root``."""
    info = DATASETS[name]
    folder = Path(root) / info.folder
    if name in _SINGLE_LANG:
        have = any(p.is_file() for s in info.splits for p in mirror_files(name, Path(root), "en", s))
        return ("en",) if have else ()
    if name in ("xnli", "indicxnli"):
        langs = {p.stem for s in info.splits for p in (folder / s).glob("*.tsv")}
    elif name == "xquad":
        langs = {p.stem for p in folder.glob("*.json")}
    else:  # one sub-folder per language (sib200 also holds a stray nqo_Nkoo.zip: ignored)
        langs = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
    return tuple(sorted(langs))


def _mirror_languages(name: str) -> tuple[str, ...]:
    root = mirror_root()
    return discover_languages(name, str(root)) if root.is_dir() else ()


def hub_usable(dataset: str) -> str | None:
    """How the hub copy of ``dataset`` would be reached now: a local clone's path, the repo id, or None."""
    src = hub.SOURCES[dataset]
    local = src.local_dir()
    if local is not None:
        return str(local)
    return None if hub.hub_offline() else src.repo


def known_languages(dataset: str) -> list[str]:
    """Every language ``dataset`` has in the mirror or in its hub copy, reachable now or not (sorted)."""
    check_dataset(dataset)
    return sorted(set(_mirror_languages(dataset)) | set(hub.SOURCES[dataset].configs))


def languages(dataset: str) -> list[str]:
    """Languages of ``dataset`` available now: the mirror's, plus the hub copy's when it can be reached.

    Raises :class:`DataUnavailableError` (naming the fix) when there are none.
    """
    check_dataset(dataset)
    langs = set(_mirror_languages(dataset))
    if hub_usable(dataset):
        langs |= set(hub.SOURCES[dataset].configs)
    if not langs:
        raise DataUnavailableError(_unavailable_message([(dataset, None, None)]))
    return sorted(langs)


@dataclass(frozen=True)
class Location:
    """Where one (dataset, lang, split) is read from: ``kind`` mirror | hub | hub-local."""

    kind: str
    where: str  # the mirror root, the hub repo id or the local clone's folder

    def describe(self) -> str:
        return {"mirror": "mirror", "hub": "hub", "hub-local": "local hub clone"}[self.kind] + f" {self.where}"


def _hub_has(dataset: str, lang: str, split: str) -> bool:
    src = hub.SOURCES[dataset]
    return lang in src.configs and split in src.splits


def locate(dataset: str, lang: str, split: str, source: str = "auto") -> Location:
    """Where ``load_split(dataset, lang, split)`` reads from now (mirror, else hub; see the module docstring).

    ``source="mirror"`` or ``"hub"`` allows only that place. Raises :class:`DataUnavailableError`.
    """
    root = mirror_root()
    if source in ("auto", "mirror") and root.is_dir():
        if all(p.is_file() for p in mirror_files(dataset, root, lang, split)):
            return Location("mirror", str(root))
    if source in ("auto", "hub") and _hub_has(dataset, lang, split):
        where = hub_usable(dataset)
        if where is not None:
            return Location("hub-local" if where != hub.SOURCES[dataset].repo else "hub", where)
    raise DataUnavailableError(_unavailable_message([(dataset, lang, split)], source=source))


def _fetch_command(keys: Iterable[tuple[str, str | None, str | None]]) -> str:
    names = sorted({d for d, _, _ in keys})
    langs = sorted({lang for _, lang, _ in keys if lang})
    target = os.environ.get("OFA_DATA_DIR") or "../shared/data"
    return f"ofa-data fetch {' '.join(names)}" + (f" --langs {','.join(langs)}" if langs else "") + f" --to {target}"


def _unavailable_message(keys: list[tuple[str, str | None, str | None]], source: str = "auto",
                         unreachable: dict[str, str] | None = None) -> str:
    root = mirror_root()
    env = "OFA_DATA_DIR=" + os.environ["OFA_DATA_DIR"] if os.environ.get("OFA_DATA_DIR") else "../shared/data"
    shown = ", ".join(f"{d}/{lang}/{s}" if lang else d for d, lang, s in keys[:8])
    more = f" and {len(keys) - 8} more" if len(keys) > 8 else ""
    tried = []
    if source != "hub":
        tried.append(f"the mirror {root} ({env}; " + ("it lacks these files" if root.is_dir() else "does not exist") + ")")
    if source != "mirror":
        repos = sorted({hub.SOURCES[d].repo for d, _, _ in keys})
        hub_root = os.environ.get("OFA_HUB_ROOT")
        tried.append(f"a local hub clone under OFA_HUB_ROOT={hub_root} (no {', '.join(repos)} there)" if hub_root
                     else "a local hub clone (OFA_HUB_ROOT is not set)")
        if hub.hub_offline():
            state = "offline, HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set"
        elif unreachable:
            state = "did not answer: " + "; ".join(f"{r}: {e}" for r, e in sorted(unreachable.items()))
        else:
            state = "no copy of these there"
        tried.append(f"the hub ({', '.join(repos)}: {state})")
        missing_hub = [f"{d}/{lang}/{s}" for d, lang, s in keys if lang and s and not _hub_has(d, lang, s)]
        if missing_hub:
            tried.append(f"(the hub copy has no {', '.join(missing_hub[:4])})")
    note = ""
    if any(d == "multinli" for d, _, _ in keys) and root.is_dir() and discover_languages("mnli15k", str(root)):
        note = (" The mirror holds only the 15,001-pair MultiNLI slice (dataset mnli15k); the paper preset trains on "
                "the full MultiNLI and does not substitute the slice.")
    return (f"no copy of {shown}{more} can be read: tried {'; '.join(tried)}.{note} Fix: on a machine with a network "
            f"run `{_fetch_command(keys)}` and point OFA_DATA_DIR at that folder (or let the hub be used: unset "
            "HF_DATASETS_OFFLINE, or clone the hub repositories under OFA_HUB_ROOT).")


def available_splits(dataset: str, lang: str) -> list[str]:
    """The splits of (``dataset``, ``lang``) that can be read now (mirror files or a reachable hub copy)."""
    info = check_dataset(dataset)
    _check_lang(info, lang)
    out = []
    for split in info.splits:
        try:
            locate(dataset, lang, split)
        except DataUnavailableError:
            continue
        out.append(split)
    return out


def _check_lang(info: DatasetInfo, lang: str) -> None:
    langs = languages(info.name)
    if lang not in langs:
        raise ValueError(
            f"lang={lang!r} is unknown for dataset={info.name!r}; available: {', '.join(langs)}"
        )


def require(keys: Iterable[tuple[str, str, str]]) -> dict[tuple[str, str, str], Location]:
    """Locate every (dataset, lang, split) without reading it; one :class:`DataUnavailableError` lists all missing.

    Cheap (file existence and environment checks only): grids and runs call it before any expensive work.
    """
    found: dict[tuple[str, str, str], Location] = {}
    missing: list[tuple[str, str | None, str | None]] = []
    for key in dict.fromkeys(keys):
        check_dataset(key[0])
        try:
            found[key] = locate(*key)
        except DataUnavailableError:
            missing.append(key)
    # the hub is not offline by configuration: make sure it answers (one short request per repository),
    # so that a machine without a network fails here, not in every run's data loading
    unreachable = {loc.where: err for loc in {loc for loc in found.values() if loc.kind == "hub"}
                   if (err := _probe_hub(loc.where))}
    missing += [key for key, loc in found.items() if loc.kind == "hub" and loc.where in unreachable]
    if missing:
        raise DataUnavailableError(_unavailable_message(missing, unreachable=unreachable))
    return found


@functools.lru_cache(maxsize=None)
def _probe_hub(repo: str, timeout_s: float = 10.0) -> str | None:
    """None when the hub answers for dataset ``repo`` within ``timeout_s``, else the reason."""
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(repo, timeout=timeout_s)
    except Exception as exc:  # no network, a proxy, a missing or gated repository: all mean "cannot read it"
        return f"{type(exc).__name__}: {str(exc)[:160]}"
    return None


def locate_checked(dataset: str, lang: str, split: str, source: str) -> Location:
    """:func:`locate` after checking the arguments (``ValueError`` naming the known values); a split that does
    not exist where the language does is a :class:`DataUnavailableError` naming the splits that do."""
    info = check_dataset(dataset)
    if split not in info.splits:
        raise ValueError(
            f"split={split!r} is unknown for dataset={dataset!r}; available: {', '.join(info.splits)}"
        )
    if source not in ("auto", "mirror", "hub"):
        raise ValueError(f"source={source!r} must be one of auto, mirror, hub")
    if source == "auto":
        _check_lang(info, lang)
    try:
        return locate(dataset, lang, split, source)
    except DataUnavailableError as exc:
        have = [s for s in info.splits if s != split and _can_locate(dataset, lang, s, source)]
        if have:  # the language exists, this split does not (TyDiQA: train only for en/ko/sw in the mirror)
            raise DataUnavailableError(
                f"split={split!r} does not exist for dataset={dataset!r}, lang={lang!r} where data can be read now; "
                f"available for this language: {', '.join(have)}. {exc}") from None
        raise


def _can_locate(dataset: str, lang: str, split: str, source: str) -> bool:
    try:
        locate(dataset, lang, split, source)
        return True
    except DataUnavailableError:
        return False
