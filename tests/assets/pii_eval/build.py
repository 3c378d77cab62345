"""Rebuild the *unlabelled* records of the PII evaluation set from Debian packages (the labels are hand-checked;
see README.md). Needs the packages unpacked under SRC (not run by the tests):

    mkdir -p /tmp/pkgs && cd /tmp/pkgs && apt-get download fortunes fortunes-min fortunes-mario emacs-common \
        jargon-text libpython3.11-testsuite miscfiles perl-doc sendmail-doc
    for f in *.deb; do d=${f%%_*}; mkdir -p x/$d; dpkg-deb -x $f x/$d; done
    .venv/bin/python tests/assets/pii_eval/build.py /tmp/pkgs/x > /tmp/pii_raw.jsonl
    .venv/bin/python tests/assets/pii_eval/build.py /tmp/pkgs/x --speed-corpus > /tmp/pii_speed.jsonl  # bench only

Records are chosen so that every category has positives and its hard negatives (numbers, dotted versions, '@'
and '!' in non-address use) appear: every record of a source that holds a candidate pattern is kept, plus a
seeded random sample of the rest. Ids are assigned after a seeded shuffle, so `id % 5 == 0` is a random 20%.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import sys
from pathlib import Path

# Anything that could be one of the categories, or one of their look-alikes (kept as hard negatives).
CANDIDATE = re.compile(
    r"@|\b\w+!\w|\d{3}[-. )]\d{3}|\d{3}-\d{4}|\d{3}-\d{2}-\d{4}|\d+\.\d+\.\d+|\b[A-Z]{2}\d{2} ?[A-Z0-9]{4}"
    r"|\d{7,}|1-800|\bISBN|\b(?:phone|tel|fax|call)\b", re.I)

# Rare in real text (phone numbers, UUCP bang paths): every record holding one is kept.
RARE = re.compile(r"\d{3}[-. )]\s?\d{3}[-. ]\d{4}|\b1-800|\b\d{3}-\d{4}\b|\+\d{1,3}[ -]\d"
                  r"|\b[a-z][\w.-]*![a-z][\w.-]*!\w"
                  r"|\b(?:phone|tel|fax)\b.{0,12}\d", re.I)


def read(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def paragraphs(text: str, lo: int = 120, hi: int = 1800) -> list[str]:
    """Blank-line paragraphs, small neighbours merged up to `lo` chars, long ones cut at a line end below `hi`."""
    out, cur = [], ""
    for p in re.split(r"\n\s*\n", text):
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= lo:
            while len(cur) > hi:
                cut = cur.rfind("\n", 0, hi)
                cut = cut if cut > lo else hi
                out.append(cur[:cut])
                cur = cur[cut:].lstrip("\n")
            out.append(cur)
            cur = ""
    if cur.strip():
        out.append(cur)
    return [p.strip("\n") for p in out if p.strip()]


def sources(src: Path):
    """(source name, records) per file."""
    fort = src / "fortunes/usr/share/games/fortunes"
    for f in sorted(fort.iterdir()):
        if f.is_file() and not f.suffix and not f.is_symlink():
            yield f"debian:fortunes/{f.name}", [x.strip("\n") for x in read(f).split("\n%\n") if x.strip()]
    for f in sorted((src / "fortunes-min/usr/share/games/fortunes").glob("[a-z]*")):
        if not f.suffix and not f.is_symlink():
            yield f"debian:fortunes-min/{f.name}", [x.strip("\n") for x in read(f).split("\n%\n") if x.strip()]
    jar = read(next((src / "jargon-text").rglob("jargon.txt.gz")))
    yield "debian:jargon-text/jargon.txt", paragraphs(jar)
    etc = src / "emacs-common/usr/share/emacs/28.2/etc"
    for name in ("NEWS.1-17", "NEWS.18", "NEWS.19", "NEWS.20", "MACHINES", "PROBLEMS", "TODO", "DISTRIB",
                 "gnus-tut.txt", "HISTORY", "ETAGS.README", "CALC-NEWS", "MH-E-NEWS", "ERC-NEWS", "AUTHORS"):
        yield f"debian:emacs-common/etc/{name}", paragraphs(read(etc / name))
    data = src / "libpython3.11-testsuite/usr/lib/python3.11/test/test_email/data"
    for f in sorted(data.glob("msg_*.txt")):
        yield f"debian:libpython3.11-testsuite/test_email/data/{f.name}", [read(f)[:4000]]
    misc = src / "miscfiles/usr/share/misc"
    yield "debian:miscfiles/mailinglists", paragraphs(read(misc / "mailinglists.gz"))
    for f in sorted((src / "sendmail-doc").rglob("*")):
        if f.is_file() and f.suffix in ("", ".gz") and ("README" in f.name.upper() or f.name.startswith("faq")):
            yield f"debian:sendmail-doc/{f.name}", paragraphs(read(f))
    for name in ("perlbook.pod", "perlhist.pod", "perlfaq2.pod", "perlfaq1.pod"):
        for f in (src / "perl-doc").rglob(name):
            yield f"debian:perl-doc/{name}", paragraphs(read(f))
    for f in sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")):
        entries = re.split(r"(?<=\n)(?=\S+ \([^)]*\) [^;]*; urgency=)", read(f))
        yield f"debian:{f.parent.name}/changelog.Debian", [e.strip("\n")[:1800] for e in entries[:6] if e.strip()]
    for f in sorted(Path("/usr/share/doc").glob("*/copyright")):
        yield f"debian:{f.parent.name}/copyright", paragraphs(read(f))
    for f in sorted(Path("/usr/share/common-licenses").iterdir()):
        if f.is_file():
            yield f"debian:common-licenses/{f.name}", paragraphs(read(f))[:3]


QUOTA = {"fortunes": 420, "jargon": 170, "emacs": 230, "test_email": 64, "mailinglists": 60, "sendmail": 40,
         "perl-doc": 60, "changelog": 220, "copyright": 140, "common-licenses": 20}


# Added after the detectors were tuned (ids from 1400 on, after the synthetic records): a fresh, untuned sample of
# another Usenet-era collection (Portuguese/English quotes and signatures), kept apart so the first ids stay stable.
EXTRA = {"fortunes-mario": 200}
EXTRA_FIRST_ID = 1400


def extra_sources(src: Path):
    for f in sorted((src / "fortunes-mario/usr/share/games/fortunes").glob("mario.*")):
        if not f.suffix == ".dat" and not f.is_symlink():
            yield f"debian:fortunes-mario/{f.name}", [x.strip("\n") for x in read(f).split("\n%\n") if x.strip()]


def speed_corpus(src: Path) -> None:
    """Every record of the Usenet-era sources (25,078 records, unlabelled): the bench's ordinary-text speed corpus."""
    keep = ("fortunes", "jargon", "emacs", "test_email")
    for name, recs in sources(src):
        if any(k in name for k in keep):
            for t in recs:
                print(json.dumps({"source": name, "text": t}, ensure_ascii=False))


