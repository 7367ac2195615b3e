"""Public hub sources of every benchmark in :mod:`ofa_lib.data`: repository, configs, splits, columns.

One :class:`HubSource` per dataset says where its public copy lives on the Hugging Face hub and how a
row of that copy becomes a row of the study's schema (the columns and label ids the mirror loaders give).
Which facts were read from the dataset cards and which could not be checked without a network is
recorded per source in ``verified`` / ``unverified`` and in ``docs/data.md``.

Two hub layouts occur:

- ``layout="configs"``: the repository's ``README.md`` declares ``configs:`` (one per language, or one
  for all) with parquet ``data_files`` and ``dataset_info`` features; loaded with
  ``datasets.load_dataset(repo, config, split=...)``.
- ``layout="parquet-branch"``: repositories that still hold a loading script (which ``datasets`` ≥ 4
  no longer runs) are read from the hub's automatic parquet conversion, revision
  ``refs/convert/parquet``, laid out ``<config>/<split>/*.parquet`` with the features in the parquet
  schema; loaded with ``datasets.load_dataset(repo, revision=..., data_files={split: pattern})``.

``OFA_HUB_ROOT=/dir`` makes ``org/name`` resolve to the local clone ``/dir/org/name`` (same layout).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ofa_lib import tasks as tasks_lib

PARQUET_BRANCH = "refs/convert/parquet"

# --------------------------------------------------------------------------- language lists
XNLI_LANGS = ("ar", "bg", "de", "el", "en", "es", "fr", "hi", "ru", "sw", "th", "tr", "ur", "vi", "zh")
INDICXNLI_LANGS = ("as", "bn", "gu", "hi", "kn", "ml", "mr", "or", "pa", "ta", "te")
# XTREME's 40 PAN-X languages, plus the WikiANN languages the paper also tested (am ay ig qu rw) and
# pl of the offline mirror; every one is a config of unimelb-nlp/wikiann.
PANX_XTREME_LANGS = ("af", "ar", "bg", "bn", "de", "el", "en", "es", "et", "eu", "fa", "fi", "fr", "he", "hi",
                     "hu", "id", "it", "ja", "jv", "ka", "kk", "ko", "ml", "mr", "ms", "my", "nl", "pt", "ru",
                     "sw", "ta", "te", "th", "tl", "tr", "ur", "vi", "yo", "zh")
WIKIANN_LANGS = tuple(sorted(set(PANX_XTREME_LANGS) | {"am", "ay", "ig", "qu", "rw", "pl"}))
MASAKHANER_LANGS = ("amh", "hau", "ibo", "kin", "lug", "luo", "pcm", "swa", "wol", "yor")
MASAKHANER2_LANGS = ("bam", "bbj", "ewe", "fon", "hau", "ibo", "kin", "lug", "luo", "mos", "nya", "pcm", "sna",
                     "swa", "tsn", "twi", "wol", "xho", "yor", "zul")
TYDIQA_LANGS = {"ar": "arabic", "bn": "bengali", "en": "english", "fi": "finnish", "id": "indonesian",
                "ko": "korean", "ru": "russian", "sw": "swahili", "te": "telugu"}
XQUAD_LANGS = ("ar", "de", "el", "en", "es", "hi", "ro", "ru", "th", "tr", "vi", "zh")
UMSAB_LANGS = ("arabic", "english", "french", "german", "hindi", "italian", "portuguese", "spanish")
SIB200_LANGS = tuple("""
ace_Arab ace_Latn acm_Arab acq_Arab aeb_Arab afr_Latn ajp_Arab aka_Latn als_Latn amh_Ethi apc_Arab arb_Arab
arb_Latn ars_Arab ary_Arab arz_Arab asm_Beng ast_Latn awa_Deva ayr_Latn azb_Arab azj_Latn bak_Cyrl bam_Latn
ban_Latn bel_Cyrl bem_Latn ben_Beng bho_Deva bjn_Arab bjn_Latn bod_Tibt bos_Latn bug_Latn bul_Cyrl cat_Latn
ceb_Latn ces_Latn cjk_Latn ckb_Arab crh_Latn cym_Latn dan_Latn deu_Latn dik_Latn dyu_Latn dzo_Tibt ell_Grek
eng_Latn epo_Latn est_Latn eus_Latn ewe_Latn fao_Latn fij_Latn fin_Latn fon_Latn fra_Latn fur_Latn fuv_Latn
gaz_Latn gla_Latn gle_Latn glg_Latn grn_Latn guj_Gujr hat_Latn hau_Latn heb_Hebr hin_Deva hne_Deva hrv_Latn
hun_Latn hye_Armn ibo_Latn ilo_Latn ind_Latn isl_Latn ita_Latn jav_Latn jpn_Jpan kab_Latn kac_Latn kam_Latn
kan_Knda kas_Arab kas_Deva kat_Geor kaz_Cyrl kbp_Latn kea_Latn khk_Cyrl khm_Khmr kik_Latn kin_Latn kir_Cyrl
kmb_Latn kmr_Latn knc_Arab knc_Latn kon_Latn kor_Hang lao_Laoo lij_Latn lim_Latn lin_Latn lit_Latn lmo_Latn
ltg_Latn ltz_Latn lua_Latn lug_Latn luo_Latn lus_Latn lvs_Latn mag_Deva mai_Deva mal_Mlym mar_Deva min_Arab
min_Latn mkd_Cyrl mlt_Latn mni_Beng mos_Latn mri_Latn mya_Mymr nld_Latn nno_Latn nob_Latn npi_Deva nqo_Nkoo
nso_Latn nus_Latn nya_Latn oci_Latn ory_Orya pag_Latn pan_Guru pap_Latn pbt_Arab pes_Arab plt_Latn pol_Latn
por_Latn prs_Arab quy_Latn ron_Latn run_Latn rus_Cyrl sag_Latn san_Deva sat_Olck scn_Latn shn_Mymr sin_Sinh
slk_Latn slv_Latn smo_Latn sna_Latn snd_Arab som_Latn sot_Latn spa_Latn srd_Latn srp_Cyrl ssw_Latn sun_Latn
swe_Latn swh_Latn szl_Latn tam_Taml taq_Latn taq_Tfng tat_Cyrl tel_Telu tgk_Cyrl tgl_Latn tha_Thai tir_Ethi
tpi_Latn tsn_Latn tso_Latn tuk_Latn tum_Latn tur_Latn twi_Latn tzm_Tfng uig_Arab ukr_Cyrl umb_Latn urd_Arab
uzn_Latn vec_Latn vie_Latn war_Latn wol_Latn xho_Latn ydd_Hebr yor_Latn yue_Hant zho_Hans zho_Hant zsm_Latn
zul_Latn""".split())

# The languages the published study evaluated (the columns of its released per-run results).
PAPER_LANGS: dict[str, tuple[str, ...]] = {
    "xnli": XNLI_LANGS,
    "indicxnli": INDICXNLI_LANGS,
    "wikiann": ("am", "ar", "ay", "bg", "de", "el", "en", "es", "fi", "fr", "he", "hi", "hu", "ig", "ja", "qu",
                "ru", "rw", "sw", "ta", "te", "tr", "ur", "vi", "yo", "zh"),
    "masakhaner": MASAKHANER_LANGS,
    "masakhaner2": tuple(lang for lang in MASAKHANER2_LANGS if lang != "luo"),
    "tydiqa_goldp": tuple(TYDIQA_LANGS),
}


@dataclass(frozen=True)
class HubSource:
    """Where one dataset's public copy lives and how its rows map onto the study's schema."""

    repo: str                          # hub repository id, org/name
    configs: dict[str, str]            # study language -> hub config name
    splits: dict[str, str]             # study split -> hub split (a slice such as "train[:15001]" is allowed)
    licence: str
    layout: str = "configs"            # "configs" | "parquet-branch" (see the module docstring)
    columns: dict[str, str] = field(default_factory=dict)  # study column -> hub column, where they differ
    id_prefix: dict[str, str] = field(default_factory=dict)  # one config for all languages: lang -> id prefix
    label_aliases: dict[str, str] = field(default_factory=dict)  # hub label name -> study label name
    verified: str = ""                 # facts read from the dataset card
    unverified: str = ""               # what could not be checked without a network

    @property
    def revision(self) -> str | None:
        return PARQUET_BRANCH if self.layout == "parquet-branch" else None

    def data_files(self, lang: str, split: str) -> dict[str, str] | None:
        """``data_files`` for ``load_dataset`` (parquet-branch layout only)."""
        if self.layout != "parquet-branch":
            return None
        hub_split = self.splits[split].split("[")[0]
        return {hub_split: f"{self.configs[lang]}/{hub_split}/*.parquet"}

    def local_dir(self) -> Path | None:
        """The clone ``$OFA_HUB_ROOT/org/name`` when that variable is set and the folder exists."""
        root = os.environ.get("OFA_HUB_ROOT")
        if not root:
            return None
        path = Path(root).expanduser() / self.repo
        return path if path.is_dir() else None


def _same(langs: tuple[str, ...]) -> dict[str, str]:
    return {lang: lang for lang in langs}


SPLITS3 = {"train": "train", "validation": "validation", "test": "test"}
NLI_EVAL = {"validation": "validation", "test": "test"}

SOURCES: dict[str, HubSource] = {
    "multinli": HubSource(
        "nyu-mll/multi_nli", {"en": "default"}, {"train": "train"}, "OANC / CC BY-SA 3.0 / CC BY 3.0 (mixed, per genre)",
        verified="392,702 train pairs; label ClassLabel entailment/neutral/contradiction (as in XNLI's all_languages card)",
        unverified="that the repository is parquet on main with a 'default' config; premise/hypothesis column names"),
    "mnli15k": HubSource(
        "nyu-mll/multi_nli", {"en": "default"}, {"train": "train[:15001]"}, "OANC / CC BY-SA 3.0 / CC BY 3.0",
        verified="MultiNLI train is the source of the slice",
        unverified="that the first 15,001 hub rows are the mirror's pairs in the same order; the hub text is not "
                   "Moses-tokenised as the mirror's is, so texts differ while labels should agree"),
    "xnli": HubSource(
        "facebook/xnli", _same(XNLI_LANGS), NLI_EVAL, "CC BY-NC 4.0",
        verified="one config per language (15); premise, hypothesis, label ClassLabel entailment/neutral/contradiction; "
                 "validation 2,490 and test 5,010 per language; parquet on main",
        unverified="exact data_files paths"),
    "indicxnli": HubSource(
        "Divyanshu/indicxnli", _same(INDICXNLI_LANGS), NLI_EVAL, "CC0 1.0", layout="parquet-branch",
        verified="11 languages as bn gu hi kn ml mr or pa ta te; licence cc0-1.0; a loading-script repository whose "
                 "parquet conversion holds one folder per language",
        unverified="column names premise/hypothesis/label and the label type in the parquet conversion; split sizes"),
    "wikiann": HubSource(
        "unimelb-nlp/wikiann", _same(WIKIANN_LANGS), SPLITS3, "ODC-BY (WikiANN; the card says unknown)",
        verified="one config per language (176, incl. every language listed here); loading script deleted, parquet on main; "
                 "tokens, ner_tags ClassLabel O/B-PER/I-PER/B-ORG/I-ORG/B-LOC/I-LOC, langs, spans; Rahimi et al. splits",
        unverified="per-language split sizes beyond the 6 mirror languages"),
    "masakhaner": HubSource(
        "masakhane/masakhaner", _same(MASAKHANER_LANGS), SPLITS3, "CC BY-NC 4.0 (AFL-3.0 on the hub card)",
        layout="parquet-branch",
        verified="the 10 languages",
        unverified="that the repository still holds a loading script (hence the parquet branch); "
                   "ner_tags ClassLabel names incl. B-DATE/I-DATE"),
    "masakhaner2": HubSource(
        "masakhane/masakhaner2", _same(MASAKHANER2_LANGS), SPLITS3, "CC BY-NC 4.0 (AFL-3.0 on the hub card)",
        layout="parquet-branch",
        verified="20 languages; loading script masakhaner2.py; parquet conversion in <config>/<split>/ folders; licence afl-3.0",
        unverified="ner_tags ClassLabel names (expected O, B-PER … I-DATE)"),
    "conll2003": HubSource(
        "eriktks/conll2003", {"en": "conll2003"}, SPLITS3, "research use (Reuters RCV1 licence)", layout="parquet-branch",
        label_aliases={"B-MISC": "O", "I-MISC": "O"},
        unverified="repository id, config name and layout; the mirror's 14,042 train sentences against the hub's "
                   "(the hub copy may drop one document marker); MISC mapped to O as in the mirror"),
    "tydiqa_goldp": HubSource(
        "google-research-datasets/tydiqa", {lang: "secondary_task" for lang in TYDIQA_LANGS},
        {"train": "train", "validation": "validation"}, "Apache-2.0",
        id_prefix={lang: f"{name}-" for lang, name in TYDIQA_LANGS.items()},
        verified="config secondary_task (the GoldP task), parquet on main; id, title, context, question, answers "
                 "(text, answer_start int32); train 49,881 and validation 5,077 over all languages (the mirror's 9 "
                 "validation files sum to 5,077); ids start with the language name (mirror ids: 'finnish--…')",
        unverified="per-language train sizes other than en/ko/sw"),
    "xquad": HubSource(
        "google/xquad", {lang: f"xquad.{lang}" for lang in XQUAD_LANGS}, {"test": "validation"}, "CC BY-SA 4.0",
        unverified="configs xquad.<lang> with one 'validation' split of 1,190; no title column (the mirror has titles)"),
    "sib200": HubSource(
        "Davlan/sib200", _same(SIB200_LANGS), SPLITS3, "CC BY-SA 4.0", layout="parquet-branch",
        unverified="configs named lang_Script; columns index_id, category, text; the layout"),
    "umsab": HubSource(
        "cardiffnlp/tweet_sentiment_multilingual", _same(UMSAB_LANGS), SPLITS3, "CC BY 3.0 (tweets: Twitter terms)",
        layout="parquet-branch",
        unverified="configs by language name; text, label ClassLabel negative/neutral/positive; 1,839/324/870 per language"),
}

# Dataset folders of each task that ``ofa-data fetch TASK`` fetches (the paper's data for that task).
TASK_DATASETS: dict[str, tuple[str, ...]] = {name: task.fetch for name, task in tasks_lib.TASKS.items()}


def hub_offline() -> bool:
    """True when the hub must not be contacted (``HF_DATASETS_OFFLINE`` or ``HF_HUB_OFFLINE`` set)."""
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
