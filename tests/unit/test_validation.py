"""Data validation with Great Expectations: detectors, each expectation failing on crafted data, redaction,
no raw PII anywhere in the outputs, and the flow stopping before training."""

import json
from pathlib import Path

import pytest

from llmops.config import DataConfig, ValidationConfig
from llmops.errors import DataError
from llmops.text.pii import find_pii, iban_ok, luhn_ok, redact
from tasks.validation import validate_data
from tests.conftest import ROOT, write_jsonl

MRN = [__import__("re").compile(r"\bMRN[:#\s]*\d{6,10}\b")]


@pytest.mark.parametrize(
    "text,cat",
    [
        ("mail me at jane.doe@example.org today", "email"),
        ("call +44 20 7946 0958 now", "phone"),
        ("call (415) 555-0132 now", "phone"),
        ("call +1-415-555-0132 now", "phone"),
        ("call 020 7946 0958 now", "phone"),
        ("ssn 123-45-6789 here", "ssn"),
        ("card 4111 1111 1111 1111 ok", "credit_card"),
        ("iban GB82 WEST 1234 5698 7654 32 ok", "iban"),
        ("host 192.168.10.254 up", "ip_address"),
        ("v6 2001:db8:85a3:0:0:8a2e:370:7334 up", "ip_address"),
        ("patient MRN: 00123456 seen", "mrn"),
    ],
)
def test_detectors_find(text, cat):
    assert cat in find_pii(text, MRN)


@pytest.mark.parametrize(
    "text,cat",
    [
        ("card 4111 1111 1111 1112 fails Luhn", "credit_card"),
        ("iban GB82 WEST 1234 5698 7654 33", "iban"),
        ("version 999.300.1.1 is not an IP", "ip_address"),
        ("ssn 000-12-3456 is invalid", "ssn"),
        ("Act 1, Scene 2, line 1234", "phone"),
        ("In 1599 and 1600 the plays", "phone"),
    ],
)
def test_detectors_avoid_false_positives(text, cat):
    assert cat not in find_pii(text, MRN)


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89 3704 0044 0532 0130 00") and not iban_ok("DE89 3704 0044 0532 0130 01")


def test_redaction_uses_typed_placeholders():
    text = "Write to jane@example.org or call +1-415-555-0132."
    assert redact(text, find_pii(text, MRN), {"email", "phone"}) == "Write to [EMAIL] or call [PHONE]."


CLEAN = [
    {"id": f"r{i}", "text": f"Speech number {i}: the quality of mercy is not strained, it droppeth {i}."}
    for i in range(60)
]


