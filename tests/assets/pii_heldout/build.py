"""Build the held-out PII set: labels come from how each record is made, before any detector sees it.

    .venv/bin/pip install faker==40.0.0 phonenumbers     # bench-only dependencies
    .venv/bin/python tests/assets/pii_heldout/build.py   # writes records.jsonl next to this file (seeded)

Two sources neither the detectors nor tests/assets/pii_eval ever used:
1. Faker records in en_US, en_GB, de_DE and fr_FR: sentences in the locale's language around Faker's own values
   (phone_number, email, ipv4/ipv6, iban, credit_card_number, ssn), some with context words, some bare, plus hard
   negatives that are not personal (package versions after ==/>=/"upgraded to", EAN-13 barcodes, ISBN-13s, dates,
   order numbers, Message-IDs in a Message-ID header). Each inserted value's span is its label; phones also carry
   `valid` = what libphonenumber says about that number in the record's region (the anchor's own verdict).
2. Real package metadata of the installed Python distributions (`*.dist-info/METADATA` headers Author-email,
   Maintainer-email, Author, Home-page, Version): real author addresses labelled from the RFC 5322 header structure
   (email.utils.getaddresses), so `Name <name12345@domain>` forms occur as people write them.
"""

from __future__ import annotations

import email.utils
import json
import random
import re
import sys
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
LOCALES = {"en_US": "US", "en_GB": "GB", "de_DE": "DE", "fr_FR": "FR"}
PHONE_CTX = {
    "en_US": ["Call me at {}", "Phone: {}", "reach the office on {}", "fax {}", "my cell is {}"],
    "en_GB": ["Ring us on {}", "Tel: {}", "mobile {}", "please phone {} after 6pm"],
    "de_DE": ["Ruf mich an: {}", "Telefon {}", "Tel. {}", "erreichbar unter {}", "Handy: {}"],
    "fr_FR": ["Appelle-moi au {}", "Téléphone : {}", "Tél. {}", "joignable au {}", "portable {}"],
}
BARE = {
    "en_US": ["{} is the number on the form.", "Contact {} for the keys.", "Numbers: {}"],
    "en_GB": ["{} is the number on file.", "Contact {} about the flat."],
    "de_DE": ["Die Nummer ist {}.", "Kontakt: {}"],
    "fr_FR": ["Le numéro est {}.", "Contact : {}"],
}
FILLER = {
    "en_US": "The meeting moved to Thursday and the report is attached.",
    "en_GB": "The parcel arrives on Monday; cheers for sorting it.",
    "de_DE": "Das Treffen ist am Donnerstag, der Bericht liegt bei.",
    "fr_FR": "La réunion est jeudi et le rapport est joint.",
}


class Rec:
    def __init__(self, locale: str, source: str) -> None:
        self.locale, self.source, self.parts, self.labels, self.meta = locale, source, [], {}, {}
        self.n = 0

    def add(self, s: str, cat: str | None = None, **meta) -> None:
        if cat:
            self.labels.setdefault(cat, []).append([self.n, self.n + len(s)])
            if meta:
                self.meta.setdefault(cat, []).append(meta)
        self.parts.append(s)
        self.n += len(s)

    def template(self, tpl: str, value: str, cat: str | None, **meta) -> None:
        a, b = tpl.split("{}")
        self.add(a)
        self.add(value, cat, **meta)
        self.add(b)

    def dump(self, rid: int) -> dict:
        out = {
            "id": rid,
            "locale": self.locale,
            "source": self.source,
            "text": "".join(self.parts),
            "labels": self.labels,
        }
        return out | ({"meta": self.meta} if self.meta else {})


