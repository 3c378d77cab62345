"""Data validation with Great Expectations (GX Core 1.x): the first gate of every training run.

    llmops validate --config configs/demo.yaml        # the report and Data Docs path, without training

Records are read by tasks/scan.py in worker processes (one per core, byte ranges of ~8 MB; malformed JSONL,
undecodable bytes, huge lines fail there with file:line, every undecodable file named). GX then validates a
*derived* table — lengths, token counts, control characters, content hashes, split membership and per-category
PII/PHI hit counts, plus each record's `file:line` — never the raw text, so no personal data can reach Data Docs,
reports or logs. Every failing expectation reports its count, up to `validation.max_examples` locations and the
setting that changes it. PII detectors add checksums to regexes (Luhn for cards, mod-97 for IBAN, octet ranges for
IPs) to avoid false positives. Policy per category: `block` fails the run; `redact` replaces hits with typed
placeholders like `[EMAIL]`; control characters are stripped by default (`validation.control_chars`). When any
record changed, training uses the cleaned copy, and the copy is what GX validated.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmops.errors import DataError
from llmops.files import write_text_atomic

# The PII/PHI detectors live in llmops/text/pii.py (measured on a labelled set: tests/assets/pii_eval).
from llmops.text.pii import pii_categories

# ----------------------------------------------------------------------------------------------- the report


@dataclass
class ValidationReport:
    passed: bool
    fingerprint: str
    source_fingerprint: str
    data_path: str
    n_records: int
    failures: list[str] = field(default_factory=list)  # one line each: count, file:line examples, the setting
    checks: list[dict] = field(default_factory=list)  # the same, structured: check, column, count, examples, setting
    pii: dict = field(default_factory=dict)
    control_chars: dict = field(default_factory=dict)
    redacted: bool = False
    cleaned: bool = False  # training reads a copy (control characters stripped and/or PII redacted)
    docs_path: str = ""
    report_path: str = ""
    summary_md: str = ""
    source_map: str | None = None  # cleaned copy: JSON {copy record hash: [source record hashes]} (ledger)
    n_tokenized: int = 0  # records whose tokens were counted (the others provably fit max_tokens)
    tokens: str = ""  # how the token check ran
    seconds: float = 0.0


def _expectations(val_cfg, has_tokens: bool) -> list:
    import great_expectations as gx

    E = gx.expectations
    ex = [
        E.ExpectTableRowCountToBeBetween(min_value=val_cfg.min_records),
        E.ExpectColumnValuesToBeBetween(
            column="n_chars",
            min_value=val_cfg.min_chars,
            max_value=val_cfg.max_chars,
            mostly=1.0 - val_cfg.max_blank_rate if val_cfg.max_blank_rate else 1.0,
        ),
        E.ExpectColumnMeanToBeBetween(column="is_blank", max_value=val_cfg.max_blank_rate),
        E.ExpectColumnProportionOfUniqueValuesToBeBetween(column="text_hash", min_value=1 - val_cfg.max_duplicate_rate),
        E.ExpectColumnSumToBeBetween(column="is_eval", min_value=val_cfg.min_eval_records),
        E.ExpectColumnSumToBeBetween(column="is_train", min_value=max(1, val_cfg.min_records - 1) // 2),
        E.ExpectColumnValuesToBeUnique(column="id"),
    ]
    if val_cfg.control_chars == "block":
        ex.append(E.ExpectColumnValuesToBeBetween(column="n_control", max_value=0))
    if has_tokens and val_cfg.max_tokens:
        ex.append(E.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=val_cfg.max_tokens))
    for cat, policy in val_cfg.pii.items():
        if policy == "block":  # the custom PII/PHI expectations: no hits allowed
            ex.append(pii_expectation(cat))
    if "redact" in val_cfg.pii.values():  # redaction runs to a fixed point; anything it leaves is its own failure
        ex.append(E.ExpectColumnValuesToBeBetween(column="redaction_left", max_value=0))
    return ex


def pii_expectation(category: str):
    """A custom GX expectation per PII/PHI category, over the derived hit-count column."""
    import great_expectations as gx

    cls_name = "ExpectNo" + "".join(p.title() for p in category.split("_"))
    cls = _PII_CLASSES.get(cls_name)
    if cls is None:
        cls = type(
            cls_name,
            (gx.expectations.ExpectColumnValuesToBeBetween,),
            {
                "__doc__": f"Expect no {category.replace('_', ' ')} in any record (detector hits per record == 0).",
                "description": f"No {category.replace('_', ' ')} (PII/PHI) in the training text",
            },
        )
        _PII_CLASSES[cls_name] = cls
    return cls(column=f"pii_{category}", min_value=0, max_value=0)


_PII_CLASSES: dict[str, type] = {}


def run_gx(df, val_cfg, out_dir: Path, name: str):
    """`_run_gx` under an exclusive lock on the GX file context: two runs on the same data (a scheduled retraining and
    a manual run) share `validation/<fingerprint>/`, and GX refuses a suite that changed since it was last saved."""
    from llmops.files import exclusive_lock

    with exclusive_lock(Path(out_dir) / ".gx.lock"):
        return _run_gx(df, val_cfg, Path(out_dir), name)


def _run_gx(df, val_cfg, out_dir: Path, name: str):
    """Build the real GX objects (context → data source → asset → batch definition → suite → validation
    definition → checkpoint with Data Docs) in a file context under out_dir, run them, return (result, docs).
    Column-map expectations return up to max_examples `where` values (file:line) of failing rows: Data Docs shows
    them in its unexpected-index table."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = gx.get_context(mode="file", project_root_dir=str(out_dir))
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}  # one-line errors only
    ds = context.data_sources.add_or_update_pandas("llmops")
    asset = ds.add_dataframe_asset(name=name) if name not in [a.name for a in ds.assets] else ds.get_asset(name)
    batch_def = asset.add_batch_definition_whole_dataframe(f"{name}-all")
    suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=f"{name}-suite", expectations=_expectations(val_cfg, "n_tokens" in df))
    )
    vd = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"{name}-validation", data=batch_def, suite=suite)
    )
    cp = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"{name}-checkpoint",
            validation_definitions=[vd],
            actions=[],
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": val_cfg.max_examples,
                "unexpected_index_column_names": ["where"],
            },
        )
    )
    result = cp.run(batch_parameters={"dataframe": df})
    # Data Docs draws its file:line table from `unexpected_index_list`, which GX fills only in COMPLETE mode (every
    # failing row: too big at 1M records). Give it the first max_examples, then render.
    for key, vr in result.run_results.items():
        for r in vr.results:
            if r.result.get("partial_unexpected_index_list"):
                r.result["unexpected_index_list"] = r.result["partial_unexpected_index_list"]
        context.validation_results_store.set(key, vr)
    context.build_data_docs(resource_identifiers=list(result.run_results))
    docs = next(iter(context.get_docs_sites_urls()), {}).get("site_url", "")
    return result, docs.removeprefix("file://")


