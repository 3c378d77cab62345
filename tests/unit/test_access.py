"""Access: governance outside the run config, signed requests, single-use run-bound codes, signed audit trail.

One test per attack an insider (requester with the CLI and `--set`, anyone reading Prefect's stores or the state
dir) would try; each failed on the code before the governance change.
"""
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from llmops.errors import ConfigError, LLMOpsError
from llmops.governance import load_governance
from tasks.access import (AccessDenied, AuditLog, AuditTampered, GovernanceStore, approval_code, enrol_user,
                          init_governance, load_private_key, make_request, verify_approval, verify_audit_log,
                          verify_request)


def _write_key(path: Path, pem: str) -> Path:
    from llmops.files import write_text_atomic

    return write_text_atomic(path, pem, mode=0o600)


@pytest.fixture
def gov(tmp_path, isolated_governance):
    """Governance with alice (ml-engineer + release-manager), bob, carol (release-managers), eve (ml-engineer)."""
    g = init_governance()
    keys = {}
    for name, roles in {"alice": ["ml-engineer", "release-manager"], "bob": ["release-manager"],
                        "carol": ["release-manager"], "eve": ["ml-engineer"]}.items():
        keys[name] = _write_key(tmp_path / "keys" / f"{name}.key", enrol_user(g, name, roles))
    g = load_governance(required=True)
    return g, GovernanceStore(g.state_db), {n: load_private_key(p) for n, p in keys.items()}, keys


def test_governance_file_holds_no_private_key_and_is_private(gov):
    g, _, _, key_files = gov
    text = g.path.read_text()
    for f in key_files.values():
        assert f.read_text().split("\n")[1] not in text  # the private key material is not stored
    assert "PRIVATE KEY" not in text
    assert oct(g.path.stat().st_mode & 0o777) == "0o600"
    assert oct(g.resolve(g.audit.signing_key).stat().st_mode & 0o777) == "0o600"
    assert len(g.digest()) == 64


@pytest.mark.parametrize("override", [
    {"promotion.roles_file": "/tmp/my-roles.yaml"},
    {"promotion.targets": [{"kind": "onprem", "uri": "/tmp/mine"}]},
])
def test_requester_cannot_set_governance_from_the_run_config(override):
    from llmops.config import PipelineConfig, load_config

    with pytest.raises((ConfigError, ValueError), match="governance"):
        PipelineConfig.model_validate({"promotion": {override and list(override)[0].split(".")[1]:
                                                     list(override.values())[0]}})
    assert load_config  # the CLI path is covered in test_promotion


def test_run_config_only_tightens(gov):
    from flows.promotion import policy_in_force
    from llmops.config import PipelineConfig
    from llmops.governance import TargetSpec

    g = gov[0]
    g.approvals.required = 2
    g.targets = {"onprem": TargetSpec(kind="onprem", uri="/a"), "edge": TargetSpec(kind="edge", uri="/b",
                                                                                  models=["other"])}
    loose = PipelineConfig.model_validate({"promotion": {"required_approvals": 1}})
    assert policy_in_force(g, loose, "m", "promote").required == 2  # 1 < governance's 2: ignored
    tight = PipelineConfig.model_validate({"promotion": {"required_approvals": 3, "targets": ["onprem"]}})
    p = policy_in_force(g, tight, "m", "promote")
    assert p.required == 3 and list(p.targets) == ["onprem"] and p.approvers == ["alice", "bob", "carol"]
    with pytest.raises(LLMOpsError, match=r"not allowed for model 'm'"):  # edge is only for model 'other'
        policy_in_force(g, PipelineConfig.model_validate({"promotion": {"targets": ["edge"]}}), "m", "promote")
    with pytest.raises(LLMOpsError, match="not allowed"):
        policy_in_force(g, PipelineConfig.model_validate({"promotion": {"targets": ["nope"]}}), "m", "promote")


def test_signed_request_names_its_signer_only(gov):
    g, store, keys, _ = gov
    req = make_request(keys["eve"], "eve", "promote", "m", "3")
    assert verify_request(g, store, req, "promote", "m", "3")["user"] == "eve"
    with pytest.raises(AccessDenied, match="already used"):  # replayed request
        verify_request(g, store, req, "promote", "m", "3")
    forged = json.loads(make_request(keys["eve"], "eve", "promote", "m", "3"))
    forged["user"] = "nobody"  # --requested-by nobody, signed by eve
    with pytest.raises(AccessDenied, match="does not verify for user 'nobody'"):
        verify_request(g, store, json.dumps(forged), "promote", "m", "3")
    with pytest.raises(AccessDenied, match="does not verify for user 'carol'"):  # eve's key, carol's name
        verify_request(g, store, make_request(keys["eve"], "carol", "promote", "m", "3"), "promote", "m", "3")
    with pytest.raises(AccessDenied, match="signed for promote of m v3"):  # request for v3 reused for v4
        verify_request(g, store, make_request(keys["eve"], "eve", "promote", "m", "3"), "promote", "m", "4")
    with pytest.raises(AccessDenied, match="not a signed llmops request"):
        verify_request(g, store, "eve", "promote", "m", "3")
    with pytest.raises(AccessDenied, match="lacks permission 'request-rollback'"):
        verify_request(g, store, make_request(keys["eve"], "eve", "rollback", "m", "2"), "rollback", "m", "2")
    old = json.loads(make_request(keys["eve"], "eve", "promote", "m", "3"))
    old["ts"] -= 3600
    from tasks.access import _request_message, sign

    old["sig"] = sign(keys["eve"], _request_message(old))
    with pytest.raises(AccessDenied, match="s old"):
        verify_request(g, store, json.dumps(old), "promote", "m", "3")


