"""Record the hand-checked labels of the PII evaluation set (see README.md for the labelling guide).

    .venv/bin/python tests/assets/pii_eval/label.py /tmp/pii_raw.jsonl > tests/assets/pii_eval/records.jsonl

How the labels were made: liberal *candidate* patterns (every '@', every bang path, every dotted quad, every digit
run libphonenumber's most lenient matcher or a 7-digit/vanity pattern accepts) were listed with their context and
each one was read by the labeller. The decisions are written down here as rules plus explicit exception lists, so
that a reader can audit them; this file is NOT a detector (it uses lists of reviewed strings) and the detectors in
llmops/text/pii.py do not import it. Synthetic insertions (valid-checksum cards/IBANs/SSNs and phone formats that are
rare in this corpus) are added at the end and marked `"synthetic": true`.
"""
from __future__ import annotations

import ipaddress
import json
import random
import re
import sys

import phonenumbers

AT = re.compile(r"[\w.+%$&=~-]+@(?:\[[\d.]+\]|[\w-]+(?:\.[\w-]+)*)")
MSGID_CONTEXT = re.compile(r"(?i)(?:message-id|references|in-reply-to|content-id|\bid|\bin|original-envelope-id)"
                           r":?\s*(?:<[^>\n]*>\s*)*$")
# '@' addresses without a dotted domain that the labeller read as mail addresses (BITNET/UUCP/local mailboxes).
NO_TLD_ADDRESSES = {"crl@purdue", "shane@mit-ajax", "RWC102@PSUVM", "jangel1@sims-ms-daemon"}
NOT_ADDRESSES = {"bug-*@gnu.org"}  # a wildcard pattern, nobody's address
BANG = re.compile(r"\b[A-Za-z][\w.-]*(?:![\w.-]*[A-Za-z][\w.-]*)+")
NOT_BANG = {"lintian!452", "o!o", "o!o!o"}  # a merge-request reference; ASCII art
DOTTED_QUAD = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
# Dotted quads read as versions, section numbers or netmasks, not addresses.
NOT_IP_CONTEXT = re.compile(r"(?i)(?:version|section|sect\.|rev\.?|\bv|release|\()\s*$")
NOT_IPS = {"5.3.1.3"}  # "See also 5.3.1.3": a section of the sendmail FAQ
NETMASK = re.compile(r"255\.(?:0|128|192|224|240|248|252|254|255)\.\d+\.\d+")
# Every phone-like candidate was read; these are the ones that are telephone/fax numbers.
PHONES = ["962-7873", "(713) 438-5018", "+1 617 621 7084", "1-800-AUDITME", "(511) 338-0959", "1-503-696-4930",
          "800-29-29-AMD", "800-292-9263", "0800-89-1131", "0031-11-1129", "512-462-4118", "1-800-DOT-6000",
          "(412) 268-4387", "(412) 268-7395", "1-415-642-4948", "+1-617-542-5942", "(617) 542-5942", "317-278-4100",
          "317-274-5902", "555-0129", "800-998-9938", "800-889-8969", "707-829-0515", "1 800 366 2665",
          "1 800 446 6520", "+ 358 200 865 718", "+1 800 CYGNUS-1", "608-262-6966",
          "800-822-6339", "617-942-1117",  # these two: found when a detector disagreed with the first pass
          "(757) 683 4842", "+358-50-5259415", "011-52-12-10-14-96", "0410-728-389"]  # fortunes-mario (ids >= 1400)


def overlaps(a, b, spans):
    return any(x < b and a < y for x, y in spans)


def label(text: str) -> dict[str, list[list[int]]]:
    lab: dict[str, list[list[int]]] = {}
    add = lambda cat, a, b: lab.setdefault(cat, []).append([a, b])  # noqa: E731
    for m in AT.finditer(text):
        a, b, s = m.start(), m.end(), m.group()
        if s in NOT_ADDRESSES or text[a - 1:a] == "*" or s.startswith("@"):
            continue
        if re.search(r"(?i)original-envelope-id:\s*$", text[max(0, a - 30):a]):
            add("message_id", a, b)
            continue
        bracketed = text[a - 1:a] == "<" and re.match(r"[^<>\s]*>", text[b:])
        if bracketed and MSGID_CONTEXT.search(text[max(0, a - 60):a - 1]):
            end = b + text[b:].index(">") + 1
            add("message_id", a - 1, end)
            continue
        lead = len(s) - len(s.lstrip("-=~"))  # ASCII-art rules run into a signature's address
        a, s = a + lead, s[lead:]
        domain = s.split("@", 1)[1]
        if re.search(r"\.[A-Za-z]{2,}$", domain) or s in NO_TLD_ADDRESSES:
            add("email", a, b)
    ids = lab.get("message_id", [])
    for m in BANG.finditer(text):
        if m.group() not in NOT_BANG and not overlaps(m.start(), m.end(), ids):
            add("email", m.start(), m.end())
    for m in DOTTED_QUAD.finditer(text):
        s = m.group()
        try:
            ipaddress.ip_address(s)
        except ValueError:
            continue
        if overlaps(m.start(), m.end(), ids) or s in NOT_IPS or NETMASK.fullmatch(s) \
                or NOT_IP_CONTEXT.search(text[:m.start()]):
            continue
        add("ip_address", m.start(), m.end())
    for p in PHONES:
        for m in re.finditer(re.escape(p), text):
            add("phone", m.start(), m.end())
    return {k: sorted(v) for k, v in lab.items()}


