"""Merge methods: the registry of rules that combine r fine-tuned checkpoints into one.

Each :class:`Method` declares its name, its options and their defaults, whether it needs the
pretrained weights θ₀ (task vectors τᵢ = θᵢ − θ₀), whether it can be computed incrementally
over r (one new checkpoint read per r: ``uniform``, ``task_arithmetic``) or needs all r inputs
per tensor (``ties``, ``dare_*``), and whether the order of its inputs matters (the content key
of :meth:`MergeSpec.key` keeps the order then). A :class:`MergeSpec` is a method with all its
options filled in; its :attr:`~MergeSpec.label` (``"uniform"``, ``"ties(density=0.2,lambda=1.0)"``)
is what the results store's ``method`` column holds, so a stored row says exactly what was merged.

Methods (floating tensors; non-floating ones must be equal everywhere and are copied):

- ``uniform`` (alias ``linear``): the mean of the θᵢ (:mod:`ofa_lib.merge.averaging`, unchanged).
- ``task_arithmetic`` (Ilharco et al. 2023): θ₀ + λ Σᵢ τᵢ.
- ``ties`` (Yadav et al. 2023): per tensor and input keep the ⌊density·numel⌋ entries of τᵢ with
  the largest |τᵢ| (entries tied with the smallest kept magnitude are kept too, as in the
  authors' code), elect γ = sign(Σᵢ trimmed τᵢ), take the mean of the trimmed τᵢ entries whose
  sign is γ and that are non-zero (0 where none): θ₀ + λ·merged.
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2024): drop each entry of τᵢ with probability
  1 − density and rescale the kept ones by 1/density, then the mean (θ₀ + λ·mean) or TIES' elect
  and disjoint mean. The drop mask is a hash of (seed, input position, tensor name, element
  index): reproducible for a seed and independent of how tensors are cut into blocks.
- ``fisher`` (Matena & Raffel 2022): per parameter the Fisher-weighted mean
  Σᵢ Fᵢ θᵢ / Σᵢ Fᵢ with Fᵢ = max(diagonal Fisher of run i, ``floor``): where every run's Fisher
  is below the floor (zero: a parameter no example moves) the weights are equal and the result
  is the uniform mean. The diagonals (:func:`ofa_lib.train.fisher.fisher_diagonal`) are computed once
  per checkpoint and options and stored (:func:`ofa_lib.train.fisher.cached_diagonal`); a merge
  refuses a diagonal whose recorded checkpoint sha256 or options are not its input's. Its
  options ``examples``, ``split`` (English ``train`` or ``dev``), ``labels`` (``sample`` /
  ``argmax``) and ``seed`` say how the diagonal was estimated and are part of the content key.
  Incremental over r: the running numerator Σ Fᵢθᵢ and denominator Σ Fᵢ (two fp32 models).
- ``greedy_soup`` (Wortsman et al. 2022): needs scores, so it runs in the cross-run pass
  (:mod:`ofa_lib.merge.crossrun`): candidates sorted by English dev, each kept only if the English-dev
  score of the uniform soup does not drop. Its weights are a uniform mean of the kept runs.

Memory: :func:`merge_files` walks every tensor in blocks of rows read with
:class:`ofa_lib.models.ckpt_io.TensorReader` (blocks of at most ``BLOCK / r`` elements per input), so its
peak is about one output model plus O(BLOCK) working memory, never r models; for TIES on tensors
larger than one block, the per-tensor magnitude threshold is found exactly by a two-pass radix
selection over the blocks (2 extra reads of that tensor).
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from ofa_lib import io
from ofa_lib.merge import averaging
from ofa_lib.models import ckpt_io
from ofa_lib.models.ckpt_io import CheckpointMismatchError, PathLike, StateDict
from ofa_lib.train import fisher

METHOD_KEY = "ofa_merge_method"    # output metadata: the method's label
OPTIONS_KEY = "ofa_merge_options"  # JSON of the filled-in options
INPUTS_KEY = "ofa_merge_inputs"    # JSON list of {file, sha256, run_id}
BASE_KEY = "ofa_merge_base"        # JSON {file, sha256} of θ₀
FISHERS_KEY = "ofa_merge_fishers"  # JSON list of {file, sha256} of the inputs' Fisher diagonals


_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors dtype names of floating tensors


class MergeSpecError(ValueError):
    """An unknown merge method or option, or an option value out of range."""


@dataclass(frozen=True)
class Method:
    """One merge rule of the registry (see the module docstring)."""

    name: str
    defaults: Mapping[str, float | int]
    needs_base: bool
    incremental: bool
    ordered: bool = False       # does the order of the inputs change the result?
    needs_scores: bool = False  # greedy_soup: only in the cross-run pass
    summary: str = ""
    needs_fisher: bool = False  # fisher: each input's stored diagonal Fisher
    choices: Mapping[str, tuple[str, ...]] | None = None  # options that take one of these strings


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("uniform", {}, needs_base=False, incremental=True, summary="mean of the weights (the paper's rule)"),
    Method("task_arithmetic", {"lambda": 0.3}, needs_base=True, incremental=True,
           summary="θ₀ + λ Σ τᵢ (λ = 0.3, in Ilharco et al.'s best range for summed task vectors)"),
    Method("ties", {"density": 0.2, "lambda": 1.0}, needs_base=True, incremental=False,
           summary="trim to the top density of |τᵢ|, elect signs, disjoint mean"),
    # the drop mask depends on each input's position, so the order of the inputs matters
    Method("dare_linear", {"density": 0.5, "lambda": 1.0, "seed": 0}, needs_base=True, incremental=False,
           ordered=True, summary="random drop (1 − density), rescale 1/density, mean"),
    Method("dare_ties", {"density": 0.5, "lambda": 1.0, "seed": 0}, needs_base=True, incremental=False,
           ordered=True, summary="random drop (1 − density), rescale 1/density, TIES elect + disjoint mean"),
    # floor: only parameters (almost) no example moves fall back to equal weights (docs/method.md)
    Method("fisher", {"examples": 256, "split": "train", "labels": "sample", "seed": 0, "floor": 1e-12},
           needs_base=False, incremental=True, needs_fisher=True,
           choices={"split": fisher.DIAGONAL_SPLITS, "labels": fisher.LABEL_MODES},
           summary="Σ Fᵢ θᵢ / Σ Fᵢ with Fᵢ each run's diagonal Fisher on English data (floored)"),
    Method("greedy_soup", {}, needs_base=False, incremental=False, needs_scores=True,
           summary="uniform mean of the runs kept greedily by English dev"),
)}
ALIASES = {"linear": "uniform"}
DEFAULT_METHODS = ("uniform",)


@dataclass(frozen=True)
class MergeSpec:
    """A method with every option filled in (defaults included), validated."""

    method: str
    options: tuple[tuple[str, float | int | str], ...] = ()

    @property
    def info(self) -> Method:
        return METHODS[self.method]

    @property
    def opts(self) -> dict[str, float | int | str]:
        return dict(self.options)

    @property
    def label(self) -> str:
        """``uniform`` or ``ties(density=0.2,lambda=1.0)``: the store's ``method`` value."""
        if not self.options:
            return self.method
        return f"{self.method}(" + ",".join(f"{k}={v!r}" for k, v in self.options) + ")"

    def key(self, variant: str, members: Iterable[str]) -> tuple:
        """Content key of this merge of the members' ``variant`` weights: the uniform mean keeps
        the key it always had (sorted member ids), so cached rows stay valid; every other method
        adds its label, and keeps the member order where the order matters."""
        members = [str(m) for m in members]
        if self.method == "uniform":
            return ("average", variant, tuple(sorted(members)))
        return ("average", variant, self.label, tuple(members if self.info.ordered else sorted(members)))