def _cfg(path, **val):
    return DataConfig(path=path, eval_fraction=0.2), ValidationConfig(
        **({"min_records": 20, "min_eval_records": 3, "max_tokens": 80} | val)
    )


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
    rows[1]["text"] = ""  # blank
    rows[2]["text"] = "x" * 500  # too many chars and tokens
    rows[3]["text"] = "bad \x07 zebra text"  # control character (policy block)
    rows[4]["text"] = rows[5]["text"] = rows[6]["text"] = rows[7]["text"]  # duplicates
    rows[8]["text"] = "SSN 123-45-6789 leaked"  # blocked PII
    rows[9]["id"] = rows[10]["id"]  # duplicate ids
    data, val = _cfg(
        write_jsonl(tmp_path / "bad.jsonl", rows),
        min_records=40,
        max_chars=300,
        max_duplicate_rate=0.05,
        min_eval_records=25,
        control_chars="block",
    )
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert not rep.passed
    by_col = {c["column"]: c for c in rep.checks}
    # every failing check: its count, the file:line of the records behind it, the setting that changes it
    expected = {
        "n_chars": (2, ["bad.jsonl:2", "bad.jsonl:3"], "validation.max_chars"),
        "is_blank": (1, ["bad.jsonl:2"], "validation.max_blank_rate"),
        "n_control": (1, ["bad.jsonl:4"], "validation.control_chars"),
        "text_hash": (3, ["bad.jsonl:6", "bad.jsonl:7", "bad.jsonl:8"], "validation.max_duplicate_rate"),
        "id": (2, ["bad.jsonl:10", "bad.jsonl:11"], "data.id_field"),
        "n_tokens": (1, ["bad.jsonl:3"], "validation.max_tokens"),
        "pii_ssn": (1, ["bad.jsonl:9"], "validation.pii.ssn"),
        "table": (30, [], "validation.min_records"),
        "is_eval": (5, [], "validation.min_eval_records"),
    }
    assert set(by_col) == set(expected)
    for col, (count, where, setting) in expected.items():
        c = by_col[col]
        assert (c["count"], c["examples"], c["setting"]) == (count, where, setting), col
    lines = {f.split(":")[0]: f for f in rep.failures}
    for col in ("n_chars", "is_blank", "n_control", "text_hash", "id", "n_tokens", "ssn"):
        assert " at bad.jsonl:" in lines[col] and "validation." in lines[col] or "data.id_field" in lines[col], col
    assert "1 longer than validation.max_chars=300" in lines["n_chars"]
    assert lines["ssn"].startswith("ssn: 1 hit(s) in 1 record(s) (policy block) at bad.jsonl:9")
    assert rep.pii["ssn"]["examples"] == ["bad.jsonl:9"]
    report = json.loads(Path(rep.report_path).read_text())  # the JSON report carries the same locations
    assert report["checks"] == rep.checks and report["failures"] == rep.failures
    docs = "".join(f.read_text() for f in (tmp_path / "out").rglob("*.html"))
    assert "bad.jsonl:4" in docs and "bad.jsonl:9" in docs  # Data Docs shows file:line of failing records
    assert "123-45-6789" not in docs + json.dumps(report) and "zebra" not in docs + json.dumps(report)


def test_control_chars_stripped_by_default_counted_with_locations(tmp_path, tokenizer_path):
    rows = [dict(r) for r in CLEAN]
    rows[2]["text"] = "b\bbo\bol\bld text, a bell \x07 and a C1 \x85 char\ttab"
    rows[9]["text"] += "\x1b[0m"
    data, val = _cfg(write_jsonl(tmp_path / "ctl.jsonl", rows))
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert rep.passed and rep.cleaned and rep.data_path != str(data.path)
    cc = rep.control_chars
    assert (cc["policy"], cc["count"], cc["records"], cc["examples"]) == (
        "strip",
        6,
        2,
        ["ctl.jsonl:3", "ctl.jsonl:10"],
    )
    copy = [json.loads(x)["text"] for x in Path(rep.data_path).read_text().splitlines()]
    assert copy[2] == "bold text, a bell  and a C1  char\ttab" and copy[9].endswith("[0m") and len(copy) == len(rows)
    assert "ctl.jsonl:3" in rep.summary_md and "validation.control_chars" in rep.summary_md
    # the ledger charges the copy's records to the originals: an overstruck letter changed the identity of record
    # 3, while dropping Cc characters alone (record 10) does not change a record's identity
    from llmops.text.identity import text_hash

    sources = json.loads(Path(rep.source_map).read_text())
    assert sources == {text_hash(copy[2]): [text_hash(rows[2]["text"])]}
    assert text_hash(copy[9]) == text_hash(rows[9]["text"]) and rep.fingerprint != rep.source_fingerprint


@pytest.mark.parametrize("policy", ["block", "allow"])
def test_control_chars_block_or_allow(tmp_path, tokenizer_path, policy):
    rows = [dict(r) for r in CLEAN]
    rows[4]["text"] += " \x07"
    data, val = _cfg(write_jsonl(tmp_path / "ctl.jsonl", rows), control_chars=policy)
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert rep.control_chars["count"] == 1 and rep.control_chars["examples"] == ["ctl.jsonl:5"]
    if policy == "block":
        assert not rep.passed and rep.failures == [
            "n_control: 1 record(s) with control characters (policy block) at ctl.jsonl:5 — set "
            "validation.control_chars: strip (the default) to remove them, or allow to keep them"
        ]
    else:
        assert rep.passed and not rep.cleaned and rep.data_path == str(data.path)