# What each derived column means when its expectation fails, and the setting that changes it.
_HINTS = {  # column: (what failed, what to do, the setting that changes it)
    "n_chars": (
        "record(s) {n_chars}",
        "fix those records or change validation.max_chars / validation.min_chars",
        "validation.max_chars",
    ),
    "is_blank": (
        "blank record(s); allowed share validation.max_blank_rate={max_value}",
        "remove them or raise validation.max_blank_rate",
        "validation.max_blank_rate",
    ),
    "n_control": (
        "record(s) with control characters (policy block)",
        "set validation.control_chars: strip (the default) to remove them, or allow to keep them",
        "validation.control_chars",
    ),
    "text_hash": (
        "duplicate record(s) (same normalised text); allowed share validation.max_duplicate_rate={max_rate}",
        "remove the duplicates or raise validation.max_duplicate_rate",
        "validation.max_duplicate_rate",
    ),
    "is_eval": (
        "held-out record(s); need validation.min_eval_records={min_value}",
        "add records, raise data.eval_fraction or lower validation.min_eval_records",
        "validation.min_eval_records",
    ),
    "is_train": (
        "training record(s); need at least {min_value}",
        "add records or lower data.eval_fraction",
        "data.eval_fraction",
    ),
    "id": (
        "record(s) sharing an id",
        "make the data.id_field values unique, or set data.id_field: null (line ids)",
        "data.id_field",
    ),
    "n_tokens": (
        "record(s) over validation.max_tokens={max_value} tokens",
        "split those records or raise validation.max_tokens",
        "validation.max_tokens",
    ),
    "table": (
        "records; need validation.min_records={min_value}",
        "add records or lower validation.min_records",
        "validation.min_records",
    ),
}


