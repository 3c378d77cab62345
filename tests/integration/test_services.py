"""Which MLflow a client uses, what `llmops status` shows, moving the ledger to Postgres (lean: no server started
here beyond the session's shared fixtures), and the embedded services end to end (integration)."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from flows.cli import main
from llmops import services
from llmops.errors import RegistryError
from llmops.services import connect_registry
from tests.conftest import ROOT, _free_port


def _record_mlflow(state, url):
    state.mkdir(parents=True, exist_ok=True)
    (state / services.RECORD).write_text(json.dumps({"mode": "embedded", "mlflow": {"url": url, "ui": url}}))


def test_clients_use_the_recorded_mlflow_server_and_a_dead_one_is_an_error_not_a_silent_switch(tmp_path, mlflow_server):
    state = tmp_path / "state"
    assert connect_registry(None, state) == f"sqlite:///{state.resolve()}/mlflow.db"  # nothing recorded: the file
    _record_mlflow(state, mlflow_server)
    assert connect_registry(None, state) == mlflow_server
    assert connect_registry("sqlite:////elsewhere.db", state) == "sqlite:////elsewhere.db"  # a configured URI wins
    _record_mlflow(state, f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(RegistryError, match="does not answer") as e:
        connect_registry(None, state)
    assert "llmops services start" in str(e.value) and str(state / services.RECORD) in str(e.value)


def test_status_lists_production_per_model_with_its_mlflow_link(tmp_path, mlflow_server, monkeypatch, capsys):
    import mlflow

    state = tmp_path / "state"
    monkeypatch.setenv("LLMOPS_HOME", str(state))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    _record_mlflow(state, mlflow_server)
    name = f"status-{uuid.uuid4().hex[:6]}"
    client = mlflow.MlflowClient(mlflow_server)
    client.create_registered_model(name)
    for _ in range(2):
        client.create_model_version(name, source="s3://bucket/model")  # a reference only
    client.set_registered_model_alias(name, "production", "1")
    client.set_registered_model_alias(name, "candidate", "2")
    assert main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = next(m for m in report["models"] if m["model"] == name)
    assert row["production"] == "1" and row["candidate"] == "2"
    assert row["url"] == f"{mlflow_server}/#/models/{name}/versions/1"
    assert report["pending_approvals"] == [] and any("no Prefect server" in p for p in report["problems"])
    assert main(["status"]) == 0
    table = capsys.readouterr().out
    assert f"{name}" in table and row["url"] in table and "PENDING APPROVALS" in table


def test_moving_the_ledger_to_postgres_carries_every_charge_and_is_audited(tmp_path, postgres_url, capsys):
    import psycopg

    from llmops.governance.audit import verify_audit_log
    from llmops.governance.ledger import open_ledger
    from llmops.governance.policy import load_governance

    assert main(["governance", "init"]) == 0
    sqlite = open_ledger()
    sqlite.reserve("a1", "fp-1", [[1.0, 0.05, 50]], 1e-5, "prv", budget=10.0, records=["r1", "r2"])
    sqlite.finish("a1", [[1.0, 0.05, 50]])
    before = sqlite.summary()
    db = f"ledger_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {db}")
    url = postgres_url.rsplit("/", 1)[0] + f"/{db}"
    capsys.readouterr()
    assert main(["governance", "ledger", "--uri", url]) == 0
    assert "1 attempt(s) carried over" in capsys.readouterr().out
    g = load_governance(required=True)
    assert g.ledger == url and open_ledger().summary() == before  # same records, same epsilon
    # a budget spent before the move stays spent after it
    assert open_ledger().entry("a1").epsilon == sqlite.entry("a1").epsilon
    assert verify_audit_log(g.audit_log, g.audit.public_key, []) == 2
    assert '"decision": "ledger-moved"' in g.audit_log.read_text().replace('":"', '": "')


@pytest.mark.integration
def test_embedded_services_start_once_reuse_and_stop(tmp_path):
    """`llmops services start` (Prefect + MLflow on free ports, logs in the state dir, nothing on the terminal but
    the summary), a second start reuses them, status sees both healthy, stop ends both. Budget: ~30 s."""
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LLMOPS_"))}
    env |= {
        "LLMOPS_HOME": str(state),
        "LLMOPS_PREFECT_PORT": str(_free_port()),
        "LLMOPS_MLFLOW_PORT": str(_free_port()),
        "LLMOPS_GOVERNANCE": str(tmp_path / "gov" / "governance.yaml"),
    }

    def llmops(*args):
        r = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180
        )
        assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
        return r.stdout

    try:
        out = llmops("services", "start")
        assert len(out.strip().splitlines()) == 4, out  # the summary only: servers log to the state dir
        rec = services.read_record(state)
        assert rec["mlflow"]["url"] == f"http://127.0.0.1:{env['LLMOPS_MLFLOW_PORT']}"
        assert llmops("services", "start").count("up in 0.") == 1  # reused, not restarted
        assert services.read_record(state)["prefect"]["pid"] == rec["prefect"]["pid"]
        report = json.loads(llmops("status", "--json"))
        assert {s["name"]: s["healthy"] for s in report["services"]} == {"prefect": True, "mlflow": True}
        assert connect_registry(None, state) == rec["mlflow"]["url"]
        assert (state / "mlflow-server" / "server.log").stat().st_size > 0
    finally:
        llmops("services", "stop")
    assert not services.mlflow_healthy(rec["mlflow"]["url"]) and not services.healthy(rec["prefect"]["url"])
    assert services.read_record(state) == {} and connect_registry(None, state).startswith("sqlite:///")
