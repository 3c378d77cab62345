"""Validation throughput end to end: `llmops validate` (the CLI: scan workers, GX, Data Docs, report) on generated
JSONL of 100k and 1M records (~450 bytes each, ~450 MB at 1M), with records/s and the peak memory of the whole
process tree (the CLI plus its worker processes, sampled every 0.1 s).

    .venv/bin/python bench/bench_validation.py                       # 100k and 1M records
    .venv/bin/python bench/bench_validation.py --records 100000 --max-tokens 64   # force exact token counts
    .venv/bin/python bench/bench_validation.py --profile 20000       # where the time goes, per stage (one process)
    .venv/bin/python bench/bench_validation.py --pii-dense           # 30% of records hold held-out PII, all redacted

Records are built from the shipped sample (speeches, re-combined) with 1% carrying an email (redact policy) and
0.5% a backspace (control characters are stripped), so the cleaned-copy path is measured too. Token counts use
the shipped tiny byte-level BPE tokenizer: a record is tokenized only when its UTF-8 length could exceed
validation.max_tokens (the default 4096 never does here; --max-tokens 64 makes every record count exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_data(path: Path, n: int, pii_dense: bool = False) -> int:
    src = [json.loads(x)["text"] for x in (ROOT / "data/sample/shakespeare.jsonl").read_text().splitlines()]
    held = [
        json.loads(x)["text"]
        for name in ("records.jsonl", "fresh.jsonl")
        for x in (ROOT / "tests/assets/pii_heldout" / name).read_text(encoding="utf-8").splitlines()
    ]
    rng = random.Random(0)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            text = "\n".join(rng.choice(src) for _ in range(4))[: rng.randint(200, 640)] + f" [{i}]"
            if i % 100 == 0:
                text += f" Write to user{i}@example.org."
            if i % 200 == 7:
                text = text.replace(" ", " _\b", 1)  # nroff underline
            if pii_dense and i % 10 < 3:  # 30%: a held-out record (phones, IPs, cards, IBANs in 4 locales) inside
                text = text[: len(text) // 2] + " " + rng.choice(held) + " " + text[len(text) // 2 :]
            line = json.dumps({"id": f"r{i}", "text": text}) + "\n"
            size += len(line)
            f.write(line)
    return size


def run_cli(config: Path, home: Path) -> tuple[float, float, float, str]:
    """Wall seconds, CPU seconds (user+sys, the CLI and its workers) and peak RSS (GB) of the process tree."""
    import resource

    import psutil

    env = dict(os.environ, LLMOPS_HOME=str(home))
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "validate", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    out, err = proc.communicate()
    dt = time.perf_counter() - t
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    if proc.returncode not in (0, 2) or "Report: `" not in out:  # 2: the data failed validation (still measured)
        raise SystemExit(f"validate failed ({proc.returncode}): {err[-2000:]}")
    return dt, cpu, peak / 2**30, out


def profile(n: int) -> None:
    """Per-stage CPU time of one process over n records (what each worker does, and the main process's part)."""
    import re

    from llmops.text.identity import text_hash
    from llmops.text.pii import find_pii, pii_categories, redact
    from tasks import scan
    from tasks.data import iter_records

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.jsonl"
        make_data(path, n)
        text = path.read_text()
        t0 = time.process_time()
        recs = list(iter_records(text, "jsonl", "p.jsonl"))
        stages = {"read + parse JSONL": time.process_time() - t0}
        bodies = [b for _, _, b in recs]
        mrn = [re.compile(r"\bMRN[:#\s]*\d{6,10}\b")]

        def timed(name, fn):
            t = time.process_time()
            out = fn()
            stages[name] = time.process_time() - t
            return out

        timed("control characters", lambda: [scan.strip_control(b) for b in bodies if scan.CONTROL.search(b)])
        spans = timed("PII detectors (find_pii)", lambda: [find_pii(b, mrn) for b in bodies])
        timed(
            "redact + re-detect (1%)",
            lambda: [find_pii(redact(b, s, {"email"}), mrn) for b, s in zip(bodies, spans) if s.get("email")],
        )
        timed("text_hash (NFKC identity)", lambda: [text_hash(b) for b in bodies])
        count, bound = scan._token_counter(str(ROOT / "llmops/assets/tiny-tokenizer"))
        timed("token bound (UTF-8 length)", lambda: [bound(b) for b in bodies])
        timed("exact token counts (if needed)", lambda: count(bodies))
        timed(
            "write cleaned copy (json.dumps)",
            lambda: [json.dumps({"id": i, "text": b}, ensure_ascii=False) for _, i, b in recs],
        )
    print(f"\nPer-stage CPU, one process, {n:,} records ({len(pii_categories())} PII categories)")
    for k, v in stages.items():
        print(f"  {k:<34}{v / n * 1e6:8.1f} us/record")


def main() -> None:
    from llmops.text.pii import pii_categories

    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--profile", type=int, default=0, help="per-stage CPU profile over this many records, then exit")
    ap.add_argument("--keep", help="directory for the generated data (reused if present)")
    ap.add_argument(
        "--pii-dense",
        action="store_true",
        help="30%% of records carry a tests/assets/pii_heldout record (every category, 4 locales); all categories "
        "set to redact, so the phone matcher, the redaction fixed point and the cleaned copy are all exercised",
    )
    args = ap.parse_args()
    if args.profile:
        return profile(args.profile)
    print(
        f"\nValidation end to end (llmops validate: workers, GX, Data Docs, report), {os.cpu_count()} cores, "
        f"max_tokens {args.max_tokens}"
    )
    print(
        "(CPU s: user+sys of the CLI and its workers; records/s if 2 idle cores = records / (CPU s / 2); load: the "
        "1-min load average before the run, other users' processes included)"
    )
    print(
        f"{'records':>10}{'MB':>8}{'seconds':>9}{'records/s':>11}{'CPU s':>8}{'2-core rec/s':>14}"
        f"{'peak RSS GB':>13}{'load':>6}  passed  cleaned  tokenized"
    )
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.keep or tmp)
        base.mkdir(parents=True, exist_ok=True)
        for n in args.records:
            tag = f"{n}-dense" if args.pii_dense else f"{n}"
            data = base / f"bench-{tag}.jsonl"
            if not data.is_file():
                make_data(data, n, args.pii_dense)
            policy = ", pii: {" + ", ".join(f"{c}: redact" for c in pii_categories()) + "}" if args.pii_dense else ""
            config = base / f"bench-{tag}.yaml"
            config.write_text(
                f"data: {{path: {data}}}\nmodel: {{source: tiny, max_seq_len: 64}}\n"
                f"validation: {{min_records: 100, max_tokens: {args.max_tokens}, "
                f"max_duplicate_rate: 0.5{policy}}}\n"
            )
            load = os.getloadavg()[0]
            dt, cpu, peak, out = run_cli(config, base / f"home-{tag}")
            report = json.loads(Path(out.split("Report: `", 1)[1].split("`", 1)[0]).read_text())
            print(
                f"{n:>10,}{data.stat().st_size / 1e6:>8.0f}{dt:>9.1f}{n / dt:>11,.0f}{cpu:>8.1f}"
                f"{n / (cpu / 2):>14,.0f}{peak:>13.2f}{load:>6.1f}  {str(report['passed']):<7} {str(report['cleaned']):<8} "
                f"{report['n_tokenized']:,}"
            )


if __name__ == "__main__":
    main()
