"""A record's identity: the text the privacy ledger charges, whatever invisible edits a requester makes.

`text_hash` is the sha256 of `identity(text)`: Unicode NFKC, zero-width/format and control characters removed, every
whitespace run collapsed to one space. A requester who appends an invisible U+200B, swaps a space for U+00A0 or
re-wraps lines has not made a "new" record. Near-variants (homoglyphs, case, one-word edits, parts) are related by
`llmops.text.neardup` on top of this.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

# Invisible code points that NFKC keeps: format (Cf: U+200B..U+200F, U+2060, U+FEFF, soft hyphen ...), control (Cc,
# whitespace aside), surrogates, variation selectors and the combining grapheme joiner.
_INVISIBLE = {"Cf", "Cc", "Cs"}
_EXTRA_INVISIBLE = {0x034F, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0), *range(0x180B, 0x1810)}


def codepoint_class(codepoints, member) -> re.Pattern:
    """One regex character class of every code point in `codepoints` (ascending) for which `member(cp)` holds, as
    ranges: a set tested per character once, then matched at regex speed."""
    import re

    ranges, start, prev = [], None, None
    for cp in codepoints:
        if member(cp):
            if start is None or cp != prev + 1:
                if start is not None:
                    ranges.append((start, prev))
                start = cp
            prev = cp
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    return re.compile(
        "["
        + "".join(f"{re.escape(chr(a))}-{re.escape(chr(b))}" if b > a else re.escape(chr(a)) for a, b in ranges)
        + "]"
    )


def _invisible_pattern():
    """One regex class of every code point `identity` drops (computed once per process, ~0.3 s): the same set as
    testing each character's category, at regex speed (the per-character loop cost ~90 us per 400-char record)."""

    # Planes 3-13 and 15-16 hold no Cc/Cf/Cs code point (tests check every code point against the definition).
    def drop(cp: int) -> bool:
        ch = chr(cp)
        return not ch.isspace() and (unicodedata.category(ch) in _INVISIBLE or cp in _EXTRA_INVISIBLE)

    return codepoint_class([*range(0x30000), *range(0xE0000, 0xE1000)], drop)


_DROP = None


def identity(text: str) -> str:
    """The text a record is identified by: NFKC, invisible characters dropped, whitespace runs -> one space."""
    global _DROP
    if _DROP is None:
        _DROP = _invisible_pattern()
    return " ".join(_DROP.sub("", unicodedata.normalize("NFKC", text)).split())


def text_hash(text: str) -> str:
    return hashlib.sha256(identity(text).encode("utf-8")).hexdigest()