SUBJ = "promote m v1"


def _approve(gov, run_id, approver, code, approve=True, requested_by="eve", action="promote", subject=SUBJ):
    g, store, _, _ = gov
    verify_approval(g, store, run_id=run_id, approver=approver, code=code, approve=approve, action=action,
                    requested_by=requested_by, subject=subject)


def test_code_is_bound_to_run_and_decision_and_single_use(gov):
    keys = gov[2]
    code_a = approval_code(keys["bob"], "run-a", SUBJ)
    with pytest.raises(AccessDenied, match="invalid approver or code"):  # captured from run A, used on run B
        _approve(gov, "run-b", "bob", code_a)
    with pytest.raises(AccessDenied, match="invalid approver or code"):  # a reject code cannot approve
        _approve(gov, "run-a", "bob", approval_code(keys["bob"], "run-a", SUBJ, approve=False))
    with pytest.raises(AccessDenied, match="invalid approver or code"):  # bob's code under carol's name
        _approve(gov, "run-a", "carol", code_a)
    # bob was shown (through a forged Prefect display) v1, but the run really promotes v2
    with pytest.raises(AccessDenied, match=r"invalid approver or code \(for promote m v2, approve\)"):
        _approve(gov, "run-a", "bob", code_a, subject="promote m v2")
    _approve(gov, "run-a", "bob", code_a)
    with pytest.raises(AccessDenied, match="already used"):
        _approve(gov, "run-a", "bob", code_a)
    with pytest.raises(AccessDenied, match="lacks permission 'approve-promotion'"):
        _approve(gov, "run-a", "eve", approval_code(keys["eve"], "run-a", SUBJ), requested_by="alice")
    with pytest.raises(AccessDenied, match="cannot also approve"):
        _approve(gov, "run-a", "alice", approval_code(keys["alice"], "run-a", SUBJ), requested_by="alice")


def test_lockout_is_per_identity_and_junk_does_not_touch_others(gov):
    g, _, keys, _ = gov
    for _ in range(g.approvals.max_failures_per_approver):
        with pytest.raises(AccessDenied, match="invalid"):
            _approve(gov, "run-x", "bob", "junk")
    with pytest.raises(AccessDenied, match="'bob' is locked out"):  # even his real code, for a while
        _approve(gov, "run-x", "bob", approval_code(keys["bob"], "run-x", SUBJ))
    _approve(gov, "run-x", "carol", approval_code(keys["carol"], "run-x", SUBJ))  # another approver is unaffected


def test_private_key_must_not_be_readable_by_others(gov):
    path = gov[3]["bob"]
    os.chmod(path, 0o644)
    with pytest.raises(AccessDenied, match="readable by others"):
        load_private_key(path)


# ------------------------------------------------------------------------------------------------- audit


@pytest.fixture
def audit(gov):
    g = gov[0]
    log = AuditLog.for_governance(g)
    anchors = []
    for d in ("requested", "denied", "approved", "promoted"):
        rec = log.append(action="promote", decision=d, model="m", version="1")
        anchors.append((rec["seq"], rec["hash"], f"m v1 {d}"))
    return g, log, anchors


def test_intact_log_verifies_with_anchors(audit):
    g, log, anchors = audit
    assert verify_audit_log(log.path, g.audit.public_key, anchors) == 4
    with pytest.raises(ValueError):
        log.append(action="x", code="123")


def _lines(log):
    return log.path.read_text().splitlines()


def test_edit_and_rechain_is_detected(audit):
    import hashlib

    g, log, anchors = audit
    lines = [json.loads(x) for x in _lines(log)]
    lines[1]["decision"] = "approved"
    out, prev = [], "0" * 64
    for rec in lines:  # the attacker re-chains every hash (what beat the old sha256 chain)
        rec["prev"] = prev
        line = json.dumps(rec, sort_keys=True)
        prev = hashlib.sha256(line.encode()).hexdigest()
        out.append(line)
    log.path.write_text("\n".join(out) + "\n")
    with pytest.raises(AuditTampered, match=r"audit.log:2: signature does not verify"):
        verify_audit_log(log.path, g.audit.public_key)


