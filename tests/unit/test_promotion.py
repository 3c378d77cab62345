"""Promotion: access control, audit, targets (real S3-compatible server), and the paused approval flow."""
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from llmops.errors import LLMOpsError
from tasks.access import AccessDenied, AuditLog, Policy, authorize, check_secret, hash_secret, verify_audit_log
from tasks.promotion import (DirTarget, EdgeTarget, PromotionError, S3Target, check_evidence, file_manifest,
                             make_target)

GOOD_TAGS = {"llmops.validation": "passed", "llmops.gate": "passed: no production model yet",
             "llmops.dp.private": "True", "llmops.dp.epsilon": "2.5", "llmops.dp.epsilon_cumulative": "2.5",
             "llmops.dp.budget": "10.0", "llmops.data_fingerprint": "ab" * 32, "llmops.dp.delta": "1e-05"}


@pytest.fixture
def policy(tmp_path):
    p = Policy(users={}, roles={"ml-engineer": ["trigger-training", "request-promotion"],
                                "release-manager": ["approve-promotion", "rollback"]}, path=str(tmp_path / "roles.yaml"))
    p.add_user("alice", ["ml-engineer", "release-manager"], "alice-secret-123")
    p.add_user("bob", ["release-manager"], "bob-secret-4567")
    p.add_user("carol", ["release-manager"], "carol-secret-89")
    p.add_user("eve", ["ml-engineer"], "eve-secret-0000")
    p.save()
    return Policy.load(p.path)


def test_credentials_are_hashed_and_checked(policy):
    stored = Path(policy.path).read_text()
    assert "bob-secret-4567" not in stored and "pbkdf2_sha256$" in stored
    assert oct(Path(policy.path).stat().st_mode & 0o777) == "0o600"
    assert check_secret("bob-secret-4567", policy.users["bob"]["credential"])
    assert not check_secret("bob-secret-4568", policy.users["bob"]["credential"])
    assert not check_secret("anything", None)
    with pytest.raises(LLMOpsError, match="shorter than 12"):
        hash_secret("short")


@pytest.mark.parametrize("user,secret,requester,match", [
    ("bob", "wrong-secret-000", "alice", "invalid user or credential"),
    ("mallory", "bob-secret-4567", "alice", "invalid user or credential"),
    ("eve", "eve-secret-0000", "alice", "lacks permission 'approve-promotion'"),
    ("alice", "alice-secret-123", "alice", "cannot also approve"),
])
def test_authorize_refusals(policy, user, secret, requester, match):
    with pytest.raises(AccessDenied, match=match):
        authorize(policy, user, secret, "approve-promotion", requested_by=requester)


def test_authorize_accepts_a_release_manager(policy):
    authorize(policy, "bob", "bob-secret-4567", "approve-promotion", requested_by="alice")


