"""Run a command, timestamp every console line it prints (stdout and stderr merged), report wall time and the
longest silences: what a person waiting at the terminal experiences.

    .venv/bin/python bench/silent_gaps.py -- make demo
    .venv/bin/python bench/silent_gaps.py --burn -- make demo      # with a CPU burner on every core
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time


def _burn(until: float) -> None:
    x = 0
    while time.time() < until:
        x = (x * 31 + 7) % 1_000_003


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--burn", action="store_true")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    burners = []
    if a.burn:
        burners = [
            multiprocessing.Process(target=_burn, args=(time.time() + 7200,), daemon=True)
            for _ in range(os.cpu_count() or 2)
        ]
        for b in burners:
            b.start()
    t0 = time.time()
    last, gaps = t0, []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    prev_line = "(start)"
    for line in proc.stdout:
        now = time.time()
        gaps.append((now - last, prev_line.strip()[:100], line.strip()[:100]))
        last, prev_line = now, line
        print(f"[{now - t0:7.1f}s] {line}", end="", flush=True)
    rc = proc.wait()
    for b in burners:
        b.terminate()
    wall = time.time() - t0
    gaps.append((time.time() - last, prev_line.strip()[:100], "(end)"))
    print(f"\nexit {rc}; wall {wall:.0f} s ({wall / 60:.1f} min); load burner: {'on' if a.burn else 'off'}")
    print("longest silent gaps (s | after line -> before line):")
    for g, before, after in sorted(gaps, reverse=True)[: a.top]:
        print(f"  {g:7.1f} | {before!r} -> {after!r}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
