"""Validation throughput: records/s of the full GX + PII/PHI validation on ~100k records.

    .venv/bin/python bench/bench_validation.py [--records 100000]

Records are built from the shipped sample (speeches, re-combined) with 1% carrying an email (redact policy),
so the redaction + re-validation path is measured too.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=100_000)
    args = ap.parse_args()
    from llmops.config import DataConfig, ValidationConfig
    from tasks.validation import validate_data

    src = [json.loads(x)["text"] for x in (ROOT / "data/sample/shakespeare.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    rows = []
    for i in range(args.records):
        text = f"{rng.choice(src)}\n{rng.choice(src)}"[:1500] + f" [{i}]"
        if i % 100 == 0:
            text += f" Write to user{i}@example.org."
        rows.append(json.dumps({"id": f"r{i}", "text": text}))
    print(f"\nValidation throughput, {args.records:,} records (~{sum(map(len, rows)) / 1e6:.0f} MB JSONL)")
    print(f"{'tokenizer':<22}{'seconds':>9}{'records/s':>12}{'redacted':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        path.write_text("\n".join(rows) + "\n")
        for name, tok in (("none (chars only)", None), ("tiny BPE (512)", str(ROOT / "llmops/assets/tiny-tokenizer"))):
            data = DataConfig(path=path)
            val = ValidationConfig(min_records=100, max_tokens=4096, max_duplicate_rate=0.5)
            t = time.perf_counter()
            rep = validate_data(data, val, Path(tmp) / f"out-{len(name)}", tok)
            dt = time.perf_counter() - t
            assert rep.passed, rep.failures
            print(f"{name:<22}{dt:>9.1f}{args.records / dt:>12,.0f}{rep.pii['email']['count']:>10}")


if __name__ == "__main__":
    main()