def _bad_rows(df, col: str, kw: dict):
    """Boolean mask of the records that make an expectation on `col` fail (None: a table-level check)."""
    if col == "text_hash":
        return df["text_hash"].duplicated()
    if col == "id":
        return df["id"].duplicated(keep=False)
    if col in ("is_eval", "is_train", "table"):
        return None
    values = df[col]
    mask = values.notna() & False
    if kw.get("min_value") is not None:
        mask |= values < kw["min_value"]
    if kw.get("max_value") is not None:
        mask |= values > kw["max_value"]
    return mask if col != "is_blank" else values > 0


def _num(v):
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _n_chars(df, val_cfg) -> str:
    over, under = int((df["n_chars"] > val_cfg.max_chars).sum()), int((df["n_chars"] < val_cfg.min_chars).sum())
    parts = [f"{over} longer than validation.max_chars={val_cfg.max_chars}"] if over else []
    parts += [f"{under} shorter than validation.min_chars={val_cfg.min_chars}"] if under else []
    return f"out of bounds ({', '.join(parts)})"


def _examples(df, mask, n: int) -> list[str]:
    return df["where"][mask].head(n).tolist()


def _failures(result, df, val_cfg, source: str) -> list[dict]:
    out = []
    n = val_cfg.max_examples
    for vr in result.run_results.values():
        for r in vr.results:
            if r.success:
                continue
            cfg = r.expectation_config
            kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
            col = kw.get("column", "table")
            mask = _bad_rows(df, col, kw)
            count = int(mask.sum()) if mask is not None else int(r.result.get("observed_value") or 0)
            examples = _examples(df, mask, n) if mask is not None else []
            if col == "redaction_left":
                what = f"redaction left {int(df[col].sum())} hit(s) in {count} record(s)"
                fix = (
                    "the detectors still find PII in the redacted text (a detector bug: please report it with these "
                    "locations); remove those records meanwhile"
                )
                setting = "validation.pii"
            elif col.startswith("pii_"):
                cat = col.removeprefix("pii_")
                what = f"{int(df[col].sum())} hit(s) in {count} record(s) (policy {val_cfg.pii[cat]})"
                setting = f"validation.pii.{cat}"
                fix = f"remove them, or set {setting}: redact"
            else:
                desc, fix, setting = _HINTS.get(col, ("record(s) outside the bound", "fix the data or the bound", ""))
                what = f"{count} " + desc.format(
                    min_value=_num(kw.get("min_value")),
                    max_value=_num(kw.get("max_value")),
                    max_rate=val_cfg.max_duplicate_rate,
                    n_chars=_n_chars(df, val_cfg),
                )
                if col == "n_chars" and not (df["n_chars"] > val_cfg.max_chars).any():
                    setting = "validation.min_chars"
            out.append(
                {
                    "check": cfg.type,
                    "column": col,
                    "label": "pii" if col == "redaction_left" else col.removeprefix("pii_"),
                    "count": count,
                    "examples": examples,
                    "more": max(0, count - len(examples)) if mask is not None else 0,
                    "what": what,
                    "fix": fix,
                    "setting": setting,
                    "where": source if mask is None else None,
                }
            )
    return out


def failure_line(f: dict) -> str:
    """`<what> at a.jsonl:3, a.jsonl:9 (+12 more) — <fix>`: count, locations (never the text), the setting."""
    at = (
        f" at {', '.join(f['examples'])}" + (f" (+{f['more']} more)" if f["more"] else "")
        if f["examples"]
        else (f" in {f['where']}" if f.get("where") else "")
    )
    return f"{f['label']}: {f['what']}{at} — {f['fix']}"


# --------------------------------------------------------------------------------------------- the pipeline


