"""The embedded default on a busy machine: no server started, every core burning, two `llmops train` at once on one
state dir and the same data: both finish (Prefect's temporary server gets a start-up budget a loaded machine meets;
the GX context is locked per data dir; log files are unique per run)."""

import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT


def _burn(stop_at: float) -> None:
    x = 0
    while time.time() < stop_at:
        x = (x * 31 + 7) % 1_000_003


@pytest.mark.integration
def test_two_concurrent_tiny_trains_finish_under_a_cpu_burner(tmp_path, tiny_jsonl):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING"))}
    env |= {
        "LLMOPS_HOME": str(tmp_path / "home"),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PYTHONPATH": str(ROOT),
    }
    state = tmp_path / "state"
    burners = [
        multiprocessing.Process(target=_burn, args=(time.time() + 900,), daemon=True)
        for _ in range(os.cpu_count() or 2)
    ]
    for b in burners:
        b.start()
    try:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flows.cli",
                    "train",
                    "--config",
                    str(ROOT / "configs/tiny.yaml"),
                    "--set",
                    f"data.path={tiny_jsonl}",
                    "--set",
                    "data.max_records=null",
                    "--set",
                    f"state_dir={state}",
                    "--set",
                    f"training.learning_rate={lr}",
                ],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for lr in (5e-4, 6e-4)
        ]
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for b in burners:
            b.terminate()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"stdout:\n{out[-1500:]}\nstderr:\n{err[-3000:]}"
        assert "Training run finished" in out
        assert "Traceback" not in err
    logs = sorted((state / "logs").glob("train-*.log"))
    assert len(logs) == 2  # one log per run, even when both start in the same second


_OPEN_REGISTRY = """
import sys
from llmops.services import connect_registry
import mlflow
client = mlflow.MlflowClient(connect_registry(None, sys.argv[1]))
client.search_registered_models()
client.search_experiments()
print("opened")
"""


def test_processes_opening_a_fresh_state_dirs_registry_at_once_all_succeed(tmp_path):
    """MLflow creates its sqlite tables check-then-create, unlocked: four processes opening a fresh state dir's
    registry together failed 11 of 12 times ("table ... already exists", "duplicate column name: step") before the
    schema was created under a lock (CI hit it as two concurrent `llmops train` reaching evaluation together)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING", "LLMOPS_TRACKING"))}
    env |= {"PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    state = tmp_path / "state"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_REGISTRY, str(state)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "opened" in out, err[-2000:]
