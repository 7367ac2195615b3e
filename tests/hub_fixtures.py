"""Local copies of the public hub repositories in their own layout, built from rows of the offline mirror.

``build_hub_root(root, units)`` writes, for each dataset of ``units``, the repository ``root/org/name`` of
its :class:`ofa_lib.data.hub.HubSource` the way the hub holds it:

- ``configs`` layout: ``README.md`` with YAML ``configs:`` (``data_files`` per split) and ``dataset_info``
  features (ClassLabel names), parquet files ``<config>/<split>-00000-of-00001.parquet``;
- ``parquet-branch`` layout (the hub's conversion of loading-script repositories): ``<config>/<split>/0000.parquet``
  with the features in the parquet schema.

Rows are converted from the study's schema back into each hub schema (hub column names, the hub's
ClassLabel names and extra columns such as WikiANN's ``langs``/``spans``), so that loading them through
``ofa_lib.data`` exercises the real mapping. ``units`` maps ``(dataset, lang, split)`` to the number of
mirror rows to take (``None``: all of them, so that counts are the published ones).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import yaml

from ofa_lib.data import catalog, hub, loading

STRING = datasets.Value("string")
NER_HUB_NAMES = {
    "wikiann": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"],
    "masakhaner": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-DATE", "I-DATE"],
    "masakhaner2": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-DATE", "I-DATE"],
    "conll2003": ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"],
}


def mirror_rows(dataset: str, lang: str, split: str, n: int | None) -> datasets.Dataset:
    """The first ``n`` rows the mirror loader gives (NER with DATE kept, as the hub has it)."""
    # the mirror has only the 15k slice of MultiNLI: it stands in for the full train split's first rows
    ds = loading.load_split("mnli15k" if dataset == "multinli" else dataset, lang, split, source="mirror",
                         map_date_to_o=False)
    return ds if n is None or n >= len(ds) else ds.select(range(n))


def to_hub_schema(dataset: str, lang: str, rows: datasets.Dataset, nli_names: list[str] | None = None) -> datasets.Dataset:
    """Study rows -> rows in the hub repository's own schema."""
    task = catalog.DATASETS[dataset].task
    if task == "nli":
        names = nli_names or catalog.NLI_LABELS
        labels = [names.index(catalog.NLI_LABELS[v]) for v in rows["label"]]
        cols: dict[str, Any] = {"premise": rows["premise"], "hypothesis": rows["hypothesis"], "label": labels}
        feats = {"premise": STRING, "hypothesis": STRING, "label": datasets.ClassLabel(names=names)}
        if dataset in ("multinli", "mnli15k"):  # nyu-mll/multi_nli has ids and the genre too
            cols = {"promptID": list(range(len(rows))), "pairID": [f"{i}n" for i in range(len(rows))], **cols,
                    "genre": ["fiction"] * len(rows)}
            feats = {"promptID": datasets.Value("int32"), "pairID": STRING, **feats, "genre": STRING}
        return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))
    if task == "ner":
        study = catalog.ner_labels(with_date=True)
        names = NER_HUB_NAMES[dataset]
        tags = [[names.index(study[t]) for t in sent] for sent in rows["ner_tags"]]
        cols = {"tokens": rows["tokens"], "ner_tags": tags}
        feats = {"tokens": datasets.List(STRING), "ner_tags": datasets.List(datasets.ClassLabel(names=names))}
        if dataset == "wikiann":
            cols |= {"langs": [[lang] * len(t) for t in rows["tokens"]], "spans": [[] for _ in rows["tokens"]]}
            feats |= {"langs": datasets.List(STRING), "spans": datasets.List(STRING)}
        else:
            cols = {"id": [str(i) for i in range(len(rows))], **cols}
            feats = {"id": STRING, **feats}
        return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))
    if task == "qa":
        answers = datasets.Features({"text": datasets.List(STRING), "answer_start": datasets.List(datasets.Value("int32"))})
        cols = {"id": rows["id"], "title": rows["title"], "context": rows["context"], "question": rows["question"],
                "answers": rows["answers"]}
        feats = {"id": STRING, "title": STRING, "context": STRING, "question": STRING, "answers": answers}
        if dataset == "xquad":  # google/xquad has no title
            del cols["title"], feats["title"]
        return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))
    if task == "sib":
        cols = {"index_id": list(range(len(rows))), "category": [catalog.SIB_TOPICS[v] for v in rows["label"]],
                "text": rows["text"]}
        feats = {"index_id": datasets.Value("int64"), "category": STRING, "text": STRING}
        return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))
    return datasets.Dataset.from_dict({"text": rows["text"], "label": rows["label"]}, features=datasets.Features(
        {"text": STRING, "label": datasets.ClassLabel(names=catalog.SENTIMENT_LABELS)}))


def build_hub_root(root: Path, units: dict[tuple[str, str, str], int | None],
                   nli_names: list[str] | None = None) -> dict[tuple[str, str, str], int]:
    """Write the hub repositories holding ``units`` under ``root``; returns the rows written per unit."""
    by_repo: dict[str, dict[tuple[str, str], list[datasets.Dataset]]] = {}
    written: dict[tuple[str, str, str], int] = {}
    for (dataset, lang, split), n in units.items():
        src = hub.SOURCES[dataset]
        rows = to_hub_schema(dataset, lang, mirror_rows(dataset, lang, split, n), nli_names)
        written[(dataset, lang, split)] = len(rows)
        hub_split = src.splits[split].split("[")[0]
        by_repo.setdefault(src.repo, {}).setdefault((src.configs[lang], hub_split), []).append(rows)
        by_repo[src.repo].setdefault(("__layout__", src.layout), [])
    for repo, parts in by_repo.items():
        layout = next(key[1] for key in parts if key[0] == "__layout__")
        folder = root / repo
        folder.mkdir(parents=True, exist_ok=True)
        configs: dict[str, list[dict[str, str]]] = {}
        infos: dict[str, datasets.Features] = {}
        for (config, split), chunks in parts.items():
            if config == "__layout__":
                continue
            table = datasets.concatenate_datasets(chunks)
            rel = f"{config}/{split}/0000.parquet" if layout == "parquet-branch" else \
                f"{config}/{split}-00000-of-00001.parquet"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            table.to_parquet(str(folder / rel))
            configs.setdefault(config, []).append({"split": split, "path": rel})
            infos[config] = table.features
        if layout == "configs":
            meta = {"configs": [{"config_name": c, "data_files": files} for c, files in configs.items()],
                    "dataset_info": [{"config_name": c, "features": f._to_yaml_list()} for c, f in infos.items()]}
            (folder / "README.md").write_text("---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
                                              + f"---\n# {repo} (test fixture built from the offline mirror)\n",
                                              encoding="utf-8")
    return written