# ------------------------------------------------------------------ synthetic minority (marked "synthetic": true)

def luhn_complete(prefix: str, n: int, rng) -> str:
    body = prefix + "".join(rng.choice("0123456789") for _ in range(n - len(prefix) - 1))
    for d in "0123456789":
        s = body + d
        tot = sum((int(c) * 2 - 9 if int(c) * 2 > 9 else int(c) * 2) if i % 2 else int(c)
                  for i, c in enumerate(reversed(s)))
        if tot % 10 == 0:
            return s


def iban_make(cc: str, bban: str) -> str:
    num = "".join(str(int(c, 36)) for c in bban + cc + "00")
    return f"{cc}{98 - int(num) % 97:02d}{bban}"


def group4(s: str) -> str:
    return " ".join(s[i:i + 4] for i in range(0, len(s), 4))


SENTENCES = [  # real sentences' frames from the corpus (mail/Usenet style), a slot for the inserted value
    "If you want to order, send a check or give us your card number, {v}, and the expiry date.",
    "Please wire the fee to our account {v} before the end of the month.",
    "Her social security number, {v}, was printed on the mailing label.",
    "For that personal contact feeling call {v}; our trained operators are waiting.",
    "Reply to this message or phone me at {v} after 6pm.",
    "The order number is {v}; quote it in every letter.",
]


def synthetic(rng) -> list[dict]:
    out = []
    cards = [luhn_complete("4", 16, rng), luhn_complete("51", 16, rng), luhn_complete("37", 15, rng),
             luhn_complete("6011", 16, rng), luhn_complete("35", 16, rng)]
    for i in range(20):
        c = cards[i % 5] if i < 5 else luhn_complete(rng.choice(["4", "52", "34", "6011"]), 16 if i % 3 else 15, rng)
        v = group4(c) if i % 2 else c if i % 3 else "-".join(c[j:j + 4] for j in range(0, len(c), 4))
        out.append(("credit_card", SENTENCES[0], v))
    ibans = [iban_make("DE", "".join(rng.choice("0123456789") for _ in range(18))) for _ in range(8)]
    ibans += [iban_make("GB", "WEST" + "".join(rng.choice("0123456789") for _ in range(14))) for _ in range(6)]
    ibans += [iban_make("FR", "".join(rng.choice("0123456789") for _ in range(23))) for _ in range(6)]
    for i, v in enumerate(ibans):
        out.append(("iban", SENTENCES[1], group4(v) if i % 2 else v))
    for _ in range(20):
        v = f"{rng.randint(1, 665):03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
        out.append(("ssn", SENTENCES[2], v))
    phones = ["+44 20 7946 0958", "020 7946 0958", "+49 30 901820", "(415) 555-0132", "415.555.0132",
              "1-800-FLOWERS", "555-1212", "+33 1 42 68 53 00", "1 (800) 555-0199", "+1 212 555 0147"]
    for v in phones:
        out.append(("phone", SENTENCES[rng.choice([3, 4])], v))
    # hard negatives: checksum failures and look-alikes (no label)
    for _ in range(10):
        c = luhn_complete("4", 16, rng)
        out.append((None, SENTENCES[5], c[:-1] + str((int(c[-1]) + 1) % 10)))
    for v in ibans[:5]:
        out.append((None, SENTENCES[1], v[:4] + v[4:-1] + str((int(v[-1]) + 3) % 10)))
    for v in ("000-12-3456", "666-45-1234", "123-00-4567", "900-12-3456", "2024-01-15", "978-0-596-00492-7"):
        out.append((None, SENTENCES[5], v))
    recs = []
    for cat, frame, v in out:
        text = frame.format(v=v)
        a = text.index(v)
        recs.append({"source": "synthetic:insertion", "text": text, "synthetic": True,
                     "labels": {cat: [[a, a + len(v)]]} if cat else {}})
    return recs


SYNTHETIC_FIRST_ID = 1227


def main() -> None:
    raw = [json.loads(x) for x in open(sys.argv[1], encoding="utf-8")]
    recs = [{"id": r["id"], "source": r["source"], "text": r["text"], "labels": label(r["text"])} for r in raw]
    rng = random.Random(5)
    syn = synthetic(rng)
    rng.shuffle(syn)
    first = 1 + max(r["id"] for r in raw if r["id"] < SYNTHETIC_FIRST_ID)
    assert first == SYNTHETIC_FIRST_ID, first  # the ids (and so the held-out split) stay as they were tuned
    for k, r in enumerate(syn):
        recs.append({"id": SYNTHETIC_FIRST_ID + k, **r})
    recs.sort(key=lambda r: r["id"])
    for r in recs:
        print(json.dumps(r, ensure_ascii=False))


if __name__ == "__main__":
    main()
