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
import logging
import os
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmops.errors import DataError
from llmops.text.identity import text_hash

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
    return fingerprint_of_hashes(text_hash(t) for t in texts)


def fingerprint_of_hashes(hashes) -> str:
    """`fingerprint` from record hashes already computed (the parallel validation scan returns them)."""
    digests = sorted(hashes)
    h = hashlib.sha256(b"llmops-dataset-v1\n")
    for d in digests:
        h.update(d.encode("ascii"))
    return h.hexdigest()


def list_files(path: Path, fmt: Format) -> list[Path]:
    if not path.exists():
        raise DataError("data path does not exist", str(path), "set data.path to a file or directory of records")
    if path.is_file():
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    files = [p for p in found if fmt != "auto" or p.suffix.lower() in SUFFIX_FORMAT]
    if skipped := [p for p in found if p not in files]:  # said once, never silently
        names = ", ".join(str(p.relative_to(path)) for p in skipped[:MAX_NAMED])
        more = f" (+{len(skipped) - MAX_NAMED} more)" if len(skipped) > MAX_NAMED else ""
        logging.getLogger("llmops").warning(
            "data.path %s: skipped %d file(s) of unknown type: %s%s (read are %s; set data.format to read every file)",
            path,
            len(skipped),
            names,
            more,
            ", ".join(sorted(SUFFIX_FORMAT)),
        )
    if not files:
        raise DataError(
            "directory has no usable files",
            str(path),
            f"add files with one of {sorted(SUFFIX_FORMAT)} or set data.format",
        )
    return files


def format_of(path: Path, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    try:
        return SUFFIX_FORMAT[path.suffix.lower()]
    except KeyError:
        raise DataError(
            f"unknown file type '{path.suffix}'", str(path), f"use one of {sorted(SUFFIX_FORMAT)} or set data.format"
        ) from None


MAX_NAMED = 10  # files or records an error names before "(+k more)"


def decode(raw: bytes, encoding: str = "utf-8", at_start: bool = True) -> str:
    """Bytes -> text; a UTF-8 byte-order mark at the start of a file is dropped (it is not text)."""
    if at_start and raw.startswith(b"\xef\xbb\xbf") and encoding.replace("_", "-").lower() in ("utf-8", "utf8"):
        raw = raw[3:]
    return raw.decode(encoding)


BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)


def bom_encoding(path) -> str | None:
    """The encoding a file's byte-order mark names (UTF-16/32), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return None
    return next((enc for bom, enc in BOMS if head.startswith(bom)), None)


# Files that are no text at all, whatever the encoding: what they are and what to do (data.encoding cannot help)
MAGIC = (
    (b"\x1f\x8b", "gzip-compressed", "decompress it (gunzip) first"),
    (b"PK\x03\x04", "a ZIP archive (or .docx/.xlsx)", "extract or export the text first"),
    (b"PAR1", "Parquet", "export the text column to JSONL or CSV first"),
    (b"%PDF", "a PDF", "extract its text first"),
    (b"BZh", "bzip2-compressed", "decompress it (bunzip2) first"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it (unxz) first"),
    (b"(\xb5/\xfd", "zstd-compressed", "decompress it (unzstd) first"),
    (b"SQLite format 3\x00", "an SQLite database", "export the text to JSONL or CSV first"),
)


def binary_kind(path) -> tuple[str, str] | None:
    """(what the file is, what to do) when its first bytes are a known binary format, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    return next(((what, fix) for magic, what, fix in MAGIC if head.startswith(magic)), None)


