"""Data validation with Great Expectations: detectors, each expectation failing on crafted data, redaction,
no raw PII anywhere in the outputs, and the flow stopping before training."""
import json
from pathlib import Path

import pytest

from llmops.config import DataConfig, ValidationConfig
from tasks.validation import DataValidationError, find_pii, iban_ok, luhn_ok, redact, validate_data
from tests.conftest import ROOT, write_jsonl

MRN = [__import__("re").compile(r"\bMRN[:#\s]*\d{6,10}\b")]


@pytest.mark.parametrize("text,cat", [
    ("mail me at jane.doe@example.org today", "email"),
    ("call +44 20 7946 0958 now", "phone"), ("call (415) 555-0132 now", "phone"),
    ("call +1-415-555-0132 now", "phone"), ("call 020 7946 0958 now", "phone"),
    ("ssn 123-45-6789 here", "ssn"), ("card 4111 1111 1111 1111 ok", "credit_card"),
    ("iban GB82 WEST 1234 5698 7654 32 ok", "iban"), ("host 192.168.10.254 up", "ip_address"),
    ("v6 2001:db8:85a3:0:0:8a2e:370:7334 up", "ip_address"), ("patient MRN: 00123456 seen", "mrn"),
])
def test_detectors_find(text, cat):
    assert cat in find_pii(text, MRN)


@pytest.mark.parametrize("text,cat", [
    ("card 4111 1111 1111 1112 fails Luhn", "credit_card"), ("iban GB82 WEST 1234 5698 7654 33", "iban"),
    ("version 999.300.1.1 is not an IP", "ip_address"), ("ssn 000-12-3456 is invalid", "ssn"),
    ("Act 1, Scene 2, line 1234", "phone"), ("In 1599 and 1600 the plays", "phone"),
])
def test_detectors_avoid_false_positives(text, cat):
    assert cat not in find_pii(text, MRN)


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE89 3704 0044 0532 0130 01")


def test_redaction_uses_typed_placeholders():
    text = "Write to jane@example.org or call +1-415-555-0132."
    assert redact(text, find_pii(text, MRN), {"email", "phone"}) == "Write to [EMAIL] or call [PHONE]."


CLEAN = [{"id": f"r{i}", "text": f"Speech number {i}: the quality of mercy is not strained, it droppeth {i}."}
         for i in range(60)]


def _cfg(path, **val):
    return DataConfig(path=path, eval_fraction=0.2), ValidationConfig(**({"min_records": 20, "min_eval_records": 3,
                                                                          "max_tokens": 80} | val))


@pytest.fixture(scope="module")
def tokenizer_path():
    return str(ROOT / "llmops" / "assets" / "tiny-tokenizer")


def test_clean_data_passes(tmp_path, tokenizer_path):
    data, val = _cfg(write_jsonl(tmp_path / "clean.jsonl", CLEAN))
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert rep.passed and rep.failures == [] and not rep.redacted and rep.data_path == str(data.path)
    assert Path(rep.docs_path).is_file() and rep.docs_path.endswith("index.html")
    assert all(v["count"] == 0 for v in rep.pii.values())


def test_every_expectation_fails_on_crafted_bad_data(tmp_path, tokenizer_path):
    rows = [dict(r) for r in CLEAN[:30]]
    rows[1]["text"] = ""                                 # blank
    rows[2]["text"] = "x" * 500                          # too many chars and tokens
    rows[3]["text"] = "bad \x07 control char"            # encoding sanity
    rows[4]["text"] = rows[5]["text"] = rows[6]["text"] = rows[7]["text"]  # duplicates
    rows[8]["text"] = "SSN 123-45-6789 leaked"           # blocked PII
    rows[9]["id"] = rows[10]["id"]                       # duplicate ids
    data, val = _cfg(write_jsonl(tmp_path / "bad.jsonl", rows), min_records=40, max_chars=300,
                     max_duplicate_rate=0.05, min_eval_records=25)
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert not rep.passed
    text = "\n".join(rep.failures)
    for expected in ("expect_table_row_count_to_be_between", "n_chars", "is_blank", "n_bad_chars", "text_hash",
                     "is_eval", "n_tokens", "expect_column_values_to_be_unique on id", "ssn: 1 hit(s) in 1 record(s)"):
        assert expected in text, expected
    assert rep.pii["ssn"]["examples"] == ["bad.jsonl:9"]


def test_redaction_round_trip_and_no_raw_pii_anywhere(tmp_path, tokenizer_path):
    rows = [dict(r) for r in CLEAN]
    rows[3]["text"] += " Contact jane.doe@example.org."
    rows[7]["text"] += " Phone +44 20 7946 0958."
    data, val = _cfg(write_jsonl(tmp_path / "pii.jsonl", rows))
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert rep.passed and rep.redacted and rep.pii["email"]["count"] == 1 and rep.pii["phone"]["count"] == 1
    redacted = [json.loads(x)["text"] for x in Path(rep.data_path).read_text().splitlines()]
    assert "[EMAIL]" in redacted[3] and "[PHONE]" in redacted[7] and len(redacted) == len(rows)
    assert rep.fingerprint != rep.source_fingerprint
    from tasks.data import text_hash  # the ledger charges each redacted record to the original it came from

    sources = json.loads(Path(rep.source_map).read_text())
    assert sources[text_hash(redacted[3])] == [text_hash(rows[3]["text"])]
    assert sources[text_hash(redacted[0])] == [text_hash(rows[0]["text"])]
    for f in (tmp_path / "out").rglob("*"):  # reports, Data Docs, GX stores: no raw value anywhere
        if f.is_file() and f.name != "redacted.jsonl":
            body = f.read_bytes()
            assert b"jane.doe@example.org" not in body and b"7946 0958" not in body, f
    assert "jane.doe" not in json.dumps(rep.__dict__)


def test_blocked_pii_is_reported_without_values(tmp_path, tokenizer_path):
    rows = [dict(r) for r in CLEAN]
    rows[5]["text"] += " Card 4111 1111 1111 1111."
    data, val = _cfg(write_jsonl(tmp_path / "card.jsonl", rows))
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert not rep.passed and rep.pii["credit_card"]["count"] == 1
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert b"4111 1111 1111 1111" not in f.read_bytes(), f


def test_flow_stops_before_training_on_bad_data(prefect_harness, tiny_config, tmp_path):
    from flows.training import training_flow

    rows = [json.loads(x) for x in Path(tiny_config.data.path).read_text().splitlines()]
    rows[0]["text"] += " SSN 123-45-6789"
    tiny_config.data.path = write_jsonl(tmp_path / "leaky.jsonl", rows)
    with pytest.raises(DataValidationError, match="ssn: 1 hit"):
        training_flow(config=tiny_config)
    state = Path(tiny_config.state_dir)
    from llmops.governance import load_governance

    assert not (state / "runs").exists() and not Path(load_governance().ledger).exists()
    assert not (state / "data").exists()  # not even the splits were written


def test_cli_validate_reports_and_fails_with_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    rows = [dict(r) for r in CLEAN]
    rows[2]["text"] += " SSN 123-45-6789"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    env = dict(os.environ, LLMOPS_HOME=str(tmp_path / "state"))
    r = subprocess.run([sys.executable, "-m", "flows.cli", "validate", "--config", str(ROOT / "configs/tiny.yaml"),
                        "--set", f"data.path={bad}", "--set", "data.max_records=null", "--set",
                        "validation.min_records=20"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Data validation: FAILED" in r.stdout and "123-45-6789" not in r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: data validation failed")
