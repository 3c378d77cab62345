"""tasks/scan.plan_chunks: byte ranges that tile each file, end on a record separator, know their first line, and
cost one pass even when one line is huge (a 60 MB record used to be re-joined 64 KB at a time: 23 s)."""

import random
import time

import pytest

from tasks.scan import plan_chunks


@pytest.mark.parametrize("kind, sep", [("jsonl", b"\n"), ("text", b"\n\n")])
def test_chunks_tile_the_file_and_end_on_a_separator(tmp_path, kind, sep):
    rng = random.Random(3)
    for trial in range(30):
        parts = [bytes(rng.choice(b"ab \n") for _ in range(rng.choice([0, 1, 5, 50, 700]))) for _ in range(40)]
        data = sep.join(parts) + (sep if trial % 2 else b"")
        f = tmp_path / f"f{trial}"
        f.write_bytes(data)
        chunks = plan_chunks([f], lambda _: kind, "utf-8", chunk_bytes=rng.choice([1, 7, 64, 300]))
        assert chunks[0].start == 0 and chunks[-1].end == len(data)
        for a, b in zip(chunks, chunks[1:]):
            assert a.end == b.start and data[: a.end].endswith(sep), (trial, a, b)
        for c in chunks:
            assert c.first_line == data[: c.start].count(b"\n") + 1


def test_one_huge_line_is_planned_in_one_pass(tmp_path):
    f = tmp_path / "huge.jsonl"
    f.write_bytes(b'{"text": "a"}\n' * 1000 + b'{"text": "' + b"word " * 12_000_000 + b'"}\n' + b'{"text": "b"}\n')
    t = time.perf_counter()
    chunks = plan_chunks([f], lambda _: "jsonl", "utf-8")  # default 8 MB chunks: the 60 MB line spans 7 of them
    assert time.perf_counter() - t < 3.0  # ~0.05 s; the re-joining version took 12 s
    assert [c.first_line for c in chunks][-1] <= 1002 and chunks[-1].end == f.stat().st_size
