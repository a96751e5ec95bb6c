"""SQuAD data: load (official JSON or HF datasets), validate, hash, split, store.

Records are flat dicts in the Hugging Face ``squad`` schema plus ``is_impossible``::

    {"id": str, "title": str, "context": str, "question": str,
     "answers": {"text": [str, ...], "answer_start": [int, ...]},
     "is_impossible": bool}
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spanflow.io_utils import atomic_open, atomic_write_json, atomic_write_text

__all__ = [
    "DataValidationError",
    "Record",
    "atomic_write_json",
    "atomic_write_text",
    "content_hash",
    "file_md5",
    "ingest",
    "limit_records",
    "load_hub_dataset",
    "load_squad_json",
    "read_jsonl",
    "sample_articles",
    "split_by_article",
    "validate",
    "write_jsonl_atomic",
]

Record = dict[str, Any]

SUPPORTED_VERSIONS = ("1.1", "2.0")
# Local data files that `ingest` hands to a `datasets` builder (not the SQuAD reader).
_BUILDER_BY_SUFFIX = {".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DataValidationError(ValueError):
    """Bad input data; the message names source, question id (if any) and reason."""

    def __init__(self, source: str | Path, reason: str, qid: str | None = None) -> None:
        self.source = str(source)
        self.qid = qid
        self.reason = reason
        where = f"question {qid}: " if qid is not None else ""
        super().__init__(f"{self.source}: {where}{reason}")


def _clip(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _type_name(value: Any) -> str:
    return type(value).__name__


# --------------------------------------------------------------------------- loading


def _require(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], err: Any) -> Any:
    """obj[key] with a type check; `err(reason)` builds the exception."""
    if key not in obj:
        raise err(f"missing field '{key}'")
    value = obj[key]
    # bool is an int subclass; never accept it where a number or string is expected
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise err(f"field '{key}' must be {names}, got {_type_name(value)}")
    return value


def _normalize_version(raw: Any) -> str | None:
    if not isinstance(raw, str):
        return None
    version = raw.strip().lower().removeprefix("v")
    return version if version in SUPPORTED_VERSIONS else None


def is_gzip_name(path: Path | str) -> bool:
    return str(path).lower().endswith(".json.gz")


def _suffix(path: Path) -> str:
    return ".json" if is_gzip_name(path) else path.suffix.lower()


def names_a_file(source: str) -> bool:
    """Whether `source` can only be a local file (a SQuAD .json/.json.gz or a .jsonl/.parquet/.csv), never a
    Hub dataset name; `user/dataset` may be either, and only loading it tells."""
    suffix = _suffix(Path(source))
    return suffix == ".json" or suffix in _BUILDER_BY_SUFFIX


def load_squad_json(path: Path | str) -> tuple[list[Record], str]:
    """Read an official SQuAD v1.1/v2.0 JSON file, plain or gzipped (.json.gz); returns (flat records, version).

    Only structure and types are checked here; content checks live in `validate`.
    """
    path = Path(path)
    src = str(path)
    try:
        raw = path.read_bytes()
        if is_gzip_name(path):
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise DataValidationError(src, "file not found") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataValidationError(src, f"not a readable gzip file ({type(exc).__name__}: {exc})") from None
    except UnicodeDecodeError as exc:
        raise DataValidationError(src, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataValidationError(src, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None

    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataValidationError(src, "no top-level 'data' list (not a SQuAD JSON file?)")
    header_version = _normalize_version(doc.get("version"))

    def at(loc_: str) -> Any:  # error factory for places without a question id
        return lambda reason: DataValidationError(src, f"{loc_}: {reason}")

    records: list[Record] = []
    for a_idx, article in enumerate(doc["data"]):
        loc = f"data[{a_idx}]"
        if not isinstance(article, dict):
            raise DataValidationError(src, f"{loc}: article must be an object")
        title = _require(article, "title", str, at(loc))
        paragraphs = _require(article, "paragraphs", list, at(loc))
        for p_idx, para in enumerate(paragraphs):
            ploc = f"{loc}.paragraphs[{p_idx}]"
            if not isinstance(para, dict):
                raise DataValidationError(src, f"{ploc}: paragraph must be an object")
            context = _require(para, "context", str, at(ploc))
            qas = _require(para, "qas", list, at(ploc))
            for q_idx, qa in enumerate(qas):
                qloc = f"{ploc}.qas[{q_idx}]"
                if not isinstance(qa, dict):
                    raise DataValidationError(src, f"{qloc}: question must be an object")
                qid = _require(qa, "id", str, at(qloc))

                def err(reason: str, qid: str = qid) -> DataValidationError:
                    return DataValidationError(src, reason, qid=qid)

                question = _require(qa, "question", str, err)
                answers_raw = _require(qa, "answers", list, err)
                texts: list[str] = []
                starts: list[int] = []
                for n, ans in enumerate(answers_raw):
                    if not isinstance(ans, dict):
                        raise err(f"answers[{n}] must be an object, got {_type_name(ans)}")

                    def aerr(reason: str, n: int = n) -> DataValidationError:
                        return err(f"answers[{n}]: {reason}")

                    texts.append(_require(ans, "text", str, aerr))
                    starts.append(_require(ans, "answer_start", int, aerr))
                if "is_impossible" in qa:
                    impossible = _require(qa, "is_impossible", bool, err)
                else:  # v1.1 has no unanswerable questions; v2.0 files carry the flag
                    impossible = header_version == "2.0" and not texts
                records.append(
                    {
                        "id": qid,
                        "title": title,
                        "context": context,
                        "question": question,
                        "answers": {"text": texts, "answer_start": starts},
                        "is_impossible": impossible,
                    }
                )

    if header_version is not None:
        version = header_version
    else:  # missing/unknown header: v2.0 iff the file uses unanswerable questions
        version = "2.0" if any(r["is_impossible"] for r in records) else "1.1"
    return records, version


def _hub_label(name: str, split: str, config: str | None, kwargs: Mapping[str, Any]) -> str:
    label = name if config is None else f"{name}/{config}"
    if "data_files" in kwargs:
        label += f" (data_files={kwargs['data_files']})"
    return f"{label}[{split}]"


def _row_answers(answers: Any, err: Any) -> tuple[list[str], list[int]]:
    """HF answers {"text": [...], "answer_start": [...]}, or SQuAD-style [{...}]."""
    if isinstance(answers, Mapping):
        if "text" not in answers or "answer_start" not in answers:
            raise err("answers needs 'text' and 'answer_start'")
        texts, starts = answers["text"], answers["answer_start"]
    elif isinstance(answers, Sequence) and not isinstance(answers, str):
        for a in answers:
            if not isinstance(a, Mapping) or "text" not in a or "answer_start" not in a:
                raise err("each answer needs 'text' and 'answer_start'")
        texts = [a["text"] for a in answers]
        starts = [a["answer_start"] for a in answers]
    else:
        raise err(f"answers must be a mapping or list, got {_type_name(answers)}")
    if texts is None or starts is None:
        texts, starts = [], []
    return list(texts), list(starts)  # types are checked by `validate`


def load_hub_dataset(name: str, split: str, config: str | None = None, **kwargs: Any) -> list[Record]:
    """Load a dataset in the HF ``squad`` schema via `datasets.load_dataset` as records.

    `name` is a Hub id ("rajpurkar/squad"), a local dataset directory, or a builder
    ("json", "parquet") with ``data_files=...``; kwargs go to `load_dataset` unchanged.
    """
    import datasets  # heavy import, only when needed

    label = _hub_label(name, split, config, kwargs)
    ds = datasets.load_dataset(name, config, split=split, **kwargs)
    rows: Iterable[Mapping[str, Any]] = ds.to_list() if hasattr(ds, "to_list") else ds

    records: list[Record] = []
    for i, row in enumerate(rows):
        raw_id = row.get("id")
        qid = None if raw_id is None else str(raw_id)

        def err(reason: str, i: int = i, qid: str | None = qid) -> DataValidationError:
            return DataValidationError(label, reason if qid else f"row {i}: {reason}", qid=qid)

        for column in ("id", "context", "question", "answers"):
            if row.get(column) is None:
                raise err(f"missing column '{column}'")
        texts, starts = _row_answers(row["answers"], err)
        records.append(
            {
                "id": qid,
                "title": "" if row.get("title") is None else str(row["title"]),
                "context": row["context"],
                "question": row["question"],
                "answers": {"text": texts, "answer_start": starts},
                "is_impossible": not texts,
            }
        )
    return records


def ingest(source: str, split: str = "train", config: str | None = None) -> tuple[list[Record], str]:
    """Load `source`: a local SQuAD .json or .json.gz file, a local .jsonl/.parquet/.csv file or
    dataset directory, or a Hub dataset name. Returns (records, version)."""
    path = Path(source)
    suffix = _suffix(path)
    if path.is_file():
        if suffix == ".json":
            return load_squad_json(path)
        if suffix in _BUILDER_BY_SUFFIX:
            records = load_hub_dataset(_BUILDER_BY_SUFFIX[suffix], split=split, data_files={split: str(path)})
            return records, _infer_version(records)
        raise DataValidationError(source, f"unsupported file type '{suffix or path.name}'")
    if names_a_file(source):
        raise DataValidationError(source, "file not found")

    looks_like_path = "/" in source or "\\" in source
    try:
        records = load_hub_dataset(source, split=split, config=config)
    except DataValidationError:
        raise
    except Exception as exc:  # for a path, any loader failure means "not found"
        if looks_like_path and not path.exists():
            raise DataValidationError(
                source,
                f"file not found (and not loadable as a dataset: {type(exc).__name__}: {exc})",
            ) from exc
        raise
    return records, _infer_version(records)


def _infer_version(records: Iterable[Record]) -> str:
    return "2.0" if any(r.get("is_impossible") for r in records) else "1.1"


# --------------------------------------------------------------------------- validation


def validate(records: Sequence[Record], source: str) -> None:
    """Check every record; raise DataValidationError on the first problem found."""
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        qid = rec.get("id")
        if not isinstance(qid, str) or not qid.strip():
            raise DataValidationError(source, f"record {i}: empty or missing id ({qid!r})")

        def fail(reason: str, qid: str = qid) -> DataValidationError:
            return DataValidationError(source, reason, qid=qid)

        if qid in seen:
            first = seen[qid]
            raise fail(
                f"duplicate id: records {first} "
                f"(title {records[first].get('title')!r}) "
                f"and {i} (title {rec.get('title')!r}) both use id {qid}"
            )
        seen[qid] = i

        question, context = rec.get("question"), rec.get("context")
        if not isinstance(question, str) or not question.strip():
            raise fail(f"empty question ({question!r})")
        if not isinstance(context, str) or not context:
            raise fail(f"empty context ({context!r})")
        if not isinstance(rec.get("title", ""), str):
            raise fail(f"title must be a string, got {_type_name(rec.get('title'))}")

        answers = rec.get("answers")
        if not isinstance(answers, Mapping):
            raise fail(f"answers must be a mapping, got {_type_name(answers)}")
        texts, starts = answers.get("text"), answers.get("answer_start")
        if not isinstance(texts, Sequence) or not isinstance(starts, Sequence):
            raise fail("answers needs 'text' and 'answer_start' lists")
        if len(texts) != len(starts):
            raise fail(f"answers has {len(texts)} texts but {len(starts)} answer_start values")
        for n, (text, start) in enumerate(zip(texts, starts, strict=True)):
            if not isinstance(text, str) or not text:
                raise fail(f"answer {n}: empty answer text ({text!r})")
            if not isinstance(start, int) or isinstance(start, bool):
                raise fail(f"answer {n}: answer_start must be int, got {_type_name(start)}")
            end = start + len(text)
            if start < 0 or end > len(context):
                raise fail(
                    f"answer {n}: answer_start {start} out of range for answer text "
                    f"{_clip(text)} (context length {len(context)})"
                )
            if context[start:end] != text:
                raise fail(
                    f"answer_start {start} does not point at answer text {_clip(text)} "
                    f"(context has {_clip(context[start:end])} there)"
                )

        impossible = rec.get("is_impossible", not texts)
        if not isinstance(impossible, bool):
            raise fail(f"is_impossible must be bool, got {_type_name(impossible)}")
        if not impossible and not texts:
            raise fail("answerable question (is_impossible false) has no answers")
        if impossible and texts:
            raise fail(f"unanswerable question (is_impossible true) has {len(texts)} answers")


# --------------------------------------------------------------------------- hashing


def _canonical(record: Record) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def content_hash(records: Iterable[Record]) -> str:
    """sha256 of the canonical JSON of the records sorted by id (order-independent)."""
    # Sort by (id, canonical text): duplicate ids cannot make the hash order-dependent.
    items = sorted((str(r.get("id")), _canonical(r)) for r in records)
    payload = "[" + ",".join(text for _, text in items) + "]"
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def file_md5(path: Path | str) -> str:
    """md5 hex of the file bytes (what DVC 3 records as a file's `md5`)."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- splitting


def split_by_article(records: Sequence[Record], val_fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split into (train, val) by article title so no article is in both.

    About round(val_fraction * n_articles) articles (at least one, and at least one left
    for training when there are two or more) go to validation; each split keeps the
    input order.
    """
    if not 0.0 <= val_fraction < 1.0:  # also rejects NaN
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    titles = sorted({r["title"] for r in records})  # sorted: independent of record order
    if val_fraction == 0.0 or not titles:
        return list(records), []
    n_val = max(1, round(val_fraction * len(titles)))
    if len(titles) >= 2:
        n_val = min(n_val, len(titles) - 1)
    random.Random(seed).shuffle(titles)
    val_titles = set(titles[:n_val])
    train = [r for r in records if r["title"] not in val_titles]
    val = [r for r in records if r["title"] in val_titles]
    return train, val


def sample_articles(records: Sequence[Record], n: int | None, seed: int) -> list[Record]:
    """The records of a seeded sample of `n` articles (by title), in input order; None = all.

    Sampling whole articles from the whole file spreads a small budget over many topics
    while keeping each article's questions together (the validation split is by article too).
    """
    if n is None:
        return list(records)
    if n < 1:
        raise ValueError(f"article sample must be >= 1 or None, got {n}")
    titles = sorted({r["title"] for r in records})
    if n >= len(titles):
        return list(records)
    keep = set(random.Random(seed).sample(titles, n))
    return [r for r in records if r["title"] in keep]


def limit_records(records: Sequence[Record], limit: int | None) -> list[Record]:
    """The first `limit` records (file order keeps articles together); None/0 = all."""
    if limit is None or limit == 0:
        return list(records)
    if limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    return list(records[:limit])


# --------------------------------------------------------------------------- storage


def write_jsonl_atomic(path: Path | str, records: Iterable[Record]) -> None:
    """Write one JSON record per line (UTF-8); the file is replaced atomically."""
    with atomic_open(path) as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False))
            fh.write("\n")


def read_jsonl(path: Path | str) -> list[Record]:
    """Read a JSON-lines file written by `write_jsonl_atomic` (skips blank lines)."""
    records: list[Record] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataValidationError(
                    path,
                    f"malformed JSON at line {lineno} column {exc.colno}: {exc.msg}",
                ) from None
            if not isinstance(rec, dict):
                raise DataValidationError(path, f"line {lineno}: expected an object")
            records.append(rec)
    return records