def make_spec(name: str, options: Mapping[str, Any] | None = None, *, where: str = "methods") -> MergeSpec:
    """Validate ``name`` (or an alias) and ``options`` against the registry; fill in defaults."""
    canonical = ALIASES.get(str(name), str(name))
    if canonical not in METHODS:
        raise MergeSpecError(f"{where}: unknown merge method {name!r}; known: {sorted(METHODS) + sorted(ALIASES)}")
    method = METHODS[canonical]
    options = dict(options or {})
    unknown = sorted(set(options) - set(method.defaults))
    if unknown:
        raise MergeSpecError(f"{where}.{name}: unknown option(s) {unknown}; {canonical} takes "
                             f"{sorted(method.defaults) or 'no options'}")
    filled: dict[str, float | int | str] = {}
    for opt, default in method.defaults.items():
        value = options.get(opt, default)
        if opt in (method.choices or {}):
            if value not in method.choices[opt]:
                raise MergeSpecError(f"{where}.{name}.{opt}: expected one of {list(method.choices[opt])}, got {value!r}")
            filled[opt] = str(value)
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeSpecError(f"{where}.{name}.{opt}: expected a number, got {value!r}")
        if opt in ("seed", "examples"):
            if int(value) != value or value < (0 if opt == "seed" else 1):
                raise MergeSpecError(f"{where}.{name}.{opt}: expected a {'non-negative' if opt == 'seed' else 'positive'} "
                                     f"integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
            if not math.isfinite(value):
                raise MergeSpecError(f"{where}.{name}.{opt}: expected a finite number, got {value!r}")
            if opt == "density" and not 0.0 < value <= 1.0:
                raise MergeSpecError(f"{where}.{name}.density: expected 0 < density <= 1, got {value!r}")
            if opt == "floor" and not value > 0.0:
                raise MergeSpecError(f"{where}.{name}.floor: expected a positive number, got {value!r}")
        filled[opt] = value
    return MergeSpec(canonical, tuple(sorted(filled.items())))


def merged_variants(spec: MergeSpec, variants: Sequence[str], method_variants: Sequence[str] | None) -> Sequence[str]:
    """The variants 03_average merges with ``spec``: the uniform mean every one, other methods
    ``method_variants`` (a cost knob; None: every one too)."""
    return variants if spec.method == "uniform" or method_variants is None else method_variants


def parse_methods(spec: Sequence[str] | Mapping[str, Mapping[str, Any] | None] | str | None) -> list[MergeSpec]:
    """The ``methods`` parameter of ``03_average``: a list of names (default options), a mapping
    name → options (``{ties: {density: 0.2}}``), or None for :data:`DEFAULT_METHODS`."""
    if spec is None:
        spec = list(DEFAULT_METHODS)
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Mapping):
        specs = [make_spec(n, o) for n, o in spec.items()]
    elif isinstance(spec, (list, tuple)):
        bad = [s for s in spec if not isinstance(s, str)]
        if bad:
            raise MergeSpecError(f"methods: expected method names, got {bad} (options go in a mapping: "
                                 "{ties: {density: 0.2}})")
        specs = [make_spec(n) for n in spec]
    else:
        raise MergeSpecError(f"methods: expected a list of names or a mapping name -> options, got {spec!r}")
    if not specs:
        raise MergeSpecError("methods: expected at least one merge method")
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise MergeSpecError(f"methods: listed twice (aliases included): {dup}")
    return specs


