"""Cached re-run vs first run of the training flow (same data bytes, config and code).

    .venv/bin/python bench/bench_cache.py                          # demo config: real SmolLM2 (~6 min)
    .venv/bin/python bench/bench_cache.py --config configs/tiny.yaml

Uses a fresh temporary state dir, so the first run does everything (model conversion included).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(Path(tmp) / "results")
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        from prefect.testing.utilities import prefect_test_harness

        from flows.training import training_flow
        from llmops.config import load_config

        cfg = load_config(args.config, {"state_dir": str(Path(tmp) / "state")})
        with prefect_test_harness():
            t0 = time.perf_counter()
            first = training_flow(config=cfg)
            t1 = time.perf_counter()
            second = training_flow(config=cfg)
            t2 = time.perf_counter()
        assert first["finetune"]["run_id"] == second["finetune"]["run_id"]
        print(f"\nTraining flow on {Path(args.config).name} ({cfg.model.source}), fresh state dir")
        print(f"{'run':<12}{'seconds':>10}")
        print(f"{'first':<12}{t1 - t0:>10.1f}")
        print(f"{'cached':<12}{t2 - t1:>10.1f}")
        print(f"cached / first = {(t2 - t1) / (t1 - t0):.3f}  (registration of a new MLflow version is not cached)")


if __name__ == "__main__":
    main()
