"""Near-duplicate record identity (llmops/text/neardup.py) measured on real text.

    .venv/bin/python bench/bench_neardup.py            # the chosen constants: full table
    .venv/bin/python bench/bench_neardup.py --sweep    # + a sweep over (w, window, threshold, min_shared)

Corpora: data/sample/shakespeare.jsonl (1434 records, field "text": Tempest, Twelfth Night, Sonnets) and
data/public/macbeth.txt cut into blank-line paragraphs (not used to choose the constants: a held-out check).

* false merges: records related to some OTHER record with a different `identity` (exact duplicates excluded), the
  number of such pairs, and examples for a human to judge;
* misses: for every record of >= 8 folded words (and, separately, 4-7 words), build each variant and count how often
  `related(keys(variant), keys(original))` is False. Seeded, so the numbers are reproducible;
* cost: microseconds per record for record_keys, and keys per record.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from llmops.text import neardup  # noqa: E402
from llmops.text.identity import identity  # noqa: E402

SHAKESPEARE = ROOT / "data/sample/shakespeare.jsonl"
MACBETH = ROOT / "data/public/macbeth.txt"

# Attacker lookalikes per Latin letter: Cyrillic / Greek / Armenian (llmops.text.neardup folds them), plus fullwidth and
# mathematical bold / italic / monospace (NFKC folds them).
_LOOK = {
    "a": "аα",
    "c": "сϲ",
    "d": "ԁ",
    "e": "еε",
    "h": "һ",
    "i": "іι",
    "j": "ј",
    "k": "κ",
    "l": "ӏ",
    "n": "ոη",
    "o": "оοօσ",
    "p": "рρ",
    "q": "ԛ",
    "s": "ѕ",
    "u": "υս",
    "v": "ν",
    "w": "ԝω",
    "x": "хχ",
    "y": "уγ",
    "A": "АΑ",
    "B": "ВΒ",
    "C": "СϹ",
    "E": "ЕΕ",
    "H": "НΗ",
    "I": "ІΙ",
    "J": "Ј",
    "K": "КΚ",
    "M": "МΜ",
    "N": "Ν",
    "O": "ОΟՕ",
    "P": "РΡ",
    "S": "Ѕ",
    "T": "ТΤ",
    "X": "ХΧ",
    "Y": "УΥ",
    "Z": "Ζ",
}
for _c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
    lo = _c.islower()
    idx = ord(_c) - (ord("a") if lo else ord("A"))
    extra = chr(0xFF21 + idx + (32 if lo else 0))  # fullwidth
    for base in (0x1D400, 0x1D434, 0x1D670):  # math bold, italic, monospace
        cp = base + idx + (26 if lo else 0)
        if cp != 0x1D455:  # italic small h is a hole (U+210E)
            extra += chr(cp)
    _LOOK[_c] = _LOOK.get(_c, "") + extra
_PUNCT = re.compile(r"[^\w\s]")
_OTHER_PUNCT = list(",.;:!?-'\"")


def load_shakespeare() -> list[str]:
    return [json.loads(x)["text"] for x in SHAKESPEARE.read_text(encoding="utf-8").splitlines() if x.strip()]


def load_macbeth() -> list[str]:
    paras = re.split(r"\n\s*\n", MACBETH.read_text(encoding="utf-8"))
    return [p.strip() for p in paras if p.strip()]


# ---- variants (each takes the text and a seeded Random) ----


def homoglyph(t, rng):
    return "".join(rng.choice(_LOOK[c]) if c in _LOOK and rng.random() < 0.5 else c for c in t)


def case(t, rng):
    return re.sub(r"\S+", lambda m: rng.choice([str.upper, str.lower, str.title, str.swapcase])(m.group()), t)


def punctuation(t, rng):
    def one(m):
        r = rng.random()
        return "" if r < 0.5 else rng.choice(_OTHER_PUNCT) if r < 0.75 else m.group()

    out = _PUNCT.sub(one, t)
    return out if out != t else t + "!"


def _words(t):
    return [m.span() for m in re.finditer(r"\S+", t)]


def substitution(t, rng, vocab):
    spans = _words(t)
    a, b = spans[rng.randrange(len(spans))]
    old = t[a:b]
    new = rng.choice(vocab)
    while new.casefold() == old.casefold():
        new = rng.choice(vocab)
    return t[:a] + new + t[b:]


def insertion(t, rng, vocab):
    spans = _words(t)
    k = rng.randrange(len(spans) + 1)
    pos = spans[k][0] if k < len(spans) else len(t)
    return t[:pos] + rng.choice(vocab) + " " + t[pos:] if k < len(spans) else t + " " + rng.choice(vocab)


def deletion(t, rng):
    spans = _words(t)
    a, b = spans[rng.randrange(len(spans))]
    return t[:a] + t[b:]


def split(t, parts):
    spans = _words(t)
    cuts = [spans[len(spans) * i // parts][0] for i in range(1, parts)]
    bounds = [0, *cuts, len(t)]
    return [t[bounds[i] : bounds[i + 1]] for i in range(parts)]


def truncate(t, frac, end):
    spans = _words(t)
    n = max(1, round(len(spans) * frac))
    return t[: spans[n - 1][1]] if end == "first" else t[spans[len(spans) - n][0] :]


KINDS = [
    "homoglyph",
    "case",
    "punctuation",
    "substitution",
    "insertion",
    "deletion",
    "split 2 (each half)",
    "split 3 (each third)",
    "concatenation",
    "truncate 70% (first)",
    "truncate 70% (last)",
    "all of the above",
    "part 42% + 40 words of filler",
]


def variants(texts: list[str], seed: int) -> dict[str, list[tuple[int, str]]]:
    """Per kind: (index of the original, variant text) for every record of texts."""
    rng = random.Random(seed)
    vocab = sorted({w for t in texts for w in re.findall(r"[A-Za-z]+", t)})
    out: dict[str, list[tuple[int, str]]] = {k: [] for k in KINDS}
    for i, t in enumerate(texts):
        out["homoglyph"].append((i, homoglyph(t, rng)))
        out["case"].append((i, case(t, rng)))
        out["punctuation"].append((i, punctuation(t, rng)))
        out["substitution"].append((i, substitution(t, rng, vocab)))
        out["insertion"].append((i, insertion(t, rng, vocab)))
        out["deletion"].append((i, deletion(t, rng)))
        out["split 2 (each half)"] += [(i, p) for p in split(t, 2)]
        out["split 3 (each third)"] += [(i, p) for p in split(t, 3)]
        j = rng.randrange(len(texts) - 1)
        other = texts[j if j < i else j + 1]
        out["concatenation"].append((i, t + "\n" + other if rng.random() < 0.5 else other + "\n" + t))
        out["truncate 70% (first)"].append((i, truncate(t, 0.7, "first")))
        out["truncate 70% (last)"].append((i, truncate(t, 0.7, "last")))
        # everything at once: homoglyphs + case + punctuation + one substitution, then a 70% prefix
        out["all of the above"].append(
            (i, truncate(substitution(punctuation(case(homoglyph(t, rng), rng), rng), rng, vocab), 0.7, "first"))
        )
        # the blind attacker's split-and-pad: a 42% slice of the record followed by ~40 words of another record
        filler = " ".join(other.split()[:40]) if len(other.split()) >= 40 else " ".join((other.split() * 40)[:40])
        out["part 42% + 40 words of filler"].append((i, truncate(t, 0.42, "first") + " " + filler))
    return out


def keys_of(texts, w, window):
    return [neardup.record_keys(t, w=w, window=window) for t in texts]


def miss_rates(orig_keys, var_keys, groups, w, window, min_shared, threshold):
    """{kind: {group: (misses, trials)}}: var_keys[kind] is a list of (original index, keys)."""
    out = {}
    for kind, vs in var_keys.items():
        out[kind] = {}
        for g, members in groups.items():
            trials = [(i, k) for i, k in vs if i in members]
            miss = sum(
                not neardup.related(k, orig_keys[i], min_shared=min_shared, threshold=threshold) for i, k in trials
            )
            out[kind][g] = (miss, len(trials))
    return out


def false_merges(texts, keys, min_shared, threshold):
    """Pairs of records with different identities that are related; the records involved."""
    ident = [identity(t) for t in texts]
    pairs = [
        (a, b)
        for a, b in neardup.related_pairs(keys, min_shared=min_shared, threshold=threshold)
        if ident[a] != ident[b]
    ]
    involved = {x for p in pairs for x in p}
    distinct = len(set(ident))
    return pairs, involved, distinct


def short(t, n=70):
    t = " ".join(t.split())
    return t if len(t) <= n else t[: n - 3] + "..."


def measure(texts, w, window, min_shared, threshold, seed):
    folded = [len(neardup.fold(t)) for t in texts]
    groups = {
        ">=8": {i for i, n in enumerate(folded) if n >= 8},
        "4-7": {i for i, n in enumerate(folded) if 4 <= n < 8},
    }
    keys = keys_of(texts, w, window)
    var = variants(texts, seed)
    var_keys = {k: [(i, neardup.record_keys(v, w=w, window=window)) for i, v in vs] for k, vs in var.items()}
    return keys, groups, miss_rates(keys, var_keys, groups, w, window, min_shared, threshold)


REQUIRED = [k for k in KINDS if k not in ("split 3 (each third)", "all of the above")]


def sweep(texts, seed):
    print(
        f"\nSweep on shakespeare.jsonl (seed {seed}). worst: the highest miss rate over the required variant kinds"
        f" ({', '.join(REQUIRED)}) for >= 8-word records, and its kind; split3: miss rate of thirds (>= 8 words);"
        " short: mean miss over the required kinds for 4-7-word records; false-merge: records related to another"
        " distinct record"
    )
    print(
        f"{'w':>2} {'win':>3} {'minsh':>5} {'thr':>4} | {'worst':>6} {'kind':<20} | {'split3':>6} | {'short':>6}"
        f" | {'false-merge':>11} {'pairs':>5} | keys/rec"
    )
    folded = [len(neardup.fold(t)) for t in texts]
    groups = {
        ">=8": {i for i, n in enumerate(folded) if n >= 8},
        "4-7": {i for i, n in enumerate(folded) if 4 <= n < 8},
    }
    var = variants(texts, seed)
    for w in (2, 3, 4, 5):
        for window in (1, 2, 3):
            keys = keys_of(texts, w, window)
            var_keys = {
                k: [(i, neardup.record_keys(v, w=w, window=window)) for i, v in vs]
                for k, vs in var.items()
                if k != "all of the above"
            }
            for min_shared in (1, 2, 3):
                for thr in (0.3, 0.4, 0.5, 0.6):
                    mr = miss_rates(keys, var_keys, groups, w, window, min_shared, thr)
                    rate = {k: mr[k][">=8"][0] / max(1, mr[k][">=8"][1]) for k in mr}
                    worst_kind = max(REQUIRED, key=rate.get)
                    short_mean = statistics.mean(mr[k]["4-7"][0] / max(1, mr[k]["4-7"][1]) for k in REQUIRED)
                    pairs, involved, distinct = false_merges(texts, keys, min_shared, thr)
                    print(
                        f"{w:>2} {window:>3} {min_shared:>5} {thr:>4} | {rate[worst_kind]:>6.2%} {worst_kind:<20} |"
                        f" {rate['split 3 (each third)']:>6.2%} | {short_mean:>6.2%} |"
                        f" {len(involved) / distinct:>11.2%} {len(pairs):>5} | {statistics.mean(len(k) for k in keys):.1f}"
                    )


def report(name, texts, w, window, min_shared, threshold, seeds, examples=5):
    print(f"\n== {name}: {len(texts)} records, w={w} window={window} min_shared={min_shared} threshold={threshold}")
    total: dict[str, dict[str, list[int]]] = {}
    for seed in seeds:
        keys, groups, mr = measure(texts, w, window, min_shared, threshold, seed)
        for kind, by in mr.items():
            for g, (m, n) in by.items():
                acc = total.setdefault(kind, {}).setdefault(g, [0, 0])
                acc[0] += m
                acc[1] += n
    print(
        f"records with >= 8 folded words: {len(groups['>=8'])}, with 4-7: {len(groups['4-7'])}, "
        f"< 4: {len(texts) - len(groups['>=8']) - len(groups['4-7'])}; seeds {list(seeds)}"
    )
    print(f"{'variant kind':<24} {'miss >= 8 words':>18} {'miss 4-7 words':>18}")
    for kind in KINDS:
        m8, n8 = total[kind][">=8"]
        m4, n4 = total[kind]["4-7"]
        print(f"{kind:<24} {f'{m8}/{n8}':>11} {m8 / max(1, n8):>6.2%} {f'{m4}/{n4}':>11} {m4 / max(1, n4):>6.2%}")
    pairs, involved, distinct = false_merges(texts, keys, min_shared, threshold)
    ids = neardup.clusters(keys, min_shared=min_shared, threshold=threshold)
    sizes = sorted((ids.count(c) for c in set(ids) if ids.count(c) > 1), reverse=True)
    print(
        f"false merges: {len(involved)}/{distinct} distinct records ({len(involved) / distinct:.2%}) related to another"
        f" distinct record; {len(pairs)} pairs; clusters of > 1 record (exact duplicates included): sizes {sizes}"
    )
    print(f"  the {min(examples, len(pairs))} lowest-containment pairs (the most doubtful):")
    for a, b in sorted(pairs, key=lambda p: neardup.containment(keys[p[0]], keys[p[1]]))[:examples]:
        c = neardup.containment(keys[a], keys[b])
        print(f"   [{a}] {short(texts[a])!r}\n   [{b}] {short(texts[b])!r}   (containment {c:.2f})")
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        keys = keys_of(texts, w, window)
    dt = (time.perf_counter() - t0) / reps / len(texts)
    words = statistics.mean(len(neardup.fold(t)) for t in texts)
    t0 = time.perf_counter()
    neardup.clusters(keys, min_shared=min_shared, threshold=threshold)
    dc = time.perf_counter() - t0
    print(
        f"cost: record_keys {dt * 1e6:.1f} us/record (mean {words:.1f} words), "
        f"{statistics.mean(len(k) for k in keys):.2f} keys/record; clusters {dc * 1e3:.1f} ms for {len(texts)} records"
    )
    return keys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--w", type=int, default=neardup.W)
    ap.add_argument("--window", type=int, default=neardup.WINDOW)
    ap.add_argument("--min-shared", type=int, default=neardup.MIN_SHARED)
    ap.add_argument("--threshold", type=float, default=neardup.THRESHOLD)
    ap.add_argument(
        "--abs-shared",
        type=int,
        default=neardup.ABS_SHARED,
        help="shared keys that relate two records whatever the ratio",
    )
    a = ap.parse_args()
    neardup.ABS_SHARED = a.abs_shared
    shakespeare, macbeth = load_shakespeare(), load_macbeth()
    if a.sweep:
        sweep(shakespeare, seed=0)
    seeds = range(a.seeds)
    ks = report("data/sample/shakespeare.jsonl", shakespeare, a.w, a.window, a.min_shared, a.threshold, seeds)
    km = report(
        "data/public/macbeth.txt paragraphs (held out)", macbeth, a.w, a.window, a.min_shared, a.threshold, seeds
    )
    both = ks + km
    texts = shakespeare + macbeth
    pairs, _, _ = false_merges(texts, both, a.min_shared, a.threshold)
    cross = [(x, y) for x, y in pairs if x < len(ks) <= y]
    print(f"\ncross-corpus (shakespeare.jsonl x macbeth paragraphs): {len(cross)} related pairs")
    for x, y in cross[:5]:
        print(f"   {short(texts[x])!r}\n   {short(texts[y])!r}")


if __name__ == "__main__":
    main()
