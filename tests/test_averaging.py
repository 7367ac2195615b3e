"""Checkpoint averaging: exact means, checks, atomic output, bounded memory, greedy soup."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

from ofa_lib.merge.averaging import (
    average_checkpoints,
    greedy_soup,
    running_average,
    uniform_soup,
)
from ofa_lib.models import ckpt_io
from ofa_lib.models.ckpt_io import (
    CheckpointMismatchError,
    NonFiniteError,
    head_fingerprint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from ofa_lib.models.running_mean import RunningMean

FP = "ab" * 32  # a head fingerprint


def _sd(value: float, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A tiny 'model': every float entry derived from ``value``; an int buffer shared by all."""
    return {
        "enc.weight": (torch.arange(6, dtype=torch.float32).reshape(2, 3) + value).to(dtype),
        "enc.bias": torch.full((3,), value).to(dtype),
        "head.weight": torch.tensor([[value, -value]]).to(dtype),
        "position_ids": torch.arange(4, dtype=torch.int64),
    }


def _write(tmp: Path, name: str, sd, **meta: str) -> Path:
    path = tmp / f"{name}.safetensors"
    save_checkpoint(sd, path, metadata={"ofa_head_fingerprint": FP, "ofa_run_id": name, **meta})
    return path


def _files(tmp: Path, values, dtype=torch.float32, **meta: str) -> list[Path]:
    return [_write(tmp, f"run{i}", _sd(v, dtype), **meta) for i, v in enumerate(values)]


def _assert_sd_equal(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), (k, a[k], b[k])


# --------------------------------------------------------------------------- exact means


def test_uniform_mean_exact(tmp_path: Path) -> None:
    paths = _files(tmp_path, [1.0, 2.0, 6.0])
    out = average_checkpoints(paths)
    _assert_sd_equal(out, _sd(3.0))
    _assert_sd_equal(uniform_soup(paths), _sd(3.0))


def test_weighted_mean_exact(tmp_path: Path) -> None:
    paths = _files(tmp_path, [1.0, 5.0])
    _assert_sd_equal(average_checkpoints(paths, weights=[3, 1]), _sd(2.0))  # (3*1 + 5) / 4
    _assert_sd_equal(average_checkpoints(paths, weights=[0.75, 0.25]), _sd(2.0))
    _assert_sd_equal(average_checkpoints(paths, weights=[0, 2]), _sd(5.0))


def test_bf16_inputs_accumulate_in_fp32(tmp_path: Path) -> None:
    # 1 + 1 + (1 + 2^-7) = 3 + 2^-7 is not representable in bf16 (step 2^-6 in [2, 4)):
    # a bf16 accumulator would lose the 2^-7; fp32 keeps it.
    values = [1.0, 1.0, 1.0 + 2**-7]
    paths = [
        _write(tmp_path, f"b{i}", {"w": torch.full((4,), v, dtype=torch.bfloat16)})
        for i, v in enumerate(values)
    ]
    out32 = average_checkpoints(paths, dtype=torch.float32)
    expected = torch.full((4,), (3 + 2**-7) / 3, dtype=torch.float32)
    assert torch.equal(out32["w"], expected)
    out = average_checkpoints(paths)  # output dtype defaults to the first input's
    assert out["w"].dtype == torch.bfloat16
    assert torch.equal(out["w"], expected.to(torch.bfloat16))

    gen = torch.Generator().manual_seed(0)
    rand = [torch.randn(64, 33, generator=gen).to(torch.bfloat16) for _ in range(5)]
    rpaths = [_write(tmp_path, f"r{i}", {"w": t}) for i, t in enumerate(rand)]
    ref = torch.stack([t.float() for t in rand]).mean(0)
    got = average_checkpoints(rpaths, dtype=torch.float32)["w"]
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_running_average_yields_prefix_means(tmp_path: Path) -> None:
    values = [1.0, 3.0, 8.0, -4.0]
    paths = _files(tmp_path, values)
    means = list(running_average(paths))
    assert len(means) == len(values)
    for r, mean in enumerate(means, start=1):
        _assert_sd_equal(mean, average_checkpoints(paths[:r]))
        _assert_sd_equal(mean, _sd(sum(values[:r]) / r))


