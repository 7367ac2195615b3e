"""Checkpoint files: safetensors headers, loading, atomic saving, head fingerprints, hashes, and
the row-block reader every merge streams through (never torch.load / pickle).

Checkpoints are ``.safetensors`` files (any float storage dtype: fp32, bf16, fp16). Their
safetensors metadata may hold ``ofa_head_fingerprint`` (identifies the classifier-head
initialisation: runs with different fingerprints were not head-aligned and must never be
combined), ``ofa_run_id`` and other ``ofa_*`` keys.

- :func:`checkpoint_info` (header only), :func:`read_metadata`, :func:`load_checkpoint`,
  :func:`save_checkpoint` (atomic), :func:`head_fingerprint`, :func:`file_sha256`.
- :class:`TensorReader`: whole tensors or blocks of rows with ``os.pread``; :func:`row_blocks`
  cuts a tensor into blocks of at most :data:`BLOCK` elements (16 MiB of fp32), so a merge of r
  files holds O(r x block) input bytes at a time, never r models.
- The checks shared by every merge: :func:`inspect_all` / :func:`check_compatible` (files exist;
  same keys, shapes and head fingerprint), :func:`check_finite`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ofa_lib.io import atomic_path, file_sha256

PathLike = str | os.PathLike
StateDict = dict[str, torch.Tensor]

FINGERPRINT_KEY = "ofa_head_fingerprint"
RUN_ID_KEY = "ofa_run_id"
AVERAGE_INPUTS_KEY = "ofa_average_inputs"
AVERAGE_METHOD_KEY = "ofa_average_method"
_PER_RUN_KEYS = frozenset({RUN_ID_KEY, AVERAGE_INPUTS_KEY, AVERAGE_METHOD_KEY})
SHOW = 5  # how many offending keys an error message lists


class CheckpointMismatchError(ValueError):
    """Checkpoints that cannot be averaged: keys, shapes, head fingerprints or values differ."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, damaged header) or whose bytes are not the ones its
    run recorded when it wrote them (``checkpoint_sha256`` in the run's manifest)."""


class NonFiniteError(ValueError):
    """An averaged (or incoming) tensor holds NaN or ±inf."""


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class CheckpointInfo:
    """What a safetensors header says about a checkpoint (no tensor data read)."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]

    @property
    def fingerprint(self) -> str | None:
        """The ``ofa_head_fingerprint`` metadata, or None (also when stored as an empty string)."""
        return self.metadata.get(FINGERPRINT_KEY) or None

    @property
    def run_id(self) -> str | None:
        """The ``ofa_run_id`` metadata, or None."""
        return self.metadata.get(RUN_ID_KEY)


@contextlib.contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """``safe_open``, with a damaged file's error naming the file (safetensors' own names none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise CorruptCheckpointError(f"checkpoint {path} is not a readable safetensors file ({exc}): truncated or "
                                     "damaged; re-create it (re-run its run) or remove it") from None


def checkpoint_info(path: PathLike) -> CheckpointInfo:
    """Read keys, shapes, dtypes and metadata of a safetensors file from its header only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open_safetensors(path) as f:
        shapes, dtypes = {}, {}
        for key in f.keys():
            sl = f.get_slice(key)
            shapes[key] = tuple(int(n) for n in sl.get_shape())
            dtypes[key] = str(sl.get_dtype())
        metadata = dict(f.metadata() or {})
    return CheckpointInfo(path=path, shapes=shapes, dtypes=dtypes, metadata=metadata)


def read_metadata(path: PathLike) -> dict[str, str]:
    """The safetensors metadata (string -> string) of ``path``; {} when there is none."""
    return dict(checkpoint_info(path).metadata)


def load_checkpoint(path: PathLike, *, dtype: torch.dtype | None = None) -> StateDict:
    """Load a safetensors checkpoint; floating tensors cast to ``dtype`` when given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    out: StateDict = {}
    with open_safetensors(path) as f:
        for key in f.keys():
            out[key] = cast(f.get_tensor(key), dtype)
    return out


def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    path: PathLike,
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Atomically write ``state_dict`` as safetensors (floating tensors cast to ``dtype`` if given).

    Tensors are moved to CPU and made contiguous; tensors sharing storage (tied weights) or
    views into a larger storage are cloned, so each is stored in full under its own key.
    ``metadata`` values must be strings; ``format: pt`` is added unless given.
    """
    meta = {"format": "pt", **dict(metadata or {})}
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; offending keys: {bad[:SHOW]}")
    tensors: StateDict = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        t = cast(value.detach().to("cpu"), dtype).contiguous()
        storage = t.untyped_storage()
        if t.numel() > 0:
            ptr = storage.data_ptr()
            if ptr in seen or t.storage_offset() != 0 or storage.nbytes() != t.nbytes:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        tensors[key] = t
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def head_fingerprint(state_dict: Mapping[str, torch.Tensor], head_prefixes: Sequence[str]) -> str:
    """sha256 (hex) over sorted key names, shapes, dtypes and raw bytes of the head tensors.

    The head tensors are those whose key starts with one of ``head_prefixes``; compute it on the
    head as initialised (before training) and store it as ``ofa_head_fingerprint`` metadata.
    """
    if isinstance(head_prefixes, str):
        head_prefixes = [head_prefixes]
    keys = sorted(k for k in state_dict if any(k.startswith(p) for p in head_prefixes))
    if not keys:
        raise KeyError(f"no tensor key starts with any of the head prefixes {list(head_prefixes)}")
    h = hashlib.sha256()
    for key in keys:
        t = state_dict[key].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        h.update(f"{key}\0{tuple(t.shape)}\0{t.dtype}\0{len(raw)}\0".encode())
        h.update(raw)
    return h.hexdigest()


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class TensorReader:
    """Reads whole tensors or blocks of rows of a safetensors file with ``os.pread``.

    Every read returns memory the caller owns (nothing stays resident as pages of a mapping, as
    with safetensors' default mmap backend, where N open files would grow RSS to N models), and a
    block of rows reads only its own bytes.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            (n,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            if n > os.fstat(self.fd).st_size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            self.header = json.loads(os.pread(self.fd, n, 8))
        except (struct.error, ValueError) as exc:
            os.close(self.fd)
            raise CorruptCheckpointError(f"checkpoint {path} has no readable safetensors header ({exc})") from None
        self.base = 8 + n
        end = max((e["data_offsets"][1] for k, e in self.header.items() if k != "__metadata__"), default=0)
        if self.base + end > os.fstat(self.fd).st_size:
            os.close(self.fd)
            raise CorruptCheckpointError(f"checkpoint {path} is truncated: its header needs {self.base + end} bytes, "
                                         f"the file has {os.path.getsize(path)}")

    def get_rows(self, key: str, rows: slice | None = None) -> torch.Tensor:
        """Tensor ``key`` (or its ``rows``) as a fresh tensor in its stored dtype."""
        entry = self.header[key]
        dtype, shape = DTYPES[entry["dtype"]], list(entry["shape"])
        start, stop = entry["data_offsets"]
        if rows is not None:
            row_bytes = (stop - start) // shape[0]
            start, stop = start + rows.start * row_bytes, start + rows.stop * row_bytes
            shape[0] = rows.stop - rows.start
        buf = bytearray(stop - start)
        view, done = memoryview(buf), 0
        while done < len(buf):
            got = os.preadv(self.fd, [view[done:]], self.base + start + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read of {key!r}")
            done += got
        if not buf:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(shape)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------- checks


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` in ``dtype`` when it is floating and ``dtype`` is given, else ``t`` itself."""
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def check_compatible(ref: CheckpointInfo, other: CheckpointInfo) -> None:
    """Raise CheckpointMismatchError unless ``other`` has ref's head fingerprint, keys and shapes."""
    if ref.fingerprint != other.fingerprint:
        raise CheckpointMismatchError(
            "classifier heads are not aligned (ofa_head_fingerprint differs): "
            f"{ref.path} has {ref.fingerprint or 'no fingerprint'}, "
            f"{other.path} has {other.fingerprint or 'no fingerprint'}; refusing to average"
        )
    missing = sorted(set(ref.shapes) - set(other.shapes))
    extra = sorted(set(other.shapes) - set(ref.shapes))
    if missing or extra:
        raise CheckpointMismatchError(
            f"{other.path} has different keys from {ref.path}: "
            f"{len(missing)} missing (first: {missing[:SHOW]}), "
            f"{len(extra)} extra (first: {extra[:SHOW]})"
        )
    for key, shape in ref.shapes.items():
        if other.shapes[key] != shape:
            raise CheckpointMismatchError(
                f"shape mismatch for key {key!r}: {list(shape)} in {ref.path} "
                f"but {list(other.shapes[key])} in {other.path}"
            )


def inspect_all(paths: Sequence[PathLike]) -> list[CheckpointInfo]:
    """Headers of all ``paths``, checked for existence and mutual compatibility."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("no checkpoints given")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint(s) not found: {missing}")
    infos = [checkpoint_info(p) for p in paths]
    fingerprints = {i.fingerprint for i in infos}
    if len(fingerprints) > 1:
        listing = ", ".join(f"{i.path}: {i.fingerprint or 'no fingerprint'}" for i in infos)
        raise CheckpointMismatchError(
            f"classifier heads are not aligned (ofa_head_fingerprint differs); refusing to average: {listing}"
        )
    for info in infos[1:]:
        check_compatible(infos[0], info)
    return infos


def all_finite(t: torch.Tensor) -> bool:
    """True if ``t`` has no NaN/±inf (min and max propagate both; ~20x cheaper than isfinite)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def check_finite(key: str, t: torch.Tensor, what: str = "averaged tensor") -> None:
    """Raise :class:`NonFiniteError` naming ``key`` when ``t`` holds NaN or ±inf."""
    if not all_finite(t):
        raise NonFiniteError(f"non-finite values (NaN/inf) in {what} {key!r}")



BLOCK = 1 << 22  # elements (16 MiB of fp32) per block: larger tensors are merged in blocks of rows


def row_blocks(shape: Sequence[int], block: int | None = None) -> list[slice | None]:
    """Row slices that keep each block within ``block`` (default ``BLOCK``) elements
    (``[None]``: the whole tensor)."""
    block = BLOCK if block is None else block
    numel = math.prod(shape)
    if numel <= block or len(shape) == 0:
        return [None]
    per_row = max(1, numel // shape[0])
    step = max(1, block // per_row)
    return [slice(a, min(a + step, shape[0])) for a in range(0, shape[0], step)]



@functools.lru_cache(maxsize=4096)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def cached_sha256(path: PathLike) -> str:
    """:func:`file_sha256` of ``path``, computed once per file version (path, size, mtime) in a process."""
    stat = Path(path).stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


def verify_recorded(run_dir: PathLike, recorded: Mapping[str, str], run_id: str) -> None:
    """Each file of a run whose sha256 the run recorded as it wrote it (``checkpoint_sha256`` of its manifest:
    path in the run folder -> hex digest) must still have it; else :class:`CorruptCheckpointError` naming the
    run and the file. Hashes are computed once per file version (path, size, mtime) in a process."""
    for name, expected in recorded.items():
        path = Path(run_dir) / name
        if not path.is_file():
            raise CorruptCheckpointError(f"run {run_id}: {path} is missing (its manifest records it)")
        if cached_sha256(path) != expected:
            raise CorruptCheckpointError(
                f"run {run_id}: {path} is not the file the run wrote (sha256 differs from the one its manifest "
                f"recorded): it was changed after training; nothing is averaged or written from these runs")