def spec_from_label(label: str) -> MergeSpec | None:
    """Inverse of :attr:`MergeSpec.label` (None for a label this registry does not know)."""
    name, _, rest = str(label).partition("(")
    options: dict[str, Any] = {}
    if rest:
        if not rest.endswith(")"):
            return None
        for part in rest[:-1].split(","):
            opt, eq, value = part.partition("=")
            if not eq:
                return None
            try:  # the reprs the label wrote: numbers and quoted strings
                options[opt] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                return None
    try:
        spec = make_spec(name, options)
    except MergeSpecError:
        return None
    return spec if spec.label == label else None


# --------------------------------------------------------------------------- the rules on blocks
def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (int64 tensors holding values < 2**32; no product overflows 2**63)."""
    m = 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & m
    x = ((x >> 16) ^ x) * 0x45D9F3B & m
    return (x >> 16) ^ x


def dare_mask(seed: int, position: int, key: str, start: int, count: int, density: float) -> torch.Tensor:
    """Keep-mask (bool) of elements ``start … start+count`` (flat index) of tensor ``key`` of the
    input at ``position``: each element kept with probability ``density``, reproducibly."""
    salt = zlib.crc32(f"{int(seed)}\0{int(position)}\0{key}".encode())
    idx = torch.arange(start, start + count, dtype=torch.int64)
    h = _hash32(_hash32(idx & 0xFFFFFFFF) ^ salt ^ (idx >> 32))
    return h < int(round(density * 2 ** 32))


def _elect_disjoint_mean(taus: torch.Tensor) -> torch.Tensor:
    """TIES' elect + disjoint merge of stacked (already trimmed or dropped) task vectors
    ``taus`` [r, ...]: γ = sign(Σ τ); mean of the entries whose sign is γ (and non-zero)."""
    gamma = torch.sign(taus.sum(dim=0))
    agree = (torch.sign(taus) == gamma) & (taus != 0)
    count = agree.sum(dim=0)
    total = torch.where(agree, taus, torch.zeros((), dtype=taus.dtype)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros((), dtype=taus.dtype))


def _bits(x: torch.Tensor) -> torch.Tensor:
    """|x| (fp32) as int64 keys in the same order (non-negative floats order like their bits)."""
    return x.abs().contiguous().view(torch.int32).to(torch.int64)


def _kth_largest_abs(blocks_fn, k: int) -> float:
    """The k-th largest |x| (k >= 1) over the fp32 blocks ``blocks_fn()`` yields (called twice),
    exactly: a radix select over the float bits, high 16 then low 16, in O(block + 2^16) memory."""
    hist = torch.zeros(1 << 15, dtype=torch.int64)  # sign bit is 0 for |x|
    for b in blocks_fn():
        hist += torch.bincount((_bits(b) >> 16).reshape(-1), minlength=1 << 15)
    above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])  # above[i] = #elements with high >= i
    high = int((above >= k).nonzero().max())
    k_low = k - (int(above[high + 1]) if high + 1 < len(above) else 0)
    low_hist = torch.zeros(1 << 16, dtype=torch.int64)
    for b in blocks_fn():
        bits = _bits(b).reshape(-1)
        sel = bits[(bits >> 16) == high] & 0xFFFF
        low_hist += torch.bincount(sel, minlength=1 << 16)
    above_low = torch.flip(torch.cumsum(torch.flip(low_hist, [0]), 0), [0])
    low = int((above_low >= k_low).nonzero().max())
    return float(torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32))


def ties_keep(tau: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """``tau`` with all but its ⌊density·numel⌋ largest-magnitude entries zeroed (entries tied
    with the smallest kept magnitude kept too); ``threshold``: that magnitude, when known."""
    k = int(math.floor(density * tau.numel()))
    if k >= tau.numel():
        return tau
    if k == 0:
        return torch.zeros_like(tau)
    if threshold is None:
        threshold = float(tau.abs().reshape(-1).kthvalue(tau.numel() - k + 1).values)
    return torch.where(tau.abs() >= threshold, tau, torch.zeros((), dtype=tau.dtype))


# --------------------------------------------------------------------------- files
def check_inputs(spec: MergeSpec, paths: Sequence[PathLike], base: PathLike | None) -> tuple[list[ckpt_io.CheckpointInfo], ckpt_io.CheckpointInfo | None]:
    """The study's checks before any tensor is read: every input exists, same keys, shapes and
    head fingerprint (:func:`ofa_lib.models.ckpt_io.inspect_all`); θ₀ given when the method needs it,
    with the inputs' keys and shapes and, when it carries one, their head fingerprint."""
    infos = ckpt_io.inspect_all(paths)
    if not spec.info.needs_base:
        return infos, None
    if base is None:
        raise MergeSpecError(f"merge method {spec.method} needs the pretrained weights θ₀ (--base / base=)")
    binfo = ckpt_io.checkpoint_info(base)
    if binfo.fingerprint is not None and binfo.fingerprint != infos[0].fingerprint:
        raise CheckpointMismatchError(
            f"θ₀ {binfo.path} has head fingerprint {binfo.fingerprint}, the inputs {infos[0].fingerprint or 'none'}: "
            "the base must carry the inputs' (frozen, aligned) head; refusing to merge")
    ref = ckpt_io.CheckpointInfo(binfo.path, binfo.shapes, binfo.dtypes, dict(infos[0].metadata))
    for info in infos:  # keys and shapes of every input against θ₀'s (the fingerprint was checked above)
        ckpt_io.check_compatible(ref, info)
    return infos, binfo


