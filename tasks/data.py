"""Load text records from JSONL / CSV / plain text (files or directories) and fingerprint them.

A record's identity (`text_hash`, what the privacy ledger charges) is the sha256 of its `identity` text: Unicode
NFKC, zero-width/format and control characters removed, every whitespace run collapsed to one space. A requester who
appends an invisible U+200B, swaps a space for U+00A0 or re-wraps lines has not made a "new" record.
The fingerprint identifies the *content* of a dataset for lineage and caching: sha256 over the sorted record hashes,
so re-ordering records does not create a "new" dataset.
The train/eval split is by content hash too: stable across runs, re-orderings and appended data. Duplicate records
(same identity) in the train split are removed before training and counted (`DataRef.n_duplicates_removed`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from llmops.errors import DataError

SUFFIX_FORMAT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "text", ".md": "text"}
Format = Literal["auto", "jsonl", "csv", "text"]


@dataclass(frozen=True)
class Record:
    id: str
    text: str
    where: str  # "file:line" of the record's origin, for error reports (never the text itself)


@dataclass
class Dataset:
    records: list[Record]
    files: list[Path]
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        self.fingerprint = fingerprint(r.text for r in self.records)


def normalise(text: str) -> str:
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


# Invisible code points that NFKC keeps: format (Cf: U+200B..U+200F, U+2060, U+FEFF, soft hyphen ...), control (Cc,
# whitespace aside), surrogates, variation selectors and the combining grapheme joiner.
_INVISIBLE = {"Cf", "Cc", "Cs"}
_EXTRA_INVISIBLE = {0x034F, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0), *range(0x180B, 0x1810)}


def identity(text: str) -> str:
    """The text a record is identified by: NFKC, invisible characters dropped, whitespace runs -> one space."""
    text = unicodedata.normalize("NFKC", text)
    kept = "".join(ch for ch in text if ch.isspace() or (
        unicodedata.category(ch) not in _INVISIBLE and ord(ch) not in _EXTRA_INVISIBLE))
    return " ".join(kept.split())


def text_hash(text: str) -> str:
    return hashlib.sha256(identity(text).encode("utf-8")).hexdigest()


def dedupe(records: list[Record]) -> tuple[list[Record], int]:
    """First occurrence of each record identity, and how many duplicates were dropped."""
    seen, out = set(), []
    for r in records:
        h = text_hash(r.text)
        if h not in seen:
            seen.add(h)
            out.append(r)
    return out, len(records) - len(out)


def fingerprint(texts) -> str:
    digests = sorted(text_hash(t) for t in texts)
    h = hashlib.sha256(b"llmops-dataset-v1\n")
    for d in digests:
        h.update(d.encode("ascii"))
    return h.hexdigest()


def list_files(path: Path, fmt: Format) -> list[Path]:
    if not path.exists():
        raise DataError("data path does not exist", str(path), "set data.path to a file or directory of records")
    if path.is_file():
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not p.name.startswith(".") and (fmt != "auto" or p.suffix.lower() in SUFFIX_FORMAT)
    )
    if not files:
        raise DataError(
            "directory has no usable files", str(path), f"add files with one of {sorted(SUFFIX_FORMAT)} or set data.format"
        )
    return files


def _format_of(path: Path, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    try:
        return SUFFIX_FORMAT[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"unknown file type '{path.suffix}'", str(path), f"use one of {sorted(SUFFIX_FORMAT)} or set data.format"
        ) from None


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"not valid UTF-8 (byte offset {e.start})", f"{path}:{line}", "re-encode the file as UTF-8"
        ) from None


def _check_line_lengths(path: Path, text: str, max_line_bytes: int) -> None:
    for n, line in enumerate(io.StringIO(text), 1):
        if len(line) > max_line_bytes:
            raise DataError(
                f"line is {len(line):,} characters (limit data.max_line_bytes={max_line_bytes:,})",
                f"{path}:{n}", "split the record or raise the limit if this is intended",
            )


def _jsonl(path: Path, text: str, text_field: str, id_field: str | None) -> Iterator[Record]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e.msg}, column {e.colno})", f"{path}:{n}", "fix or remove that line") from None
        if not isinstance(obj, dict):
            raise DataError("each JSONL line must be an object", f"{path}:{n}", "write one {...} object per line")
        if text_field not in obj:
            raise DataError(
                f"missing field '{text_field}' (has {sorted(obj)[:8]})", f"{path}:{n}", "set data.text_field to the text key"
            )
        value = obj[text_field]
        if value is not None and not isinstance(value, str):
            raise DataError(f"field '{text_field}' is {type(value).__name__}, not text", f"{path}:{n}", "store text as strings")
        rid = obj.get(id_field) if id_field else None
        yield Record(str(rid) if rid is not None else f"{path.name}:{n}", value or "", f"{path}:{n}")


def _csv(path: Path, text: str, text_field: str, id_field: str | None) -> Iterator[Record]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or text_field not in reader.fieldnames:
        raise DataError(
            f"no column '{text_field}' (columns: {reader.fieldnames})", f"{path}:1", "set data.text_field to the text column"
        )
    for row in reader:
        n = reader.line_num
        if None in row:
            raise DataError("row has more cells than the header", f"{path}:{n}", "quote fields that contain commas")
        rid = row.get(id_field) if id_field else None
        yield Record(rid or f"{path.name}:{n}", row[text_field] or "", f"{path}:{n}")


def _text(path: Path, text: str) -> Iterator[Record]:
    """Plain text: one record per blank-line separated block (a paragraph, speech or stanza)."""
    block: list[str] = []
    start = 1
    for n, line in enumerate(text.splitlines() + [""], 1):
        if line.strip():
            if not block:
                start = n
            block.append(line.rstrip())
        elif block:
            yield Record(f"{path.name}:{start}", "\n".join(block), f"{path}:{start}")
            block = []


def load_dataset(
    path: str | Path, fmt: Format = "auto", text_field: str = "text", id_field: str | None = "id",
    max_records: int | None = None, max_line_bytes: int = 1_000_000,
) -> Dataset:
    """Read every record under `path`. Raises DataError naming file:line on the first bad input."""
    files = list_files(Path(path), fmt)
    records: list[Record] = []
    for f in files:
        kind = _format_of(f, fmt)
        text = _decode(f)
        _check_line_lengths(f, text, max_line_bytes)
        rows = (
            _jsonl(f, text, text_field, id_field) if kind == "jsonl"
            else _csv(f, text, text_field, id_field) if kind == "csv"
            else _text(f, text)
        )
        records.extend(rows)
        if max_records and len(records) >= max_records:
            records = records[:max_records]
            break
    if not records:
        raise DataError("no records found", str(path), "check the file is not empty and data.format/text_field match it")
    return Dataset(records, files)


def is_eval(text: str, eval_fraction: float) -> bool:
    """Deterministic held-out membership by content hash (the same text always lands on the same side)."""
    return int(text_hash(text)[:8], 16) / 0xFFFFFFFF < eval_fraction


def split(ds: Dataset, eval_fraction: float) -> tuple[list[Record], list[Record]]:
    train, held = [], []
    for r in ds.records:
        (held if is_eval(r.text, eval_fraction) else train).append(r)
    return train, held


def write_jsonl(records: list[Record], path: Path) -> Path:
    """Write atomically (tmp + rename) so a crash never leaves a half-written split behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"id": r.id, "text": r.text}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_texts(path: Path) -> list[str]:
    """Read a split written by `write_jsonl`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@dataclass(frozen=True)
class DataRef:
    """What later steps receive: paths and hashes, never the records themselves."""

    fingerprint: str
    train_path: str
    eval_path: str
    n_records: int
    n_train: int
    n_eval: int
    source: str
    n_duplicates_removed: int = 0  # train-split records dropped because their identity was already there


def prepare_data(
    path: str | Path, state_dir: str | Path, eval_fraction: float = 0.1, fmt: Format = "auto",
    text_field: str = "text", id_field: str | None = "id", max_records: int | None = None,
    max_line_bytes: int = 1_000_000,
) -> DataRef:
    """Load, fingerprint and split; the splits land in <state_dir>/data/<fingerprint>/ (content-addressed)."""
    ds = load_dataset(path, fmt, text_field, id_field, max_records, max_line_bytes)
    train, held = split(ds, eval_fraction)
    train, n_dup = dedupe(train)  # identical identities always land on the same side of the split
    held, _ = dedupe(held)
    if not train or not held:
        raise DataError(
            f"split left {len(train)} train and {len(held)} eval records", str(path),
            "add records or change data.eval_fraction",
        )
    out = Path(state_dir) / "data" / ds.fingerprint[:16]
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    if not (train_path.exists() and eval_path.exists()):
        write_jsonl(train, train_path)
        write_jsonl(held, eval_path)
    return DataRef(ds.fingerprint, str(train_path), str(eval_path), len(ds.records), len(train), len(held), str(path),
                   n_dup)


def _task():
    from dataclasses import asdict

    from prefect import task

    from llmops.caching import files_key

    @task(name="prepare-data", cache_policy=files_key(lambda i: [i.get("path") or i["cfg"].data.path]),
          persist_result=True)
    def prepare_data_task(cfg, path: str | None = None) -> dict:
        """Split `path` (the validated, possibly redacted data) or, without validation, `data.path`."""
        d = cfg.data
        if path and path != str(d.path):  # the redacted copy is JSONL with id/text, capped already
            return asdict(prepare_data(path, cfg.state_dir, d.eval_fraction, "jsonl", "text", "id", None,
                                       d.max_line_bytes))
        return asdict(prepare_data(d.path, cfg.state_dir, d.eval_fraction, d.format, d.text_field, d.id_field,
                                   d.max_records, d.max_line_bytes))

    return prepare_data_task


prepare_data_task = _task()