def encoding_error(bad: list[tuple[str, int, int]], encoding: str) -> DataError:
    """One error naming every undecodable file (up to MAX_NAMED) as file:line, and the setting to change."""
    named = ", ".join(f"{f}:{line} (byte {off})" for f, line, off in bad[:MAX_NAMED])
    more = f" (+{len(bad) - MAX_NAMED} more files)" if len(bad) > MAX_NAMED else ""
    boms = {enc for f, _, _ in bad if (enc := bom_encoding(f))}
    binary = [(f, kind) for f, _, _ in bad if (kind := binary_kind(f))]
    if binary:
        f, (what, todo) = binary[0]
        others = f" (and {len(binary) - 1} more binary file(s))" if len(binary) > 1 else ""
        return DataError(f"{what}, not text{others}", f, f"{todo}, or remove it from data.path")
    if len(boms) == 1:
        (enc,) = boms
        fix = (
            f"the file(s) start with a {enc.upper()} byte-order mark: set data.encoding: {enc} (or re-encode as UTF-8)"
        )
    else:
        fix = "set data.encoding to the files' encoding (e.g. latin-1, cp1252, utf-16) or re-encode them as UTF-8"
    return DataError(f"{len(bad)} file(s) are not valid {encoding}: {named}{more}", f"data.encoding={encoding}", fix)


def check_encoding(files: list[Path], encoding: str) -> None:
    if encoding.replace("_", "-").lower() in ("latin-1", "latin1", "iso-8859-1"):
        return  # every byte sequence is latin-1
    bad = []
    for f in files:
        raw = f.read_bytes()
        try:
            decode(raw, encoding)
        except UnicodeDecodeError as e:
            bad.append((str(f), raw[: e.start].count(b"\n") + 1, e.start))
    if bad:
        raise encoding_error(bad, encoding)


class RecordError(Exception):
    """A bad record at a line of a file (the caller names the file)."""

    def __init__(self, line: int, what: str, fix: str):
        super().__init__(what)
        self.line, self.what, self.fix = line, what, fix


def check_line_lengths(text: str, max_line_bytes: int, first_line: int = 1) -> None:
    if len(text) <= max_line_bytes:
        return
    for n, line in enumerate(text.split("\n"), first_line):
        if len(line) > max_line_bytes:
            raise RecordError(
                n,
                f"line is {len(line):,} characters (limit data.max_line_bytes={max_line_bytes:,})",
                "split the record or raise the limit if this is intended",
            )


def iter_records(
    text: str, fmt: str, name: str, text_field: str = "text", id_field: str | None = "id", first_line: int = 1
) -> Iterator[tuple[int, str, str]]:
    """(line, id, text) of each record in `text` (a whole file, or a slice of one starting at `first_line`).
    Lines end at \\n only (JSON allows U+2028 inside strings). Raises RecordError."""
    if fmt == "csv":
        yield from _csv(text, name, text_field, id_field)
    elif fmt == "text":
        yield from _text(text, name, first_line)
    else:
        yield from _jsonl(text, name, text_field, id_field, first_line)


def _jsonl(text: str, name: str, text_field: str, id_field: str | None, first_line: int):
    loads = json.loads
    for n, line in enumerate(text.split("\n"), first_line):
        if not line.strip():
            continue
        try:
            obj = loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(n, f"malformed JSON ({e.msg}, column {e.colno})", "fix or remove that line") from None
        if not isinstance(obj, dict):
            raise RecordError(n, "each JSONL line must be an object", "write one {...} object per line")
        if text_field not in obj:
            raise RecordError(
                n, f"missing field '{text_field}' (has {sorted(obj)[:8]})", "set data.text_field to the text key"
            )
        value = obj[text_field]
        if value is not None and not isinstance(value, str):
            raise RecordError(n, f"field '{text_field}' is {type(value).__name__}, not text", "store text as strings")
        rid = obj.get(id_field) if id_field else None
        yield n, str(rid) if rid is not None else f"{name}:{n}", value or ""