def check_fishers(spec: MergeSpec, infos: Sequence[ckpt_io.CheckpointInfo],
                  fishers: Sequence[PathLike] | None) -> list[Path]:
    """One stored diagonal per input (``fisher`` merges): each records its input's sha256 and the
    spec's diagonal options, and holds every floating tensor of the input with its shape."""
    if fishers is None or len(fishers) != len(infos):
        raise MergeSpecError(f"merge method {spec.method} needs one Fisher diagonal per input (--fisher / fishers=): "
                             f"got {0 if fishers is None else len(fishers)} for {len(infos)} input(s)")
    options = fisher.diagonal_options(spec.opts)
    out = []
    for info, f in zip(infos, fishers):
        f = Path(f)
        if not f.is_file():
            raise FileNotFoundError(f"Fisher diagonal not found: {f}")
        why = fisher.diagonal_mismatch(f, ckpt_io.cached_sha256(info.path), options)
        if why is not None:
            raise CheckpointMismatchError(f"Fisher diagonal {f} cannot weight {info.path}: {why}; refusing to merge")
        shapes = ckpt_io.checkpoint_info(f).shapes
        for key, dt in info.dtypes.items():
            if dt in _FLOAT_DTYPES and shapes.get(key) != info.shapes[key]:
                raise CheckpointMismatchError(
                    f"Fisher diagonal {f} has {'no tensor' if key not in shapes else f'shape {list(shapes[key])} for'} "
                    f"{key!r} (the input {info.path}: {list(info.shapes[key])})")
        out.append(f)
    return out


