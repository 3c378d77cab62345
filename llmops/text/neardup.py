"""Near-duplicate-aware record identity: variants of one training text count as ONE record for DP accounting.

`llmops.text.identity.text_hash` identifies a record by its exact `identity` text (NFKC, invisible characters dropped, whitespace
collapsed). A requester who wants a text seen more often than its privacy budget allows only has to make each copy
differ by one character. This module gives each record a set of *keys* (winnowed word w-gram fingerprints, Schleimer,
Wilkerson & Aiken 2003, the MOSS algorithm) and relates two records when they share enough keys; `clusters` turns the
relation into a cluster id per record (union-find), the unit the ledger should charge, and `near_dedupe` keeps the first
record of each cluster.

Threat model. Caught (measured on real text by bench/bench_neardup.py, 3 seeds: 0 misses for every kind below out of
4083 variants each of the 1361 records of data/sample/shakespeare.jsonl with >= 8 folded words, and 0 of 1479 on the
held-out data/public/macbeth.txt paragraphs):
  * invisible characters, whitespace, Unicode compatibility forms (fullwidth, mathematical alphanumerics, ligatures):
    `llmops.text.identity.identity` (NFKC);
  * homoglyphs: the Cyrillic / Greek / Armenian / IPA lookalikes of Latin letters in `CONFUSABLES` (mapped before
    NFKC and again before casefold, so Greek capital eta -> H but small eta -> n, lunate sigma -> c), accents and
    other combining marks (stripped after NFD);
  * case changes (casefold); punctuation changes or removal (punctuation and symbols are deleted and only
    whitespace splits words, so "Let's" == "Lets" == "Let;s" and "knight.--Thou" == "knight-Thou");
  * one-word substitutions, insertions and deletions (they change at most W grams; the rest still match);
  * splitting a text into parts (a part's grams are a subset of the whole's), concatenation with other text (the
    original's grams are a subset of the concatenation's), truncation to a prefix or suffix (a part again).
    `containment` divides by the SMALLER key set, so a part is related to its whole however small it is relative to
    the whole.
Not caught: paraphrase, translation, synonym rewrites, word reordering, edits dense enough that no 3 consecutive words
survive in a large enough fraction of the text (a change every 3rd word), punctuation turned into spaces inside a
word ("cross-gartered" vs "cross gartered" is a one-word change, tolerated only once per few words), and
digit/letter swaps (0 for O, 1 for l: digits are kept as digits). Combined attacks are partly caught: homoglyphs +
case + punctuation + one substitution + truncation to 70% is missed for 8% of the >= 8-word records.
Short records are weak: a text of fewer than W=3 words has one key (the hash of its whole token sequence) and matches
only the same token sequence; 4-7-word texts have 2-5 keys, and for them one substitution is missed 41% of the time,
a deletion 10%, an insertion 5%, a half of a split 5% (homoglyph, case, punctuation, concatenation, truncation: 0%).
A part of fewer than 3 words (a third of an 8-word record) is never matched: thirds are missed 1.6% (>= 8 words).

Constants, chosen by the sweep in the bench (w in 2..5, window 1..3, min_shared 1..3, threshold 0.3..0.6): W=3,
WINDOW=1, MIN_SHARED=2, THRESHOLD=0.45 is the setting with 0 misses on every required kind (>= 8 words) and the fewest
false merges. WINDOW=1 means every gram is a key (winnowing with a window of one): these records are short (median 21
words), and any window >= 2 missed 0.4-6% of one-word edits / halves on 8-15-word records, because winnowing only
guarantees a shared key for shared runs of >= W + WINDOW - 1 words. For long documents (thousands of words) a larger
window divides the key count by ~(WINDOW + 1) / 2 and stays exact for splits/concatenations/truncations. w=2 catches
more of the short records but merges 4-17% of distinct records; w=4 misses 1-6% of one-word edits.

Split-and-pad (a slice of a record followed by other text, so the slice is a small share of both records): a shared
verbatim run of >= 10 words (ABS_SHARED = 8 shared keys) relates two records whatever the ratio. Measured with the
bench's "part 42% + 40 words of filler" kind: missed for 51% of the >= 8-word Shakespeare records (those whose
42% slice is under 10 words: the median record is 21 words) and 53% of Macbeth's; a slice of >= 10 words is caught.
ABS_SHARED raises the false-merge rate from 2.09% to 2.44% of distinct Shakespeare records (Macbeth unchanged 2.6%);
6 would catch more slices (40% missed) at 2.93%.

False merges are the price: the relation is "shares runs of >= 3 words making up >= 45% of the smaller record", so two
distinct records that share a phrase are related when the phrase is most of the smaller one. On the 1432 distinct
records of data/sample/shakespeare.jsonl 2.1% (30 records, 20 pairs) are related to another distinct record; on the
Macbeth paragraphs 2.6% (14 records, 8 pairs); none across the two corpora. By hand: about half are true near-duplicates
(the same stage direction with other punctuation, the refrain "With hey, ho, the wind and the rain" verses, lines of
Malvolio's letter quoted again later), the rest share a speaker name plus a stock phrase or stage direction
("[Enter SIR TOBY BELCH and SIR ANDREW AGUE-CHEEK.]" vs "[Enter SIR TOBY BELCH, SIR ANDREW AGUE-CHEEK, and FABIAN.]",
"SCENE VII. The same. Another part of the Plain." vs "SCENE VIII. ..."). For DP accounting a false merge is
conservative (two records charged as one privacy unit); for `near_dedupe` it costs the dropped record. Clusters are
transitive: A + B concatenated joins A's and B's clusters, so near_dedupe keeps one record of the three.

Cost (measured, one CPU core, Python): record_keys ~55-70 us per record of ~35 words (~1.7 us per word: NFKC, folding,
one blake2b per gram), ~1 key per word (35 per record); clusters for the 1434 records 20-130 ms (noisy shared machine),
through an inverted index key -> records, i.e. the sum of posting lengths, not n^2.

Keys are stable across processes and machines: 63-bit ints from blake2b (not Python's salted `hash()`), over the
folded tokens joined by U+001F.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence

from llmops.text.identity import identity

W = 3  # words per gram
WINDOW = 1  # grams per winnowing window: every shared run of >= W + WINDOW - 1 words shares a key
MIN_SHARED = 2  # keys two records must share (capped by the smaller key set's size, see `related`)
THRESHOLD = 0.45  # containment |A & B| / min(|A|, |B|) at or above which two records are related
ABS_SHARED = 8  # or this many shared keys whatever the ratio: a verbatim run of >= 10 words (a part of a record
# padded with other text is a small share of the padded record, and of the original when the part is small)
MAX_POSTINGS = 2000  # a key held by more records is not used to *find* candidates (it still counts when comparing)

# Lookalikes of Latin letters that NFKC leaves alone, by script. Applied before casefold: capitals map to capitals
# (Greek capital eta looks like H, its small form like n). Sources: Unicode confusables.txt (the Latin targets of
# Cyrillic, Greek, Armenian and a few Latin/IPA letters), restricted to the visually unambiguous ones.
_CONFUSABLE_PAIRS = {
    # Cyrillic capitals
    "А": "A",
    "В": "B",
    "С": "C",
    "Е": "E",
    "Ѕ": "S",
    "І": "I",
    "Ї": "I",
    "Ј": "J",
    "К": "K",
    "М": "M",
    "Н": "H",
    "О": "O",
    "Р": "P",
    "Т": "T",
    "Х": "X",
    "У": "Y",
    "Ү": "Y",
    "Ԁ": "D",
    "Ԛ": "Q",
    "Ԝ": "W",
    "Ӏ": "I",
    "Ь": "b",
    "Ꙅ": "S",
    # Cyrillic small
    "а": "a",
    "в": "b",
    "с": "c",
    "ԁ": "d",
    "е": "e",
    "ё": "e",
    "һ": "h",
    "і": "i",
    "ї": "i",
    "ј": "j",
    "к": "k",
    "ӏ": "l",
    "м": "m",
    "п": "n",
    "о": "o",
    "р": "p",
    "ԛ": "q",
    "ѕ": "s",
    "т": "t",
    "у": "y",
    "ү": "y",
    "х": "x",
    "ԝ": "w",
    "ь": "b",
    "ѡ": "w",
    # Greek capitals
    "Α": "A",
    "Β": "B",
    "Ε": "E",
    "Ζ": "Z",
    "Η": "H",
    "Ι": "I",
    "Κ": "K",
    "Μ": "M",
    "Ν": "N",
    "Ο": "O",
    "Ρ": "P",
    "Τ": "T",
    "Υ": "Y",
    "Χ": "X",
    "Ϲ": "C",
    "Ϳ": "J",
    "Ϝ": "F",
    # Greek small
    "α": "a",
    "β": "b",
    "γ": "y",
    "ε": "e",
    "η": "n",
    "ι": "i",
    "κ": "k",
    "ν": "v",
    "ο": "o",
    "ρ": "p",
    "σ": "o",
    "τ": "t",
    "υ": "u",
    "χ": "x",
    "ω": "w",
    "ϲ": "c",
    "ϳ": "j",
    "ς": "s",
    "μ": "u",
    # Armenian
    "Ս": "U",
    "Օ": "O",
    "Լ": "L",
    "Տ": "S",
    "Ց": "G",
    "օ": "o",
    "ս": "u",
    "ո": "n",
    "հ": "h",
    "ց": "g",
    "զ": "q",
    "ռ": "n",
    "ա": "w",
    "գ": "q",
    "ք": "p",
    # Latin / IPA lookalikes
    "ı": "i",
    "ȷ": "j",
    "ɡ": "g",
    "ɑ": "a",
    "ɩ": "i",
    "ʏ": "y",
    "ɴ": "n",
    "ʀ": "r",
    "ɪ": "i",
    "ᴀ": "a",
    "ᴄ": "c",
    "ᴅ": "d",
    "ᴇ": "e",
    "ᴋ": "k",
    "ᴍ": "m",
    "ᴏ": "o",
    "ᴘ": "p",
    "ᴛ": "t",
    "ᴜ": "u",
    "ᴠ": "v",
    "ᴡ": "w",
    "ᴢ": "z",
    "ø": "o",
    "Ø": "O",
    "đ": "d",
    "Đ": "D",
    "ħ": "h",
    "ł": "l",
    "Ł": "L",
    "ƅ": "b",
}
CONFUSABLES = str.maketrans(_CONFUSABLE_PAIRS)

# Punctuation and symbols are deleted, not split on: "I'll" == "Ill", "knight.--Thou" == "knight-Thou" ==
# "knightThou" (measured: splitting on them missed 0.1% of punctuation variants, deleting them 0%). Whitespace splits.
_DELETE_ASCII = re.compile(r"[^a-z0-9\s]+")
_DELETE = re.compile(r"[^\w\s]+|_+")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
# A token: one CJK character (no spaces between words there), or a run of other letters/digits.
_TOKEN = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


_COMBINING = None


def _combining_pattern():
    """One regex class of every code point with a nonzero canonical combining class (computed once, ~0.2 s)."""
    from llmops.text.identity import codepoint_class

    return codepoint_class(range(0x30000), lambda cp: unicodedata.combining(chr(cp)) != 0)


def fold(text: str) -> list[str]:
    """Normalised word tokens: Cyrillic/Greek/Armenian lookalikes -> Latin, `identity` (NFKC, invisibles dropped),
    casefold, NFD with combining marks dropped, punctuation and symbols deleted, split on whitespace (and each CJK
    character a token of its own)."""
    global _COMBINING
    if not text.isascii():  # before NFKC too: it turns some lookalikes into others (lunate sigma c -> final sigma)
        text = text.translate(CONFUSABLES)
    s = identity(text)
    ascii_ = s.isascii()  # ASCII text holds no lookalike and no combining mark (str.translate is slow: skip it)
    if not ascii_:
        s = s.translate(CONFUSABLES).casefold()
        if _COMBINING is None:
            _COMBINING = _combining_pattern()
        s = _COMBINING.sub("", unicodedata.normalize("NFD", s))
        # Stripping marks can expose lookalikes again (a Cyrillic letter with a diacritic), so fold once more.
        s = s.translate(CONFUSABLES).casefold()
        return _TOKEN.findall(_DELETE.sub("", s))
    return _DELETE_ASCII.sub("", s.casefold()).split()


_BLAKE = hashlib.blake2b(digest_size=8, person=b"llmops-neardup1")  # copied per hash (cheaper than a new one)


def _h63(tokens: Sequence[str]) -> int:
    """Stable 63-bit hash of a token sequence: blake2b-64 (personalised) of the tokens joined by U+001F, >> 1."""
    h = _BLAKE.copy()
    h.update("\x1f".join(tokens).encode("utf-8"))
    return int.from_bytes(h.digest(), "big") >> 1


def record_keys(text: str, w: int = W, window: int = WINDOW) -> list[int]:
    """Sorted unique winnowing fingerprints of the word `w`-grams of `fold(text)`: the minimum gram hash of every
    `window` consecutive grams. A text of fewer than `w` tokens has one key (the hash of its whole token sequence),
    one with fewer than `window` grams the minimum of its grams; an empty text has no keys."""
    toks = fold(text)
    if not toks:
        return []
    if len(toks) < w:
        return [_h63(toks)]
    grams = [_h63(toks[i : i + w]) for i in range(len(toks) - w + 1)]
    if window <= 1:
        return sorted(set(grams))
    if len(grams) < window:
        return [min(grams)]
    return sorted({min(grams[i : i + window]) for i in range(len(grams) - window + 1)})


def containment(keys_a: Sequence[int], keys_b: Sequence[int]) -> float:
    """|A & B| / min(|A|, |B|): 1.0 when one key set contains the other (a part and its whole); 0.0 if either is empty."""
    if not keys_a or not keys_b:
        return 0.0
    a, b = set(keys_a), set(keys_b)
    return len(a & b) / min(len(a), len(b))


def related(
    keys_a: Sequence[int],
    keys_b: Sequence[int],
    *,
    min_shared: int = MIN_SHARED,
    threshold: float = THRESHOLD,
    abs_shared: int | None = None,
) -> bool:
    """Whether two records are variants of one text: they share >= min_shared keys (or all the keys of the smaller
    one, when it has fewer) and containment >= threshold, or they share >= ABS_SHARED keys at all."""
    if not keys_a or not keys_b:
        return False
    a, b = set(keys_a), set(keys_b)
    return related_counts(len(a & b), len(a), len(b), min_shared=min_shared, threshold=threshold, abs_shared=abs_shared)


def related_counts(
    shared: int,
    n_a: int,
    n_b: int,
    *,
    min_shared: int = MIN_SHARED,
    threshold: float = THRESHOLD,
    abs_shared: int | None = None,
) -> bool:
    """`related` from counts (the ledger counts shared keys in SQL)."""
    small = min(n_a, n_b)
    if not small:
        return False
    if shared >= (ABS_SHARED if abs_shared is None else abs_shared):
        return True
    return shared >= min(min_shared, small) and shared / small >= threshold


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller index becomes the root, so a cluster's id is its first record
            self.parent[max(ra, rb)] = min(ra, rb)


def related_pairs(
    key_lists: Sequence[Sequence[int]],
    *,
    min_shared: int = MIN_SHARED,
    threshold: float = THRESHOLD,
    max_postings: int = MAX_POSTINGS,
) -> list[tuple[int, int]]:
    """Every pair (i, j), i < j, of records that are `related`, found through an inverted index key -> records (the
    cost is the sum over keys of their posting lengths, not n^2). Records with identical key sets are paired with
    their first copy only (and so only that copy is compared with the rest); keys held by more than `max_postings`
    distinct key sets are not used to find candidates."""
    first: dict[tuple[int, ...], int] = {}
    pairs: list[tuple[int, int]] = []
    reps: list[int] = []
    for i, ks in enumerate(key_lists):
        t = tuple(sorted(set(ks)))
        if not t:
            continue
        j = first.setdefault(t, i)
        if j != i:
            pairs.append((j, i))
        else:
            reps.append(i)
    sets = {i: set(key_lists[i]) for i in reps}
    postings: dict[int, list[int]] = defaultdict(list)
    for i in reps:
        for k in sets[i]:
            postings[k].append(i)
    for i in reps:
        cands: set[int] = set()
        for k in sets[i]:
            post = postings[k]
            if len(post) <= max_postings:
                cands.update(j for j in post if j < i)
        for j in sorted(cands):  # candidates; the exact test also counts the skipped keys
            if related(sets[i], sets[j], min_shared=min_shared, threshold=threshold):
                pairs.append((j, i))
    return sorted(pairs)


def clusters(key_lists: Sequence[Sequence[int]], **kw) -> list[int]:
    """A cluster id per record: the index of the cluster's first record (union-find over `related_pairs`). A record
    without keys (empty text) is its own cluster."""
    uf = _UnionFind(len(key_lists))
    for a, b in related_pairs(key_lists, **kw):
        uf.union(a, b)
    return [uf.find(i) for i in range(len(key_lists))]


def near_dedupe(texts: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """Indices kept (the first record of each cluster, in order) and (dropped index, kept index) for the others.
    The kept record is the cluster's first, which the dropped one may be related to only through others."""
    ids = clusters([record_keys(t) for t in texts])
    kept = [i for i, c in enumerate(ids) if c == i]
    dropped = [(i, c) for i, c in enumerate(ids) if c != i]
    return kept, dropped
