"""Access: governance outside the run config, signed requests, single-use run-bound codes, signed audit trail.

One test per attack an insider (requester with the CLI and `--set`, anyone reading Prefect's stores or the state
dir) would try; each failed on the code before the governance change.
"""

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from llmops.errors import AccessDenied, AuditTampered, ConfigError, LLMOpsError
from llmops.governance.access import (
    approval_code,
    enrol_user,
    init_governance,
    make_request,
    verify_approval,
    verify_request,
)
from llmops.governance.audit import AuditLog, verify_audit_log
from llmops.governance.keys import load_private_key
from llmops.governance.policy import load_governance
from llmops.governance.store import GovernanceStore


def _write_key(path: Path, pem: str) -> Path:
    from llmops.files import write_text_atomic

    return write_text_atomic(path, pem, mode=0o600)


@pytest.fixture
def gov(tmp_path, isolated_governance):
    """Governance with alice (ml-engineer + release-manager), bob, carol (release-managers), eve (ml-engineer)."""
    g = init_governance()
    keys = {}
    for name, roles in {
        "alice": ["ml-engineer", "release-manager"],
        "bob": ["release-manager"],
        "carol": ["release-manager"],
        "eve": ["ml-engineer"],
    }.items():
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


@pytest.mark.parametrize(
    "override",
    [
        {"promotion.roles_file": "/tmp/my-roles.yaml"},
        {"promotion.targets": [{"kind": "onprem", "uri": "/tmp/mine"}]},
    ],
)
def test_requester_cannot_set_governance_from_the_run_config(override):
    from llmops.config import PipelineConfig, load_config

    with pytest.raises((ConfigError, ValueError), match="governance"):
        PipelineConfig.model_validate(
            {"promotion": {override and list(override)[0].split(".")[1]: list(override.values())[0]}}
        )
    assert load_config  # the CLI path is covered in test_promotion


def test_run_config_only_tightens(gov):
    from llmops.config import PipelineConfig
    from llmops.governance.decision import policy_in_force
    from llmops.governance.policy import TargetSpec

    g = gov[0]
    g.approvals.required = 2
    g.targets = {
        "onprem": TargetSpec(kind="onprem", uri="/a"),
        "edge": TargetSpec(kind="edge", uri="/b", models=["other"]),
    }
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
    from llmops.governance.access import _request_message
    from llmops.governance.keys import sign

    old["sig"] = sign(keys["eve"], _request_message(old))
    with pytest.raises(AccessDenied, match="s old"):
        verify_request(g, store, json.dumps(old), "promote", "m", "3")


SUBJ = "promote m v1"
CH = "c" * 32  # an execution's challenge
EXP = 4_000_000_000


def _code(key, run_id, subject=SUBJ, approve=True, challenge=CH, expires=EXP):
    return approval_code(key, run_id, subject, approve=approve, challenge=challenge, expires=expires)


def _approve(
    gov,
    run_id,
    approver,
    code,
    approve=True,
    requested_by="eve",
    action="promote",
    subject=SUBJ,
    challenge=CH,
    expires=EXP,
):
    g, store, _, _ = gov
    verify_approval(
        g,
        store,
        run_id=run_id,
        approver=approver,
        code=code,
        approve=approve,
        action=action,
        requested_by=requested_by,
        subject=subject,
        challenge=challenge,
        expires=expires,
    )


def test_code_is_bound_to_run_and_decision_and_single_use(gov):
    keys = gov[2]
    code_a = _code(keys["bob"], "run-a")
    with pytest.raises(AccessDenied, match="invalid approver or code"):  # captured from run A, used on run B
        _approve(gov, "run-b", "bob", code_a)
    with pytest.raises(AccessDenied, match="invalid approver or code"):  # a reject code cannot approve
        _approve(gov, "run-a", "bob", _code(keys["bob"], "run-a", approve=False))
    with pytest.raises(AccessDenied, match="invalid approver or code"):  # bob's code under carol's name
        _approve(gov, "run-a", "carol", code_a)
    # bob was shown (through a forged Prefect display) v1, but the run really promotes v2
    with pytest.raises(AccessDenied, match=r"invalid approver or code \(for promote m v2, approve\)"):
        _approve(gov, "run-a", "bob", code_a, subject="promote m v2")
    # another execution of the same run (forced back to Scheduled) has another challenge: the code is dead there
    with pytest.raises(AccessDenied, match="invalid approver or code"):
        _approve(gov, "run-a", "bob", code_a, challenge="d" * 32)
    _approve(gov, "run-a", "bob", code_a)
    with pytest.raises(AccessDenied, match="already decided"):
        _approve(gov, "run-a", "bob", code_a)
    with pytest.raises(AccessDenied, match="lacks permission 'approve-promotion'"):
        _approve(gov, "run-a", "eve", _code(keys["eve"], "run-a"), requested_by="alice")
    with pytest.raises(AccessDenied, match="cannot also approve"):
        _approve(gov, "run-a", "alice", _code(keys["alice"], "run-a"), requested_by="alice")