def test_running_mean_equals_mean() -> None:
    gen = torch.Generator().manual_seed(1)
    sds = [{"a": torch.randn(5, 7, generator=gen), "b": torch.randn(3, generator=gen)} for _ in range(6)]
    rm = RunningMean()
    for sd in sds:
        rm.update(sd)
    assert rm.count == 6
    for key in ("a", "b"):
        torch.testing.assert_close(rm.mean[key], torch.stack([s[key] for s in sds]).mean(0))
    # inputs are not modified by the in-place update
    assert torch.equal(sds[0]["a"], torch.randn(5, 7, generator=torch.Generator().manual_seed(1)))


def test_running_mean_rejects_without_corrupting() -> None:
    rm = RunningMean()
    rm.update({"a": torch.ones(2), "b": torch.ones(2)})
    before = {k: v.clone() for k, v in rm.mean.items()}
    with pytest.raises(NonFiniteError, match="'b'"):
        rm.update({"a": torch.zeros(2), "b": torch.tensor([0.0, float("nan")])}, name="snap2")
    with pytest.raises(CheckpointMismatchError, match="shape mismatch for key 'a'.*snap3"):
        rm.update({"a": torch.zeros(3), "b": torch.zeros(2)}, name="snap3")
    with pytest.raises(CheckpointMismatchError, match="missing.*'b'"):
        rm.update({"a": torch.zeros(2)})
    assert rm.count == 1
    _assert_sd_equal(rm.mean, before)
    assert rm.state_dict(torch.bfloat16)["a"].dtype == torch.bfloat16


# --------------------------------------------------------------------------- checks


def test_missing_and_extra_keys(tmp_path: Path) -> None:
    a = _write(tmp_path, "a", _sd(1.0))
    sd = _sd(2.0)
    del sd["enc.bias"]
    b = _write(tmp_path, "b", sd)
    with pytest.raises(CheckpointMismatchError, match=r"b\.safetensors.*1 missing.*'enc\.bias'"):
        average_checkpoints([a, b])
    sd = _sd(2.0)
    sd["extra.weight"] = torch.zeros(1)
    c = _write(tmp_path, "c", sd)
    with pytest.raises(CheckpointMismatchError, match=r"c\.safetensors.*1 extra.*'extra\.weight'"):
        average_checkpoints([a, c])


def test_shape_mismatch(tmp_path: Path) -> None:
    a = _write(tmp_path, "a", _sd(1.0))
    sd = _sd(2.0)
    sd["enc.bias"] = torch.zeros(4)
    b = _write(tmp_path, "b", sd)
    with pytest.raises(CheckpointMismatchError) as err:
        average_checkpoints([a, b])
    msg = str(err.value)
    assert "'enc.bias'" in msg and "[3]" in msg and "[4]" in msg and "b.safetensors" in msg


def test_fingerprint_mismatch_and_missing(tmp_path: Path) -> None:
    a = _write(tmp_path, "a", _sd(1.0))
    b = _write(tmp_path, "b", _sd(2.0), ofa_head_fingerprint="cd" * 32)
    with pytest.raises(CheckpointMismatchError, match="not aligned") as err:
        average_checkpoints([a, b])
    assert FP in str(err.value) and "cd" * 32 in str(err.value) and "b.safetensors" in str(err.value)
    c = tmp_path / "c.safetensors"
    save_checkpoint(_sd(3.0), c, metadata={"ofa_run_id": "c"})  # no fingerprint
    with pytest.raises(CheckpointMismatchError, match="no fingerprint"):
        average_checkpoints([a, c])
    with pytest.raises(CheckpointMismatchError, match="no fingerprint"):
        average_checkpoints([c, a])
    with pytest.raises(CheckpointMismatchError, match="not aligned"):
        greedy_soup([a, b], lambda sd: 0.0)


def test_files_without_fingerprints_average(tmp_path: Path) -> None:
    paths = []
    for i, v in enumerate([2.0, 4.0]):
        paths.append(tmp_path / f"n{i}.safetensors")
        save_checkpoint(_sd(v), paths[-1])
    _assert_sd_equal(average_checkpoints(paths), _sd(3.0))


def test_missing_file(tmp_path: Path) -> None:
    a = _write(tmp_path, "a", _sd(1.0))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        average_checkpoints([a, tmp_path / "nope.safetensors"])
    with pytest.raises(ValueError, match="no checkpoints"):
        average_checkpoints([])


