"""llmops/text/neardup.py: variants of a real record are related to it, unrelated records are not, keys are stable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmops.text import neardup

ROOT = Path(__file__).resolve().parents[2]
RECORDS = [json.loads(x)["text"] for x in (ROOT / "data/sample/shakespeare.jsonl").read_text("utf-8").splitlines()]
# Real records of different lengths (8, ~20, ~60 words), and an unrelated pair.
SAMPLES = [next(t for t in RECORDS if len(neardup.fold(t)) == n) for n in (8, 20, 60)]
K = neardup.record_keys


def _words(t):
    return t.split()


def _variants(t: str) -> dict[str, list[str]]:
    w = _words(t)
    mid = len(w) // 2
    n70 = round(len(w) * 0.7)
    other = RECORDS[100] if RECORDS[100] != t else RECORDS[101]
    homo = t.translate(str.maketrans({"a": "а", "o": "ο", "e": "е", "p": "р", "c": "ϲ", "A": "Α", "T": "Т", "i": "і"}))
    fancy = "".join(chr(0x1D41A + ord(c) - 97) if "a" <= c <= "z" and i % 3 == 0 else c for i, c in enumerate(t))
    return {
        "homoglyph": [homo, fancy, t.replace("e", "ｅ")],
        "case": [t.upper(), t.lower(), t.swapcase()],
        "punctuation": ["".join(c for c in t if c.isalnum() or c.isspace()), t.replace(",", ";").replace(".", "!")],
        "substitution": [" ".join([*w[:mid], "zebra", *w[mid + 1 :]])],
        "insertion": [" ".join([*w[:mid], "zebra", *w[mid:]])],
        "deletion": [" ".join([*w[:mid], *w[mid + 1 :]])],
        "split": [" ".join(w[:mid]), " ".join(w[mid:])],
        "concatenation": [t + "\n" + other, other + " " + t],
        "truncation": [" ".join(w[:n70]), " ".join(w[len(w) - n70 :])],
        "invisible": [t.replace(" ", "\u200b \u00a0")],
    }


@pytest.mark.parametrize("kind", list(_variants(RECORDS[0])))
def test_every_variant_kind_is_related_to_the_original(kind):
    for t in SAMPLES[:3]:
        for v in _variants(t)[kind]:
            assert neardup.related(K(v), K(t)), (kind, t[:60], v[:60])
            assert neardup.related(K(t), K(v))  # symmetric


def test_sample_lengths():
    assert [len(neardup.fold(t)) for t in SAMPLES[:3]] == [8, 20, 60]


def test_fold_normalises_lookalikes_case_punctuation_and_marks():
    assert neardup.fold("Ｈéllo, ΗΕLLΟ wοrld!  I'll  knight.--Thou") == ["hello", "hello", "world", "ill", "knightthou"]
    assert neardup.fold("𝐁𝐨𝐥𝐝 ϲat Нello") == ["bold", "cat", "hello"]
    assert neardup.fold("route 66") == ["route", "66"]
    assert neardup.fold("") == [] and neardup.fold(" ,;\u200b ") == []


def test_unrelated_real_records_are_not_related():
    a = RECORDS[10]  # BOATSWAIN. When the sea is. Hence! ...
    b = RECORDS[500]  # MIRANDA. Yes, for a score of kingdoms ...
    assert not neardup.related(K(a), K(b))
    assert not neardup.related(K(SAMPLES[1]), K(SAMPLES[2]))
    assert neardup.containment(K(a), K(b)) == 0.0


def test_short_and_empty_texts():
    assert K("") == [] and K("  ...  ") == []
    assert len(K("Exit.")) == 1 and len(K("Exit Ariel")) == 1
    assert K("Exit Ariel") == K("EXIT, ariel!")
    assert not neardup.related(K("Exit Ariel"), K("Exit Caliban"))
    assert not neardup.related([], [])
    assert not neardup.related(K(""), K("Exit Ariel"))


def test_keys_are_sorted_unique_63_bit_ints():
    ks = K(SAMPLES[2])
    assert ks == sorted(set(ks)) and all(0 <= k < 2**63 for k in ks)


STABLE_TEXT = "To be, or not to be: that is the question."
STABLE_KEYS = [
    72447644336172149,
    2853265099222325878,
    4546750278370221622,
    6319167665762893921,
    6638876727655590847,
    8033145169987839941,
    8327319263965162690,
    9081153435375197446,
]


def test_keys_are_stable_across_processes():
    assert K(STABLE_TEXT) == STABLE_KEYS
    code = f"from llmops.text.neardup import record_keys; print(record_keys({STABLE_TEXT!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert json.loads(out.stdout) == STABLE_KEYS


def test_near_dedupe_keeps_the_first_of_each_cluster():
    t, u = SAMPLES[1], SAMPLES[2]
    w = _words(t)
    texts = [t, u, t.upper(), " ".join(w[: len(w) // 2]), "Exit Ariel", u + " " + t, "EXIT ariel."]
    kept, dropped = neardup.near_dedupe(texts)
    # t, its upper case and its half cluster with t; the concatenation joins t's and u's clusters.
    assert kept == [0, 4]
    assert dropped == [(1, 0), (2, 0), (3, 0), (5, 0), (6, 4)]
    assert neardup.near_dedupe([]) == ([], [])


def test_clusters_ids_and_linear_index_agrees_with_all_pairs():
    texts = RECORDS[:300]
    keys = [K(t) for t in texts]
    brute = {(i, j) for i in range(len(keys)) for j in range(i + 1, len(keys)) if neardup.related(keys[i], keys[j])}
    assert set(neardup.related_pairs(keys)) == brute
    ids = neardup.clusters(keys)
    assert all(ids[i] <= i for i in range(len(ids))) and all(ids[ids[i]] == ids[i] for i in range(len(ids)))
    assert neardup.clusters([[], []]) == [0, 1]
