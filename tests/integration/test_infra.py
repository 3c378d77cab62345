"""`deploy all` and a real worker running a deployment (the shipped infra files' checks: tests/unit/test_infra.py)."""

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, _free_port
from tests.unit.test_infra import deployments  # noqa: F401

PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


@pytest.mark.integration
def test_deploy_all_and_a_worker_runs_a_deployment(tmp_path):
    from llmops import services

    port = _free_port()
    api = services.start_prefect(tmp_path / "server", port)
    env = dict(
        os.environ,
        PREFECT_API_URL=api,
        LLMOPS_REPO=str(ROOT),
        LLMOPS_HOME=str(tmp_path / "state"),
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp_path / "results"),
    )
    prefect = [sys.executable, "-m", "prefect"]

    def run(*args, timeout=300):
        r = subprocess.run([*prefect, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
        return r.stdout

    try:
        run("work-pool", "create", "llmops-cpu", "--type", "process")
        run("work-pool", "create", "llmops-promotion", "--type", "process")
        run(
            "work-pool",
            "create",
            "llmops-gpu",
            "--type",
            "kubernetes",
            "--base-job-template",
            str(ROOT / "infra" / "k8s" / "gpu-base-job-template.json"),
        )
        out = run("--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_YAML))
        assert out.count("successfully created") == len(deployments())
        run("deployment", "run", "llmops-training/train-tiny")
        run("worker", "start", "--pool", "llmops-cpu", "--run-once", timeout=600)
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'state'}/mlflow.db")
        mv = client.get_model_version_by_alias("llmops-demo", "candidate")
        assert mv.tags["llmops.dp.private"] == "True" and mv.tags["prefect.flow_run_id"]
    finally:
        services.stop_prefect(tmp_path / "server")