def test_audit_log_chain_detects_tampering(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    log.append(action="promote", decision="denied", approver="eve")
    log.append(action="promote", decision="approved", approver="bob")
    assert verify_audit_log(log.path) == 2
    lines = log.path.read_text().splitlines()
    log.path.write_text(lines[0].replace("denied", "approved") + "\n" + lines[1] + "\n")
    with pytest.raises(LLMOpsError, match=r"audit.log:2: audit log chain broken"):
        verify_audit_log(log.path)
    with pytest.raises(AssertionError):
        log.append(action="x", credential="nope")


@pytest.mark.parametrize("tags,problem", [
    ({"llmops.validation": "failed"}, "data validation: failed"),
    ({"llmops.gate": "failed: worse"}, "evaluation gate"),
    ({"llmops.dp.private": "False"}, "not trained with differential privacy"),
    ({"llmops.dp.epsilon_cumulative": "12"}, "exceeds budget"),
])
def test_evidence_checks(tags, problem):
    assert check_evidence(GOOD_TAGS) == []
    assert any(problem in p for p in check_evidence(GOOD_TAGS | tags))


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    (d / "tokenizer.json").write_text("{}")
    return d


def test_dir_target_is_atomic_and_idempotent(tmp_path, model_dir, monkeypatch):
    target = DirTarget(str(tmp_path / "onprem"))
    man = file_manifest(model_dir, "m", "1")
    assert target.publish(model_dir, man)["skipped"] is False
    assert target.read_manifest("m", "1") == man
    assert target.publish(model_dir, man)["skipped"] is True
    target.point_current("m", "1")
    assert json.loads((tmp_path / "onprem/m/current.json").read_text())["version"] == "1"
    # a copy that dies half-way leaves neither the version dir nor a temp dir behind
    import shutil

    def dying_copy(src, dst, **kw):
        Path(dst).mkdir(parents=True)
        (Path(dst) / "config.json").write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", dying_copy)
    with pytest.raises(OSError):
        target.publish(model_dir, file_manifest(model_dir, "m", "2"))
    assert sorted(p.name for p in (tmp_path / "onprem/m").iterdir()) == ["1", "current.json"]


def test_edge_target_needs_onnx(tmp_path, model_dir):
    with pytest.raises(PromotionError, match="no .onnx file"):
        EdgeTarget(str(tmp_path / "edge")).publish(model_dir, file_manifest(model_dir, "m", "1"))
    (model_dir / "model.onnx").write_bytes(b"onnx")
    assert EdgeTarget(str(tmp_path / "edge")).publish(model_dir, file_manifest(model_dir, "m", "1"))["files"] == 4


def _s3(endpoint):
    return boto3.client("s3", endpoint_url=endpoint)


def test_s3_target_round_trip_with_independent_reader(s3_env, model_dir, monkeypatch):
    import tasks.promotion as promo

    monkeypatch.setattr(promo, "PART_SIZE", 5 * 1024 * 1024)  # S3's minimum part; a 6 MiB file goes multipart
    (model_dir / "big.bin").write_bytes(b"x" * (6 * 1024 * 1024))
    _s3(s3_env).create_bucket(Bucket="llmops-models")
    target = make_target("s3", "s3://llmops-models/prod", s3_env)
    man = file_manifest(model_dir, "m", "7", {"epsilon": "2.5"})
    assert target.publish(model_dir, man) == {"target": "s3://llmops-models/prod", "skipped": False, "files": 4}
    assert target.publish(model_dir, man)["skipped"] is True  # idempotent re-run
    # read back with a separate process and a plain client: every file matches the manifest's sha256
    code = f"""
import boto3, hashlib, json
s3 = boto3.client("s3", endpoint_url="{s3_env}")
man = json.loads(s3.get_object(Bucket="llmops-models", Key="prod/m/7/manifest.json")["Body"].read())
for rel, meta in man["files"].items():
    body = s3.get_object(Bucket="llmops-models", Key="prod/m/7/" + rel)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == meta["sha256"], rel
print(len(man["files"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "4", r.stderr[-1500:]


def test_interrupted_s3_upload_leaves_no_visible_model(s3_env, model_dir, monkeypatch):
    _s3(s3_env).create_bucket(Bucket="llmops-partial")
    target = S3Target("s3://llmops-partial/p", s3_env)
    real_verify, calls = S3Target._verify, []

    def flaky(self, s3, key, path, meta):
        calls.append(key)
        if len(calls) == 2:
            raise PromotionError("connection dropped", key, "retry")
        return real_verify(self, s3, key, path, meta)

    monkeypatch.setattr(S3Target, "_verify", flaky)
    with pytest.raises(PromotionError, match="connection dropped"):
        target.publish(model_dir, file_manifest(model_dir, "m", "1"))
    assert target.read_manifest("m", "1") is None  # a reader never sees the partial model
    monkeypatch.setattr(S3Target, "_verify", real_verify)
    target.publish(model_dir, file_manifest(model_dir, "m", "1"))
    assert target.read_manifest("m", "1") is not None


def test_s3_checksum_mismatch_is_caught(s3_env, model_dir):
    _s3(s3_env).create_bucket(Bucket="llmops-bad")
    man = file_manifest(model_dir, "m", "1")
    man["files"]["config.json"]["sha256"] = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(PromotionError, match="checksum mismatch"):
        S3Target("s3://llmops-bad/p", s3_env).publish(model_dir, man)
    assert S3Target("s3://llmops-bad/p", s3_env).read_manifest("m", "1") is None


def _paused_run(name: str, timeout: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            for run in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[name]))):
                if run.state and run.state.is_paused():
                    return run
            time.sleep(0.5)
    raise AssertionError(f"no paused {name} run")


def _resume(run_id, **form):
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(run_id, run_input={"approve": True, "comment": "", **form})


def _wait_paused_again(run_id, n_before, timeout=60):
    from prefect.client.orchestration import get_client

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            states = client.read_flow_run_states(run_id)
            if sum(1 for s in states if s.is_paused()) > n_before and client.read_flow_run(run_id).state.is_paused():
                return
            time.sleep(0.3)
    raise AssertionError("flow did not pause again")


@pytest.fixture
def registered(tmp_path, policy, s3_env):
    """A tiny model registered in a sqlite MLflow with passing evidence; config with onprem + S3 targets."""
    from llmops.config import PipelineConfig
    from tasks.model import resolve_model
    from tasks.registry import register_candidate, tracking_uri

    state = tmp_path / "state"
    model = resolve_model("tiny", state, tiny=dict(arch="llama", layers=1, hidden=32, heads=2, seed=0), max_len=32)
    import uuid

    bucket = f"llmops-flow-{uuid.uuid4().hex[:8]}"
    _s3(s3_env).create_bucket(Bucket=bucket)
    cfg = PipelineConfig.model_validate({
        "state_dir": str(state), "registry": {"model_name": "m"},
        "promotion": {"roles_file": policy.path, "approval_timeout_s": 120, "required_approvals": 2,
                      "targets": [{"kind": "onprem", "uri": str(tmp_path / "onprem")},
                                  {"kind": "s3", "uri": f"s3://{bucket}/models", "endpoint_url": s3_env}]}})
    uri = tracking_uri(None, state)
    for _ in range(2):  # versions 1 and 2
        out = register_candidate(uri=uri, state_dir=str(state), experiment="e", model_name="m", model_dir=model.path,
                                 params={}, metrics={"eval.eval_loss": 3.0}, step_metrics=[], artifacts={}, texts={},
                                 tags={}, version_tags=GOOD_TAGS, set_alias=True)
    return cfg, out


def test_promotion_flow_needs_two_distinct_authorised_approvals(prefect_harness, registered, tmp_path):
    import mlflow

    from flows.promotion import promotion_flow
    from tasks.registry import tracking_uri

    cfg, reg = registered
    result = {}
    t = threading.Thread(target=lambda: result.update(promotion_flow(version="1", requested_by="alice",
                                                                     config=cfg)))
    t.start()
    run = _paused_run("llmops-promotion")
    assert not (tmp_path / "onprem" / "m").exists()  # nothing published while waiting
    attempts = [dict(approver="bob", credential="not-bobs-secret"),        # wrong credential
                dict(approver="eve", credential="eve-secret-0000"),        # no approve permission
                dict(approver="alice", credential="alice-secret-123"),     # the requester herself
                dict(approver="bob", credential="bob-secret-4567"),        # 1st valid approval
                dict(approver="bob", credential="bob-secret-4567")]        # same person again: not a 2nd approval
    for i, form in enumerate(attempts):
        _resume(run.id, **form)
        _wait_paused_again(run.id, i + 1)
    _resume(run.id, approver="carol", credential="carol-secret-89")
    t.join(timeout=120)
    assert result["status"] == "promoted" and result["approved_by"] == ["bob", "carol"]

    audit = [json.loads(x) for x in (Path(cfg.state_dir) / "audit.log").read_text().splitlines()]
    assert [a["decision"] for a in audit] == ["denied", "denied", "denied", "approved", "duplicate", "approved",
                                              "promoted"]
    text = (Path(cfg.state_dir) / "audit.log").read_text()
    for secret in ("bob-secret-4567", "carol-secret-89", "not-bobs-secret", "alice-secret-123"):
        assert secret not in text
    client = mlflow.MlflowClient(tracking_uri(None, cfg.state_dir))
    assert str(client.get_model_version_by_alias("m", "production").version) == "1"
    assert client.get_model_version("m", "1").tags["llmops.approved_by"] == "bob,carol"
    tags = client.get_model_version("m", "1").tags  # every decision is also tagged on the version, in order
    decisions = [json.loads(tags[k]) for k in sorted(k for k in tags if k.startswith("llmops.decision."))]
    assert [(d["decision"], d.get("approver")) for d in decisions] == [
        ("denied", "bob"), ("denied", "eve"), ("denied", "alice"), ("approved", "bob"), ("duplicate", "bob"),
        ("approved", "carol"), ("promoted", None)]
    assert decisions[-1]["approved_by"] == ["bob", "carol"] and decisions[0]["reason"]
    assert not any(secret in json.dumps(tags) for secret in ("bob-secret-4567", "carol-secret-89", "not-bobs-secret"))
    assert json.loads((tmp_path / "onprem/m/current.json").read_text())["version"] == "1"
    s3t = cfg.promotion.targets[1]
    assert S3Target(s3t.uri, s3t.endpoint_url).read_manifest("m", "1")["approved_by"] == ["bob", "carol"]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as pc:  # the submitted forms (with credentials) were deleted
        keys = [i.key for i in pc.filter_flow_run_input(flow_run_id=run.id, key_prefix="paused-", limit=100,
                                                         exclude_keys=set())]
    assert not [k for k in keys if k.endswith("-response")]


def test_rejection_promotes_nothing(prefect_harness, registered, tmp_path):
    import mlflow

    from flows.promotion import promotion_flow
    from tasks.registry import tracking_uri

    cfg, _ = registered
    errors = []

    def go():
        try:
            promotion_flow(version="2", requested_by="alice", config=cfg)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=go)
    t.start()
    run = _paused_run("llmops-promotion")
    _resume(run.id, approve=False, approver="bob", credential="bob-secret-4567", comment="loss regressed")
    t.join(timeout=120)
    assert errors and "rejected by bob: loss regressed" in str(errors[0])
    assert not (tmp_path / "onprem" / "m").exists()
    client = mlflow.MlflowClient(tracking_uri(None, cfg.state_dir))
    assert "production" not in client.get_registered_model("m").aliases
    tags = client.get_model_version("m", "2").tags
    rejected = json.loads(tags["llmops.decision.001"])
    assert rejected["decision"] == "rejected" and rejected["approver"] == "bob" and rejected["comment"] == "loss regressed"
