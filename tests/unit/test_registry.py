"""Evaluation gate (pure) and MLflow registration with lineage (sqlite store here; real server in integration)."""

import json
import subprocess
import sys

import pytest

from llmops.errors import RegistryError
from llmops.services import connect_registry
from tasks.evaluation import GatePolicy, should_promote
from tasks.registry import CANDIDATE, production_version, register_candidate

PRIVATE = {
    "private": True,
    "dp_sgd": True,
    "epsilon": 3.0,
    "noise_multiplier": 1.0,
    "sampling": "poisson",
    "reproducible_insecure": False,
}


@pytest.mark.parametrize(
    "cand,inc,policy,passed,why",
    [
        ({"eval_loss": 2.0}, None, GatePolicy(), True, "no production model yet"),
        ({"eval_loss": 2.0}, {"eval_loss": 2.1}, GatePolicy(), True, "-0.1000 nats"),
        ({"eval_loss": 2.2}, {"eval_loss": 2.1}, GatePolicy(), False, "+0.1000 nats vs production"),
        ({"eval_loss": 2.2}, {"eval_loss": 2.1}, GatePolicy(max_loss_increase=0.15), True, "allowed +0.15"),
        (
            {"eval_loss": 2.0, "latency_ms_per_token_p50": 30},
            {"eval_loss": 2.1, "latency_ms_per_token_p50": 10},
            GatePolicy(max_latency_ratio=1.5),
            False,
            "3.00x production",
        ),
        ({"eval_loss": float("nan")}, None, GatePolicy(), False, "not finite"),
    ],
)
def test_gate_decisions(cand, inc, policy, passed, why):
    d = should_promote(cand, inc, policy, PRIVATE)
    assert d.passed is passed
    assert why in d.summary()


def test_gate_refuses_non_private_models():
    d = should_promote({"eval_loss": 1.0}, None, GatePolicy(), {"private": False})
    assert not d.passed and "without differential privacy" in d.summary()
    assert should_promote({"eval_loss": 1.0}, None, GatePolicy(require_private=False), {"private": False}).passed


def _register(tmp_path, model_dir, uri=None, set_alias=True, **over):
    uri = uri or connect_registry(None, tmp_path)
    kwargs = dict(
        uri=uri,
        state_dir=str(tmp_path),
        experiment="exp",
        model_name="m",
        model_dir=model_dir,
        params={"privacy.target_epsilon": "8"},
        metrics={"eval.eval_loss": 2.5},
        step_metrics=[{"step": 1, "loss": 3.0, "epsilon": 0.5}, {"step": 2, "loss": 2.9, "epsilon": 0.7}],
        artifacts={"privacy": str(tmp_path / "privacy.json")},
        texts={"model_card.md": "# card"},
        tags={"prefect.flow_run_id": "abc"},
        version_tags={"llmops.data_fingerprint": "f" * 64, "llmops.dp.epsilon": "3"},
        set_alias=set_alias,
    )
    kwargs.update(over)
    (tmp_path / "privacy.json").write_text(json.dumps({"epsilon": 3}))
    return register_candidate(**kwargs), uri


@pytest.fixture
def tiny_model_dir(state_dir):
    from tasks.model import resolve_model

    return resolve_model(
        "tiny", state_dir, tiny=dict(arch="llama", layers=1, hidden=32, heads=2, seed=0), max_len=32
    ).path


def check_registered(uri, out):
    import mlflow

    client = mlflow.MlflowClient(uri)
    mv = client.get_model_version_by_alias("m", CANDIDATE)
    assert str(mv.version) == out["version"]  # int from sqlite, str over REST
    assert mv.tags["llmops.data_fingerprint"] == "f" * 64 and mv.tags["llmops.dp.epsilon"] == "3"
    run = client.get_run(out["run_id"])
    assert run.data.tags["prefect.flow_run_id"] == "abc" and run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(out["run_id"], "train.epsilon")] == [0.5, 0.7]
    assert client.get_metric_history(out["run_id"], "train.loss") == []  # exact training loss never leaves
    names = {a.path for a in client.list_artifacts(out["run_id"], "reports")}
    assert "reports/model_card.md" in names
    assert {a.path for a in client.list_artifacts(out["run_id"], "privacy")} == {"privacy/privacy.json"}