def _csv(text: str, name: str, text_field: str, id_field: str | None):
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or text_field not in reader.fieldnames:
        raise RecordError(
            1, f"no column '{text_field}' (columns: {reader.fieldnames})", "set data.text_field to the text column"
        )
    end = reader.line_num  # the header's last line
    for row in reader:
        n, end = end + 1, reader.line_num  # a quoted multi-line record is located at its first line, not its last
        if None in row:
            raise RecordError(n, "row has more cells than the header", "quote fields that contain commas")
        rid = row.get(id_field) if id_field else None
        yield n, rid or f"{name}:{n}", row[text_field] or ""


def _text(text: str, name: str, first_line: int):
    """Plain text: one record per blank-line separated block (a paragraph, speech or stanza)."""
    block: list[str] = []
    start = first_line
    for n, line in enumerate(text.split("\n") + [""], first_line):
        if line.strip():
            if not block:
                start = n
            block.append(line.rstrip())
        elif block:
            yield start, f"{name}:{start}", "\n".join(block)
            block = []


def location(path: Path, root: Path) -> str:
    """How reports name a file: relative to data.path when that is a directory (never the text)."""
    return path.relative_to(root).as_posix() if root.is_dir() and path.is_relative_to(root) else path.name


def load_dataset(
    path: str | Path,
    fmt: Format = "auto",
    text_field: str = "text",
    id_field: str | None = "id",
    max_records: int | None = None,
    max_line_bytes: int = 1_000_000,
    encoding: str = "utf-8",
) -> Dataset:
    """Read every record under `path`. Raises DataError naming file:line on the first bad record, or every file
    that is not valid `encoding`."""
    files = list_files(Path(path), fmt)
    check_encoding(files, encoding)
    records: list[Record] = []
    for f in files:
        kind = format_of(f, fmt)
        text = decode(f.read_bytes(), encoding)
        try:
            check_line_lengths(text, max_line_bytes)
            records.extend(
                Record(rid, body, f"{f}:{n}") for n, rid, body in iter_records(text, kind, f.name, text_field, id_field)
            )
        except RecordError as e:
            raise DataError(e.what, f"{f}:{e.line}", e.fix) from None
        if max_records and len(records) >= max_records:
            records = records[:max_records]
            break
    if not records:
        raise DataError(
            "no records found", str(path), "check the file is not empty and data.format/text_field match it"
        )
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
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}-{secrets.token_hex(3)}.tmp")  # concurrent runs: own tmp
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
    n_duplicates_removed: int = 0  # records dropped as (near-)duplicates of an earlier one (llmops/text/neardup.py)


def prepare_data(
    path: str | Path,
    state_dir: str | Path,
    eval_fraction: float = 0.1,
    fmt: Format = "auto",
    text_field: str = "text",
    id_field: str | None = "id",
    max_records: int | None = None,
    max_line_bytes: int = 1_000_000,
    encoding: str = "utf-8",
) -> DataRef:
    """Load, fingerprint and split; the splits land in <state_dir>/data/<fingerprint>/ (content-addressed)."""
    ds = load_dataset(path, fmt, text_field, id_field, max_records, max_line_bytes, encoding)
    from llmops.text.neardup import near_dedupe

    # One record per near-duplicate cluster (homoglyph/case/punctuation/one-word variants, parts, concatenations:
    # llmops/text/neardup.py), kept before the split, so variants of one text neither train twice nor sit in the held-out
    # split whose loss is released.
    kept, dropped = near_dedupe([r.text for r in ds.records])
    train, held = split(Dataset([ds.records[i] for i in kept], ds.files), eval_fraction)
    n_dup = len(dropped)
    if not train or not held:
        raise DataError(
            f"split left {len(train)} train and {len(held)} eval records",
            str(path),
            "add records or change data.eval_fraction",
        )
    out = Path(state_dir) / "data" / ds.fingerprint[:16]
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    if not (train_path.exists() and eval_path.exists()):
        write_jsonl(train, train_path)
        write_jsonl(held, eval_path)
    return DataRef(
        ds.fingerprint, str(train_path), str(eval_path), len(ds.records), len(train), len(held), str(path), n_dup
    )
