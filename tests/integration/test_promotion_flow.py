"""The paused promotion/rollback flows against a real (harness) Prefect API, as an insider would attack them.

Requester `alice` (ml-engineer), release managers `bob`, `carol`; `eve` (ml-engineer) and `mallory` (not enrolled)
are attackers. Governance requires 2 approvals for model `m` and allows targets `onprem` and `s3` (credentials from a
file only the worker reads). Each test is one attack (or one property) from the approvals issue.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import boto3
import pytest

from llmops.governance.access import approval_code, commit_governance, enrol_user, init_governance, make_request
from llmops.governance.audit import AuditLog, verify_audit_log
from llmops.governance.keys import load_private_key
from llmops.governance.policy import TargetSpec, load_governance
from tests.conftest import ROOT, S3_KEY, S3_SECRET, _free_port, ledger_backed_tags

GOOD_TAGS = {
    "llmops.validation": "passed",
    "llmops.gate": "passed: no production model yet",
    "llmops.dp.private": "True",
    "llmops.dp.epsilon": "2.5",
    "llmops.dp.epsilon_cumulative": "2.5",
    "llmops.dp.budget": "10.0",
    "llmops.data_fingerprint": "ab" * 32,
    "llmops.dp.delta": "1e-05",
}
USERS = {"alice": ["ml-engineer"], "bob": ["release-manager"], "carol": ["release-manager"], "eve": ["ml-engineer"]}


@pytest.fixture
def world(tmp_path, s3_server, monkeypatch):
    """Governance + keys + a sqlite MLflow with versions 1..3 of `m` (passing evidence) + an S3 bucket."""
    import uuid

    from llmops.config import PipelineConfig
    from llmops.files import write_text_atomic
    from llmops.services import connect_registry
    from tasks.model import resolve_model
    from tasks.registry import register_candidate

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the worker's credentials file is the only source
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    g = init_governance()
    keys = {}
    for name, roles in USERS.items():
        keys[name] = write_text_atomic(tmp_path / "keys" / f"{name}.key", enrol_user(g, name, roles), mode=0o600)
    creds = write_text_atomic(
        g.home / "s3-credentials",
        f"[default]\naws_access_key_id = {S3_KEY}\naws_secret_access_key = {S3_SECRET}\n",
        mode=0o600,
    )
    bucket = f"llmops-flow-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET).create_bucket(
        Bucket=bucket
    )
    g.approvals.models = {"m": 2}
    g.approvals.timeout_s = 120
    g.targets = {
        "onprem": TargetSpec(kind="onprem", uri=str(tmp_path / "onprem")),
        "s3": TargetSpec(kind="s3", uri=f"s3://{bucket}/models", endpoint_url=s3_server, credentials_file=creds),
    }
    g.registry_uri = connect_registry(None, tmp_path / "state")  # promotions read evidence here only
    commit_governance(g, "test-setup")  # the worker refuses governance the audit log did not record
    state = tmp_path / "state"
    model = resolve_model("tiny", state, tiny=dict(arch="llama", layers=1, hidden=32, heads=2, seed=0), max_len=32)
    uri = connect_registry(None, state)
    for i in range(3):  # each backed by a charged, completed attempt in the governance ledger
        register_candidate(
            uri=uri,
            state_dir=str(state),
            experiment="e",
            model_name="m",
            model_dir=model.path,
            params={},
            metrics={"eval.eval_loss": 3.0},
            step_metrics=[],
            artifacts={},
            texts={},
            tags={},
            set_alias=True,
            version_tags=ledger_backed_tags(GOOD_TAGS, [f"rec-{i}"], model_dir=model.path),
        )
    cfg = PipelineConfig.model_validate({"state_dir": str(state), "registry": {"model_name": "m"}})
    import mlflow

    return {
        "cfg": cfg,
        "g": load_governance(required=True),
        "keys": {n: load_private_key(p) for n, p in keys.items()},
        "key_files": keys,
        "tmp": tmp_path,
        "bucket": bucket,
        "mlflow": mlflow.MlflowClient(uri),
    }


def _request(w, user="alice", version="1", action="promote"):
    return make_request(w["keys"][user], user, action, "m", version)


def _start(fn, **kw):
    out = {}

    def go():
        try:
            out["result"] = fn(**kw)
        except Exception as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=go)
    t.start()
    return t, out


def _paused(flow_name, exclude=(), timeout=120):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            for run in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name]))):
                if run.state and run.state.is_paused() and str(run.id) not in exclude:
                    return str(run.id)
            time.sleep(0.3)
    raise AssertionError(f"no paused {flow_name} run")


def _subj(run_id):
    """(subject, challenge, expires) an approver signs besides the run id, as `llmops approval-code` reads them from
    the Prefect API (the request parameter and this execution's challenge artifact)."""
    from prefect.client.orchestration import get_client

    from flows.cli.release import read_challenge
    from llmops.governance.access import approval_subject

    with get_client(sync_client=True) as client:
        req = json.loads(client.read_flow_run(run_id).parameters["request"])
        challenge, expires = read_challenge(client, run_id)
    return approval_subject(req["action"], req["model"], req["version"]), challenge, expires


def _code(key, run_id, approve=True):
    subject, challenge, expires = _subj(run_id)
    return approval_code(key, run_id, subject, approve=approve, challenge=challenge, expires=expires)


def _submit(run_id, approver, code, approve=True, comment=""):
    from prefect.flow_runs import resume_flow_run

    resume_flow_run(run_id, run_input={"approve": approve, "approver": approver, "code": code, "comment": comment})


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


def _audit(w):
    """The decisions (admin entries about governance left out)."""
    return [e for e in AuditLog.for_governance(w["g"]).entries() if e.get("action") != "governance"]


def _all(w) -> int:
    return len(AuditLog.for_governance(w["g"]).entries())


def _released(w, *versions):
    """Audit entries as if `versions` had been promoted in turn (the worker's key signs them: the log is the truth)."""
    log = AuditLog.for_governance(w["g"])
    for v in versions:
        log.append(action="promote", decision="promoted", model="m", version=v, targets=[])


def _anchors(w):
    from flows.cli.admin import audit_anchors

    return audit_anchors(w["cfg"])


def _alias(w, alias):
    from flows.promotion import _alias

    return _alias(w["mlflow"], "m", alias)


def test_two_distinct_verified_approvals_then_publish(prefect_harness, world, monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL

    from flows.cli import main
    from flows.promotion import promotion_flow
    from tasks.promotion import S3Target

    w, keys = world, world["keys"]
    t, out = _start(promotion_flow, version="1", request=_request(w), config=w["cfg"])
    run = _paused("llmops-promotion")
    assert not (w["tmp"] / "onprem" / "m").exists()  # nothing published while waiting
    bob = _code(keys["bob"], run)
    attempts = [
        ("bob", "x" * 86),  # junk code
        ("mallory", _code(keys["eve"], run)),  # not enrolled
        ("eve", _code(keys["eve"], run)),  # enrolled, no approve permission
        ("alice", _code(keys["alice"], run)),  # the requester (may not approve)
        ("bob", bob),  # 1st valid approval
        ("bob", bob),
    ]  # the same code again
    for i, (who, code) in enumerate(attempts):
        _submit(run, who, code)
        _wait_paused_again(run, i + 1)
    monkeypatch.setenv("PREFECT_API_URL", PREFECT_API_URL.value())  # carol approves with the real CLI
    carol = ["approve", run, "--approver", "carol", "--key-file", str(w["key_files"]["carol"])]
    assert main([*carol, "--expect", "2"]) == 2
    assert "not version 2" in capsys.readouterr().err  # she expected another version: nothing was submitted
    assert main([*carol, "--expect", "1"]) == 0
    assert "promote m v1, requested by alice; state Paused" in capsys.readouterr().err
    t.join(timeout=120)
    assert out.get("result", {}).get("status") == "promoted", out
    assert out["result"]["approved_by"] == ["bob", "carol"] and out["result"]["requested_by"] == "alice"

    audit = _audit(w)
    assert [a["decision"] for a in audit] == [
        "requested",
        "denied",
        "denied",
        "denied",
        "denied",
        "approved",
        "denied",
        "approved",
        "promoted",
    ]
    assert "already decided" in audit[6]["reason"] and audit[-1]["policy"] == w["g"].digest()[:16]
    anchors = _anchors(w)
    assert len(anchors) == 9 and verify_audit_log(w["g"].audit_log, w["g"].audit.public_key, anchors) == _all(w)
    assert _alias(w, "production") == "1"
    assert json.loads((w["tmp"] / "onprem/m/current.json").read_text())["version"] == "1"
    s3t = w["g"].targets["s3"]
    man = S3Target(s3t.uri, s3t.endpoint_url, credentials_file=s3t.credentials_file).read_manifest("m", "1")
    assert man["approved_by"] == ["bob", "carol"] and man["policy"] == w["g"].digest()
    for f in w["key_files"].values():  # no private key material anywhere in the audit or the registry
        secret = f.read_text().split("\n")[1]
        assert secret not in w["g"].audit_log.read_text()
        assert secret not in json.dumps(w["mlflow"].get_model_version("m", "1").tags)


def test_code_read_from_run_input_store_cannot_approve_another_run(prefect_harness, world):
    """The attacker polls Prefect's unauthenticated run-input API and replays what bob typed, on another run."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    from flows.promotion import promotion_flow

    w, keys = world, world["keys"]
    w["g"].approvals.models = {}
    commit_governance(w["g"], "test-setup")  # one approval is enough here
    t_a, out_a = _start(promotion_flow, version="1", request=_request(w, version="1"), config=w["cfg"])
    run_a = _paused("llmops-promotion")
    t_b, out_b = _start(promotion_flow, version="2", request=_request(w, version="2"), config=w["cfg"])
    run_b = _paused("llmops-promotion", exclude={run_a})
    api, captured = PREFECT_API_URL.value(), None
    _submit(run_a, "bob", _code(keys["bob"], run_a, approve=False), approve=False, comment="not yet")
    deadline = time.time() + 10
    while time.time() < deadline and captured is None:  # what an attacker sees before the flow deletes it
        for item in httpx.post(
            f"{api}/flow_runs/{run_a}/input/filter", json={"prefix": "paused-", "limit": 50}, timeout=5
        ).json():
            if item["key"].endswith("-response"):
                captured = json.loads(item["value"])
        time.sleep(0.05)
    t_a.join(timeout=60)
    assert "rejected by bob" in str(out_a.get("error"))
    form = captured or {"approver": "bob", "code": _code(keys["bob"], run_a, approve=False)}
    _submit(run_b, form["approver"], form["code"], approve=False)  # replayed on run B
    _wait_paused_again(run_b, 1)
    _submit(run_b, "carol", _code(keys["carol"], run_b))
    t_b.join(timeout=120)
    assert out_b.get("result", {}).get("status") == "promoted", out_b
    b_entries = [a for a in _audit(w) if a.get("flow_run_id") == run_b]
    assert [(a["decision"], a.get("approver")) for a in b_entries] == [
        ("requested", None),
        ("denied", "bob"),
        ("approved", "carol"),
        ("promoted", None),
    ]


def test_requester_cannot_loosen_policy_or_pick_targets(prefect_harness, world, tmp_path, capsys):
    from flows.cli import main
    from flows.promotion import promotion_flow
    from llmops.config import PipelineConfig

    w, keys = world, world["keys"]
    # --set of governance keys fails at config load, before anything runs
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"state_dir: {w['cfg'].state_dir}\nregistry: {{model_name: m}}\n")
    assert main(["check-config", str(cfg_file), "--set", f"promotion.roles_file={tmp_path}/roles.yaml"]) == 2
    assert "governance, not a run setting" in capsys.readouterr().err
    # the requester's own MLflow, where they can write any evidence tag: refused
    own = PipelineConfig.model_validate(
        {**w["cfg"].model_dump(), "registry": {"model_name": "m", "tracking_uri": f"sqlite:///{tmp_path}/mine.db"}}
    )
    with pytest.raises(Exception, match="not the registry governance pins"):
        promotion_flow(version="1", request=_request(w), config=own)
    # a target the governance does not list: refused, audited, nothing published
    bad = PipelineConfig.model_validate({**w["cfg"].model_dump(), "promotion": {"targets": ["mine"]}})
    with pytest.raises(Exception, match="not allowed for model 'm'"):
        promotion_flow(version="1", request=_request(w), config=bad)
    # fewer approvals than governance: governance's 2 still apply
    loose = PipelineConfig.model_validate({**w["cfg"].model_dump(), "promotion": {"required_approvals": 1}})
    t, out = _start(promotion_flow, version="1", request=_request(w), config=loose)
    run = _paused("llmops-promotion")
    _submit(run, "bob", _code(keys["bob"], run))
    _wait_paused_again(run, 1)  # still waiting after one approval
    assert "2 distinct approval(s)" in _summary(run)
    _submit(run, "carol", _code(keys["carol"], run, approve=False), approve=False)
    t.join(timeout=60)
    assert "rejected by carol" in str(out.get("error")) and not (w["tmp"] / "onprem" / "m").exists()


def _summary(run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return "\n".join(a.data for a in arts if a.key == "promotion-summary")


def test_forged_requester_is_refused_and_audited(prefect_harness, world):
    from flows.promotion import promotion_flow

    w = world
    forged = json.loads(_request(w, user="eve"))
    forged["user"] = "nobody"  # `--requested-by nobody`, so that eve could approve her own model
    with pytest.raises(Exception, match="does not verify for user 'nobody'"):
        promotion_flow(version="1", request=json.dumps(forged), config=w["cfg"])
    with pytest.raises(Exception, match="not a signed llmops request"):
        promotion_flow(version="1", request="alice", config=w["cfg"])
    assert [a["decision"] for a in _audit(w)] == ["refused", "refused"]
    assert _alias(w, "production") is None


def test_evidence_tags_not_backed_by_the_ledger_are_refused(prefect_harness, world):
    """An ML engineer with EDIT on the registered model writes passing privacy tags on a version by hand."""
    from flows.promotion import promotion_flow
    from llmops.services import connect_registry
    from tasks.registry import register_candidate

    w = world
    uri, state = connect_registry(None, w["cfg"].state_dir), str(w["cfg"].state_dir)
    real = ledger_backed_tags(GOOD_TAGS, ["rec-x"])
    cases = {
        "4": GOOD_TAGS,  # no attempt behind it (e.g. a non-private model re-tagged)
        "5": {**real, "llmops.dp.epsilon": "0.5"},  # a smaller epsilon than was charged
        "6": {**GOOD_TAGS, "llmops.dp.attempt_id": "f" * 24},
    }  # an attempt id the ledger never saw
    from tasks.model import resolve_model

    model = resolve_model("tiny", state, tiny=dict(arch="llama", layers=1, hidden=32, heads=2, seed=0), max_len=32)
    for version, tags in cases.items():
        out = register_candidate(
            uri=uri,
            state_dir=state,
            experiment="e",
            model_name="m",
            model_dir=model.path,
            params={},
            metrics={"eval.eval_loss": 3.0},
            step_metrics=[],
            artifacts={},
            texts={},
            tags={},
            version_tags=tags,
            set_alias=False,
        )
        assert str(out["version"]) == version
    for version, why in (
        ("4", "no llmops.dp.attempt_id tag"),
        ("5", "disagrees with the ledger"),
        ("6", "is not in the deployment's privacy ledger"),
    ):
        with pytest.raises(Exception, match=why):
            promotion_flow(version=version, request=_request(w, version=version), config=w["cfg"])
    assert [a["decision"] for a in _audit(w)] == ["refused"] * 3 and _alias(w, "production") is None


def test_a_swapped_model_under_copied_evidence_is_never_published(prefect_harness, world):
    """An insider with EDIT registers other weights under tags copied from a real, ledger-backed version (or replaces
    its artifacts): every tag checks out, two release managers approve, and still nothing is published, because the
    files are not the model the ledger's training attempt recorded."""
    from flows.promotion import promotion_flow
    from llmops.services import connect_registry
    from tasks.model import resolve_model
    from tasks.registry import register_candidate

    w, keys = world, world["keys"]
    uri, state = connect_registry(None, w["cfg"].state_dir), str(w["cfg"].state_dir)
    real = w["mlflow"].get_model_version("m", "1").tags  # backed by the ledger, with model A's digest
    other = resolve_model("tiny", state, tiny=dict(arch="llama", layers=1, hidden=32, heads=2, seed=7), max_len=32)
    out = register_candidate(
        uri=uri,
        state_dir=state,
        experiment="e",
        model_name="m",
        model_dir=other.path,
        params={},
        metrics={"eval.eval_loss": 3.0},
        step_metrics=[],
        artifacts={},
        texts={},
        tags={},
        version_tags=dict(real),
        set_alias=False,
    )
    assert str(out["version"]) == "4"
    t, res = _start(promotion_flow, version="4", request=_request(w, version="4"), config=w["cfg"])
    run = _paused("llmops-promotion")
    _submit(run, "bob", _code(keys["bob"], run))
    _wait_paused_again(run, 1)
    _submit(run, "carol", _code(keys["carol"], run))
    t.join(timeout=120)
    assert "are not the model training attempt" in str(res.get("error")), res
    assert not (w["tmp"] / "onprem" / "m").exists() and _alias(w, "production") is None
    last = _audit(w)[-1]
    assert last["decision"] == "aborted" and "are not the model training attempt" in last["reason"]


def test_stale_rollback_is_refused_after_approval(prefect_harness, world):
    from flows.promotion import rollback_flow

    w, keys, client = world, world["keys"], world["mlflow"]
    w["g"].approvals.models = {}
    commit_governance(w["g"], "test-setup")
    _released(w, "1", "2")
    client.set_registered_model_alias("m", "production", "2")
    client.set_registered_model_alias("m", "previous", "1")
    t, out = _start(rollback_flow, request=make_request(keys["bob"], "bob", "rollback", "m", "1"), config=w["cfg"])
    run = _paused("llmops-rollback")
    _released(w, "3")  # a promotion lands while the rollback waits
    client.set_registered_model_alias("m", "production", "3")
    client.set_registered_model_alias("m", "previous", "2")
    _submit(run, "carol", _code(keys["carol"], run))
    t.join(timeout=60)
    assert "moved from 2/1 to 3/2" in str(out.get("error"))
    assert _alias(w, "production") == "3" and _alias(w, "previous") == "2"
    assert [a["decision"] for a in _audit(w)][-1] == "refused"
    assert not (w["tmp"] / "onprem" / "m").exists()


CHILD = """
import os, sys, time
import tasks.promotion as promo
real_copy = promo._copy_file
def slow_copy(src, fout):  # slow enough that the parent kills us mid-copy into the target
    time.sleep(0.5)
    return real_copy(src, fout)
promo._copy_file = slow_copy
from llmops.config import PipelineConfig
from flows.promotion import promotion_flow
cfg = PipelineConfig.model_validate_json(sys.argv[1])
promotion_flow(version="1", request=sys.argv[2], config=cfg)
"""


def test_sigkill_mid_publish_is_aborted_cleaned_and_failed_on_next_run(prefect_harness, world):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    from flows.promotion import promotion_flow

    w, keys = world, world["keys"]
    w["g"].approvals.models = {}
    w["g"].targets.pop("s3")
    commit_governance(w["g"], "test-setup")
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, w["cfg"].model_dump_json(), _request(w)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    run = _paused("llmops-promotion", timeout=180)
    _submit(run, "bob", _code(keys["bob"], run))
    model_root = w["tmp"] / "onprem" / "m"
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        p.name.startswith(".tmp-") for p in (model_root.iterdir() if model_root.exists() else [])
    ):
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert any(p.name.startswith(".tmp-") for p in model_root.iterdir())  # debris of the killed copy
    assert not (model_root / "current.json").exists()
    # the next promotion (here: of version 2) recovers the dead one first
    t, out = _start(promotion_flow, version="2", request=_request(w, version="2"), config=w["cfg"])
    run2 = _paused("llmops-promotion", exclude={run})
    with get_client(sync_client=True) as pc:
        assert pc.read_flow_run(run).state.is_failed()
    aborted = [a for a in _audit(w) if a["decision"] == "aborted"]
    assert len(aborted) == 1 and aborted[0]["flow_run_id"] == run and "stage 'publish'" in aborted[0]["reason"]
    assert not [p for p in model_root.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert not (w["g"].resolve(w["g"].state) / "work" / run).exists()  # the download is gone too
    _submit(run2, "carol", _code(keys["carol"], run2))
    t.join(timeout=120)
    assert out.get("result", {}).get("status") == "promoted", out
    assert json.loads((model_root / "current.json").read_text())["version"] == "2"
    assert verify_audit_log(w["g"].audit_log, w["g"].audit.public_key, _anchors(w)) == _all(w)


def _promote_once(w, version="1"):
    """A real, approved promotion (one approval): returns its flow-run id."""
    from flows.promotion import promotion_flow

    t, out = _start(promotion_flow, version=version, request=_request(w, version=version), config=w["cfg"])
    run = _paused("llmops-promotion", exclude=set(_runs_seen))
    _runs_seen.append(run)
    _submit(run, "bob", _code(w["keys"]["bob"], run))
    t.join(timeout=120)
    assert out.get("result", {}).get("status") == "promoted", out
    return run


_runs_seen: list[str] = []


def test_a_finished_run_reexecuted_through_the_api_is_refused_and_audited(prefect_harness, world):
    """Attack (critical): a completed, approved promotion run forced back to Scheduled through the REST API and
    executed again, fed the (re-encoded) request and sniffed codes, re-promoted a version that an approved rollback
    had removed. Now a flow-run id executes once: the second execution is refused before anything, and audited."""
    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow
    from prefect.states import Scheduled

    from flows.promotion import promotion_flow

    w = world
    w["g"].approvals.models = {}
    commit_governance(w["g"], "test-setup")
    run = _promote_once(w, "1")
    entries_before = len(_audit(w))
    with get_client(sync_client=True) as pc:
        pc.set_flow_run_state(run, Scheduled(), force=True)
        fr = pc.read_flow_run(run)
    with pytest.raises(Exception, match="already executed"):
        run_flow(promotion_flow, flow_run=fr, parameters=fr.parameters)
    new = _audit(w)[entries_before:]
    assert [(e["decision"], e["flow_run_id"]) for e in new] == [("refused", run)]
    assert "executes once" in new[0]["reason"]
    assert _alias(w, "production") == "1"


def test_moved_aliases_are_divergence_not_truth(prefect_harness, world, capsys, monkeypatch):
    """Attack: anyone with MLflow EDIT (the training worker included) moved @production/@previous by hand; status and
    audit verify did not notice, the form said "Production now: v4", the next promotion recorded previous=4 and a
    rollback then published v4, never approved. Now the signed log is the truth: every cache is compared with it."""
    from flows.cli import main
    from flows.promotion import promotion_flow, rollback_flow

    w, client = world, world["mlflow"]
    w["g"].approvals.models = {}
    commit_governance(w["g"], "test-setup")
    _promote_once(w, "1")
    _promote_once(w, "2")
    assert (_alias(w, "production"), _alias(w, "previous")) == ("2", "1")
    assert main(["audit", "verify"]) == 0
    client.set_registered_model_alias("m", "previous", "3")  # the insider's edit: v3 was never approved
    assert main(["audit", "verify"]) == 2
    assert "MLflow m@previous is v3 but the signed audit log says v1" in capsys.readouterr().err
    with pytest.raises(Exception, match="m@previous is v3 but the signed audit log says v1"):
        rollback_flow(request=make_request(w["keys"]["bob"], "bob", "rollback", "m", "1"), config=w["cfg"])
    client.set_registered_model_alias("m", "production", "3")
    with pytest.raises(Exception, match="m@production is v3 but the signed audit log says v2"):
        promotion_flow(version="1", request=_request(w, version="1"), config=w["cfg"])
    assert [e["decision"] for e in _audit(w)][-2:] == ["refused", "refused"]
    assert not (w["tmp"] / "onprem" / "m" / "3").exists()
    # the target's pointer is a cache too
    (w["tmp"] / "onprem" / "m" / "current.json").write_text(json.dumps({"model": "m", "version": "1"}))
    assert main(["audit", "reconcile"]) == 2  # aliases restored from the log; the pointer still diverges
    err = capsys.readouterr().err
    assert "target 'onprem' points m at v1 but the signed audit log says v2" in err
    assert (_alias(w, "production"), _alias(w, "previous")) == ("2", "1")
    assert _audit(w) and [e for e in AuditLog.for_governance(w["g"]).entries()][-1]["decision"] == "aliases-reconciled"


def test_a_pending_run_forced_to_another_state_is_audited(prefect_harness, world):
    """Attack: forcing a pending run's state through the API (Cancelled, Completed) killed or hid it with no audit
    entry. Now the waiting flow notices and audits 'interrupted'."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    from flows.promotion import promotion_flow

    w = world
    t, out = _start(promotion_flow, version="1", request=_request(w), config=w["cfg"])
    run = _paused("llmops-promotion")
    with get_client(sync_client=True) as pc:
        pc.set_flow_run_state(run, Cancelled(message="hidden"), force=True)
    t.join(timeout=60)
    last = _audit(w)[-1]
    assert last["decision"] == "interrupted" and last["flow_run_id"] == run and "Cancelled" in last["reason"]
    assert _alias(w, "production") is None


@pytest.mark.integration
def test_team_mode_promotion_runs_on_the_worker_that_alone_holds_governance(world, tmp_path):
    """Requester and approver only talk to the Prefect API with their keys; the `llmops-promotion` worker's own
    environment points at governance (public keys, audit key, target credentials) and publishes."""
    from prefect.client.orchestration import get_client

    from llmops import services

    w = world
    w["g"].approvals.models = {}
    commit_governance(w["g"], "test-setup")
    port = _free_port()
    api = services.start_prefect(tmp_path / "server", port)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LLMOPS_GOVERNANCE", "AWS_", "PREFECT_API"))}
    requester_env = dict(base, PREFECT_API_URL=api, HOME=str(tmp_path / "requester-home"))
    worker_env = dict(
        base,
        PREFECT_API_URL=api,
        LLMOPS_REPO=str(ROOT),
        LLMOPS_GOVERNANCE=str(w["g"].path),
        AWS_DEFAULT_REGION="us-east-1",
        PREFECT_RESULTS_LOCAL_STORAGE_PATH=str(tmp_path / "results"),
    )
    prefect = [sys.executable, "-m", "prefect"]

    def run(*args, env=requester_env, timeout=300):
        r = subprocess.run([*prefect, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])
        return r.stdout

    worker = None
    try:
        run("work-pool", "create", "llmops-promotion", "--type", "process")
        run("--no-prompt", "deploy", "--name", "promote", "--prefect-file", str(ROOT / "deployments/prefect.yaml"))
        params = {"version": "1", "request": _request(w), "config": json.loads(w["cfg"].model_dump_json())}
        out = run("deployment", "run", "llmops-promotion/promote", "--params", json.dumps(params))
        run_id = next(tok for line in out.splitlines() if "UUID" in line for tok in line.split() if len(tok) == 36)
        worker = subprocess.Popen(
            [*prefect, "worker", "start", "--pool", "llmops-promotion"],
            env=worker_env,
            cwd=ROOT,
            stdout=open(tmp_path / "worker.log", "w"),
            stderr=subprocess.STDOUT,
        )
        import prefect.settings as ps

        with ps.temporary_settings({ps.PREFECT_API_URL: api}):
            deadline = time.time() + 240
            with get_client(sync_client=True) as pc:
                while not pc.read_flow_run(run_id).state.is_paused():
                    assert time.time() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                    time.sleep(1)
                _submit(run_id, "bob", _code(w["keys"]["bob"], run_id))
                while not pc.read_flow_run(run_id).state.is_final():
                    assert time.time() < deadline, (tmp_path / "worker.log").read_text()[-3000:]
                    time.sleep(1)
                assert pc.read_flow_run(run_id).state.is_completed(), (tmp_path / "worker.log").read_text()[-3000:]
        assert json.loads((w["tmp"] / "onprem/m/current.json").read_text())["version"] == "1"
        assert [a["decision"] for a in _audit(w)] == ["requested", "approved", "promoted"]
        assert _alias(w, "production") == "1"
    finally:
        if worker:  # a busy machine can take longer than 30 s to drain a worker: stop it, never fail the test on it
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=30)
        services.stop_prefect(tmp_path / "server")


def test_a_response_planted_in_the_run_input_store_does_not_lock_approvers_out(prefect_harness, world):
    """Attack: creating the paused run's `paused-N-response` input through the API made every real approval fail
    with 409 (Prefect refuses to resume over an existing key) and nothing was audited. The waiting flow removes a
    response that stays while the run is still Paused and audits it; a real approval then goes through."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    from flows.promotion import promotion_flow

    w = world
    t, out = _start(promotion_flow, version="1", request=_request(w), config=w["cfg"])
    run = _paused("llmops-promotion")
    with get_client(sync_client=True) as pc:
        key = pc.read_flow_run(run).state.state_details.run_input_keyset["response"]
        pc.create_flow_run_input(
            flow_run_id=run,
            key=key,
            value=json.dumps({"approve": True, "approver": "rm-x", "code": "x", "comment": ""}),
        )
        deadline = time.time() + 30
        while time.time() < deadline and any(
            i.key == key
            for i in pc.filter_flow_run_input(flow_run_id=run, key_prefix="paused-", limit=50, exclude_keys=set())
        ):
            time.sleep(0.5)
        assert not any(
            i.key == key
            for i in pc.filter_flow_run_input(flow_run_id=run, key_prefix="paused-", limit=50, exclude_keys=set())
        )
    planted = [e for e in _audit(w) if e.get("decision") == "denied" and "planted" in e.get("reason", "")]
    assert planted and planted[-1]["flow_run_id"] == run
    assert _paused("llmops-promotion") == run  # still waiting for a real approval
    with get_client(sync_client=True) as pc:
        pc.set_flow_run_state(run, Cancelled(message="test over"), force=True)
    t.join(timeout=60)