def _input_key(data_cfg, val_cfg, files: list[Path], tokenizer_path: str | None) -> str:
    """Content of the inputs (file bytes, settings, tokenizer, this code and the detectors'): a report with the same
    key is reused, so `llmops train` validating before the flow and the flow's own step cost one scan."""
    import importlib

    from llmops.caching import hash_path

    h = hashlib.sha256(data_cfg.model_dump_json().encode() + val_cfg.model_dump_json().encode())
    for mod in ("tasks.validation", "tasks.scan", "tasks.data", "llmops.text.pii", "llmops.text.identity"):
        h.update(Path(importlib.import_module(mod).__file__).read_bytes())
    for f in files:
        hash_path(f, h)
    if tokenizer_path:
        hash_path(Path(tokenizer_path) / "tokenizer.json", h)
    return h.hexdigest()


def _progress(total_bytes: int, show: bool):
    """A progress bar on a terminal (stderr); nothing otherwise, so a failing CLI prints exactly one error line."""
    if not show:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="validating", file=sys.stderr, leave=False)
    seen = [0, time.perf_counter()]

    def step(nbytes: int, nrec: int) -> None:
        seen[0] += nrec
        bar.update(nbytes)
        bar.set_postfix_str(f"{seen[0]:,} records, {seen[0] / (time.perf_counter() - seen[1]):,.0f}/s", refresh=False)

    return step, bar.close