def spec_from_fishers(fishers: Sequence[PathLike], floor: float | None = None) -> MergeSpec:
    """The ``fisher`` spec the stored diagonals were made for (their options must agree), with ``floor``."""
    found = {}
    for f in fishers:
        meta = ckpt_io.read_metadata(f)
        if fisher.OPTIONS_KEY not in meta:
            raise MergeSpecError(f"{f} is not a stored Fisher diagonal (no {fisher.OPTIONS_KEY} metadata)")
        found[str(f)] = json.loads(meta[fisher.OPTIONS_KEY])
    if len({json.dumps(v, sort_keys=True) for v in found.values()}) > 1:
        raise MergeSpecError(f"the Fisher diagonals were estimated with different options: {found}")
    opts = {k: v for k, v in next(iter(found.values())).items() if k in fisher.DIAGONAL_OPTIONS}
    if floor is not None:
        opts["floor"] = floor
    return make_spec("fisher", opts, where="fisher diagonals")


def merge_files(
    spec: MergeSpec,
    paths: Sequence[PathLike],
    *,
    base: PathLike | None = None,
    fishers: Sequence[PathLike] | None = None,
    dtype: torch.dtype | None = torch.float32,
    out_path: PathLike | None = None,
) -> StateDict | None:
    """Merge checkpoint files with ``spec`` (any method but greedy_soup), streaming row blocks.

    ``uniform`` is :func:`ofa_lib.merge.averaging.average_checkpoints` (unchanged). Other methods read,
    per block of rows, θ₀'s block and each input's block (at most ``BLOCK / r`` elements each),
    compute the merged block in fp32 and write it into the output (``dtype``, default fp32; None:
    each tensor's storage dtype in the first input). ``fisher`` reads each input's block and its
    diagonal's (``fishers``: one stored diagonal per input, checked by :func:`check_fishers`).
    Every output tensor is checked finite (a NaN/inf in an input surfaces there, naming the
    tensor). With ``out_path`` the result is written atomically with the method, its options,
    the inputs' and θ₀'s sha256 in its metadata (:data:`METHOD_KEY` …) and None is returned.
    """
    if spec.info.needs_scores:
        raise MergeSpecError(f"{spec.method} selects runs by an evaluation score: run it in 03_average "
                             "(crossrun.average_runs), not on files alone")
    infos, binfo = check_inputs(spec, paths, base)
    fpaths = check_fishers(spec, infos, fishers) if spec.info.needs_fisher else None
    if spec.method == "uniform":
        result = averaging.average_checkpoints([i.path for i in infos], dtype=dtype)
    elif fpaths is not None:
        result = _fisher_blocks(spec, infos, fpaths, dtype)
    else:
        result = _merge_blocks(spec, infos, binfo, dtype)
    if out_path is None:
        return result
    ckpt_io.save_checkpoint(result, out_path, metadata=merge_metadata(spec, infos, binfo, fpaths))
    return None


