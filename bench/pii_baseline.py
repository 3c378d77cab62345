"""The PII detectors as they were before llmops/text/pii.py (commit 9b982bf's tasks/validation.py), frozen here only as
the baseline column of bench/bench_pii.py. Not used at run time."""

from __future__ import annotations

import ipaddress
import re

from llmops.text.pii import luhn_ok  # unchanged since; the rest below is the old code

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
# +44 20 7946 0958 · (415) 555-0132 · +1-415-555-0132 · 020 7946 0958 · 415.555.0132
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}(?!\w)")
SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{1,4}\b")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")


def iban_ok(s: str) -> bool:  # the old rule (llmops/text/pii.py also checks each country's IBAN length)
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
