"""Cached re-run vs first run of training (same data bytes, config and code), measured as a user would see it.

    .venv/bin/python bench/bench_cache.py                               # demo config: real SmolLM2 (~10 min)
    .venv/bin/python bench/bench_cache.py --config configs/tiny.yaml
    .venv/bin/python bench/bench_cache.py --config configs/tiny.yaml --in-process   # + the flow called in-process

`cli`: the whole `llmops train` process (imports, validation, the flow, registration) against a running local
Prefect server, as `make demo` runs it. `in-process`: the flow function twice in one Python process (a Prefect test
harness), i.e. without process start-up. Each mode starts from a fresh temporary state dir and governance, so the
first run does everything (model conversion included). Goal (issue 15): cli cached / first <= 0.05 on the demo config.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
LLMOPS = str(Path(sys.executable).parent / "llmops")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(argv: list[str], env: dict, log: Path) -> float:
    t = time.perf_counter()
    with open(log, "ab") as out:
        r = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    if r.returncode:
        sys.exit(f"bench: {' '.join(argv[1:3])} failed (exit {r.returncode}); see {log}")
    return time.perf_counter() - t


def cli(config: str, tmp: Path) -> tuple[float, float]:
    home = tmp / "home"
    env = dict(
        os.environ,
        LLMOPS_HOME=str(home),
        PREFECT_HOME=str(home / "prefect"),
        LLMOPS_GOVERNANCE=str(tmp / "governance" / "governance.yaml"),
        LLMOPS_PREFECT_PORT=str(_free_port()),
        LLMOPS_MLFLOW_PORT=str(_free_port()),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    env.pop("PREFECT_API_URL", None)
    tmp.mkdir(parents=True, exist_ok=True)
    log = tmp / "bench.log"
    _run([LLMOPS, "governance", "init"], env, log)
    _run([LLMOPS, "services", "start"], env, log)
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{env['LLMOPS_PREFECT_PORT']}/api"
    try:
        train = [LLMOPS, "train", "--config", config, "--set", f"state_dir={home}"]
        return _run(train, env, log), _run(train, env, log)
    finally:
        subprocess.run([LLMOPS, "services", "stop"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def in_process(config: str, tmp: Path) -> tuple[float, float]:
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(tmp / "results")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["LLMOPS_GOVERNANCE"] = str(tmp / "governance" / "governance.yaml")
    from prefect.testing.utilities import prefect_test_harness

    from flows.training import training_flow
    from llmops.config import load_config
    from llmops.governance.access import init_governance

    init_governance(Path(os.environ["LLMOPS_GOVERNANCE"]))
    cfg = load_config(config, {"state_dir": str(tmp / "state")})
    with prefect_test_harness():
        t0 = time.perf_counter()
        first = training_flow(config=cfg)
        t1 = time.perf_counter()
        second = training_flow(config=cfg)
        t2 = time.perf_counter()
    assert first["finetune"]["run_id"] == second["finetune"]["run_id"]
    assert first["registered"]["version"] == second["registered"]["version"]
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--in-process", action="store_true", help="also time the flow in-process")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(("cli (llmops train)", *cli(args.config, Path(tmp) / "cli")))
        if args.in_process:
            rows.append(("in-process flow", *in_process(args.config, Path(tmp) / "inproc")))
    print(f"\nRe-run cost, {Path(args.config).name}, fresh state dir each mode")
    print(f"{'mode':<22}{'first s':>10}{'cached s':>10}{'cached/first':>14}")
    for name, first, cached in rows:
        print(f"{name:<22}{first:>10.1f}{cached:>10.1f}{cached / first:>14.3f}")


if __name__ == "__main__":
    main()