def scan_data(
    data_cfg,
    val_cfg,
    files: list[Path],
    work: Path,
    tokenizer_path: str | None,
    workers: int | None,
    progress: bool,
    chunk_bytes: int | None = None,
):
    """Run tasks/scan.py over the files; raise DataError for undecodable files (all named) or a bad record."""
    from tasks import scan
    from tasks.data import encoding_error, format_of, location

    spec = scan.ScanSpec(
        fmt=data_cfg.format,
        text_field=data_cfg.text_field,
        id_field=data_cfg.id_field,
        encoding=data_cfg.encoding,
        max_line_bytes=data_cfg.max_line_bytes,
        eval_fraction=data_cfg.eval_fraction,
        control_chars=val_cfg.control_chars,
        categories=pii_categories(),
        mrn_patterns=tuple(val_cfg.mrn_patterns),
        phone_regions=tuple(val_cfg.phone_regions),
        redact=tuple(c for c, p in val_cfg.pii.items() if p == "redact"),
        tokenizer=tokenizer_path,
        max_tokens=val_cfg.max_tokens,
        copy_dir=str(work),
    )
    root = Path(data_cfg.path)
    total = sum(f.stat().st_size for f in files)
    cores = workers or len(os.sched_getaffinity(0))
    # ~6 ranges per worker (so one slow range does not leave a core idle at the end), 1-8 MB each
    size = chunk_bytes or min(scan.CHUNK_BYTES, max(1 << 20, total // (6 * cores)))
    chunks = scan.plan_chunks(
        files, lambda f: format_of(f, data_cfg.format), data_cfg.encoding, size, [location(f, root) for f in files]
    )
    workers = min(cores, len(chunks))
    step, close = _progress(sum(c.end - c.start for c in chunks), progress)
    try:
        results = scan.run_chunks(chunks, spec, workers, step)
    finally:
        close()
    bad_files = {}
    for c, r in zip(chunks, results):
        if "decode_error" in r and c.file_index not in bad_files:
            bad_files[c.file_index] = (c.path, *r["decode_error"])
    if bad_files:
        raise encoding_error([bad_files[i] for i in sorted(bad_files)], data_cfg.encoding)
    for c, r in zip(chunks, results):
        if "parse_error" in r:
            line, what, fix = r["parse_error"]
            raise DataError(what, f"{c.path}:{line}", fix)
    return results


def derived_table(results, limit: int | None):
    """The table GX validates: one row per record, numbers and file:line only."""
    import numpy as np
    import pandas as pd

    done = [r for r in results if r["n"]]
    n = sum(r["n"] for r in done) if limit is None else min(limit, sum(r["n"] for r in done))

    def cat(key):
        return [x for r in done for x in r[key]][:n]

    df = pd.DataFrame(
        {
            "where": cat("where"),
            "id": cat("ids"),
            "text_hash": cat("hashes"),
            **{k: np.concatenate([r["cols"][k] for r in done])[:n] for k in done[0]["cols"]},
        }
        if done
        else {"where": [], "id": [], "text_hash": []}
    )
    if done:
        df["is_train"] = 1 - df["is_eval"]
        if df["n_tokens"].isna().all():
            df = df.drop(columns="n_tokens")
    sources, row = {}, 0
    for r in done:
        for i, h in r["source_hashes"].items():
            if row + i < n:
                sources[row + i] = h
        row += r["n"]
    return df, sources


def write_copy(results, n: int, path: Path) -> Path:
    """Concatenate the workers' parts of the cleaned copy (first n records) atomically."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two runs validating the same data write their own tmp
    left = n
    with open(tmp, "w", encoding="utf-8") as out:
        for r in results:
            if left <= 0:
                break
            with open(r["part"], encoding="utf-8") as part:
                if r["n"] <= left:
                    shutil.copyfileobj(part, out)
                else:
                    out.writelines(line for _, line in zip(range(left), part))
            left -= r["n"]
    tmp.replace(path)
    return path


def source_map(df, sources: dict[int, str]) -> dict[str, list[str]]:
    """{copy record hash: [hashes of the source records it came from]} for every copy hash that differs from its
    source (records whose copy hash is its own are left out: the ledger reads `.get(h, [h])`)."""
    out: dict[str, list[str]] = {}
    hashes = df["text_hash"]
    for i, src in sources.items():
        out.setdefault(hashes.iat[i], []).append(src)
    if out:  # an unchanged record whose hash equals a mapped copy hash is its own source too
        for i in hashes.index[hashes.isin(out.keys())]:
            if i not in sources:
                out[hashes.iat[i]].append(hashes.iat[i])
    return out


def validate_data(
    data_cfg,
    val_cfg,
    out_dir: str | Path,
    tokenizer_path: str | None = None,
    *,
    workers: int | None = None,
    progress: bool = False,
    reuse: bool = True,
    chunk_bytes: int | None = None,
) -> ValidationReport:
    """Scan (workers), build the derived table, run GX, write report.json; reuse a report of identical inputs."""
    from tasks.data import fingerprint_of_hashes, list_files

    started = time.perf_counter()
    out = Path(out_dir)
    files = list_files(Path(data_cfg.path), data_cfg.format)
    key = _input_key(data_cfg, val_cfg, files, tokenizer_path)
    cached = out / "runs" / f"{key[:32]}.json"
    if reuse and cached.is_file():
        rep = ValidationReport(**json.loads(cached.read_text()))
        if Path(rep.data_path).is_file() and Path(rep.report_path).is_file():
            return rep
    _import_gx_in_background()  # only when validating for real: the import costs ~4 s of CPU
    work = out / f"tmp-{os.getpid()}-{key[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = scan_data(data_cfg, val_cfg, files, work, tokenizer_path, workers, progress, chunk_bytes)
        df, sources = derived_table(results, data_cfg.max_records)
        # the table holds the columns now: keep only what the copy and the report still need (peak memory)
        results = [{k: r.get(k) for k in ("n", "part", "changed", "n_tokenized")} for r in results]
        if df.empty:
            raise DataError(
                "no records found",
                str(data_cfg.path),
                "check the file is not empty and data.format/text_field match it",
            )
        hashes = df["text_hash"].tolist()
        fp = fingerprint_of_hashes(hashes)
        for i, h in sources.items():  # a plain list: item assignment on a pandas column copies it (copy-on-write)
            hashes[i] = h
        source_fp = fingerprint_of_hashes(hashes) if sources else fp
        final = out / source_fp[:16]
        final.mkdir(parents=True, exist_ok=True)
        changed = any(r["changed"] for r in results)
        data_path, smap = str(data_cfg.path), None
        if changed:
            data_path = str(write_copy(results, len(df), final / "clean.jsonl"))
            if sources:
                smap = str(write_text_atomic(final / "clean.sources.json", json.dumps(source_map(df, sources))))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    pii = _pii_summary(df, val_cfg)
    control = {
        "policy": val_cfg.control_chars,
        "count": int(df["n_control"].sum()),
        "records": int((df["n_control"] > 0).sum()),
        "examples": _examples(df, df["n_control"] > 0, val_cfg.max_examples),
    }
    table = df.drop(columns=[c for c in df if c.startswith("found_")])
    result, docs = run_gx(table, val_cfg, final, "records")
    checks = _failures(result, table, val_cfg, str(data_cfg.path))
    report = ValidationReport(
        passed=bool(result.success),
        fingerprint=fp,
        source_fingerprint=source_fp,
        data_path=data_path,
        n_records=len(df),
        failures=[failure_line(f) for f in checks],
        checks=checks,
        pii=pii,
        control_chars=control,
        redacted=any(v["policy"] == "redact" and v["count"] for v in pii.values()),
        cleaned=changed,
        docs_path=docs,
        report_path=str(final / "report.json"),
        source_map=smap,
        n_tokenized=sum(r.get("n_tokenized", 0) for r in results),
        seconds=round(time.perf_counter() - started, 2),
        tokens=_token_note(tokenizer_path, val_cfg.max_tokens, sum(r.get("n_tokenized", 0) for r in results), len(df)),
    )
    report.summary_md = summary_markdown(report, data_cfg.path)
    write_text_atomic(final / "report.json", json.dumps(asdict(report), indent=2))
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cached, json.dumps(asdict(report)))
    return report


def _token_note(tokenizer_path: str | None, max_tokens: int | None, n: int, n_records: int) -> str:
    if not max_tokens:
        return "no token limit (validation.max_tokens: null)"
    if not tokenizer_path:
        return "skipped: the model's tokenizer is not available yet (run `llmops prepare-model`)"
    if n >= n_records:
        return f"all {n} records tokenized"
    return (
        f"{n} record(s) tokenized; the other {n_records - n} have at most {max_tokens} UTF-8 bytes, so at most "
        f"{max_tokens} tokens (byte-level BPE)"
    )


def _import_gx_in_background() -> None:
    """Importing GX takes ~4 s; do it while the workers scan (run_gx's own import then waits for this one)."""
    import threading

    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    if "great_expectations" not in sys.modules:
        threading.Thread(target=lambda: __import__("great_expectations"), daemon=True).start()


def _pii_summary(df, val_cfg) -> dict:
    out = {}
    for cat in pii_categories():
        found = df[f"found_{cat}"]
        hit = found > 0
        out[cat] = {
            "count": int(found.sum()),
            "records": int(hit.sum()),
            "policy": val_cfg.pii.get(cat, "allow"),
            "examples": _examples(df, hit, val_cfg.max_examples),
        }
    return out


def summary_markdown(rep: ValidationReport, source) -> str:
    rows = "\n".join(
        f"| {c} | {v['count']} | {v['policy']} | {', '.join(v['examples']) or '—'} |" for c, v in rep.pii.items()
    )
    fails = "\n".join(f"- {f}" for f in rep.failures) or "- none"
    cc = rep.control_chars
    control = (
        f"Control characters (policy `{cc['policy']}`, setting `validation.control_chars`): {cc['count']} in "
        f"{cc['records']} record(s){' at ' + ', '.join(cc['examples']) if cc['examples'] else ''}"
        f"{' — stripped in the copy used for training' if cc['policy'] == 'strip' and cc['count'] else ''}"
    )
    return f"""## Data validation: {"PASSED" if rep.passed else "FAILED"}
Source `{source}` · {rep.n_records} records · fingerprint `{rep.fingerprint[:16]}…`{" · **cleaned copy used**" if rep.cleaned else ""}

Failures (count, example locations as file:line, the setting that changes it):
{fails}

{control}

Tokens (setting `validation.max_tokens`): {rep.tokens}

| PII/PHI category | hits | policy | example locations (file:line) |
|---|---|---|---|
{rows}

Report: `{rep.report_path}` · Data Docs: `{rep.docs_path}`
"""


class DataValidationError(DataError):
    """The data failed validation; nothing downstream runs."""


def failed_error(rep: ValidationReport, source) -> DataValidationError:
    """One line: the failures (first three in full), and where the report is."""
    more = f" (+{len(rep.failures) - 3} more)" if len(rep.failures) > 3 else ""
    return DataValidationError(
        f"data validation failed: {'; '.join(rep.failures[:3])}{more}", str(source), f"report: {rep.report_path}"
    )
