"""PII detectors measured on the labelled evaluation set: llmops/text/pii.py vs the old regexes vs Presidio.

    .venv/bin/pip install -e '.[bench]'      # presidio-analyzer (bench only; no spaCy model is used)
    .venv/bin/python bench/bench_pii.py [--split all|real|dev|test]

Scoring is span-level with overlap matching: a predicted span is a true positive if it overlaps a labelled span
of the same category (precision = such predictions / predictions); a labelled span is found if any prediction of
its category overlaps it (recall = found / labelled). The set is tests/assets/pii_eval/records.jsonl (README there);
`test` is the held-out split (id % 5 == 0) the detectors were not tuned on, `dev` the rest, `real` drops the
marked synthetic insertions, `fresh` the 200 records added after tuning (ids >= 1400). Presidio runs its
predefined pattern recognizers directly (nlp_artifacts=None),
with tldextract offline (its bundled public-suffix snapshot).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EVAL = ROOT / "tests/assets/pii_eval/records.jsonl"
HELDOUT = ROOT / "tests/assets/pii_heldout/records.jsonl"
REGION = {"en_US": "US", "en_GB": "GB", "de_DE": "DE", "fr_FR": "FR", "meta": "US"}
MRN = [re.compile(r"\bMRN[:#\s]*\d{6,10}\b")]
SCORED = ("email", "message_id", "phone", "ssn", "credit_card", "ip_address", "iban")


def load(split: str = "all") -> list[dict]:
    recs = [json.loads(x) for x in EVAL.read_text(encoding="utf-8").splitlines()]
    keep = {
        "all": lambda r: True,
        "real": lambda r: not r.get("synthetic"),
        "dev": lambda r: r["id"] % 5 != 0,
        "test": lambda r: r["id"] % 5 == 0,
        "test-real": lambda r: r["id"] % 5 == 0 and not r.get("synthetic"),
        "fresh": lambda r: r["id"] >= 1400,
    }[split]
    return [r for r in recs if keep(r)]


def score(records: list[dict], preds: list[dict], cats=SCORED) -> dict[str, dict[str, float]]:
    """Per category: n (labelled), precision, recall, f1 with overlap matching (see the module docstring)."""
    out = {}
    for cat in cats:
        n_pred = tp_pred = n_gold = tp_gold = 0
        for r, p in zip(records, preds):
            gold, pred = r["labels"].get(cat, []), p.get(cat, [])
            hit = lambda s, spans: any(a < s[1] and s[0] < b for a, b in spans)  # noqa: E731
            n_pred, tp_pred = n_pred + len(pred), tp_pred + sum(hit(s, gold) for s in pred)
            n_gold, tp_gold = n_gold + len(gold), tp_gold + sum(hit(s, pred) for s in gold)
        prec = tp_pred / n_pred if n_pred else 1.0
        rec = tp_gold / n_gold if n_gold else 1.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[cat] = {"n": n_gold, "n_pred": n_pred, "precision": prec, "recall": rec, "f1": f1}
    return out


def ours(text: str) -> dict:
    from llmops.text.pii import find_pii

    return find_pii(text, MRN)


def valid_phone_recall(records: list[dict], preds: list[dict]) -> tuple[int, int]:
    """(found, n) over the labelled phones libphonenumber itself calls valid in the record's region."""
    found = n = 0
    for r, p in zip(records, preds):
        for span, meta in zip(r["labels"].get("phone", []), r.get("meta", {}).get("phone", [])):
            if meta.get("valid"):
                n += 1
                found += any(a < span[1] and span[0] < b for a, b in p.get("phone", []))
    return found, n


def region_of(locale: str) -> str:
    """The region a locale's numbers are written for: the Faker locales' table, else the territory ("da_DK" -> DK)."""
    if locale in REGION:
        return REGION[locale]
    territory = locale.split("@")[0].split("_")[-1].upper()
    return territory if len(territory) == 2 and territory.isalpha() else "US"


def ours_told(text: str, region: str) -> dict:
    """llmops with the record's region put first in phone_regions (what a user sets for data from that region)."""
    from llmops.text.pii import DEFAULT_PHONE_REGIONS, find_pii

    return find_pii(text, MRN, (region, *[r for r in DEFAULT_PHONE_REGIONS if r != region]))


def matcher_detector():
    """The phone anchor: plain phonenumbers.PhoneNumberMatcher with the record's own region (it is told the locale)."""
    import phonenumbers

    def detect(text: str, region: str = "US") -> dict:
        return {"phone": [(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region)]}

    return detect


def old(text: str) -> dict:
    from pii_baseline import find_pii  # the detectors as they were before llmops/text/pii.py (frozen copy)

    return find_pii(text, MRN)


