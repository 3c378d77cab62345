"""Console behaviour of whole `llmops train` runs on a Prefect server (help, log routing, summaries: tests/unit/test_console.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def test_an_error_inside_the_flow_prints_once_with_the_traceback_in_the_log(tmp_path, prefect_harness):
    """A task raising inside the flow: Prefect logs it four times and the CLI used to print it again."""
    from prefect.settings import PREFECT_API_URL

    # the session's Prefect API (a temporary server of its own would cost ~10 s more)
    env = dict(
        os.environ,
        LLMOPS_HOME=str(tmp_path / "state"),
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=PREFECT_API_URL.value(),
    )
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "train",
            "--config",
            str(ROOT / "configs/tiny.yaml"),
            "--set",
            "training.batch_size=5000",
            "--set",
            "validation.enabled=false",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "Traceback" not in out and "Finished in state Failed" not in out
    errors = [line for line in r.stderr.splitlines() if line.startswith("error") or "Error" in line]
    assert len(errors) == 1 and errors[0].startswith("error: training.batch_size: batch_size 5000 exceeds"), errors
    log = Path(
        next(line.split("log: ", 1)[1].split(" (")[0] for line in r.stderr.splitlines() if line.startswith("log: "))
    )
    assert "Traceback (most recent call last)" in log.read_text()
    assert len(r.stderr.splitlines()) <= 12, r.stderr


@pytest.mark.slow
def test_train_prints_a_short_summary_and_json_only_with_json(tmp_path):
    """The whole console of a tiny `llmops train` (about a minute here): a few lines for people, no warning wall."""
    env = dict(os.environ, LLMOPS_HOME=str(tmp_path / "state"), PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "train", "--config", str(ROOT / "configs/tiny.yaml")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(r.stderr.splitlines()) + len(r.stdout.splitlines()) <= 30, r.stdout + r.stderr
    for noise in ("Warning", "torchao", "triton", "_pytree", "Traceback", "mlflow"):
        assert noise not in r.stderr, noise
    assert r.stdout.startswith("Training run finished") and "@candidate" in r.stdout
    r = subprocess.run([*cmd, "--json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["registered"]["version"]
