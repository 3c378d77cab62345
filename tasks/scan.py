"""One parallel pass over the data files: the numbers validation checks, never the text.

    run_chunks(plan_chunks(files, ...), ScanSpec(...), workers=2)  ->  per byte range: columns of numbers (one row
    per record: file:line, lengths, flags, control characters, PII hit counts), ids and content hashes

Why this shape: validation must read ~1M records (~450 MB) at >= 10,000 records/s on 2 cores in under 2 GB.
1. The main process cuts every file into byte ranges of 1-8 MB (about six per worker, so no core idles at the end)
   that end at a newline (a blank line for plain text; CSV and non-ASCII-compatible encodings such as UTF-16 stay
   one range per file), counting newlines on the way so each range knows the line it starts at.
2. Worker processes (spawned, one per core) each read their own range from disk, decode it (`data.encoding`, a
   UTF-8 BOM dropped), parse records, apply `validation.control_chars`, run the PII detectors and redact, hash,
   count tokens where the count could matter, and write their part of the cleaned copy.
3. They send back columns of numbers (plus hashes and ids); the main process concatenates them in file order. The
   text itself never crosses a process boundary and is never held all at once.
Token counts: with a byte-level BPE tokenizer (GPT-2/Llama-3/SmolLM2 style, no normalizer) a record has at most one
token per UTF-8 byte, so only records whose byte length exceeds `max_tokens` are tokenized (the rest are left empty:
they provably fit). Other tokenizers count every record.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 8 << 20
MAX_REDACTION_PASSES = 4
# C0 and C1 control characters except tab, newline and carriage return (a line ending), plus U+FFFD (text that was
# already decoded wrongly somewhere upstream). nroff bold/underline leaves backspaces and BELs in old mail archives.
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
OVERSTRIKE = re.compile(r"[^\x08\n]\x08")  # nroff bold "b\bb" and underline "_\bb": keep what was struck over


def strip_control(text: str) -> str:
    return CONTROL.sub("", OVERSTRIKE.sub("", text) if "\x08" in text else text)


@dataclass(frozen=True)
class ScanSpec:
    """What a worker needs: plain values only (it is pickled to each worker)."""

    fmt: str = "auto"
    text_field: str = "text"
    id_field: str | None = "id"
    encoding: str = "utf-8"
    max_line_bytes: int = 1_000_000
    eval_fraction: float = 0.1
    control_chars: str = "strip"
    redact: tuple[str, ...] = ()  # categories replaced by placeholders
    categories: tuple[str, ...] = ()  # every PII category the detectors report
    mrn_patterns: tuple[str, ...] = ()
    phone_regions: tuple[str, ...] = ("US",)  # libphonenumber regions tried for numbers without +country
    tokenizer: str | None = None
    max_tokens: int | None = None
    copy_dir: str | None = None  # write the cleaned copy's parts here (None: nothing can change the text)


@dataclass(frozen=True)
class Chunk:
    index: int
    file_index: int
    path: str
    start: int
    end: int
    first_line: int  # 1-based line number of the byte at `start`
    fmt: str
    name: str = ""  # how reports name the file (relative to data.path)


def ascii_compatible(encoding: str) -> bool:
    """Newlines are the single byte 0x0A, so a byte range cut at one decodes on its own."""
    try:
        return '\n\r ab{}"'.encode(encoding) == b'\n\r ab{}"'
    except LookupError:
        return False


# ------------------------------------------------------------------------------------------------ main process


def plan_chunks(
    files: list[Path], fmt_of, encoding: str, chunk_bytes: int = CHUNK_BYTES, names: list[str] | None = None
) -> list[Chunk]:
    chunks = []
    for fi, f in enumerate(files):
        name = names[fi] if names else f.name
        kind = fmt_of(f)
        size = f.stat().st_size
        if kind == "csv" or not ascii_compatible(encoding) or size <= chunk_bytes:
            chunks.append(Chunk(len(chunks), fi, str(f), 0, size, 1, kind, name))
            continue
        sep = b"\n\n" if kind == "text" else b"\n"
        keep = len(sep) - 1  # bytes of a separator that may straddle two reads
        with open(f, "rb") as fh:
            start, line = 0, 1
            while start < size:
                fh.seek(start)
                block = fh.read(chunk_bytes)
                end, newlines = start + len(block), block.count(b"\n")
                tail = block[len(block) - keep :] if keep else b""
                while end < size:  # extend to the end of the next separator (read on, never re-joined: one long
                    more = fh.read(1 << 20)  # line of 60 MB costs one pass, not a quadratic concatenation)
                    if not more:
                        break
                    pos = (tail + more).find(sep)
                    if pos >= 0:
                        take = pos + len(sep) - len(tail)
                        end, newlines = end + take, newlines + more.count(b"\n", 0, take)
                        break
                    end, newlines = end + len(more), newlines + more.count(b"\n")
                    tail = more[len(more) - keep :] if keep else b""
                chunks.append(Chunk(len(chunks), fi, str(f), start, end, line, kind, name))
                line += newlines
                start = end
    return chunks


def run_chunks(chunks: list[Chunk], spec: ScanSpec, workers: int, progress=None) -> list[dict]:
    """Scan every chunk (in worker processes when there is more than one), results in chunk order."""
    if workers <= 1 or len(chunks) == 1:
        out = []
        for c in chunks:
            out.append(scan_chunk(c, spec))
            if progress:
                progress(c.end - c.start, out[-1]["n"])
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    results: list[dict | None] = [None] * len(chunks)
    # spawn, not fork: the caller may be a Prefect flow with threads and an event loop running.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        futures = {pool.submit(scan_chunk, c, spec): c for c in chunks}
        from concurrent.futures import as_completed

        for fut in as_completed(futures):
            c = futures[fut]
            results[c.index] = fut.result()
            if progress:
                progress(c.end - c.start, results[c.index]["n"])
    return results  # type: ignore[return-value]


def _worker_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already


# ---------------------------------------------------------------------------------------------------- workers


_TOKENIZER: dict = {}


def _token_counter(path: str):
    """(count_batch, bound): bound(text) is an upper bound on the token count, or None when none is known."""
    if path not in _TOKENIZER:
        tj = Path(path) / "tokenizer.json"
        bound = None
        if tj.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tj))
            cfg = json.loads(tj.read_text(encoding="utf-8"))
            pre = cfg.get("pre_tokenizer") or {}
            pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
            if (
                cfg.get("normalizer") is None
                and (cfg.get("model") or {}).get("type") == "BPE"
                and any(p.get("type") == "ByteLevel" for p in pres)
            ):
                extra = int(any(p.get("add_prefix_space") for p in pres))
                bound = lambda t: (len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass"))) + extra  # noqa: E731

            def count(texts):
                return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
        else:  # no fast tokenizer file: the transformers loader (slower, exact)
            from tasks.model import load_tokenizer

            hf = load_tokenizer(path)

            def count(texts):
                return [len(x) for x in hf(texts, add_special_tokens=False)["input_ids"]]

        _TOKENIZER[path] = (count, bound)
    return _TOKENIZER[path]


def scan_chunk(chunk: Chunk, spec: ScanSpec) -> dict:
    """Scan one byte range. Errors come back as data (the main process adds the file name and picks the first)."""
    from llmops.text import pii as detectors  # find_pii, redact
    from llmops.text.identity import text_hash
    from tasks.data import RecordError, check_line_lengths, decode, iter_records

    with open(chunk.path, "rb") as fh:
        fh.seek(chunk.start)
        raw = fh.read(chunk.end - chunk.start)
    out: dict = {"n": 0, "index": chunk.index}
    try:
        text = decode(raw, spec.encoding, at_start=chunk.start == 0)
    except UnicodeDecodeError as e:
        out["decode_error"] = (chunk.first_line + raw[: e.start].count(b"\n"), chunk.start + e.start)
        return out
    del raw
    mrn = [re.compile(p) for p in spec.mrn_patterns]
    redact_cats = set(spec.redact)
    strip = spec.control_chars == "strip"
    find_pii, redact, control = detectors.find_pii, detectors.redact, CONTROL.search
    lines, n_chars, blank, n_control, is_eval, ids, hashes, finals = [], [], [], [], [], [], [], []
    # (row, hits found, hits of non-redacted categories, hits redaction could not remove): most rows have none
    hits: list[tuple[int, dict, dict, dict]] = []
    source_hashes, changed = {}, False
    try:
        check_line_lengths(text, spec.max_line_bytes, chunk.first_line)
        records = iter_records(text, chunk.fmt, Path(chunk.path).name, spec.text_field, spec.id_field, chunk.first_line)
        for i, (line, rid, body) in enumerate(records):
            n_ctrl = len(CONTROL.findall(body)) if control(body) else 0
            h = text_hash(body)
            final = strip_control(body) if strip and n_ctrl else body
            spans = find_pii(final, mrn, spec.phone_regions)
            if spans:
                found = {c: len(v) for c, v in spans.items() if v}
                # Redaction to a fixed point: re-check the redacted text (placeholders never count as context) and
                # redact what a pass uncovers, until a pass finds nothing new to redact. What is still found after
                # MAX_REDACTION_PASSES is reported as "left after redaction" (its own error, never policy advice).
                for _ in range(MAX_REDACTION_PASSES):
                    if not redact_cats.intersection(spans):
                        break
                    final = redact(final, spans, redact_cats)
                    spans = find_pii(final, mrn, spec.phone_regions)
                left = {c: len(v) for c, v in spans.items() if v and c not in redact_cats}
                stuck = {c: len(v) for c, v in spans.items() if v and c in redact_cats}
                hits.append((i, found, left, stuck))
            if final is not body:
                changed = True
                h_final = text_hash(final)
                if h_final != h:
                    source_hashes[i] = h
                h = h_final
            lines.append(line)
            n_chars.append(len(final))
            blank.append(not final or final.isspace())
            n_control.append(n_ctrl)
            is_eval.append(int(h[:8], 16) / 0xFFFFFFFF < spec.eval_fraction)  # tasks.data.is_eval, exactly
            ids.append(rid)
            hashes.append(h)
            finals.append(final)
    except RecordError as e:
        out["parse_error"] = (e.line, e.what, e.fix)
        return out
    import numpy as np

    tokens: list = []
    out["n_tokenized"] = _count_tokens(finals, spec, tokens)
    n = len(ids)
    # int64: GX's between-check is vectorised only for int64/float64 columns (int32 falls back to a Python loop)
    cols = {"n_chars": n_chars, "is_blank": blank, "n_control": n_control, "is_eval": is_eval}
    cols = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}
    for c in spec.categories:
        cols[f"pii_{c}"], cols[f"found_{c}"] = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    cols["redaction_left"] = np.zeros(n, dtype=np.int64)
    for row, found, left, stuck in hits:
        cols["redaction_left"][row] = sum(stuck.values())
        for c, k in found.items():
            if c in spec.categories:
                cols[f"found_{c}"][row] = k
        for c, k in left.items():
            if c in spec.categories:
                cols[f"pii_{c}"][row] = k
    cols["n_tokens"] = np.array([np.nan if t is None else t for t in tokens], dtype=np.float64)
    where = [f"{chunk.name}:{line}" for line in lines]
    if spec.copy_dir:
        part = Path(spec.copy_dir) / f"part-{chunk.index:06d}.jsonl"
        with open(part, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": r, "text": t}, ensure_ascii=False) + "\n" for r, t in zip(ids, finals))
        out["part"] = str(part)
    out.update(n=len(ids), cols=cols, where=where, ids=ids, hashes=hashes, source_hashes=source_hashes, changed=changed)
    return out


def _count_tokens(texts: list[str], spec: ScanSpec, into: list) -> int:
    """Fill `into` with token counts (None where the record provably fits `max_tokens`); returns how many counted.

    Capped: the count only has to say whether a record exceeds `max_tokens`, so a long record is tokenized by
    prefixes cut at whitespace (the pre-tokenizers split there, so a prefix never has more tokens than the whole),
    doubling from 8 characters per allowed token until the prefix exceeds the limit or is the whole record. A 60 MB
    record costs a few prefixes of ~max_tokens tokens, not 60 MB of encodings; its count is then a lower bound above
    the limit (reported as over it)."""
    if not spec.tokenizer or not spec.max_tokens:
        into.extend([None] * len(texts))
        return 0
    count, bound = _token_counter(spec.tokenizer)
    cap = spec.max_tokens
    need = [i for i, t in enumerate(texts) if bound is None or bound(t) > cap]
    short = [i for i in need if len(texts[i]) <= 8 * (cap + 1)]
    counts = dict(zip(short, count([texts[i] for i in short]))) if short else {}
    for i in need:
        if i not in counts:
            counts[i] = _capped_count(count, texts[i], cap)
    into.extend(counts.get(i) for i in range(len(texts)))
    return len(need)


def _capped_count(count, text: str, cap: int) -> int:
    size = 8 * (cap + 1)
    while True:
        if size >= len(text):
            return count([text])[0]
        cut = text.rfind(" ", size // 2, size)
        prefix = text[: cut if cut > 0 else size]
        n = count([prefix])[0]
        if n > cap:
            return n
        size *= 2