def test_weights_validation(tmp_path: Path) -> None:
    paths = _files(tmp_path, [1.0, 2.0])
    with pytest.raises(ValueError, match="3 weights for 2"):
        average_checkpoints(paths, weights=[1, 1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        average_checkpoints(paths, weights=[2, -1])
    with pytest.raises(ValueError, match="positive"):
        average_checkpoints(paths, weights=[0, 0])


def test_non_finite_results(tmp_path: Path) -> None:
    sd = _sd(1.0)
    sd["enc.bias"][1] = float("inf")
    paths = [_write(tmp_path, "a", _sd(1.0)), _write(tmp_path, "b", sd)]
    with pytest.raises(NonFiniteError, match="'enc.bias'"):
        average_checkpoints(paths)
    # finite in fp32 but overflows the requested fp16 output
    big = [_write(tmp_path, f"big{i}", {"w": torch.full((2,), 1e5)}) for i in range(2)]
    with pytest.raises(NonFiniteError, match="'w'"):
        average_checkpoints(big, dtype=torch.float16)


def test_non_floating_tensors_must_match(tmp_path: Path) -> None:
    sd = _sd(2.0)
    sd["position_ids"] = torch.arange(4, dtype=torch.int64) + 1
    paths = [_write(tmp_path, "a", _sd(1.0)), _write(tmp_path, "b", sd)]
    with pytest.raises(CheckpointMismatchError, match="'position_ids'"):
        average_checkpoints(paths)


def test_running_average_rejects_rth_input(tmp_path: Path) -> None:
    paths = _files(tmp_path, [1.0, 2.0])
    bad = _write(tmp_path, "bad", _sd(3.0), ofa_head_fingerprint="ee" * 32)
    it = running_average([*paths, bad])
    next(it), next(it)
    with pytest.raises(CheckpointMismatchError, match=r"bad\.safetensors"):
        next(it)


# --------------------------------------------------------------------------- output files


def test_output_file_and_metadata(tmp_path: Path) -> None:
    paths = _files(tmp_path, [1.0, 5.0], ofa_task="nli")
    out = tmp_path / "avg" / "avg.safetensors"
    assert average_checkpoints(paths, out, weights=[3, 1], dtype=torch.bfloat16) is None
    got = load_checkpoint(out)
    _assert_sd_equal(got, {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in _sd(2.0).items()})
    meta = read_metadata(out)
    assert meta["ofa_head_fingerprint"] == FP
    assert meta["ofa_task"] == "nli"  # shared input metadata is carried over
    assert "ofa_run_id" not in meta  # per-run metadata is not
    assert meta["format"] == "pt"
    inputs = json.loads(meta["ofa_average_inputs"])
    assert [i["file"] for i in inputs] == ["run0.safetensors", "run1.safetensors"]
    assert [i["run_id"] for i in inputs] == ["run0", "run1"]
    assert [i["weight"] for i in inputs] == [0.75, 0.25]


def test_atomic_output_on_error(tmp_path: Path) -> None:
    sd = _sd(1.0)
    sd["head.weight"][0, 0] = float("nan")
    paths = [_write(tmp_path, "a", _sd(1.0)), _write(tmp_path, "b", sd)]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "avg.safetensors"
    with pytest.raises(NonFiniteError):
        average_checkpoints(paths, out)
    assert list(out_dir.iterdir()) == []  # neither the output nor a temp file
    out.write_bytes(b"old")
    with pytest.raises(NonFiniteError):
        average_checkpoints(paths, out)
    assert out.read_bytes() == b"old" and list(out_dir.iterdir()) == [out]


def test_save_load_roundtrip_tied_and_views(tmp_path: Path) -> None:
    emb = torch.randn(5, 4)
    sd = {
        "emb.weight": emb,
        "decoder.weight": emb,  # tied
        "half": emb[:2],  # a view into a larger storage
        "t": torch.randn(3, 2).t(),  # non-contiguous
        "step": torch.tensor(7),
    }
    path = tmp_path / "m.safetensors"
    save_checkpoint(sd, path, metadata={"ofa_run_id": "x"})
    back = load_checkpoint(path)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    half = load_checkpoint(path, dtype=torch.float16)
    assert half["emb.weight"].dtype == torch.float16 and half["step"].dtype == torch.int64
    save_checkpoint(sd, tmp_path / "h.safetensors", dtype=torch.bfloat16)
    assert load_checkpoint(tmp_path / "h.safetensors")["t"].dtype == torch.bfloat16
    assert read_metadata(path)["ofa_run_id"] == "x"
    with pytest.raises(TypeError, match="str to str"):
        save_checkpoint(sd, tmp_path / "bad.safetensors", metadata={"n": 3})  # type: ignore[dict-item]
    assert not (tmp_path / "bad.safetensors").exists()


def test_head_fingerprint() -> None:
    sd = _sd(1.0)
    fp = head_fingerprint(sd, ["head."])
    assert len(fp) == 64 and fp == head_fingerprint(_sd(1.0), ["head."])
    other_body = dict(sd, **{"enc.bias": torch.zeros(3)})
    assert head_fingerprint(other_body, ["head."]) == fp  # only the head counts
    other_head = dict(sd, **{"head.weight": torch.tensor([[1.0, -1.5]])})
    assert head_fingerprint(other_head, ["head."]) != fp
    as_bf16 = dict(sd, **{"head.weight": sd["head.weight"].to(torch.bfloat16)})
    assert head_fingerprint(as_bf16, ["head."]) != fp  # dtype is part of it
    assert head_fingerprint(sd, ["head.", "enc.bias"]) != fp
    with pytest.raises(KeyError, match="classifier"):
        head_fingerprint(sd, ["classifier."])


# --------------------------------------------------------------------------- memory


class _SpyOpen:
    """Wraps safe_open: counts get_tensor calls per (file, key) and tracks live bytes read."""

    def __init__(self) -> None:
        self.reads: dict[tuple[str, str], int] = {}
        self.live = 0
        self.peak = 0

    def __call__(self, path, framework, **kwargs):
        spy, inner = self, averaging_safe_open(path, framework, **kwargs)

        class Handle:
            def __enter__(self):
                inner.__enter__()
                return self

            def __exit__(self, *exc):
                return inner.__exit__(*exc)

            def __getattr__(self, name):
                return getattr(inner, name)

            def get_tensor(self, key):
                t = inner.get_tensor(key)
                spy.reads[(Path(path).name, key)] = spy.reads.get((Path(path).name, key), 0) + 1
                n = t.untyped_storage().nbytes()
                spy.live += n
                spy.peak = max(spy.peak, spy.live)
                weakref.finalize(t, spy._freed, n)
                return t

        return Handle()

    def _freed(self, n: int) -> None:
        self.live -= n


averaging_safe_open = ckpt_io.safe_open


def _big_model_files(tmp: Path, n: int, rows: int = 256) -> tuple[list[Path], int, int]:
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        sd = {f"layer{j}.weight": torch.randn(rows, 1024, generator=gen) for j in range(4)}
        paths.append(tmp / f"m{i}.safetensors")
        save_checkpoint(sd, paths[-1], metadata={"ofa_head_fingerprint": FP})
    model_bytes = 4 * rows * 1024 * 4
    return paths, model_bytes, rows * 1024 * 4


def test_streaming_reads_one_tensor_at_a_time(tmp_path: Path, monkeypatch) -> None:
    paths, model_bytes, tensor_bytes = _big_model_files(tmp_path, 8, rows=64)
    spy = _SpyOpen()
    inner = ckpt_io.TensorReader.get_rows

    def get_rows(reader, key, rows=None):  # count reads per (file, key); track the bytes alive
        t = inner(reader, key, rows)
        spy.reads[(reader.path.name, key)] = spy.reads.get((reader.path.name, key), 0) + 1
        spy.live += t.untyped_storage().nbytes()
        spy.peak = max(spy.peak, spy.live)
        weakref.finalize(t, spy._freed, t.untyped_storage().nbytes())
        return t

    monkeypatch.setattr(ckpt_io.TensorReader, "get_rows", get_rows)
    average_checkpoints(paths)
    assert set(spy.reads.values()) == {1} and len(spy.reads) == 8 * 4
    # one tensor read alive at a time, never N models
    assert spy.peak == tensor_bytes < model_bytes

    spy2 = _SpyOpen()
    monkeypatch.setattr(ckpt_io, "safe_open", spy2)
    for _ in running_average(paths):
        pass
    assert set(spy2.reads.values()) == {1} and len(spy2.reads) == 8 * 4  # each file read once


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from ofa_lib.merge.averaging import average_checkpoints
    from ofa_lib.models.ckpt_io import load_checkpoint

    def hwm():  # this process's peak RSS in bytes (VmHWM is reset by exec, ru_maxrss is not)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    paths = sys.argv[2:]
    base = hwm()
    if sys.argv[1] == "stream":
        out = average_checkpoints(paths)
    else:  # naive control: hold all N state dicts, then average
        sds = [{k: v.clone() for k, v in load_checkpoint(p).items()} for p in paths]
        out = {k: torch.stack([sd[k] for sd in sds]).mean(0) for k in sds[0]}
    print(hwm() - base)
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_rss_independent_of_n(tmp_path: Path) -> None:
    """Peak RSS growth of a child for N=8 stays near that for N=2, unlike loading all N."""
    paths, model_bytes, _ = _big_model_files(tmp_path, 8, rows=1024)  # 16 MiB per model
    runs = {
        "stream2": ["stream", *map(str, paths[:2])],
        "stream8": ["stream", *map(str, paths)],
        "naive8": ["naive", *map(str, paths)],
    }
    procs = {
        name: subprocess.Popen([sys.executable, "-c", _CHILD, *args], stdout=subprocess.PIPE, text=True)
        for name, args in runs.items()
    }
    growth = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, name
        growth[name] = int(out.strip().splitlines()[-1])
    mib = {k: round(v / 2**20, 1) for k, v in growth.items()}
    print("peak RSS growth, MiB:", mib)
    # the harness does see N models when they are all held
    assert growth["naive8"] > growth["stream8"] + 5 * model_bytes, mib
    # streaming: independent of N, and about one output model plus fixed overhead (code pages
    # faulted in on first use, allocator slack)
    assert growth["stream8"] < growth["stream2"] + 0.5 * model_bytes, mib
    assert growth["stream8"] < 2 * model_bytes + 16 * 2**20, mib


# --------------------------------------------------------------------------- greedy soup


def test_greedy_soup_leaves_out_the_bad_candidate(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=gen)
    target = torch.tensor([1.0, 2.0])
    y = x @ target
    # errors from the target: c0 (.3, 0), c1 (9, -7) bad, c2 (0, .3), c3 (-.15, -.15) best alone
    candidates = [[1.3, 2.0], [10.0, -5.0], [1.0, 2.3], [0.85, 1.85]]
    paths = [
        _write(tmp_path, f"c{i}", {"lin.weight": torch.tensor([w]), "lin.bias": torch.zeros(1)})
        for i, w in enumerate(candidates)
    ]
    calls = []

    def score(sd) -> float:
        calls.append(1)
        pred = x @ sd["lin.weight"][0] + sd["lin.bias"][0]
        return -float(((pred - y) ** 2).mean())

    soup, kept = greedy_soup(paths, score)
    assert 1 not in kept
    assert kept[0] == 3  # the best individual comes first
    assert sorted(kept) == [0, 2, 3]
    assert len(calls) == 2 * len(paths) - 1
    expected = torch.tensor([[(1.3 + 1.0 + 0.85) / 3, (2.0 + 2.3 + 1.85) / 3]])
    torch.testing.assert_close(soup["lin.weight"], expected)

    out = tmp_path / "soup.safetensors"
    assert greedy_soup(paths, score, out_path=out) == (None, kept)
    meta = read_metadata(out)
    assert json.loads(meta["ofa_greedy_soup"])["kept"] == kept
    assert len(json.loads(meta["ofa_average_inputs"])) == 3


def test_large_tensors_are_averaged_in_row_blocks(tmp_path, monkeypatch):
    """Blocks of rows (a tiny _BLOCK here) give the same mean as whole tensors, for any row width."""
    from ofa_lib.merge import averaging as A

    gen = torch.Generator().manual_seed(0)
    states = [{"emb": torch.randn(37, 5, generator=gen).to(torch.bfloat16), "wide": torch.randn(2, 40, generator=gen),
               "vec": torch.randn(23, generator=gen), "step": torch.tensor(3)} for _ in range(3)]
    paths = []
    for i, st in enumerate(states):
        paths.append(tmp_path / f"{i}.safetensors")
        ckpt_io.save_checkpoint(st, paths[-1])
    whole = A.average_checkpoints(paths)
    monkeypatch.setattr(ckpt_io, "BLOCK", 16)
    assert ckpt_io.row_blocks((37, 5))[:2] == [slice(0, 3), slice(3, 6)] and ckpt_io.row_blocks((2, 40)) == [slice(0, 1), slice(1, 2)]
    blocked = A.average_checkpoints(paths)
    for key in whole:
        assert blocked[key].dtype == whole[key].dtype
        torch.testing.assert_close(blocked[key], whole[key], rtol=0, atol=0)
    expected = torch.stack([st["emb"].float() for st in states]).mean(0).to(torch.bfloat16)
    torch.testing.assert_close(blocked["emb"], expected)