def _reencodings(code: str) -> list[str]:
    """Texts that a lenient base64 decoder maps to the same 64 bytes."""
    import base64

    raw = base64.urlsafe_b64decode(code + "==")
    std = base64.b64encode(raw).decode()
    last = code[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    bits = alphabet.index(last)
    sibling = alphabet[bits ^ 1] if bits & 0b1111 == bits else alphabet[bits | 1]  # flips a padding bit
    return [code + "=", code + "==", std, std.rstrip("="), f" {code} ", code[:-1] + sibling, code + "\n"]


def test_reencoded_codes_never_verify_nor_count_as_new(gov):
    """Attack: the approval's signature re-encoded (padding, +/ alphabet, a flipped trailing bit) was accepted as
    another, unused code. One text per signature; consumption is by approver + run + challenge."""
    keys = gov[2]
    code = _code(keys["bob"], "run-r")
    for other in _reencodings(code):
        if other.strip() == code:
            continue
        with pytest.raises(AccessDenied, match="invalid approver or code"):
            _approve(gov, "run-r", "bob", other)
    _approve(gov, "run-r", "bob", code)
    with pytest.raises(AccessDenied, match="already decided"):  # even a (valid) reject code: one decision each
        _approve(gov, "run-r", "bob", _code(keys["bob"], "run-r", approve=False), approve=False)


def test_expired_code_is_refused(gov):
    keys = gov[2]
    with pytest.raises(AccessDenied, match="approval window"):
        _approve(gov, "run-e", "bob", _code(keys["bob"], "run-e", expires=1000), expires=1000)


def test_reencoded_request_starts_nothing_new(gov):
    """Attack: the same signed request with its signature re-encoded, or its JSON re-serialised, started another run
    'requested by' its signer. Requests are consumed by (user, nonce)."""
    g, store, keys, _ = gov
    req = make_request(keys["eve"], "eve", "promote", "m", "3")
    body = json.loads(req)
    verify_request(g, store, req, "promote", "m", "3")
    for sig in _reencodings(body["sig"]):
        with pytest.raises(AccessDenied, match="does not verify|already used"):
            verify_request(g, store, json.dumps({**body, "sig": sig}), "promote", "m", "3")
    with pytest.raises(AccessDenied, match="already used"):  # same bytes signed, other JSON text
        verify_request(g, store, json.dumps(body, indent=1), "promote", "m", "3")


def test_junk_codes_lock_nobody_out(gov):
    """Attack: five junk codes under bob's name locked him out of every run for 15 minutes. Now bad submissions
    only slow down the run they were typed into; bob's real code works at once, here and in any other run."""
    from llmops.governance.access import submission_delay

    g, _, keys, _ = gov
    for _ in range(3 * g.approvals.max_failures_per_approver):
        with pytest.raises(AccessDenied, match="invalid"):
            _approve(gov, "run-x", "bob", "junk")
    _approve(gov, "run-x", "bob", _code(keys["bob"], "run-x"))
    _approve(gov, "run-y", "bob", _code(keys["bob"], "run-y"))
    free, cap = g.approvals.max_failures_per_approver, g.approvals.lockout_s
    assert [submission_delay(n, free, cap) for n in (1, free - 1, free, free + 3)] == [0, 0, 1, 8]
    assert submission_delay(10_000, free, cap) == min(cap, 64)


def test_private_key_must_not_be_readable_by_others(gov):
    path = gov[3]["bob"]
    os.chmod(path, 0o644)
    with pytest.raises(AccessDenied, match="readable by others"):
        load_private_key(path)


# ------------------------------------------------------------------------------------------------- audit


ADMIN = 5  # governance-created + four users enrolled: admin entries, signed like every decision


@pytest.fixture
def audit(gov):
    g = gov[0]
    log = AuditLog.for_governance(g)
    anchors = []
    for d in ("requested", "denied", "approved", "aborted"):
        rec = log.append(action="promote", decision=d, model="m", version="1")
        anchors.append((rec["seq"], rec["hash"], f"m v1 {d}"))
    return g, log, anchors


def test_intact_log_verifies_with_anchors(audit):
    g, log, anchors = audit
    assert verify_audit_log(log.path, g.audit.public_key, anchors) == ADMIN + 4
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
    from llmops.governance.keys import generate_keypair

    g, log, _ = audit
    # the attacker signs with their own key: the governance public key does not accept it
    pem, _ = generate_keypair()
    _write_key(tmp_path / "evil.key", pem)
    AuditLog(log.path, tmp_path / "evil.key").append(action="promote", decision="approved", approver="bob")
    with pytest.raises(AuditTampered, match=rf"audit.log:{ADMIN + 5}: signature does not verify"):
        verify_audit_log(log.path, g.audit.public_key)


def test_truncation_and_deletion_are_detected_against_anchors(audit):
    g, log, anchors = audit
    log.path.write_text("\n".join(_lines(log)[:2]) + "\n")  # a valid prefix: signatures and chain still fine
    assert verify_audit_log(log.path, g.audit.public_key) == 2
    with pytest.raises(AuditTampered, match=f"truncated: it ends at entry 2 but entry {ADMIN + 1} is anchored"):
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


def test_truncating_the_last_admin_entry_is_detected_by_the_anchored_head(audit):
    """Attack: dropping the last audit line (an admin entry, which has no registry anchor) went unnoticed."""
    from llmops.governance.access import verified_entries

    g, log, _ = audit
    log.append(action="governance", decision="user-enrolled", user="mallory")
    verified_entries(g)
    log.path.write_text("\n".join(_lines(log)[:-1]) + "\n")
    assert verify_audit_log(log.path, g.audit.public_key) == ADMIN + 4  # the prefix itself is a valid chain
    with pytest.raises(AuditTampered, match="truncated.*governance store's audit head"):
        verified_entries(g)
    log.path.unlink()
    with pytest.raises(AuditTampered, match="missing"):
        verified_entries(g)


def test_hand_edited_governance_is_refused_until_audited(gov, capsys):
    """Attack: a hand edit (a new approver whose key the requester holds, approvals.required lowered) was obeyed
    and never audited. The worker refuses a file whose digest is not the latest signed admin entry's."""
    import yaml

    from flows.cli import main
    from llmops.errors import GovernanceTampered
    from llmops.governance.access import verified_governance
    from llmops.governance.keys import generate_keypair

    g = gov[0]
    verified_governance()
    data = yaml.safe_load(g.path.read_text())
    _, pub = generate_keypair()
    data["users"]["sock-puppet"] = {"roles": ["release-manager"], "public_key": pub}
    data["approvals"]["required"] = 3
    g.path.write_text(yaml.safe_dump(data))
    os.chmod(g.path, 0o600)
    with pytest.raises(GovernanceTampered, match=r"changed outside `llmops`.*approvals.required.*users.sock-puppet"):
        verified_governance()
    assert main(["users", "add", "x", "--role", "ml-engineer"]) == 2  # admin commands start from the audited file
    assert main(["governance", "restore"]) == 0
    assert "sock-puppet" not in verified_governance().users
    # every field has an audited command; the entry names who (the kernel's uid, not $USER) and what changed
    os.environ["USER"] = "someone-else"
    assert main(["governance", "set", "approvals.models.m", "3"]) == 0
    last = AuditLog.for_governance(g).entries()[-1]
    assert last["decision"] == "governance-set" and last["field"] == "approvals.models.m" and last["new"] == 3
    assert f"uid {os.geteuid()}" in last["by"] and "someone-else" not in last["by"]
    assert verified_governance().approvals.required_for("m") == 3
    assert main(["governance", "set", "audit.public_key", "x"]) == 2  # the audit key is not a settable field


@pytest.mark.parametrize("what,mode", [("file", 0o604), ("file", 0o640), ("dir", 0o750), ("dir", 0o705)])
def test_governance_readable_or_writable_by_others_is_refused(gov, what, mode):
    from llmops.errors import GovernanceTampered
    from llmops.governance.access import verified_governance

    g = gov[0]
    os.chmod(g.path if what == "file" else g.home, mode)
    with pytest.raises(GovernanceTampered, match="accessible by group/others"):
        verified_governance()


def test_governance_owned_by_another_uid_is_refused(gov, monkeypatch):
    from llmops.errors import GovernanceTampered
    from llmops.governance.access import verified_governance

    monkeypatch.setattr(os, "geteuid", lambda: 12345)  # as if the worker ran as another user than the file's owner
    with pytest.raises(GovernanceTampered, match="owned by uid"):
        verified_governance()


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
    assert verify_audit_log(log.path, g.audit.public_key) == ADMIN + 4 + 45


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
        ("governance-created", None),
        ("user-enrolled", "rm-dan"),
    ]
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
    argv = [
        "rollback",
        "--config",
        str(cfg),
        "--set",
        "promotion.required_approvals=3",
        "--set",
        "registry.model_name=other",
        "--requested-by",
        "bob",
        "--key-file",
        str(gov[3]["bob"]),
        "--background",
    ]
    with pytest.raises(Stop):
        main(argv)
    assert seen["argv"][-len(argv) + 1 :] == [a for a in argv if a != "--background"]


def test_llmops_serve_cannot_put_an_unreleased_version_on_a_release_targets_port(gov):
    """`llmops serve --model m/3` is for testing; on the port of a governance serve target only the version the
    signed log released there may run (it was the one way to serve a rolled-back version where users are)."""
    from types import SimpleNamespace

    from flows.cli.serve import _refuse_unreleased_on_a_release_target
    from llmops.governance.access import commit_governance
    from llmops.governance.policy import TargetSpec

    g = load_governance()
    g.targets["live"] = TargetSpec(kind="serve", uri="http://127.0.0.1:8123")
    commit_governance(g, "target", target="live")
    with pytest.raises(LLMOpsError, match="governance serve target 'live'"):
        _refuse_unreleased_on_a_release_target("m", "3", SimpleNamespace(http_port=8123))
    _refuse_unreleased_on_a_release_target("m", "3", SimpleNamespace(http_port=8124))  # another port: a test