def test_partial_pii_settings_keep_the_other_categories(tmp_path, tokenizer_path):
    from llmops.config import load_config, pii_defaults

    p = tmp_path / "c.yaml"
    p.write_text("validation:\n  pii: {email: block}\n")
    for cfg in (load_config(p), load_config(None, {"validation.pii.email": "block"})):
        assert cfg.validation.pii == pii_defaults() | {"email": "block"}
        assert cfg.validation.pii["ssn"] == "block" and cfg.validation.pii["phone"] == "redact"
    rows = [dict(r) for r in CLEAN]
    rows[1]["text"] += " SSN 123-45-6789"
    rows[2]["text"] += " jane@example.org"
    data, _ = _cfg(write_jsonl(tmp_path / "pii.jsonl", rows))
    rep = validate_data(
        data,
        load_config(
            p, {"validation.min_records": 20, "validation.min_eval_records": 3, "validation.max_tokens": 80}
        ).validation,
        tmp_path / "out",
        tokenizer_path,
    )
    assert not rep.passed and {f.split(":")[0] for f in rep.failures} == {"ssn", "email"}


def test_latin1_via_data_encoding_and_every_bad_file_named(tmp_path, tokenizer_path):
    d = tmp_path / "d"
    d.mkdir()
    lines = [json.dumps({"id": r["id"], "text": r["text"] + " caf\u00e9"}, ensure_ascii=False) for r in CLEAN]
    for name, part in (("a.jsonl", lines[:30]), ("b.jsonl", lines[30:45]), ("c.jsonl", lines[45:])):
        (d / name).write_bytes(("\n".join(part) + "\n").encode("latin-1"))
    (d / "ok.jsonl").write_text("")
    data, val = _cfg(d)
    with pytest.raises(DataError) as e:
        validate_data(data, val, tmp_path / "out", tokenizer_path)
    msg = str(e.value)
    assert msg.startswith("data.encoding=utf-8: 3 file(s) are not valid utf-8: ") and "set data.encoding" in msg
    for name in ("a.jsonl", "b.jsonl", "c.jsonl"):
        assert f"{d / name}:1 (byte " in msg
    data = data.model_copy(update={"encoding": "latin-1"})
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert rep.passed and rep.n_records == 60
    from tasks.data import load_dataset

    assert load_dataset(d, encoding="latin-1").records[0].text.endswith(" café")


def test_utf8_bom_is_not_text(tmp_path, tokenizer_path):
    p = write_jsonl(tmp_path / "bom.jsonl", CLEAN)
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes())
    data, val = _cfg(p)
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert rep.passed and not rep.cleaned
    from tasks.data import load_dataset

    assert load_dataset(p).records[0].text == CLEAN[0]["text"]


def test_parallel_chunks_give_the_same_report_as_one_pass(tmp_path, tokenizer_path):
    rows = [dict(r) for r in CLEAN] * 3
    rows = [{"id": f"{r['id']}-{i}", "text": r["text"] + f" {i}"} for i, r in enumerate(rows)]
    rows[7]["text"] += " \x07 mail jane@example.org"
    rows[150]["text"] = "x" * 400
    data, val = _cfg(write_jsonl(tmp_path / "big.jsonl", rows), max_chars=300)
    one = validate_data(data, val, tmp_path / "one", tokenizer_path, workers=1, reuse=False)
    many = validate_data(data, val, tmp_path / "many", tokenizer_path, workers=2, chunk_bytes=2000, reuse=False)
    assert many.failures == one.failures and "big.jsonl:151" in one.failures[0]
    assert (many.fingerprint, many.source_fingerprint, many.pii, many.control_chars) == (
        one.fingerprint,
        one.source_fingerprint,
        one.pii,
        one.control_chars,
    )
    assert Path(many.data_path).read_bytes() == Path(one.data_path).read_bytes()
    assert json.loads(Path(many.source_map).read_text()) == json.loads(Path(one.source_map).read_text())


