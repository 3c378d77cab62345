"""Second real-text held-out source for issue 22: glibc's locale definitions (Debian 12 package `locales`
2.36-9+deb12u14, /usr/share/i18n/locales/*; `apt-get download locales` gives the same files). Real text written
by locale maintainers in many countries: header comments with real postal addresses, e-mail addresses and phone/fax
numbers (+45, +27, +98, +353 ...), and LC_IDENTIFICATION / LC_TELEPHONE / LC_ADDRESS / LC_MONETARY / LC_TIME
sections full of hard negatives (format strings "+%c %a %l", `int_prefix "45"`, code points <U0030>, dates,
revisions, postal formats).

Labels come from the files' structure, before any detector runs:
  phone  the value of a comment field `% Tel:` / `% Fax:` / `% Phone:` / `% Telephone:` and of LC_IDENTIFICATION
         `tel "..."` / `fax "..."`, when it holds 6+ digits (the whole value: "+45 - 39966101");
         plus three phones written elsewhere, read by hand (MANUAL);
  email  every `local@domain.tld` token (addresses are written plainly in these files; `<...>` and quotes trimmed).
meta.phone[i].valid: libphonenumber's is_valid_number for the value (parsed as written, +country).

    python build_locales.py /usr/share/i18n/locales > glibc_locales.jsonl
"""

import json
import re
import sys
from pathlib import Path

import phonenumbers as pn

SECTIONS = ("LC_IDENTIFICATION", "LC_TELEPHONE", "LC_ADDRESS", "LC_MONETARY", "LC_NUMERIC", "LC_MEASUREMENT", "LC_NAME")
FIELD = re.compile(r"(?im)^%[ \t]*(?:tel|fax|phone|telephone|telefon)[ \t]*:[ \t]*(.*?)[ \t]*$")
ID_FIELD = re.compile(r'(?m)^(?:tel|fax)\s+"([^"]*)"')
# Read by hand (every digit run of 7+ digits outside the fields above was listed and checked, build review): phones
# written elsewhere than in a Tel/Fax field.
MANUAL = {"ta_LK": ["94-777-315206"], "uk_UA": ["+380 44 4908888", "(044) 4908888"]}
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")


def blocks(text: str):
    """The header comment, then each wanted LC_ section, cut at blank lines into pieces of at most ~1,200 chars."""
    lines = text.splitlines(keepends=True)
    keep, inside = [], None
    for i, line in enumerate(lines):
        word = line.split(maxsplit=1)[0] if line.strip() else ""
        if word.startswith("LC_"):
            inside = word
        head = inside is None
        if head or inside in SECTIONS:
            keep.append(line)
        if word == "END" and inside:
            inside = "done" if inside in SECTIONS else inside
            keep.append("\n") if inside == "done" else None
    cur = ""
    for para in re.split(r"\n\s*\n", "".join(keep)):
        if not para.strip():
            continue
        if cur and len(cur) + len(para) > 1200:
            yield cur
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        yield cur


def labels(text: str, locale: str):
    phones = []
    for value in MANUAL.get(locale, []):
        phones += [(m.start(), m.end()) for m in re.finditer(re.escape(value), text)]
    for m in list(FIELD.finditer(text)) + list(ID_FIELD.finditer(text)):
        if sum(c.isdigit() for c in m.group(1)) >= 6:
            phones.append(m.span(1))
    emails = [m.span() for m in EMAIL.finditer(text)]
    out = {}
    if phones:
        out["phone"] = sorted(phones)
    if emails:
        out["email"] = emails
    return out


def main(root: str) -> None:
    n, seen = 0, set()
    for path in sorted(Path(root).iterdir()):
        if not path.is_file() or path.name in ("C", "POSIX") or path.name.startswith("translit_") or path.name.startswith("iso"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in blocks(text):
            if block in seen:  # headers copied from locale to locale: each text once
                continue
            seen.add(block)
            lab = labels(block, path.name)
            meta = {}
            if "phone" in lab:
                valid = []
                for a, b in lab["phone"]:
                    try:
                        region = path.name.split("_")[1][:2] if "_" in path.name else None
                        valid.append({"valid": pn.is_valid_number(pn.parse(block[a:b], region))})
                    except pn.NumberParseException:
                        valid.append({"valid": False})
                meta["phone"] = valid
            rec = {"id": n, "locale": path.name, "source": f"debian:locales/{path.name}", "text": block, "labels": lab}
            if meta:
                rec["meta"] = meta
            print(json.dumps(rec, ensure_ascii=False))
            n += 1


if __name__ == "__main__":
    main(sys.argv[1])
