import json

import pytest

from llmops.errors import DataError
from tasks.data import fingerprint, load_dataset, prepare_data, read_texts, split
from tests.conftest import write_jsonl

ROWS = [{"id": f"r{i}", "text": f"Record number {i} says something."} for i in range(30)]


def test_jsonl_csv_text_and_directory(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS[:10])
    (tmp_path / "b.csv").write_text('id,text\nc1,"Hello, world"\nc2,Second row\n', encoding="utf-8")
    (tmp_path / "c.txt").write_text("First para\nline two\n\n\nSecond para\n", encoding="utf-8")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    ds = load_dataset(tmp_path)
    assert [f.name for f in ds.files] == ["a.jsonl", "b.csv", "c.txt"]
    texts = [r.text for r in ds.records]
    assert texts[10:] == ["Hello, world", "Second row", "First para\nline two", "Second para"]
    assert ds.records[0].id == "r0" and ds.records[11].where.endswith("b.csv:3")
    assert ds.records[12].id == "c.txt:1" and ds.records[13].id == "c.txt:5"


def test_fingerprint_is_content_identity(tmp_path):
    a = fingerprint(["x", "y\r\nz"])
    assert a == fingerprint(["y\nz", " x "])  # order, line endings and outer whitespace do not matter
    assert a != fingerprint(["x", "y\nZ"])
    assert a != fingerprint(["x"])
    f1 = write_jsonl(tmp_path / "1.jsonl", ROWS)
    f2 = write_jsonl(tmp_path / "2.jsonl", list(reversed(ROWS)))
    assert load_dataset(f1).fingerprint == load_dataset(f2).fingerprint


@pytest.mark.parametrize(
    "content,match,line",
    [
        (b'{"text": "ok"}\n{"text": oops}\n', "malformed JSON", 2),
        (b'{"text": "ok"}\n["a"]\n', "must be an object", 2),
        (b'{"text": "ok"}\n{"body": "x"}\n', "missing field 'text'", 2),
        (b'{"text": "ok"}\n{"text": 5}\n', "is int, not text", 2),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, match, line):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        load_dataset(p)
    assert f"{p}:{line}:" in str(e.value)


def test_enormous_line_rejected(tmp_path):
    p = tmp_path / "big.jsonl"
    p.write_text('{"text": "ok"}\n' + json.dumps({"text": "x" * 5000}) + "\n")
    with pytest.raises(DataError, match=r"big.jsonl:2: line is 5,012 characters"):
        load_dataset(p, max_line_bytes=1000)


def test_empty_missing_and_unusable(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records found"):
        load_dataset(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "missing.jsonl")
    d = tmp_path / "d"
    d.mkdir()
    (d / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="no usable files"):
        load_dataset(d)
    with pytest.raises(DataError, match="no column 'text'"):
        (tmp_path / "x.csv").write_text("a,b\n1,2\n")
        load_dataset(tmp_path / "x.csv")


def test_split_is_deterministic_disjoint_and_order_free(tmp_path):
    ds = load_dataset(write_jsonl(tmp_path / "a.jsonl", [{"text": f"line {i}"} for i in range(500)]))
    train, held = split(ds, 0.2)
    assert len(train) + len(held) == 500 and 60 < len(held) < 140
    assert not {r.text for r in train} & {r.text for r in held}
    ds2 = load_dataset(write_jsonl(tmp_path / "b.jsonl", [{"text": f"line {i}"} for i in reversed(range(500))]))
    assert {r.text for r in split(ds2, 0.2)[1]} == {r.text for r in held}


def test_prepare_data_writes_content_addressed_splits(tmp_path, tiny_jsonl):
    ref = prepare_data(tiny_jsonl, tmp_path / "state", 0.1)
    assert ref.n_train + ref.n_eval == ref.n_records == 200
    assert ref.fingerprint[:16] in ref.train_path
    assert len(read_texts(ref.train_path)) == ref.n_train and len(read_texts(ref.eval_path)) == ref.n_eval
    assert not list((tmp_path / "state").rglob("*.tmp"))


def test_prepare_data_refuses_empty_split(tmp_path):
    p = write_jsonl(tmp_path / "one.jsonl", [{"text": "only one"}])
    with pytest.raises(DataError, match="split left"):
        prepare_data(p, tmp_path / "state", 0.1)
    assert not (tmp_path / "state").exists()


def test_undecodable_file_named_with_line_and_the_setting(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"data.encoding=utf-8: 1 file\(s\) are not valid utf-8: {p}:2 \(byte 28\)"):
        load_dataset(p)
    assert load_dataset(p, encoding="cp1252").records[1].text == "café"


def test_identity_regex_drops_exactly_the_invisible_code_points():
    """identity() uses one precomputed regex class; it must equal the per-character definition (the privacy ledger
    keys on it) for every code point, including the planes the class builder skips."""
    import sys
    import unicodedata

    from llmops.text.identity import _EXTRA_INVISIBLE, _INVISIBLE, identity

    identity("x")
    from llmops.text.identity import _DROP

    for cp in range(sys.maxunicode + 1):
        ch = chr(cp)
        drop = not ch.isspace() and (unicodedata.category(ch) in _INVISIBLE or cp in _EXTRA_INVISIBLE)
        assert bool(_DROP.fullmatch(ch)) == drop, hex(cp)
    assert identity("a\u200bb\u00a0 c\x07\t\nd\ufeff") == "ab c d"


def test_bad_input_is_named_with_the_fix(tmp_path, caplog):
    """UTF-16 with a BOM suggests utf-16; a multi-line CSV record is located at its first line; skipped files are
    said once (never silently)."""
    from tasks.data import check_encoding, list_files

    u16 = tmp_path / "u16" / "a.jsonl"
    u16.parent.mkdir()
    u16.write_bytes('{"text": "hello"}\n'.encode("utf-16"))
    with pytest.raises(DataError) as e:
        check_encoding([u16], "utf-8")
    assert "UTF-16 byte-order mark: set data.encoding: utf-16" in str(e.value)
    assert [r.text for r in load_dataset(u16, encoding="utf-16").records] == ["hello"]
    import gzip

    gz = tmp_path / "gz" / "a.jsonl"  # compressed bytes under a text name: said as such, not as an encoding problem
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 50))
    with pytest.raises(DataError) as e:
        check_encoding([gz], "utf-8")
    assert (
        str(e.value) == f"{gz}: gzip-compressed, not text — decompress it (gunzip) first, or remove it from data.path"
    )

    (tmp_path / "m.csv").write_text('id,text\na,"one\ntwo\nthree"\nb,four\n', encoding="utf-8")
    recs = load_dataset(tmp_path / "m.csv").records
    assert [r.where.rsplit(":", 1)[1] for r in recs] == ["2", "5"]

    d = tmp_path / "dir"
    d.mkdir()
    write_jsonl(d / "a.jsonl", ROWS[:3])
    (d / "notes.pdf").write_bytes(b"%PDF")
    with caplog.at_level("WARNING", logger="llmops"):
        assert [p.name for p in list_files(d, "auto")] == ["a.jsonl"]
    assert "skipped 1 file(s) of unknown type: notes.pdf" in caplog.text