def test_tokens_counted_only_where_the_byte_bound_could_exceed(tmp_path, tokenizer_path):
    from tasks.model import load_tokenizer

    rows = [dict(r) for r in CLEAN]
    rows[3]["text"] = "word " * 40  # 200 bytes > max_tokens: counted exactly
    data, val = _cfg(write_jsonl(tmp_path / "t.jsonl", rows), max_tokens=100)
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    exact = len(load_tokenizer(tokenizer_path)(rows[3]["text"], add_special_tokens=False)["input_ids"])
    assert rep.n_tokenized == 1 and exact > 0
    assert rep.passed == (exact <= 100)


def test_reused_report_for_identical_inputs(tmp_path, tokenizer_path):
    data, val = _cfg(write_jsonl(tmp_path / "clean.jsonl", CLEAN))
    first = validate_data(data, val, tmp_path / "out", tokenizer_path)
    again = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert again == first
    write_jsonl(tmp_path / "clean.jsonl", CLEAN[:-1])  # new content: scanned again
    assert validate_data(data, val, tmp_path / "out", tokenizer_path).n_records == len(CLEAN) - 1


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
    from llmops.text.identity import text_hash  # the ledger charges each redacted record to the original it came from

    sources = json.loads(Path(rep.source_map).read_text())  # the ledger reads sources.get(h, [h])
    assert sources[text_hash(redacted[3])] == [text_hash(rows[3]["text"])]
    assert sources.get(text_hash(redacted[0]), [text_hash(redacted[0])]) == [text_hash(rows[0]["text"])]
    assert rep.pii["email"]["examples"] == ["pii.jsonl:4"] and rep.pii["phone"]["examples"] == ["pii.jsonl:8"]
    for f in (tmp_path / "out").rglob("*"):  # reports, Data Docs, GX stores: no raw value anywhere
        if f.is_file() and f.name != "clean.jsonl":
            body = f.read_bytes()
            assert b"jane.doe@example.org" not in body and b"7946 0958" not in body, f
    assert "jane.doe" not in json.dumps(rep.__dict__)


def test_phone_regions_setting_reaches_the_scan_workers(tmp_path, tokenizer_path):
    """A national number without +country is a phone in the listed regions: `validation.phone_regions`."""
    rows = [dict(r) for r in CLEAN]
    rows[2]["text"] += " Office 0161 496 0000, Manchester."
    path = write_jsonl(tmp_path / "uk.jsonl", rows)
    counts = {}
    for regions in (["US"], ["US", "GB"]):
        data, val = _cfg(path)
        val = val.model_copy(update={"phone_regions": regions})
        rep = validate_data(data, val, tmp_path / f"out-{len(regions)}", tokenizer_path)
        counts[len(regions)] = (rep.pii.get("phone") or {}).get("count", 0)
    assert counts == {1: 0, 2: 1}
    data, val = _cfg(path)
    assert val.phone_regions[:4] == ["US", "GB", "DE", "FR"]  # the default is international


def test_what_redaction_leaves_is_its_own_error(tmp_path, tokenizer_path, monkeypatch):
    """A redaction that leaves a hit (here: a broken redactor) fails with its own message, never policy advice."""
    import llmops.text.pii as pii

    rows = [dict(r) for r in CLEAN]
    rows[3]["text"] += " Mail jane.doe@example.org today."
    data, val = _cfg(write_jsonl(tmp_path / "left.jsonl", rows))
    val = val.model_copy(update={"workers": 1})
    monkeypatch.setattr(pii, "redact", lambda text, spans, cats: text)
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert not rep.passed
    (line,) = [f for f in rep.failures if f.startswith("pii: redaction left")]
    assert "redaction left 1 hit(s) in 1 record(s) at left.jsonl:4" in line, line
    assert "set validation.pii" not in line and "jane.doe" not in line


