"""Shared pytest fixtures. Keep each fixture small and documented; add new ones below."""

from __future__ import annotations

import os
import shutil
import string

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TINY_WORDS = (
    "the of and to in a is was for on that with as by at from it his her he she are be this "
    "an which or had were who their has have not but its one also first new they after two "
    "been more when there into other year city world war time people state river north south "
    "john york new what where how many"
).split()


def build_tiny_tokenizer():
    """A real XLM-R-style fast tokenizer (a few hundred Unigram pieces), built offline.

    Ids follow XLM-R: ``<s>``=0, ``<pad>``=1, ``</s>``=2, ``<unk>``=3; then ``▁``, single
    characters, ``▁``+character and ``▁``+common English words, so any Latin text tokenizes
    (mostly character by character) with offsets. Post-processing is XLM-R's
    ``<s> A </s>`` / ``<s> A </s></s> B </s>``.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import XLMRobertaTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation + "äöüéèàçñßø")
    words = list(dict.fromkeys(_TINY_WORDS))
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -5.0) for c in chars]
    vocab += [("▁" + c, -5.5) for c in chars]
    vocab += [("▁" + w, -3.0) for w in words]
    vocab += [("<mask>", 0.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=3))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return XLMRobertaTokenizerFast(tokenizer_object=backend)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Session-wide tiny XLM-R-style fast tokenizer (see ``build_tiny_tokenizer``)."""
    return build_tiny_tokenizer()


@pytest.fixture
def tmp_outputs(tmp_path, monkeypatch):
    """Point ``OFA_OUTPUTS`` (hence ``outputs/cache``) at a fresh temporary folder."""
    out = tmp_path / "outputs"
    out.mkdir()
    monkeypatch.setenv("OFA_OUTPUTS", str(out))
    return out


# ---------------------------------------------------------------- disk: a test module's files go when it passes
# Smoke runs write real checkpoints (a few hundred MB each), and the whole suite would hold tens of GB under
# pytest's basetemp until it ends. A module whose tests all passed leaves nothing behind: the folders it made
# there (function tmp_path and its fixtures' mktemp) are removed when the module is done. A module with a
# failure keeps them for inspection, and pytest keeps only the last run's basetemp (pyproject.toml).
_FAILED_MODULES: set[str] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        _FAILED_MODULES.add(item.module.__name__)


@pytest.fixture(scope="module", autouse=True)
def _module_tmp_cleanup(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    yield
    if request.module.__name__ in _FAILED_MODULES or os.environ.get("OFA_KEEP_TMP"):
        return
    for path in set(base.iterdir()) - before:
        shutil.rmtree(path, ignore_errors=True)
