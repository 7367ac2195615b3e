"""Weight averaging of fine-tuned checkpoints: streaming and running means, soups.

File I/O (headers, loading, saving, the row-block reader, compatibility checks) lives in
:mod:`ofa_lib.models.ckpt_io`. Other merge rules (task arithmetic, TIES, DARE, ...) are in
:mod:`ofa_lib.merge.merging`.

- :func:`average_checkpoints`: streaming weighted mean, key by key across all files, fp32
  accumulation; peak memory ~ one model whatever the number of inputs.
- :func:`running_average` / :class:`RunningMean`: the accumulative mean
  θ̄_r = θ̄_{r-1} + (θ_r − θ̄_{r-1}) / r (one file read per step; the CA variant in training).
- :func:`uniform_soup`, :func:`greedy_soup` (Wortsman et al. 2022).

Floating tensors are averaged; non-floating tensors (e.g. integer ``position_ids`` buffers)
must be identical in every input and are copied.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Callable, Iterable, Iterator, Sequence

import torch

from ofa_lib.models import ckpt_io
from ofa_lib.models.ckpt_io import (
    AVERAGE_INPUTS_KEY,
    AVERAGE_METHOD_KEY,
    FINGERPRINT_KEY,
    RUN_ID_KEY,
    CheckpointInfo,
    CheckpointMismatchError,
    PathLike,
    StateDict,
    TensorReader,
    check_compatible,
    check_finite,
    checkpoint_info,
    inspect_all,
    load_checkpoint,
    row_blocks,
    save_checkpoint,
)
from ofa_lib.models.running_mean import RunningMean

_PER_RUN_KEYS = frozenset({RUN_ID_KEY, AVERAGE_INPUTS_KEY, AVERAGE_METHOD_KEY})

def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"got {len(w)} weights for {n} checkpoints")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights must be finite and non-negative, got {w}")
    if sum(w) <= 0:
        raise ValueError(f"weights must sum to a positive number, got {w}")
    return w


def _average_metadata(
    infos: Sequence[CheckpointInfo], weights: Sequence[float], method: str
) -> dict[str, str]:
    """Output metadata: values shared by all inputs, the inputs with their weights, the fingerprint."""
    shared = {
        k: v
        for k, v in infos[0].metadata.items()
        if k not in _PER_RUN_KEYS and all(i.metadata.get(k) == v for i in infos[1:])
    }
    total = sum(weights)
    inputs = [
        {"file": i.path.name, "run_id": i.run_id, "weight": w / total}
        for i, w in zip(infos, weights)
    ]
    shared[AVERAGE_INPUTS_KEY] = json.dumps(inputs)
    shared[AVERAGE_METHOD_KEY] = method
    if infos[0].fingerprint is not None:
        shared[FINGERPRINT_KEY] = infos[0].fingerprint
    return shared


# --------------------------------------------------------------------------- averaging


def average_checkpoints(
    paths: Sequence[PathLike],
    out_path: PathLike | None = None,
    weights: Sequence[float] | None = None,
    *,
    dtype: torch.dtype | None = None,
) -> StateDict | None:
    """Weighted mean of checkpoints, streamed tensor by tensor with fp32 accumulation.

    All headers are checked first (files exist; same keys, shapes and head fingerprint). Then,
    for each key, that tensor is read from each file in turn and accumulated (tensors above
    ``BLOCK`` elements block of rows by block of rows), so memory holds the output model plus a
    16 MiB accumulator, whatever ``len(paths)`` and the size of the embedding table. ``weights`` (default uniform)
    must be non-negative with a positive sum and are normalised; zero-weight files are checked
    but not read. Output dtype: ``dtype``, else each tensor's dtype in the first file.
    With ``out_path`` the result is written atomically (metadata: shared input metadata, the
    inputs and weights as JSON under ``ofa_average_inputs``, the head fingerprint) and None is
    returned; otherwise the state dict is returned.
    """
    infos = inspect_all(paths)
    w = _check_weights(weights, len(infos))
    total = sum(w)
    # large tensors are averaged in blocks of rows through one small fp32 accumulator, so memory
    # holds the output model plus O(BLOCK) elements, however large the embedding table
    widest_row = max((math.prod(sh[1:]) for sh in infos[0].shapes.values() if len(sh) > 1), default=0)
    acc_buf = torch.empty(max(ckpt_io.BLOCK, widest_row), dtype=torch.float32)
    scratch = torch.empty(_CHUNK, dtype=torch.float32)
    result: StateDict = {}
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(TensorReader(i.path)) for i in infos]
        for key, shape in infos[0].shapes.items():
            const: torch.Tensor | None = None  # copied value (non-floating tensors)
            out: torch.Tensor | None = None
            for rows in row_blocks(shape):
                acc: torch.Tensor | None = None  # fp32 weighted sum of this block (floating tensors)
                for info, handle, wi in zip(infos, handles, w):
                    if wi == 0:
                        continue
                    t = handle.get_rows(key, rows)
                    if (acc is not None and not t.is_floating_point()) or (const is not None and t.is_floating_point()):
                        raise CheckpointMismatchError(
                            f"tensor {key!r} is floating in some inputs and not in others ({info.path})")
                    if not t.is_floating_point():  # must be identical everywhere
                        if const is None:
                            const = t.clone()
                        elif t.dtype != const.dtype or not torch.equal(t, const):
                            raise CheckpointMismatchError(
                                f"non-floating tensor {key!r} differs between {infos[0].path} and {info.path}")
                    elif acc is None:
                        if out is None:
                            out = torch.empty(shape, dtype=dtype or t.dtype)
                        acc = acc_buf[: t.numel()].view(t.shape)
                        acc.copy_(t)
                        if wi != 1.0:
                            acc.mul_(wi)
                    else:
                        _accumulate(acc, t, wi, scratch)
                    del t  # free this input block before reading the next one
                if acc is None:
                    continue
                if total != 1.0:
                    acc.div_(total)
                block = out[rows] if rows is not None else out
                block.copy_(acc)
                check_finite(key, block)  # NaN/inf in an input, or overflow of the output dtype
            if out is None:
                assert const is not None
                result[key] = const
            else:
                result[key] = out
    if out_path is None:
        return result
    method = "uniform_mean" if weights is None else "weighted_mean"
    save_checkpoint(result, out_path, metadata=_average_metadata(infos, w, method))
    return None


_CHUNK = 1 << 20  # elements of the fp32 scratch buffer used to upcast bf16/fp16 inputs (4 MiB)


def _accumulate(acc: torch.Tensor, t: torch.Tensor, weight: float, scratch: torch.Tensor) -> None:
    """acc += weight * t in fp32 without allocating: non-fp32 ``t`` is upcast chunk by chunk
    into the reusable 1-D fp32 ``scratch``. (``acc.add_(t.float())`` allocates a full fp32
    temporary per read: several times slower from page faults, and it fragments the heap.)"""
    if t.dtype == torch.float32:
        acc.add_(t, alpha=weight)
        return
    flat_acc, flat_t = acc.view(-1), t.reshape(-1)
    for start in range(0, flat_acc.numel(), scratch.numel()):
        stop = min(start + scratch.numel(), flat_acc.numel())
        buf = scratch[: stop - start]
        buf.copy_(flat_t[start:stop])
        flat_acc[start:stop].add_(buf, alpha=weight)


def uniform_soup(paths: Sequence[PathLike], out_path: PathLike | None = None) -> StateDict | None:
    """Uniform average of ``paths`` (a "uniform soup"); see :func:`average_checkpoints`."""
    return average_checkpoints(paths, out_path)


def running_average(
    paths: Iterable[PathLike], *, dtype: torch.dtype | None = None
) -> Iterator[StateDict]:
    """Yield θ̄_1 … θ̄_r, the means of the first r checkpoints, reading each file exactly once.

    Each input is checked against the first (keys, shapes, head fingerprint) before its
    tensors are read; a mismatching r-th input raises naming it. Each yielded dict is a fresh
    copy (floating tensors in ``dtype``, default the first input's dtype); the running mean
    itself stays in fp32.
    """
    mean = RunningMean()
    ref: CheckpointInfo | None = None
    for path in paths:
        info = checkpoint_info(path)
        if ref is None:
            ref = info
        else:
            check_compatible(ref, info)
        mean.update(load_checkpoint(info.path), name=str(info.path))
        yield mean.state_dict(dtype)


def greedy_soup(
    paths: Sequence[PathLike],
    score_fn: Callable[[StateDict], float],
    *,
    out_path: PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[StateDict | None, list[int]]:
    """Greedy soup (Wortsman et al. 2022): add ingredients in order of individual held-out score.

    Every candidate is scored once on its own (``score_fn``, higher is better); candidates are
    sorted by that score, descending (ties keep input order). Starting from the best, each next
    candidate is kept if the uniform average of the kept ones plus it scores at least as well
    as the current soup (i.e. it does not lower the held-out score). ``score_fn`` is called
    2·N − 1 times and receives state dicts in ``dtype`` (default: the checkpoints' own
    storage dtypes); the soup is accumulated in fp32 with :class:`RunningMean`.
    Returns (soup state dict, or None when written to ``out_path``; kept indices into
    ``paths`` in the order they were added).
    """
    infos = inspect_all(paths)
    scores: list[float] = []
    for info in infos:
        score = float(score_fn(load_checkpoint(info.path, dtype=dtype)))
        if not math.isfinite(score):
            raise ValueError(f"score_fn returned {score} for {info.path}")
        scores.append(score)
    order = sorted(range(len(infos)), key=lambda i: -scores[i])

    soup = RunningMean()
    soup.update(load_checkpoint(infos[order[0]].path), name=str(infos[order[0]].path))
    kept, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        trial = soup.copy()
        trial.update(load_checkpoint(infos[i].path), name=str(infos[i].path))
        score = float(score_fn(trial.state_dict(dtype)))
        if not math.isfinite(score):
            raise ValueError(f"score_fn returned {score} for the soup with {infos[i].path}")
        if score >= best:
            soup, best = trial, score
            kept.append(i)
        del trial
    result = soup.state_dict(dtype)
    if out_path is None:
        return result, kept
    kept_infos = [infos[i] for i in kept]
    meta = _average_metadata(kept_infos, [1.0] * len(kept), "greedy_soup")
    meta["ofa_greedy_soup"] = json.dumps(
        {"candidates": [i.path.name for i in infos], "scores": scores, "kept": kept, "soup_score": best}
    )
    save_checkpoint(result, out_path, metadata=meta)
    return None, kept