def test_a_huge_record_fails_fast_in_bounded_memory(tmp_path, tokenizer_path):
    """Token counting is capped at what max_tokens needs: a 20 MB one-line record is decided from prefixes."""
    import resource
    import time

    from tasks.scan import ScanSpec, _count_tokens

    big = "lorem ipsum dolor sit amet " * 800_000  # 21.6 MB
    spec = ScanSpec(tokenizer=tokenizer_path, max_tokens=4096)
    t0, rss0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: list = []
    assert _count_tokens([big, "short text"], spec, out) == 1
    assert out[0] > 4096 and out[1] is None
    assert time.process_time() - t0 < 2.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # KiB: no 20 MB-record encoding


def test_capped_token_count_decides_like_the_exact_count(tokenizer_path):
    from tokenizers import Tokenizer

    from tasks.scan import _capped_count

    tok = Tokenizer.from_file(f"{tokenizer_path}/tokenizer.json")

    def count(texts):
        return [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]

    for text in ("lorem ipsum dolor " * 400, "x" * 5000, "a b " * 3000 + "zzzz" * 900):
        exact = count([text])[0]
        for cap in (1, exact // 9, exact // 2, exact - 1, exact, exact + 1, exact * 10):
            got = _capped_count(count, text, cap)
            assert (got > cap) == (exact > cap), (cap, exact, got)
            assert got == exact or got > cap


def test_blocked_pii_is_reported_without_values(tmp_path, tokenizer_path):
    rows = [dict(r) for r in CLEAN]
    rows[5]["text"] += " Card 4111 1111 1111 1111."
    data, val = _cfg(write_jsonl(tmp_path / "card.jsonl", rows))
    rep = validate_data(data, val, tmp_path / "out", tokenizer_path)
    assert not rep.passed and rep.pii["credit_card"]["count"] == 1
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert b"4111 1111 1111 1111" not in f.read_bytes(), f


def test_cli_validate_reports_and_fails_with_exit_2(tmp_path):
    import os
    import subprocess
    import sys

    rows = [dict(r) for r in CLEAN]
    rows[2]["text"] += " SSN 123-45-6789"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    env = dict(os.environ, LLMOPS_HOME=str(tmp_path / "state"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "validate",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--set",
            f"data.path={bad}",
            "--set",
            "data.max_records=null",
            "--set",
            "validation.min_records=20",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Data validation: FAILED" in r.stdout and "123-45-6789" not in r.stdout + r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}: data validation failed")


def test_plain_text_cut_at_blank_lines_and_utf16(tmp_path, tokenizer_path):
    """Text files are cut only at blank lines (a paragraph never splits across workers); UTF-16 stays one range."""
    from tasks.data import load_dataset

    paragraphs = [f"Paragraph {i} line one,\nline two of {i}." for i in range(80)]
    p = tmp_path / "book.txt"
    p.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    data, val = _cfg(p)
    one = validate_data(data, val, tmp_path / "one", tokenizer_path, workers=1, reuse=False)
    many = validate_data(data, val, tmp_path / "many", tokenizer_path, workers=2, chunk_bytes=300, reuse=False)
    assert one.passed and many.passed and one.n_records == many.n_records == 80
    assert many.fingerprint == one.fingerprint == load_dataset(p).fingerprint
    u16 = tmp_path / "book16.txt"
    u16.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-16")
    rep = validate_data(
        data.model_copy(update={"path": u16, "encoding": "utf-16"}),
        val,
        tmp_path / "u16",
        tokenizer_path,
        workers=2,
        chunk_bytes=300,
        reuse=False,
    )
    assert rep.passed and rep.fingerprint == one.fingerprint