def merge_metadata(spec: MergeSpec, infos: Sequence[ckpt_io.CheckpointInfo],
                   base: ckpt_io.CheckpointInfo | None, fishers: Sequence[Path] | None = None) -> dict[str, str]:
    """Output metadata: the head fingerprint, the method label and options, inputs and θ₀ with sha256."""
    meta = {METHOD_KEY: spec.label, OPTIONS_KEY: json.dumps(spec.opts, sort_keys=True),
            INPUTS_KEY: json.dumps([{"file": str(i.path), "sha256": io.file_sha256(i.path), "run_id": i.run_id}
                                    for i in infos])}
    if base is not None:
        meta[BASE_KEY] = json.dumps({"file": str(base.path), "sha256": io.file_sha256(base.path)})
    if fishers is not None:
        meta[FISHERS_KEY] = json.dumps([{"file": str(f), "sha256": io.file_sha256(f)} for f in fishers])
    if infos[0].fingerprint is not None:
        meta[ckpt_io.FINGERPRINT_KEY] = infos[0].fingerprint
    return meta


def _merge_blocks(spec: MergeSpec, infos: Sequence[ckpt_io.CheckpointInfo], binfo: ckpt_io.CheckpointInfo,
                  dtype: torch.dtype | None) -> StateDict:
    opts, r = spec.opts, len(infos)
    block = max(1, ckpt_io.BLOCK // max(1, r))  # r blocks of inputs at a time: O(BLOCK) working memory
    result: StateDict = {}
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(ckpt_io.TensorReader(i.path)) for i in infos]
        base = stack.enter_context(ckpt_io.TensorReader(binfo.path))
        for key, shape in binfo.shapes.items():
            if binfo.dtypes[key] not in _FLOAT_DTYPES:  # integer buffers: equal everywhere, copied
                b0 = base.get_rows(key)
                for info, rd in zip(infos, readers):
                    t = rd.get_rows(key)
                    if t.dtype != b0.dtype or not torch.equal(t, b0):
                        raise CheckpointMismatchError(f"non-floating tensor {key!r} differs between {binfo.path} and {info.path}")
                result[key] = b0
                continue
            blocks = ckpt_io.row_blocks(shape, block)
            thresholds = None
            if spec.method == "ties" and len(blocks) > 1:
                thresholds = [_tensor_threshold(base, rd, key, blocks, opts["density"], math.prod(shape)) for rd in readers]
            out = torch.empty(shape, dtype=dtype or ckpt_io.DTYPES[infos[0].dtypes[key]])
            for rows in blocks:
                theta0 = base.get_rows(key, rows).to(torch.float32)
                start = 0 if rows is None else rows.start * (math.prod(shape[1:]) if len(shape) > 1 else 1)
                ckpt_io.check_finite(key, theta0, what=f"θ₀ {binfo.path}, tensor")
                taus = torch.stack([_finite(rd, key, rows) - theta0 for rd in readers])
                merged = _merge_taus(spec, key, taus, start, thresholds)
                target = out if rows is None else out[rows]
                target.copy_(theta0.add_(merged, alpha=opts["lambda"]))
                del taus, merged, theta0
                ckpt_io.check_finite(key, target, what="merged tensor")
            result[key] = out
    return result


def _fisher_weight(reader: ckpt_io.TensorReader, key: str, rows: slice | None, floor: float) -> torch.Tensor:
    """A block of a stored diagonal as the merge weight max(F, floor) in fp32 (finite, else refused)."""
    w = reader.get_rows(key, rows).to(torch.float32)
    ckpt_io.check_finite(key, w, what=f"Fisher diagonal {reader.path}, tensor")
    return w.clamp_(min=floor)