def faker_records(n_per_locale: int, rng: random.Random) -> list[Rec]:
    import phonenumbers
    from faker import Faker

    out = []
    for locale, region in LOCALES.items():
        fk = Faker(locale)
        fk.seed_instance(rng.randrange(1 << 30))
        for _ in range(n_per_locale):
            r = Rec(locale, f"faker:{locale}")
            kinds = rng.sample(
                ["phone", "phone", "phone", "email", "ip", "ipv6", "iban", "card", "ssn", "neg", "neg", "neg"], 3
            )
            for k in kinds:
                r.add(" " if r.n else "")
                if k == "phone":
                    num = fk.phone_number()
                    try:
                        valid = phonenumbers.is_valid_number(phonenumbers.parse(num, region))
                    except phonenumbers.NumberParseException:
                        valid = False
                    tpl = rng.choice(PHONE_CTX[locale] if rng.random() < 0.6 else BARE[locale])
                    r.template(tpl, num, "phone", valid=valid)
                elif k == "email":
                    addr = (
                        fk.email()
                        if rng.random() < 0.5
                        else fk.user_name() + str(rng.randrange(10, 99999)) + "@" + fk.free_email_domain()
                    )
                    if rng.random() < 0.4:
                        r.add(fk.name() + " <")
                        r.add(addr, "email")
                        r.add(">")
                    else:
                        r.template("Write to {} for details.", addr, "email")
                elif k == "ip":
                    r.template(
                        rng.choice(["Login from {} failed.", "host {} is down", "client={}"]), fk.ipv4(), "ip_address"
                    )
                elif k == "ipv6":
                    r.template(rng.choice(["peer {} connected", "from [{}]", "addr {}"]), fk.ipv6(), "ip_address")
                elif k == "iban":
                    iban = fk.iban()
                    if rng.random() < 0.5:
                        iban = " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
                    r.template("IBAN {}", iban, "iban")
                elif k == "card":
                    r.template(
                        rng.choice(["card {} was charged", "Karte/card: {}"]), fk.credit_card_number(), "credit_card"
                    )
                elif k == "ssn":
                    if locale == "en_US":
                        r.template("SSN {}", fk.ssn(), "ssn")
                    else:
                        r.add(FILLER[locale])
                else:
                    neg = rng.choice(["version", "pin", "upgrade", "ean", "isbn", "date", "order", "msgid", "semver"])
                    v4 = ".".join(str(rng.randrange(0, 20)) for _ in range(4))
                    if neg == "version":
                        r.add(f"Requires {fk.word()}lib=={v4} or later.")
                    elif neg == "pin":
                        r.add(f"pip install {fk.word()}-utils>={v4}")
                    elif neg == "upgrade":
                        r.add(f"We upgraded {fk.word()} to {v4} last week.")
                    elif neg == "ean":
                        r.add(f"EAN {fk.ean13()} in stock.")
                    elif neg == "isbn":
                        r.add(f"ISBN {fk.isbn13()}")
                    elif neg == "date":
                        r.add(f"Date: {fk.date()} {fk.time()}")
                    elif neg == "order":
                        r.add(f"Order #{rng.randrange(10**7, 10**9)} shipped.")
                    elif neg == "msgid":
                        r.add("Message-ID: ")
                        mid = f"<{fk.date_time().strftime('%Y%m%d%H%M%S')}.{rng.randrange(10**4, 10**6)}@{fk.domain_name()}>"
                        r.add(mid, "message_id")
                    else:
                        r.add(
                            f"Released {fk.word()} {rng.randrange(1, 9)}.{rng.randrange(0, 30)}.{rng.randrange(0, 30)}."
                        )
            r.add(" " + FILLER[locale])
            out.append(r)
    return out


HEADER = re.compile(r"^(Author-email|Maintainer-email|Author|Maintainer|Home-page|Version|Name): (.*)$", re.M)


def metadata_records(limit: int) -> list[Rec]:
    out, seen = [], set()
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata.get("Name") or "").lower()):
        name = (dist.metadata.get("Name") or "").lower()
        if name in seen or not name:
            continue
        seen.add(name)
        raw = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""
        head = raw.split("\n\n", 1)[0]
        lines = [m for m in HEADER.finditer(head)]
        if not any(m.group(1).endswith("-email") for m in lines):
            continue
        r = Rec("meta", f"dist-info:{name}")
        for m in lines:
            key, value = m.group(1), m.group(2).strip()
            r.add(f"{key}: ")
            if key.endswith("-email"):
                # each address's span is where getaddresses says it is (no detector involved)
                pos = 0
                for _, addr in email.utils.getaddresses([value]):
                    if not addr or "@" not in addr:
                        continue
                    i = value.find(addr, pos)
                    if i < 0:
                        continue
                    r.add(value[pos:i])
                    r.add(addr, "email")
                    pos = i + len(addr)
                r.add(value[pos:] + "\n")
            else:
                r.add(value + "\n")
        out.append(r)
        if len(out) >= limit:
            break
    return out


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--out", default=str(HERE / "records.jsonl"))
    ap.add_argument("--no-metadata", action="store_true", help="Faker records only (a fresh split of new values)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    recs = faker_records(200, rng) + ([] if args.no_metadata else metadata_records(400))
    path = Path(args.out)
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(recs):
            f.write(json.dumps(r.dump(i), ensure_ascii=False) + "\n")
    by = {}
    for r in recs:
        for c, s in r.labels.items():
            by[(r.locale, c)] = by.get((r.locale, c), 0) + len(s)
    print(f"{path}: {len(recs)} records", file=sys.stderr)
    for (loc, c), n in sorted(by.items()):
        print(f"  {loc:<6} {c:<12} {n}", file=sys.stderr)


if __name__ == "__main__":
    main()
