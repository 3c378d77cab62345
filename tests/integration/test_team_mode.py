"""Team mode on one machine, end to end, as its users would meet it (budget: <= 150 s wall here).

`llmops services start --team` (PostgreSQL, SeaweedFS, Prefect on Postgres with API auth, MLflow on Postgres + S3,
a training and a promotion worker); the tiny training deployment is triggered through the Prefect REST API with the
auth string and runs on the training worker; then foreign clients find everything where team mode says it is: the
flow run in Prefect's Postgres database, the model version through the MLflow server (`mlflow` CLI, MlflowClient),
its artifacts as objects in the S3 bucket (boto3), the charge in the Postgres ledger; a gateway configured from team
mode caches in the team Redis, which refuses clients without the password. MLflow runs its basic-auth app: requests
without a user get 401, each worker has its own identity, the promotion identity moves aliases but cannot delete
versions. A full restart loses nothing (but the cache, which is not persisted on purpose).
"""

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, _free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not (Path("/usr/lib/postgresql/15/bin/initdb").exists() and Path("/usr/bin/redis-server").exists()),
        reason="team mode needs Debian's postgresql 15 and redis-server (make test installs them as root: "
        "infra/system-deps.sh)",
    ),
]


def _ports() -> dict:
    from llmops.services import SEAWEED_PORTS

    names = ["prefect-server", "mlflow", "postgres", "s3", "redis", *SEAWEED_PORTS]
    while True:  # SeaweedFS's gRPC ports are its ports + 10000
        ports = dict(zip(names, (_free_port() for _ in names)))
        if len(set(ports.values())) == len(names) and max(ports.values()) < 55000:
            return ports