def test_forged_append_is_detected(audit, tmp_path):
    from tasks.access import generate_keypair

    g, log, _ = audit
    # the attacker signs with their own key: the governance public key does not accept it
    pem, _ = generate_keypair()
    _write_key(tmp_path / "evil.key", pem)
    AuditLog(log.path, tmp_path / "evil.key").append(action="promote", decision="approved", approver="bob")
    with pytest.raises(AuditTampered, match=r"audit.log:5: signature does not verify"):
        verify_audit_log(log.path, g.audit.public_key)


def test_truncation_and_deletion_are_detected_against_anchors(audit):
    g, log, anchors = audit
    log.path.write_text("\n".join(_lines(log)[:2]) + "\n")  # a valid prefix: signatures and chain still fine
    assert verify_audit_log(log.path, g.audit.public_key) == 2
    with pytest.raises(AuditTampered, match="truncated: it ends at entry 2 but entry 3 is anchored"):
        verify_audit_log(log.path, g.audit.public_key, anchors)
    log.path.unlink()
    with pytest.raises(AuditTampered, match="audit log is missing, but 4 decision"):
        verify_audit_log(log.path, g.audit.public_key, anchors)


@pytest.mark.parametrize("bad", ["", "not json", "[1, 2]", '{"seq": 2}'])
def test_malformed_lines_are_tampering_with_file_line(audit, bad):
    g, log, _ = audit
    lines = _lines(log)
    lines.insert(2, bad)
    log.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditTampered, match=r"audit.log:3: "):
        verify_audit_log(log.path, g.audit.public_key)


def test_cli_audit_verify_reports_tampering_in_one_line(audit, capsys):
    from flows.cli import main

    g, log, _ = audit
    assert main(["audit", "verify"]) == 0
    lines = _lines(log)
    log.path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    assert main(["audit", "verify"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audit.log:2: malformed audit line" in err and "Traceback" not in err


def _appender(args):
    gov_path, n = args
    os.environ["LLMOPS_GOVERNANCE"] = gov_path
    g = load_governance(required=True)
    log = AuditLog.for_governance(g)
    for i in range(n):
        log.append(action="promote", decision="denied", model="m", version=str(i))


def test_concurrent_appenders_keep_the_chain(audit):
    g, log, _ = audit
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pool.map(_appender, [(str(g.path), 15)] * 3)
    assert verify_audit_log(log.path, g.audit.public_key) == 4 + 45


def test_cli_users_add_prints_key_once_and_stores_public_key(tmp_path, capsys, monkeypatch):
    from flows.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["governance", "init"]) == 0
    assert main(["governance", "init"]) == 2  # never overwrites an existing governance (or its audit key)
    assert main(["users", "add", "rm-dan", "--role", "release-manager", "--key-out", str(tmp_path / "dan.key")]) == 0
    assert oct((tmp_path / "dan.key").stat().st_mode & 0o777) == "0o600"
    key = load_private_key(tmp_path / "dan.key")
    g = load_governance(required=True)
    assert g.users["rm-dan"].roles == ["release-manager"] and "PRIVATE" not in g.path.read_text()
    assert key is not None
    capsys.readouterr()  # a code is only ever computed for what the run really is (read from Prefect)
    assert main(["approval-code", "run-1", "--approver", "rm-dan", "--key-file", str(tmp_path / "dan.key")]) == 2
    assert "cannot read the flow run to know what you approve" in capsys.readouterr().err
    assert main(["users", "add", "x", "--role", "wizard"]) == 2
    assert "unknown roles ['wizard']" in capsys.readouterr().err
    # admin changes are audited (signed) like every other decision
    assert [(e["decision"], e.get("user")) for e in AuditLog.for_governance(g).entries()] == [
        ("governance-created", None), ("user-enrolled", "rm-dan")]
    assert verify_audit_log(g.audit_log, g.audit.public_key) == 2


def test_world_writable_governance_is_refused(gov):
    g = gov[0]
    os.chmod(g.path, 0o666)
    with pytest.raises(ConfigError, match="writable by others"):
        load_governance(required=True)


def test_background_keeps_every_cli_option(gov, tmp_path, monkeypatch):
    """`promote/rollback --background` re-runs the very same command line (minus --background) detached."""
    import subprocess

    from flows.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def fake_popen(argv, **kw):
        seen["argv"] = argv
        raise Stop

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\n")
    argv = ["rollback", "--config", str(cfg), "--set", "promotion.required_approvals=3", "--set",
            "registry.model_name=other", "--requested-by", "bob", "--key-file", str(gov[3]["bob"]), "--background"]
    with pytest.raises(Stop):
        main(argv)
    assert seen["argv"][-len(argv) + 1:] == [a for a in argv if a != "--background"]