def main() -> None:
    src = Path(sys.argv[1])
    if sys.argv[2:] == ["--speed-corpus"]:
        return speed_corpus(src)
    rng = random.Random(13)
    seen, chosen = set(), []
    for kind, quota in QUOTA.items():
        pool = [(name, i, t) for name, recs in sources(src) if kind in name for i, t in enumerate(recs)]
        pool = [p for p in pool if 20 <= len(p[2]) and p[2] not in seen]
        must = [p for p in pool if RARE.search(p[2])]
        hot = [p for p in pool if CANDIDATE.search(p[2]) and not RARE.search(p[2])]
        cold = [p for p in pool if not CANDIDATE.search(p[2])]
        rng.shuffle(hot), rng.shuffle(cold)
        n_hot = max(0, min(len(hot), int(quota * 0.75) - len(must)))
        take = must + hot[:n_hot] + cold[:max(0, quota - n_hot - len(must))]
        for name, i, t in take:
            if t not in seen:
                seen.add(t)
                chosen.append({"source": f"{name}#{i}", "text": t})
    rng.shuffle(chosen)
    for k, r in enumerate(chosen):
        print(json.dumps({"id": k, **r}, ensure_ascii=False))
    rng = random.Random(1400)
    pool = [(name, i, t) for name, recs in extra_sources(src) for i, t in enumerate(recs) if 20 <= len(t) <= 3000]
    must = [p for p in pool if RARE.search(p[2])]
    hot = [p for p in pool if CANDIDATE.search(p[2]) and not RARE.search(p[2])]
    cold = [p for p in pool if not CANDIDATE.search(p[2])]
    rng.shuffle(hot), rng.shuffle(cold)
    n = EXTRA["fortunes-mario"]
    take = must + hot[:int(n * 0.75) - len(must)] + cold[:n - int(n * 0.75)]
    rng.shuffle(take)
    for k, (name, i, t) in enumerate(take):
        print(json.dumps({"id": EXTRA_FIRST_ID + k, "source": f"{name}#{i}", "text": t}, ensure_ascii=False))


if __name__ == "__main__":
    main()
