"""Data validation with Great Expectations (GX Core 1.x): the first gate of every training run.

    llmops validate --config configs/demo.yaml        # the report and Data Docs path, without training

Records are loaded by tasks/data.py (malformed JSONL, non-UTF-8 bytes, huge lines... fail there with file:line).
GX then validates a *derived* table — lengths, token counts, blank/encoding flags, content hashes, split membership
and per-category PII/PHI hit counts — never the raw text, so no personal data can reach Data Docs, reports or
logs (examples are row ids only). PII detectors add checksums to regexes (Luhn for cards, mod-97 for IBAN, octet
ranges for IPs) to avoid false positives. Policy per category: `block` fails the run; `redact` writes a redacted
copy (typed placeholders like `[EMAIL]`), re-validates it, and training uses the copy.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmops.errors import DataError
from llmops.files import write_text_atomic
from tasks.data import Record, fingerprint, is_eval, load_dataset, normalise, text_hash, write_jsonl

# ------------------------------------------------------------------------------------------- PII detectors

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# +44 20 7946 0958 · (415) 555-0132 · +1-415-555-0132 · 020 7946 0958 · 415.555.0132
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?!\w)")
SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")
PLACEHOLDER = {"email": "[EMAIL]", "phone": "[PHONE]", "ssn": "[SSN]", "credit_card": "[CREDIT_CARD]",
               "ip_address": "[IP_ADDRESS]", "iban": "[IBAN]", "mrn": "[MRN]"}


def luhn_ok(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total, alt = total + d, not alt
    return total % 10 == 0


def iban_ok(s: str) -> bool:
    s = s.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    num = "".join(str(int(c, 36)) for c in s[4:] + s[:4])
    return int(num) % 97 == 1


def _ip_ok(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def find_pii(text: str, mrn_patterns: list[re.Pattern]) -> dict[str, list[tuple[int, int]]]:
    """Spans of each category in `text` (checksums applied)."""
    spans: dict[str, list[tuple[int, int]]] = {}

    def add(cat, m):
        spans.setdefault(cat, []).append(m.span())

    for m in EMAIL.finditer(text):
        add("email", m)
    for m in SSN.finditer(text):
        add("ssn", m)
    for m in CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and luhn_ok(digits):
            add("credit_card", m)
    for m in IBAN.finditer(text):
        if iban_ok(m.group()):
            add("iban", m)
    for pat in (IPV4, IPV6):
        for m in pat.finditer(text):
            if _ip_ok(m.group()):
                add("ip_address", m)
    taken = [s for cat in ("ssn", "credit_card", "iban", "ip_address") for s in spans.get(cat, [])]
    for m in PHONE.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 7 <= len(digits) <= 15 and not any(a < m.end() and m.start() < b for a, b in taken):
            add("phone", m)
    for pat in mrn_patterns:
        for m in pat.finditer(text):
            add("mrn", m)
    return spans


def redact(text: str, spans: dict[str, list[tuple[int, int]]], categories: set[str]) -> str:
    cuts = sorted(((a, b, c) for c, ss in spans.items() if c in categories for a, b in ss), reverse=True)
    last = len(text) + 1
    for a, b, cat in cuts:  # right to left; overlapping spans keep the outer-most replacement
        if b <= last:
            text = text[:a] + PLACEHOLDER[cat] + text[b:]
            last = a
    return text


# ----------------------------------------------------------------------------------------------- the report


@dataclass
class ValidationReport:
    passed: bool
    fingerprint: str
    source_fingerprint: str
    data_path: str
    n_records: int
    failures: list[str] = field(default_factory=list)
    pii: dict = field(default_factory=dict)
    redacted: bool = False
    docs_path: str = ""
    summary_md: str = ""
    source_map: str | None = None  # redacted copy: JSON {redacted record hash: [source record hashes]} (ledger)


def derived_table(records: list[Record], mrn: list[re.Pattern], eval_fraction: float, tok=None):
    """One row per record with numbers and flags only (no raw text); plus the PII spans per record."""
    import pandas as pd

    rows, spans_by_row = [], []
    texts = [r.text for r in records]
    n_tokens = [len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]] if tok is not None else None
    for i, r in enumerate(records):
        spans = find_pii(r.text, mrn)
        spans_by_row.append(spans)
        norm = normalise(r.text)
        row = {"id": r.id, "n_chars": len(r.text), "is_blank": int(not norm), "n_bad_chars": len(CONTROL.findall(r.text)),
               "text_hash": text_hash(r.text), "is_eval": int(is_eval(r.text, eval_fraction))}
        row["is_train"] = 1 - row["is_eval"]
        if n_tokens is not None:
            row["n_tokens"] = n_tokens[i]
        for cat in PLACEHOLDER:
            row[f"pii_{cat}"] = len(spans.get(cat, []))
        rows.append(row)
    return pd.DataFrame(rows), spans_by_row


def _expectations(val_cfg, has_tokens: bool) -> list:
    import great_expectations as gx

    E = gx.expectations
    ex = [
        E.ExpectTableRowCountToBeBetween(min_value=val_cfg.min_records),
        E.ExpectColumnValuesToBeBetween(column="n_chars", min_value=val_cfg.min_chars, max_value=val_cfg.max_chars,
                                        mostly=1.0 - val_cfg.max_blank_rate if val_cfg.max_blank_rate else 1.0),
        E.ExpectColumnMeanToBeBetween(column="is_blank", max_value=val_cfg.max_blank_rate),
        E.ExpectColumnValuesToBeBetween(column="n_bad_chars", max_value=0),
        E.ExpectColumnProportionOfUniqueValuesToBeBetween(column="text_hash", min_value=1 - val_cfg.max_duplicate_rate),
        E.ExpectColumnSumToBeBetween(column="is_eval", min_value=val_cfg.min_eval_records),
        E.ExpectColumnSumToBeBetween(column="is_train", min_value=max(1, val_cfg.min_records - 1) // 2),
        E.ExpectColumnValuesToBeUnique(column="id"),
    ]
    if has_tokens and val_cfg.max_tokens:
        ex.append(E.ExpectColumnValuesToBeBetween(column="n_tokens", max_value=val_cfg.max_tokens))
    for cat, policy in val_cfg.pii.items():
        if policy != "allow":  # the custom PII/PHI expectations: no hits allowed (after redaction for 'redact')
            ex.append(pii_expectation(cat))
    return ex


def pii_expectation(category: str):
    """A custom GX expectation per PII/PHI category, over the derived hit-count column."""
    import great_expectations as gx

    cls_name = "ExpectNo" + "".join(p.title() for p in category.split("_"))
    cls = _PII_CLASSES.get(cls_name)
    if cls is None:
        cls = type(cls_name, (gx.expectations.ExpectColumnValuesToBeBetween,), {
            "__doc__": f"Expect no {category.replace('_', ' ')} in any record (detector hits per record == 0).",
            "description": f"No {category.replace('_', ' ')} (PII/PHI) in the training text"})
        _PII_CLASSES[cls_name] = cls
    return cls(column=f"pii_{category}", min_value=0, max_value=0)


_PII_CLASSES: dict[str, type] = {}


def run_gx(df, val_cfg, out_dir: Path, name: str):
    """Build the real GX objects (context → data source → asset → batch definition → suite → validation
    definition → checkpoint with Data Docs) in a file context under out_dir, run them, return (result, docs)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    context = gx.get_context(mode="file", project_root_dir=str(out_dir))
    ds = context.data_sources.add_or_update_pandas("llmops")
    asset = ds.add_dataframe_asset(name=name) if name not in [a.name for a in ds.assets] else ds.get_asset(name)
    batch_def = asset.add_batch_definition_whole_dataframe(f"{name}-all")
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=f"{name}-suite",
                                                             expectations=_expectations(val_cfg, "n_tokens" in df)))
    vd = context.validation_definitions.add_or_update(gx.ValidationDefinition(name=f"{name}-validation",
                                                                              data=batch_def, suite=suite))
    cp = context.checkpoints.add_or_update(gx.Checkpoint(
        name=f"{name}-checkpoint", validation_definitions=[vd],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data-docs")],
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": 0}))
    result = cp.run(batch_parameters={"dataframe": df})
    docs = next(iter(context.get_docs_sites_urls()), {}).get("site_url", "")
    return result, docs.removeprefix("file://")


def _failures(result, df, pii_cfg: dict) -> list[str]:
    out = []
    for vr in result.run_results.values():
        for r in vr.results:
            if r.success:
                continue
            cfg = r.expectation_config
            kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id", "result_format")}
            if "unexpected_count" in r.result:
                observed = f"{r.result['unexpected_count']} record(s) outside the bound"
            else:
                observed = f"observed {r.result.get('observed_value')}"
            col = kw.get("column", "table")
            if col.startswith("pii_"):
                cat = col.removeprefix("pii_")
                out.append(f"{cat}: {int(df[col].sum())} hit(s) in {int((df[col] > 0).sum())} record(s) (policy "
                           f"{pii_cfg[cat]}) — remove them, or set validation.pii.{cat}: redact")
            else:
                bound = {k: v for k, v in kw.items() if k != "column"}
                out.append(f"{cfg.type} on {col}: {observed} {bound} — fix the data or the validation.* bound")
    return out


def validate_data(data_cfg, val_cfg, out_dir: str | Path, tokenizer_path: str | None = None) -> ValidationReport:
    out = Path(out_dir)
    ds = load_dataset(data_cfg.path, data_cfg.format, data_cfg.text_field, data_cfg.id_field, data_cfg.max_records,
                      data_cfg.max_line_bytes)
    tok = None
    if tokenizer_path:
        from tasks.model import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
    mrn = [re.compile(p) for p in val_cfg.mrn_patterns]
    out = out / ds.fingerprint[:16]
    out.mkdir(parents=True, exist_ok=True)
    df, spans = derived_table(ds.records, mrn, data_cfg.eval_fraction, tok)
    pii = {cat: {"count": int(df[f"pii_{cat}"].sum()), "policy": val_cfg.pii.get(cat, "allow"),
                 "examples": [ds.records[i].where.rsplit("/", 1)[-1] for i in df.index[df[f"pii_{cat}"] > 0][:5]]}
           for cat in PLACEHOLDER}
    to_redact = {c for c, v in pii.items() if v["policy"] == "redact" and v["count"]}
    records, data_path, redacted, source_map = ds.records, str(data_cfg.path), False, None
    if to_redact:
        records = [Record(r.id, redact(r.text, s, to_redact), r.where) for r, s in zip(ds.records, spans)]
        source_df, (df, _) = df, derived_table(records, mrn, data_cfg.eval_fraction, tok)
        # The privacy ledger charges a redacted record to the person's original record: keep hash -> source hashes.
        sources: dict[str, list[str]] = {}
        for new, old in zip(df["text_hash"], source_df["text_hash"]):
            sources.setdefault(new, []).append(old)
        source_map = str(write_text_atomic(out / "redacted.sources.json", json.dumps(sources)))
        data_path = str(write_jsonl(records, out / "redacted.jsonl"))
        redacted = True
    result, docs = run_gx(df, val_cfg, out, "records")
    failures = _failures(result, df, val_cfg.pii)
    report = ValidationReport(passed=bool(result.success), fingerprint=fingerprint(r.text for r in records),
                              source_fingerprint=ds.fingerprint, data_path=data_path, n_records=len(records),
                              failures=failures, pii=pii, redacted=redacted, docs_path=docs, source_map=source_map)
    report.summary_md = summary_markdown(report, data_cfg.path)
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2))
    return report