def presidio_detector(threshold: float = 0.0):
    """Presidio's predefined pattern recognizers; `threshold` 0 is AnalyzerEngine's default score_threshold."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )
    from presidio_analyzer.predefined_recognizers.generic import email_recognizer

    # Offline: the bundled public-suffix snapshot, no download attempt (and no traceback in the output).
    email_recognizer.tldextract = type(
        "T", (), {"extract": staticmethod(tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None))}
    )
    recs = {
        "email": EmailRecognizer(),
        "phone": PhoneRecognizer(),
        "ssn": UsSsnRecognizer(),
        "credit_card": CreditCardRecognizer(),
        "ip_address": IpRecognizer(),
        "iban": IbanRecognizer(),
    }

    def detect(text: str) -> dict:
        out: dict[str, list] = {}
        for cat, rec in recs.items():
            for res in rec.analyze(text, entities=rec.supported_entities, nlp_artifacts=None) or []:
                if res.score >= threshold:
                    out.setdefault(cat, []).append((res.start, res.end))
        return out

    return detect


def run(detect, records: list[dict]) -> tuple[list[dict], float]:
    """Predictions and records per CPU-second of this process (the 2 cores here are shared: wall time is noisy)."""
    t0 = time.process_time()
    preds = [detect(r["text"]) for r in records]
    return preds, len(records) / (time.process_time() - t0)


def table(name: str, s: dict, rate: float) -> str:
    rows = [f"{name}  ({rate:,.0f} records/s)"]
    for cat, v in s.items():
        rows.append(f"  {cat:<12}{v['n']:>6}{v['n_pred']:>7}{v['precision']:>8.3f}{v['recall']:>8.3f}{v['f1']:>8.3f}")
    return "\n".join(rows)


def heldout(detectors: dict, path: Path = HELDOUT) -> None:
    """tests/assets/pii_heldout: P/R per category, then per locale, for every detector (plus the phone anchor)."""
    records = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    detectors = detectors | {
        "llmops, region added to phone_regions (told the region)": ours_told,
        "phonenumbers.PhoneNumberMatcher (told the region)": matcher_detector(),
    }
    from llmops.text.pii import DEFAULT_PHONE_REGIONS

    def group(locale: str) -> str:  # many locales (glibc): by whether the default phone_regions hold the territory
        if len(locales) <= 12:
            return locale
        return "territory in default regions" if region_of(locale) in DEFAULT_PHONE_REGIONS else "other territories"

    locales = sorted({r["locale"] for r in records})
    groups = sorted({group(loc) for loc in locales})
    print(f"\nheld-out set: {len(records)} records ({len(locales)} locales); span-level, overlap matching")
    rows = []
    for name, det in detectors.items():
        told = "told the region" in name
        t0 = time.process_time()
        preds = [det(r["text"], region_of(r["locale"])) if told else det(r["text"]) for r in records]
        us = (time.process_time() - t0) / len(records) * 1e6
        cats = ("phone",) if "PhoneNumberMatcher" in name else SCORED
        for loc in ["all", *groups]:
            idx = [i for i, r in enumerate(records) if loc in ("all", group(r["locale"]))]
            sub, sp = [records[i] for i in idx], [preds[i] for i in idx]
            for cat, v in score(sub, sp, cats).items():
                if v["n"] or v["n_pred"]:
                    extra = ""
                    if cat == "phone":
                        f, n = valid_phone_recall(sub, sp)
                        extra = f"{f / n:.3f} ({f}/{n})" if n else ""
                    rows.append((name, loc, cat, v, extra))
        print(f"  {name}: {us:,.0f} µs/record")
    print(
        "\n| detector | locale | category | gold | pred | P | R | R on valid phones |\n|---|---|---|---:|---:|---:|---:|---:|"
    )
    for name, loc, cat, v, extra in rows:
        print(
            f"| {name} | {loc} | {cat} | {v['n']} | {v['n_pred']} | {v['precision']:.3f} | {v['recall']:.3f} | {extra} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--heldout",
        nargs="?",
        const=str(HELDOUT),
        help="score a labelled JSONL with locales (default tests/assets/pii_heldout/records.jsonl) by category and locale",
    )
    ap.add_argument("--split", default="all", choices=["all", "real", "dev", "test", "test-real", "fresh"])
    ap.add_argument("--no-presidio", action="store_true")
    ap.add_argument(
        "--speed-corpus",
        default=str(ROOT / "data/sample/shakespeare.jsonl"),
        help="JSONL with a 'text' field: records/s on ordinary text (the eval set is PII-dense on purpose)",
    )
    args = ap.parse_args()
    records = load(args.split)
    detectors = {"llmops/text/pii.py": ours, "old (bench/pii_baseline.py = 9b982bf)": old}
    if not args.no_presidio:
        detectors["Presidio pattern recognizers"] = presidio_detector()
        detectors["Presidio, score >= 0.5"] = presidio_detector(0.5)
    if args.heldout:
        heldout(detectors, Path(args.heldout))
        return
    print(f"\nsplit={args.split}: {len(records)} records; span-level, overlap matching")
    print(f"  {'category':<12}{'gold':>6}{'pred':>7}{'P':>8}{'R':>8}{'F1':>8}")
    for name, det in detectors.items():
        det(records[0]["text"])  # imports outside the timing
        preds, rate = run(det, records)
        print(table(name, score(records, preds), rate))
    corpus = [{"text": json.loads(x)["text"]} for x in Path(args.speed_corpus).read_text(encoding="utf-8").splitlines()]
    print(f"\nrecords per CPU-second on {args.speed_corpus} ({len(corpus):,} records, one core, best of 3):")
    for name, det in detectors.items():
        print(f"  {name:<34}{max(run(det, corpus)[1] for _ in range(3)):>10,.0f}")


if __name__ == "__main__":
    main()