def _copy_equal(key: str, readers: Sequence[ckpt_io.TensorReader]) -> torch.Tensor:
    """A non-floating tensor (an integer buffer): equal in every input, copied."""
    first = readers[0].get_rows(key)
    for rd in readers[1:]:
        t = rd.get_rows(key)
        if t.dtype != first.dtype or not torch.equal(t, first):
            raise CheckpointMismatchError(f"non-floating tensor {key!r} differs between {readers[0].path} and {rd.path}")
    return first


def _fisher_blocks(spec: MergeSpec, infos: Sequence[ckpt_io.CheckpointInfo], fishers: Sequence[Path],
                   dtype: torch.dtype | None) -> StateDict:
    """Σᵢ max(Fᵢ, floor) θᵢ / Σᵢ max(Fᵢ, floor) per block of rows, one input (weights and diagonal) at a
    time: O(block) working memory beside the output."""
    floor = spec.opts["floor"]
    result: StateDict = {}
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(ckpt_io.TensorReader(i.path)) for i in infos]
        weights = [stack.enter_context(ckpt_io.TensorReader(f)) for f in fishers]
        for key, shape in infos[0].shapes.items():
            if infos[0].dtypes[key] not in _FLOAT_DTYPES:
                result[key] = _copy_equal(key, readers)
                continue
            out = torch.empty(shape, dtype=dtype or ckpt_io.DTYPES[infos[0].dtypes[key]])
            for rows in ckpt_io.row_blocks(shape):
                num = den = None
                for rd, wr in zip(readers, weights):
                    w = _fisher_weight(wr, key, rows, floor)
                    wt = _finite(rd, key, rows).mul_(w)
                    num, den = (wt, w) if num is None else (num.add_(wt), den.add_(w))
                target = out if rows is None else out[rows]
                target.copy_(num.div_(den))
                ckpt_io.check_finite(key, target, what="merged tensor")
            result[key] = out
    return result


def _finite(reader: ckpt_io.TensorReader, key: str, rows: slice | None) -> torch.Tensor:
    """A block of an input in fp32, refused (naming the file) when it holds NaN/inf: trimming
    would otherwise drop a NaN silently instead of letting it surface in the output."""
    t = reader.get_rows(key, rows).to(torch.float32)
    ckpt_io.check_finite(key, t, what=f"input {reader.path}, tensor")
    return t


def _tensor_threshold(base, reader, key: str, blocks, density: float, numel: int) -> float | None:
    """The smallest kept |τ| of TIES' trim over a whole tensor read block by block (None: keep all)."""
    k = int(math.floor(density * numel))
    if k >= numel or k == 0:
        return None if k >= numel else math.inf

    def taus():
        for rows in blocks:
            yield reader.get_rows(key, rows).to(torch.float32) - base.get_rows(key, rows).to(torch.float32)

    return _kth_largest_abs(taus, k)


def _merge_taus(spec: MergeSpec, key: str, taus: torch.Tensor, start: int, thresholds) -> torch.Tensor:
    """The merged task vector of one block from the stacked inputs' task vectors ``taus`` [r, ...]."""
    opts = spec.opts
    if spec.method == "task_arithmetic":
        return taus.sum(dim=0)
    if spec.method == "ties":
        if thresholds is None:
            trimmed = torch.stack([ties_keep(t, opts["density"]) for t in taus])
        else:
            trimmed = torch.stack([t if th is None else torch.where(t.abs() >= th, t, torch.zeros((), dtype=t.dtype))
                                   for t, th in zip(taus, thresholds)])
        return _elect_disjoint_mean(trimmed)
    if spec.method in ("dare_linear", "dare_ties"):
        d = opts["density"]
        n = taus[0].numel()
        dropped = torch.stack([torch.where(dare_mask(opts["seed"], i, key, start, n, d).view(t.shape), t / d,
                                           torch.zeros((), dtype=t.dtype)) for i, t in enumerate(taus)])
        return dropped.mean(dim=0) if spec.method == "dare_linear" else _elect_disjoint_mean(dropped)
    raise MergeSpecError(f"no block rule for merge method {spec.method}")


