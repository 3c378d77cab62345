"""Every shipped infra/deployment file is parsed and checked; a real worker runs a deployment end to end."""

import json

import pytest
import yaml

from llmops.config import PipelineConfig
from tests.conftest import ROOT

PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"


def deployments():
    return yaml.safe_load(PREFECT_YAML.read_text())["deployments"]


@pytest.mark.parametrize("dep", deployments(), ids=lambda d: d["name"])
def test_each_deployment_is_valid(dep):
    module, func = dep["entrypoint"].split(":")
    assert (ROOT / module).is_file()
    import importlib

    flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), func)
    assert hasattr(flow, "deploy")  # a Prefect flow
    cfg = PipelineConfig.model_validate(dep["parameters"]["config"])  # the form's default validates
    if dep["name"] == "train-gpu":
        assert cfg.training.world_size == 8 and cfg.model.dtype == "bfloat16"
    assert dep["work_pool"]["name"] in ("llmops-cpu", "llmops-gpu", "llmops-promotion")
    # promotions run only on the pool whose worker holds governance (keys, target credentials)
    assert (dep["work_pool"]["name"] == "llmops-promotion") == (func in ("promotion_flow", "rollback_flow"))


def test_nightly_schedule_and_anchors():
    deps = {d["name"]: d for d in deployments()}
    sched = deps["nightly"]["schedules"][0]
    assert sched["cron"] == "0 2 * * *" and sched["timezone"] == "Europe/Berlin"
    # anchors: the on-demand and nightly deployments share one config definition
    assert deps["train"]["parameters"]["config"] == deps["nightly"]["parameters"]["config"]


def test_compose_file_services_and_no_literal_secrets():
    text = (ROOT / "infra" / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert {"postgres", "prefect-server", "mlflow", "s3", "worker-training", "worker-promotion"} <= set(
        compose["services"]
    )
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} exposes {port} beyond localhost"
    assert (
        "postgresql+asyncpg://"
        in compose["services"]["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    )
    for key in (
        "POSTGRES_PASSWORD",
        "S3_SECRET_KEY",
        "PREFECT_AUTH",
        "PREFECT_DB_PASSWORD",
        "MLFLOW_DB_PASSWORD",
        "MLFLOW_AUTH_DB_PASSWORD",
        "LEDGER_DB_PASSWORD",
        "REDIS_PASSWORD",
        "MLFLOW_FLASK_SECRET_KEY",
        "MLFLOW_TRAINING_PASSWORD",
        "MLFLOW_PROMOTION_PASSWORD",
    ):
        assert "${" + key in text  # secrets only by reference to the env file


def test_compose_describes_the_team_mode_that_services_start_runs():
    """infra/docker-compose.yml (hosts of their own) and `llmops services start --team` (one machine) are one
    topology: the same services, databases, drivers, buckets, pools, and governance on the promotion worker only."""
    from llmops.services import TEAM_SERVICES

    compose = yaml.safe_load((ROOT / "infra" / "docker-compose.yml").read_text())["services"]
    assert set(compose) == set(TEAM_SERVICES)
    init = (ROOT / "infra" / "postgres-init.sh").read_text()
    assert f"for db in {' '.join(TEAM_SERVICES['postgres']['databases'])}; do" in init
    s3_cmd = " ".join(compose["s3"]["command"])
    assert all(f"s3.bucket.create -name {b}" in s3_cmd for b in TEAM_SERVICES["s3"]["buckets"])
    for name in ("prefect-server", "mlflow"):
        svc, env = TEAM_SERVICES[name], compose[name]["environment"]
        url = env["PREFECT_API_DATABASE_CONNECTION_URL" if name == "prefect-server" else "MLFLOW_BACKEND_STORE_URI"]
        assert url.startswith(f"{svc['db_driver']}://{svc['database']}:") and url.endswith(f"/{svc['database']}")
        assert all(k in env for k in svc["env"]), (name, svc["env"])
    assert f"--artifacts-destination {TEAM_SERVICES['mlflow']['artifacts']}" in compose["mlflow"]["command"]
    mlflow_svc = compose["mlflow"]  # basic auth, its ini (passwords) from a mounted file, not the command line
    assert (
        f"--app-name {TEAM_SERVICES['mlflow']['app']}" in mlflow_svc["command"]
        and "mlflow[auth]" in mlflow_svc["command"]
    )
    auth_ini = mlflow_svc["environment"]["MLFLOW_AUTH_CONFIG_PATH"]
    assert any(v.endswith(f":{auth_ini}:ro") for v in mlflow_svc["volumes"])
    redis, cache = compose["redis"], TEAM_SERVICES["redis"]  # the serving cache: bounded, no persistence, auth
    redis_cmd = " ".join(redis["command"])
    assert redis["image"].startswith("redis:7") and redis["ports"] == [f"127.0.0.1:{cache['port']}:6379"]
    assert f"--maxmemory {cache['maxmemory']} --maxmemory-policy {cache['maxmemory_policy']}" in redis_cmd
    assert ("--save '' --appendonly no" in redis_cmd) == (not cache["persistence"])
    assert "requirepass" in redis_cmd and "--requirepass" not in redis_cmd  # in a config file, not in `ps`
    pools = {d["work_pool"]["name"] for d in deployments()}
    for name in ("worker-training", "worker-promotion"):
        svc, c = TEAM_SERVICES[name], compose[name]
        assert f"--pool {svc['pool']} --type process" in c["command"] and svc["pool"] in pools
        governed = "LLMOPS_GOVERNANCE" in c["environment"] or any(":/etc/llmops" in v for v in c["volumes"])
        assert governed == svc["governance"], name
        assert ("AWS_SECRET_ACCESS_KEY" in c["environment"]) is False  # target credentials live in governance
        assert c["environment"]["MLFLOW_TRACKING_USERNAME"] == svc["mlflow_user"]  # each worker its own identity


def test_k8s_template_requests_gpus():
    tpl = json.loads((ROOT / "infra" / "k8s" / "gpu-base-job-template.json").read_text())
    container = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert tpl["variables"]["properties"]["gpus"]["default"] == 8
    pvc = yaml.safe_load((ROOT / "infra" / "k8s" / "state-pvc.yaml").read_text())
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_hostfile_example_format():
    lines = [x for x in (ROOT / "infra" / "hostfile.example").read_text().splitlines() if x and not x.startswith("#")]
    assert lines and all(len(x.split()) == 2 and x.split()[1].startswith("slots=") for x in lines)


def test_retraining_decision_is_pure():
    from flows.retraining import data_changed

    assert data_changed("abc", None)
    assert data_changed("abc", {"llmops.data_fingerprint": "xyz"})
    assert not data_changed("abc", {"llmops.data_fingerprint": "abc"})