def load_by_alias_in_fresh_process(uri) -> list[str]:
    code = (
        "import mlflow, json, sys; mlflow.set_tracking_uri(sys.argv[1]); "
        "m = mlflow.pyfunc.load_model('models:/m@candidate'); "
        "print(json.dumps(m.predict(['Shall I compare'], params={'max_new_tokens': 4})))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, uri],
        capture_output=True,
        text=True,
        timeout=300,
        env={"MLFLOW_DISABLE_TELEMETRY": "true", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_register_round_trip_sqlite_and_load_by_alias(tmp_path, tiny_model_dir):
    import mlflow

    out, uri = _register(tmp_path, tiny_model_dir)
    assert uri.startswith("sqlite:///") and out["version"] == "1" and out["alias"] == CANDIDATE
    check_registered(uri, out)
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts live in the state dir
    preds = load_by_alias_in_fresh_process(uri)
    assert len(preds) == 1 and isinstance(preds[0], str)
    assert production_version(uri, "m") is None
    # a re-run that would register the same thing (only the Prefect run differs) gets the same version, no copy
    again, _ = _register(
        tmp_path,
        tiny_model_dir,
        uri=uri,
        tags={"prefect.flow_run_id": "def"},
        version_tags={
            "llmops.data_fingerprint": "f" * 64,
            "llmops.dp.epsilon": "3",
            "prefect.flow_run_id": "def",
            "llmops.git_commit": "0" * 40,
        },
    )
    assert again["version"] == "1" and again["run_id"] == out["run_id"] and again.get("reused")
    client = mlflow.MlflowClient(uri)
    assert len(client.search_model_versions("name='m'")) == 1
    # ...but any difference in what is recorded is a new version: metrics, lineage, reports
    out2, _ = _register(tmp_path, tiny_model_dir, uri=uri, metrics={"eval.eval_loss": 2.4})
    assert out2["version"] == "2" and not out2.get("reused")
    out3, _ = _register(tmp_path, tiny_model_dir, uri=uri, texts={"model_card.md": "# other card"})
    assert out3["version"] == "3"
    # a reused version is the candidate again when the gate passes (the alias moved to v3 meanwhile)
    assert _register(tmp_path, tiny_model_dir, uri=uri)[0]["version"] == "1"
    assert str(client.get_model_version_by_alias("m", CANDIDATE).version) == "1"
    # a version whose lineage tags were edited afterwards is not reused
    client.set_model_version_tag("m", "1", "llmops.dp.epsilon", "0.1")
    assert _register(tmp_path, tiny_model_dir, uri=uri)[0]["version"] == "4"


def test_failed_gate_registers_without_alias(tmp_path, tiny_model_dir):
    import mlflow

    out, uri = _register(tmp_path, tiny_model_dir, set_alias=False)
    client = mlflow.MlflowClient(uri)
    assert out["alias"] is None and client.get_registered_model("m").aliases == {}


def test_failure_mid_registration_leaves_no_version(tmp_path, tiny_model_dir, monkeypatch):
    import mlflow

    from tasks import registry

    def broken(*a, **k):
        raise RuntimeError("artifact store went away")

    monkeypatch.setattr(registry, "_wait_ready", broken)
    with pytest.raises(RegistryError, match="registration failed .*artifact store went away"):
        _register(tmp_path, tiny_model_dir)
    client = mlflow.MlflowClient(connect_registry(None, tmp_path))
    assert client.search_model_versions("name='m'") == []
    runs = client.search_runs([client.get_experiment_by_name("exp").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_version_description_fits_the_sql_stores_limit_and_keeps_the_plots(tmp_path):
    """MLflow on PostgreSQL (team mode) refuses a version description over 5000 characters; SQLite does not."""
    from tasks.registry import MAX_DESCRIPTION, version_description

    (tmp_path / "loss.png").write_bytes(b"png")
    out = version_description("card line\n" * 900, "http://127.0.0.1:5000", "r1", str(tmp_path))
    assert len(out) <= MAX_DESCRIPTION and out.endswith("![loss.png](get-artifact?path=plots/loss.png&run_uuid=r1)\n")
    assert "model_card.md" in out
    assert version_description("short card", "http://127.0.0.1:5000", "r1", None) == "short card"