# --------------------------------------------------------------------------- incremental over r
def incremental_states(spec: MergeSpec, paths: Sequence[PathLike], *, base: PathLike | None = None,
                       fishers: Sequence[PathLike] | None = None,
                       dtype: torch.dtype = torch.float32) -> Iterator[StateDict]:
    """Yield the merges of the first 1, 2, … r ``paths`` reading each input once (incremental
    methods only): ``uniform`` is :func:`ofa_lib.merge.averaging.running_average` (today's stream,
    bit for bit); ``task_arithmetic`` keeps the fp32 running sum S_r = S_{r-1} + τ_r (one model)
    and yields θ₀ + λ S_r (θ₀ read again, block by block, for each r); ``fisher`` keeps the fp32
    running numerator Σ Fᵢθᵢ and denominator Σ Fᵢ (two models; ``fishers``: one diagonal per path)
    and yields their ratio."""
    if not spec.info.incremental:
        raise MergeSpecError(f"{spec.method} needs all r inputs per tensor; it is not incremental over r")
    if spec.method == "uniform":
        yield from averaging.running_average(paths, dtype=dtype)
        return
    if spec.info.needs_fisher:
        yield from _fisher_incremental(spec, paths, fishers, dtype)
        return
    paths = [Path(p) for p in paths]
    if not paths:
        return
    infos, binfo = check_inputs(spec, paths[:1], base)
    lam = spec.opts["lambda"]
    total: StateDict = {}
    with ckpt_io.TensorReader(binfo.path) as b:
        for r, path in enumerate(paths, start=1):
            if r > 1:
                ckpt_io.check_compatible(infos[0], ckpt_io.checkpoint_info(path))
            out: StateDict = {}
            with ckpt_io.TensorReader(path) as rd:
                for key, shape in binfo.shapes.items():
                    theta0 = b.get_rows(key)
                    t = rd.get_rows(key)
                    if not theta0.is_floating_point():
                        if t.dtype != theta0.dtype or not torch.equal(t, theta0):
                            raise CheckpointMismatchError(f"non-floating tensor {key!r} differs between {binfo.path} and {path}")
                        out[key] = theta0
                        continue
                    theta0 = theta0.to(torch.float32)
                    tau = t.to(torch.float32)
                    ckpt_io.check_finite(key, tau, what=f"input {path}, tensor")
                    tau.sub_(theta0)
                    if key in total:
                        total[key].add_(tau)
                    else:
                        total[key] = tau
                    out[key] = theta0.add_(total[key], alpha=lam).to(dtype)
                    ckpt_io.check_finite(key, out[key], what="merged tensor")
            yield out


def _fisher_incremental(spec: MergeSpec, paths: Sequence[PathLike], fishers: Sequence[PathLike] | None,
                        dtype: torch.dtype) -> Iterator[StateDict]:
    paths = [Path(p) for p in paths]
    if not paths:
        return
    ref = ckpt_io.checkpoint_info(paths[0])
    if fishers is None or len(fishers) != len(paths):
        check_fishers(spec, [ref] * len(paths), fishers)  # raises, naming what is missing
    floor = spec.opts["floor"]
    num: StateDict = {}
    den: StateDict = {}
    with ckpt_io.TensorReader(ref.path) as first:  # integer buffers: equal to the first input's
        for path, fpath in zip(paths, fishers):
            info = ckpt_io.checkpoint_info(path)
            ckpt_io.check_compatible(ref, info)
            (fpath,) = check_fishers(spec, [info], [fpath])
            out: StateDict = {}
            with ckpt_io.TensorReader(path) as rd, ckpt_io.TensorReader(fpath) as wr:
                for key in ref.shapes:
                    if ref.dtypes[key] not in _FLOAT_DTYPES:
                        out[key] = _copy_equal(key, [first, rd])
                        continue
                    w = _fisher_weight(wr, key, None, floor)
                    wt = _finite(rd, key, None).mul_(w)
                    if key in num:
                        num[key].add_(wt)
                        den[key].add_(w)
                    else:
                        num[key], den[key] = wt, w
                    out[key] = (num[key] / den[key]).to(dtype)
                    ckpt_io.check_finite(key, out[key], what="merged tensor")
            yield out