def _api(method: str, url: str, auth: str | None, body: dict | None = None) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(
        url, method=method, headers=headers, data=json.dumps(body).encode() if body is not None else None
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, {}


def _team_cache_roundtrip(state, ports: dict, sec: dict, key: str) -> None:
    """Unauthenticated clients are refused; a gateway's cache built from team mode's settings reaches the team Redis."""
    import asyncio

    from llmops import services
    from llmops.serving.cache import make_cache
    from llmops.serving.settings import ServeSettings, resolve_cache

    assert services.redis_ping(ports["redis"]).startswith("NOAUTH")
    assert services.redis_ping(ports["redis"], sec["redis"]) == "PONG"
    cache = make_cache(resolve_cache(ServeSettings(), state).cache)
    assert cache.url == f"redis://127.0.0.1:{ports['redis']}/0"

    async def go():
        await cache.put(key, {"text": "cached"})
        return await cache.get(key), cache.errors

    assert asyncio.run(go()) == ({"text": "cached"}, 0)


def _mlflow_auth_checks(url: str, sec: dict, rec: dict, mv) -> None:
    """Nobody without a user reaches the registry; each worker runs as its own identity; promotion cannot delete."""
    from llmops import services

    search = f"{url}/api/2.0/mlflow/registered-models/search"
    alias = f"{url}/api/2.0/mlflow/registered-models/alias"
    move = {"name": mv.name, "alias": "production", "version": mv.version}
    assert _api("GET", search, None)[0] == 401
    assert _api("POST", alias, None, move)[0] == 401
    assert _api("POST", alias, "llmops-training:wrong-password", move)[0] == 401
    users = sec["mlflow_users"]
    assert _api("GET", search, f"{services.MLFLOW_ADMIN}:{users[services.MLFLOW_ADMIN]}")[0] == 200
    promotion = f"llmops-promotion:{users['llmops-promotion']}"
    assert _api("POST", alias, promotion, dict(move, alias="auth-check"))[0] == 200  # its grant: aliases of any model
    assert (
        _api(
            "DELETE", f"{url}/api/2.0/mlflow/model-versions/delete", promotion, {"name": mv.name, "version": mv.version}
        )[0]
        == 403
    )
    server = open(f"/proc/{rec['mlflow']['pid']}/cmdline").read()
    assert "--app-name\0basic-auth" in server and not any(pw in server for pw in users.values())  # not in `ps`
    for worker in ("worker-training", "worker-promotion"):
        environ = open(f"/proc/{rec[worker]['pid']}/environ").read().split("\0")
        assert f"MLFLOW_TRACKING_USERNAME={services.TEAM_SERVICES[worker]['mlflow_user']}" in environ


def test_team_mode_worker_run_lands_in_postgres_and_s3_and_survives_a_restart(
    tmp_path, isolated_governance, monkeypatch
):
    import mlflow
    import psycopg

    from llmops import services
    from llmops.files import write_text_atomic

    state = tmp_path / "state"
    write_text_atomic(state / "team" / "ports.json", json.dumps(_ports()))  # free ports, kept across the restart
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "LLMOPS_", "AWS_", "MLFLOW_TRACKING_"))
    }
    env |= {"LLMOPS_HOME": str(state), "LLMOPS_GOVERNANCE": str(isolated_governance)}

    def llmops(*args, timeout=240):
        t0 = time.time()
        r = subprocess.run(
            [sys.executable, "-m", "flows.cli", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert r.returncode == 0, (args, r.stdout[-3000:], r.stderr[-3000:])
        return r.stdout, time.time() - t0

    try:
        out, cold = llmops("services", "start", "--team")
        _, warm = llmops("services", "start", "--team")
        print(f"team start: cold {cold:.1f}s, warm {warm:.1f}s")
        sec, ports = services.team_secrets(state), services.team_ports(state)
        for value in (
            sec["postgres"],
            sec["s3_secret_key"],
            sec["prefect_auth"],
            sec["redis"],
            *sec["db"].values(),
            *sec["mlflow_users"].values(),
        ):
            assert value not in out  # secrets are never printed
        printed = llmops("services", "env")[0]
        exported = dict(line.removeprefix("export ").split("=", 1) for line in printed.splitlines())
        assert exported["REDISCLI_AUTH"] == sec["redis"]  # printed only when asked for
        assert exported["MLFLOW_TRACKING_USERNAME"] == services.MLFLOW_ADMIN  # the operator's MLflow identity
        client_env = dict(env, **exported)
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # MlflowClient here, as a user would
            monkeypatch.setenv(var, exported[var])
        redis_pid = services.read_record(state)["redis"]["pid"]
        assert sec["redis"] not in open(f"/proc/{redis_pid}/cmdline").read()  # not in `ps`
        _team_cache_roundtrip(state, ports, sec, "before-restart")
        api, auth = client_env["PREFECT_API_URL"], client_env["PREFECT_API_AUTH_STRING"]

        # only the promotion worker's environment names governance
        rec = services.read_record(state)
        environ = {w: open(f"/proc/{rec[w]['pid']}/environ").read() for w in ("worker-training", "worker-promotion")}
        assert "LLMOPS_GOVERNANCE=" not in environ["worker-training"]
        assert f"LLMOPS_GOVERNANCE={isolated_governance}" in environ["worker-promotion"]

        # the train-tiny deployment as deployments/prefect.yaml defines it, created over the REST API (what
        # `prefect deploy` does, without importing the flow's libraries in one more process)
        spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
        dep = next(d for d in spec["deployments"] if d["name"] == "train-tiny")
        assert _api("POST", f"{api}/flows/", None, {"name": "llmops-training"})[0] == 401
        status, flow = _api("POST", f"{api}/flows/", auth, {"name": "llmops-training"})
        assert status in (200, 201), status
        status, dep = _api(
            "POST",
            f"{api}/deployments/",
            auth,
            {
                "name": dep["name"],
                "flow_id": flow["id"],
                "entrypoint": dep["entrypoint"],
                "tags": dep["tags"],
                "work_pool_name": dep["work_pool"]["name"],
                "parameters": dep["parameters"],
                "pull_steps": spec["pull"],
                "description": dep["description"],
            },
        )
        assert status in (200, 201), (status, dep)
        assert dep["work_pool_name"] == services.TEAM_SERVICES["worker-training"]["pool"]
        status, run = _api("POST", f"{api}/deployments/{dep['id']}/create_flow_run", auth, {})
        assert status == 201, status
        deadline = time.time() + 150
        while True:
            run = _api("GET", f"{api}/flow_runs/{run['id']}", auth)[1]
            state_type = (run.get("state") or {}).get("type")
            if state_type in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") or time.time() > deadline:
                break
            time.sleep(2)
        log = (state / "team" / "worker-training" / "worker.log").read_text()[-3000:]
        assert state_type == "COMPLETED", (state_type, log)

        def check_everything(cli: bool):
            pg = dict(host="127.0.0.1", port=ports["postgres"], connect_timeout=10)
            with psycopg.connect(**pg, user="prefect", password=sec["db"]["prefect"], dbname="prefect") as c:
                assert (
                    c.execute("SELECT state_type FROM flow_run WHERE id=%s", (run["id"],)).fetchone()[0] == "COMPLETED"
                )
            client = mlflow.MlflowClient(client_env["LLMOPS_TRACKING_URI"])
            mv = client.get_model_version_by_alias("llmops-demo", "candidate")
            assert mv.tags["prefect.flow_run_id"] == run["id"] and mv.tags["llmops.dp.private"] == "True"
            if cli:  # the `mlflow` command, as someone on the team would look
                listed = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "mlflow",
                        "artifacts",
                        "list",
                        "--run-id",
                        mv.run_id,
                        "--artifact-path",
                        "plots",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env=dict(client_env, MLFLOW_TRACKING_URI=client_env["LLMOPS_TRACKING_URI"]),
                )
                assert listed.returncode == 0 and ".png" in listed.stdout, (listed.stdout, listed.stderr[-2000:])
            keys = [
                o["Key"]
                for o in services.s3_client(state).list_objects_v2(Bucket="mlflow-artifacts").get("Contents", [])
            ]
            assert any(mv.run_id in k for k in keys), keys[:20]
            with psycopg.connect(**pg, user="ledger", password=sec["db"]["ledger"], dbname="ledger") as c:
                row = c.execute(
                    "SELECT status FROM runs WHERE run_id=%s", (mv.tags["llmops.dp.attempt_id"],)
                ).fetchone()
            assert row is not None, "the training charge is not in the Postgres ledger"
            return mv.version, len(keys)

        before = check_everything(cli=True)
        _mlflow_auth_checks(
            client_env["LLMOPS_TRACKING_URI"],
            sec,
            services.read_record(state),
            mlflow.MlflowClient(client_env["LLMOPS_TRACKING_URI"]).get_model_version_by_alias(
                "llmops-demo", "candidate"
            ),
        )
        llmops("services", "stop", "--team")
        assert not services.healthy(api)
        llmops("services", "start", "--team")
        assert check_everything(cli=False) == before
        import redis

        assert redis.Redis(host="127.0.0.1", port=ports["redis"], password=sec["redis"]).keys("*") == []  # cold
        _team_cache_roundtrip(state, ports, sec, "after-restart")
        report = json.loads(llmops("status", "--json")[0])  # reads Prefect with the auth string, MLflow on Postgres
        assert all(s["healthy"] for s in report["services"]) and len(report["services"]) == 7, report["services"]
        assert {m["model"]: m["candidate"] for m in report["models"]} == {"llmops-demo": before[0]}, report
    finally:
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "services", "stop", "--team"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            timeout=180,
        )
        services.remove_postgres_cluster(state)