def summary_markdown(rep: ValidationReport, source) -> str:
    rows = "\n".join(f"| {c} | {v['count']} | {v['policy']} | {', '.join(v['examples']) or '—'} |"
                     for c, v in rep.pii.items())
    fails = "\n".join(f"- {f}" for f in rep.failures) or "- none"
    return f"""## Data validation: {'PASSED' if rep.passed else 'FAILED'}
Source `{source}` · {rep.n_records} records · fingerprint `{rep.fingerprint[:16]}…`{' · **redacted copy used**' if rep.redacted else ''}

Failures:
{fails}

| PII/PHI category | hits | policy | example locations (file:line) |
|---|---|---|---|
{rows}

Data Docs: `{rep.docs_path}`
"""


class DataValidationError(DataError):
    """The data failed validation; nothing downstream runs."""


def _task():
    from prefect import task

    @task(name="validate-data", persist_result=False)
    def validate_task(data_cfg, val_cfg, out_dir: str, tokenizer_path: str | None) -> dict:
        from prefect.artifacts import create_markdown_artifact

        rep = validate_data(data_cfg, val_cfg, out_dir, tokenizer_path)
        create_markdown_artifact(rep.summary_md, key="data-validation", description="GX data validation")
        if not rep.passed:
            raise DataValidationError("; ".join(rep.failures[:4]) + (f" (+{len(rep.failures) - 4} more)"
                                                                      if len(rep.failures) > 4 else ""),
                                      str(data_cfg.path), f"see the Data Docs: {rep.docs_path}")
        return asdict(rep)

    return validate_task


validate_task = _task()
