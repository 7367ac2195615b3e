"""``ofa-data`` (also ``python -m ofa_lib.data``): list the data sets, fetch hub copies into a mirror, check one.

- ``ofa-data list``: every dataset with its languages, hub repository and where each would be read from now.
- ``ofa-data fetch TASK|DATASET… [--langs a,b] --to DIR``: read the hub copies (the hub, or the clones under
  ``OFA_HUB_ROOT``) and write them in the mirror layout the loaders read, so a login node with a network
  prepares data for compute nodes without one (``OFA_DATA_DIR=DIR``). Idempotent (a file recorded in
  ``DIR/ofa-data.json`` with the same hash is not fetched again), atomic per file, with a progress bar and
  a summary of counts.
- ``ofa-data check DIR``: parse every file of the mirror at ``DIR`` and compare the examples per dataset ×
  language × split with the known sizes (and the hashes recorded when they were fetched).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ofa_lib.data import catalog, hub, loading, locate, readers
from ofa_lib.io import file_sha256, write_json, write_text

MANIFEST = "ofa-data.json"

# Examples per (dataset, lang, split) in the published splits, where known. Mirror datasets: counted with
# these loaders in the offline mirror (they agree with its README wherever the README gives a number; NER
# counts are sentences after skipping malformed ones); the rest from the hub dataset cards.
_MASAKHANER = {"amh": (1750, 250, 500), "hau": (1912, 276, 552), "ibo": (2235, 320, 638), "kin": (2116, 302, 605),
               "lug": (1428, 200, 407), "luo": (644, 92, 186), "pcm": (2124, 306, 600), "swa": (2109, 300, 604),
               "wol": (1871, 267, 539), "yor": (2171, 305, 645)}
_MASAKHANER2 = {"bam": (4462, 638, 1274), "bbj": (3384, 483, 966), "ewe": (3505, 501, 1001), "fon": (4343, 623, 1228),
                "hau": (5716, 816, 1633), "ibo": (7634, 1090, 2181), "kin": (7825, 1118, 2235), "lug": (4942, 706, 1412),
                "luo": (5161, 737, 1474), "mos": (4532, 648, 1294), "nya": (6250, 893, 1785), "pcm": (5646, 806, 1613),
                "sna": (6207, 887, 1773), "swa": (6593, 942, 1883), "tsn": (3489, 499, 996), "twi": (4240, 605, 1211),
                "wol": (4593, 656, 1312), "xho": (5716, 817, 1633), "yor": (6876, 983, 1964), "zul": (5848, 836, 1670)}
_TYDIQA = {"validation": dict(ar=921, bn=113, en=440, fi=782, id=565, ko=276, ru=812, sw=499, te=669),
           "train": dict(en=3696, ko=1625, sw=2755)}


def _known_sizes() -> dict[tuple[str, str, str], int]:
    sizes: dict[tuple[str, str, str], int] = {
        ("mnli15k", "en", "train"): 15_001,
        ("multinli", "en", "train"): 392_702,
        ("conll2003", "en", "train"): 14_042, ("conll2003", "en", "validation"): 3_250,
        ("conll2003", "en", "test"): 3_453,
    }
    for lang in hub.XNLI_LANGS:
        sizes |= {("xnli", lang, "validation"): 2_490, ("xnli", lang, "test"): 5_010}
    for lang in ("de", "en", "es", "nl", "pl", "ru"):
        sizes |= {("wikiann", lang, s): n for s, n in zip(catalog.SPLITS, (20_000, 10_000, 10_000))}
    for name, table in (("masakhaner", _MASAKHANER), ("masakhaner2", _MASAKHANER2)):
        sizes |= {(name, lang, s): n for lang, counts in table.items() for s, n in zip(catalog.SPLITS, counts)}
    sizes |= {("tydiqa_goldp", lang, s): n for s, table in _TYDIQA.items() for lang, n in table.items()}
    sizes |= {("xquad", lang, "test"): 1_190 for lang in hub.XQUAD_LANGS}
    sizes |= {("sib200", lang, s): n for lang in hub.SIB200_LANGS for s, n in zip(catalog.SPLITS, (701, 99, 204))}
    sizes |= {("umsab", lang, s): n for lang in hub.UMSAB_LANGS for s, n in zip(catalog.SPLITS, (1_839, 324, 870))}
    return sizes


KNOWN_SIZES = _known_sizes()


# --------------------------------------------------------------------------- writing the mirror layout
def _clean(text: str, counter: list[int]) -> str:
    """Tabs and line breaks inside a field would break the line formats: each becomes one space (counted)."""
    if any(c in text for c in "\t\n\r"):
        counter[0] += 1
        return text.replace("\r\n", " ").replace("\t", " ").replace("\n", " ").replace("\r", " ")
    return text


def render(dataset: str, split: str, ds: Any) -> tuple[dict[str, str], int]:
    """The mirror file(s) of one split as ``{file name relative to the dataset's split files: text}``, and the
    number of fields whose tabs or line breaks were replaced by spaces."""
    fixed = [0]
    task = catalog.DATASETS[dataset].task
    if dataset == "mnli15k":
        words = ["entailment", "neutral", "contradictory"]
        lines = ["premise\thypo\tlabel"] + [f"{_clean(p, fixed)}\t{_clean(h, fixed)}\t{words[y]}"
                                            for p, h, y in zip(ds["premise"], ds["hypothesis"], ds["label"])]
        return {"0": "\n".join(lines) + "\n"}, fixed[0]
    if task == "nli":
        lines = ["id\tpremise\thypothesis\tlabel"] + [f"{i}\t{_clean(p, fixed)}\t{_clean(h, fixed)}\t{y}" for i, (p, h, y)
                                                      in enumerate(zip(ds["premise"], ds["hypothesis"], ds["label"]))]
        return {"0": "\n".join(lines) + "\n"}, fixed[0]
    if task == "ner":
        names = ds.features["ner_tags"].feature.names
        sentences = []
        for tokens, tags in zip(ds["tokens"], ds["ner_tags"]):
            toks = [_clean(t, fixed).replace(" ", "_") if dataset != "wikiann" else _clean(t, fixed) for t in tokens]
            if dataset == "wikiann":
                sentences.append("\n".join(f"{i}\t{t}\t{names[g]}" for i, (t, g) in enumerate(zip(toks, tags))))
            else:
                sentences.append("\n".join(f"{t} {names[g]}" for t, g in zip(toks, tags)))
        return {"0": "\n\n".join(sentences) + "\n"}, fixed[0]
    if task == "qa":
        articles: list[dict[str, Any]] = []
        for qid, title, context, question, ans in zip(ds["id"], ds["title"], ds["context"], ds["question"], ds["answers"]):
            if not articles or articles[-1]["title"] != title:
                articles.append({"title": title, "paragraphs": []})
            paragraphs = articles[-1]["paragraphs"]
            if not paragraphs or paragraphs[-1]["context"] != context:
                paragraphs.append({"context": context, "qas": []})
            paragraphs[-1]["qas"].append({"id": qid, "question": question, "answers": [
                {"text": t, "answer_start": s} for t, s in zip(ans["text"], ans["answer_start"])]})
        return {"0": json.dumps({"data": articles}, ensure_ascii=False) + "\n"}, 0
    if task == "sib":
        lines = ["index_id\tcategory\ttext"] + [f"{i}\t{catalog.SIB_TOPICS[y]}\t{_clean(t, fixed)}"
                                                for i, (t, y) in enumerate(zip(ds["text"], ds["label"]))]
        return {"0": "\n".join(lines) + "\n"}, fixed[0]
    texts = "\n".join(_clean(t, fixed) for t in ds["text"]) + "\n"
    labels = "\n".join(str(y) for y in ds["label"]) + "\n"
    return {"0": texts, "1": labels}, fixed[0]


def _units(names: list[str], langs: list[str] | None) -> list[tuple[str, str, str]]:
    """(dataset, lang, split) to fetch: every split of every hub language (or of ``langs``) of each dataset."""
    datasets_: list[str] = []
    for name in names:
        if name in hub.TASK_DATASETS:
            datasets_ += list(hub.TASK_DATASETS[name])
        elif name in catalog.DATASETS:
            datasets_.append(name)
        else:
            raise SystemExit(f"error: {name!r} is neither a task ({', '.join(hub.TASK_DATASETS)}) "
                             f"nor a dataset ({', '.join(catalog.DATASETS)})")
    units = []
    for dataset in dict.fromkeys(datasets_):
        src = hub.SOURCES[dataset]
        chosen = [lang for lang in src.configs if not langs or lang in langs]
        units += [(dataset, lang, split) for lang in chosen for split in catalog.DATASETS[dataset].splits
                  if split in src.splits]
    if not units:
        raise SystemExit(f"error: no language of {', '.join(names)} is among --langs {','.join(langs or [])}")
    return units


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {"files": {}}


def fetch(names: list[str], to: str | Path, langs: list[str] | None = None, *, force: bool = False,
          progress: bool = True) -> list[dict[str, Any]]:
    """Fetch the hub copies of ``names`` (tasks or datasets) into the mirror ``to``; one summary row per split."""
    root = Path(to).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(root)
    rows = []
    for dataset, lang, split in tqdm(_units(names, langs), desc="ofa-data fetch", unit="split", disable=not progress):
        paths = locate.mirror_files(dataset, root, lang, split)
        rels = [str(p.relative_to(root)) for p in paths]
        recorded = [manifest["files"].get(r) for r in rels]
        if not force and all(rec and p.is_file() and file_sha256(p) == rec["sha256"]
                             for rec, p in zip(recorded, paths)):
            rows.append({"dataset": dataset, "lang": lang, "split": split, "examples": recorded[0]["examples"],
                         "state": "present", "file": rels[0]})
            continue
        try:
            ds = loading.load_split(dataset, lang, split, source="hub", map_date_to_o=False)
        except catalog.DataError as exc:
            rows.append({"dataset": dataset, "lang": lang, "split": split, "examples": 0, "state": "failed",
                         "file": rels[0], "error": str(exc)[:300]})
            continue
        texts, fixed = render(dataset, split, ds)
        source = loading.source_of(dataset, lang, split, source="hub", map_date_to_o=False)
        for path, rel, text in zip(paths, rels, texts.values()):
            write_text(path, text)  # atomic per file: a kill leaves the old file or none
            manifest["files"][rel] = {"dataset": dataset, "lang": lang, "split": split, "examples": len(ds),
                                      "sha256": file_sha256(path), "bytes": path.stat().st_size,
                                      "fields_with_whitespace_replaced": fixed, "source": source,
                                      "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if dataset == "sib200":
            write_text(paths[0].parent / "labels.txt", "\n".join(catalog.SIB_TOPICS) + "\n")
        write_json(root / MANIFEST, manifest)  # after every split: what is recorded is on disk
        rows.append({"dataset": dataset, "lang": lang, "split": split, "examples": len(ds), "state": "fetched",
                     "file": rels[0]})
    return rows


# --------------------------------------------------------------------------- checking a mirror
def check(root: str | Path) -> list[dict[str, Any]]:
    """Parse every file of the mirror at ``root``; one row per dataset × language × split with its state:
    ``ok``, ``count`` (differs from the known size), ``unknown-size``, ``hash`` (differs from the hash recorded
    at fetch time) or ``error`` (cannot be read)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise SystemExit(f"error: {root} is not a folder")
    manifest = _read_manifest(root)
    rows = []
    for dataset, info in catalog.DATASETS.items():
        locate.discover_languages.cache_clear()
        for lang in locate.discover_languages(dataset, str(root)):
            for split in info.splits:
                paths = locate.mirror_files(dataset, root, lang, split)
                if not all(p.is_file() for p in paths):
                    continue
                row: dict[str, Any] = {"dataset": dataset, "lang": lang, "split": split,
                                       "file": str(paths[0].relative_to(root)),
                                       "expected": KNOWN_SIZES.get((dataset, lang, split))}
                bad_hash = [str(p.relative_to(root)) for p in paths
                            if str(p.relative_to(root)) in manifest["files"]
                            and manifest["files"][str(p.relative_to(root))]["sha256"] != file_sha256(p)]
                try:
                    columns, _ = readers.PARSERS[dataset](paths, {"map_date_to_o": True})
                    row["examples"] = len(next(iter(columns.values())))
                except catalog.DataError as exc:
                    row.update(examples=None, state="error", error=str(exc))
                    rows.append(row)
                    continue
                if bad_hash:
                    row.update(state="hash", error=f"{', '.join(bad_hash)} changed since it was fetched")
                elif row["examples"] == 0:
                    row.update(state="error", error="no examples")
                elif row["expected"] is None:
                    row["state"] = "unknown-size"
                else:
                    row["state"] = "ok" if row["examples"] == row["expected"] else "count"
                rows.append(row)
    return rows


def list_rows() -> list[dict[str, Any]]:
    """One row per dataset: task, languages (mirror / hub), hub repository, where it is read from now."""
    rows = []
    root = locate.mirror_root()
    for name, info in catalog.DATASETS.items():
        src = hub.SOURCES[name]
        mirror = locate.discover_languages(name, str(root)) if root.is_dir() else ()
        usable = locate.hub_usable(name)
        now = ("mirror" if mirror else "") + ("+" if mirror and usable else "") + \
              (("local clone" if usable != src.repo else "hub") if usable else "")
        rows.append({"dataset": name, "task": info.task, "mirror_langs": len(mirror),
                     "hub_langs": len(src.configs), "hub": src.repo + (f"@{src.revision}" if src.revision else ""),
                     "read_from": now or "nowhere (ofa-data fetch)", "licence": src.licence})
    return rows


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows)
    if frame.empty:
        print("(nothing)")
        return
    with pd.option_context("display.width", 220, "display.max_rows", 2000, "display.max_colwidth", 90):
        print(frame[[c for c in columns if c in frame]].to_string(index=False))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ofa-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="datasets, languages and where each is read from now")
    p = sub.add_parser("fetch", help="copy hub data into a mirror folder")
    p.add_argument("names", nargs="+", metavar="TASK|DATASET", help=f"tasks {', '.join(hub.TASK_DATASETS)} or datasets")
    p.add_argument("--langs", default=None, help="comma-separated languages (default: all of each dataset)")
    p.add_argument("--to", required=True, help="the mirror folder to write (then OFA_DATA_DIR=that folder)")
    p.add_argument("--force", action="store_true", help="fetch again files that are already there")
    p = sub.add_parser("check", help="count the examples of a mirror against the known sizes")
    p.add_argument("dir")
    args = parser.parse_args(argv)
    if args.command == "list":
        _print_table(list_rows(), ["dataset", "task", "mirror_langs", "hub_langs", "read_from", "hub", "licence"])
        print(f"mirror: {locate.mirror_root()}; hub: {'offline' if hub.hub_offline() else 'online'}; "
              f"OFA_HUB_ROOT: {__import__('os').environ.get('OFA_HUB_ROOT') or '-'}")
        return 0
    if args.command == "fetch":
        langs = [x for x in args.langs.split(",") if x] if args.langs else None
        rows = fetch(args.names, args.to, langs, force=args.force)
        _print_table(rows, ["dataset", "lang", "split", "examples", "state", "file", "error"])
        states = {s: sum(r["state"] == s for r in rows) for s in ("fetched", "present", "failed")}
        print(f"{states['fetched']} split(s) fetched, {states['present']} already present, {states['failed']} failed; "
              f"{sum(r['examples'] for r in rows):,} examples in {args.to}. Use it with OFA_DATA_DIR={args.to}")
        return 1 if states["failed"] else 0
    rows = check(args.dir)
    _print_table(rows, ["dataset", "lang", "split", "examples", "expected", "state", "file", "error"])
    bad = [r for r in rows if r["state"] in ("count", "hash", "error")]
    unknown = sum(r["state"] == "unknown-size" for r in rows)
    print(f"{len(rows)} split(s) checked: {len(rows) - len(bad) - unknown} match the known sizes, {unknown} of unknown "
          f"size, {len(bad)} wrong" + (": " + "; ".join(f"{r['file']} ({r['state']})" for r in bad[:10]) if bad else ""))
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
