"""Who did what, proven: signed requests, single-use run-bound approval codes, and a signed audit trail.

Attackers this module is written against (see the README's threat model):
- a requester (ml-engineer) with the CLI, `--set` and the Prefect REST API must not approve their own request, pose
  as someone else, or choose who approves;
- anyone who can read Prefect's stores (the run-input API is unauthenticated in OSS Prefect; its SQLite WAL is
  world-readable) must not learn anything that approves a *different* run or approves twice;
- anyone with read (or write) access to the state dir must not forge, edit, reorder, truncate or delete audit
  entries unnoticed.

Choices, and why:
1. Every person holds an ed25519 private key (printed once by `llmops users add`); governance stores only the public
   key, so reading the governance file gives nothing that signs. (A shared-secret scheme, HOTP/TOTP, would make the
   governance file itself an approval credential.)
2. An approval code is the signature of ("llmops-approval-v1", flow-run id, "promote <model> v<version>",
   approve|reject): bound to one run, one subject and one decision, so a code captured from Prefect's run-input store
   approves nothing else, and a display forged through the Prefect API cannot turn it into an approval of another
   version (the flow checks the subject against what it will really do); each code is consumed
   in a governance-side table (never twice). It is 86 characters: the release manager pastes what
   `llmops approval-code RUN_ID` prints; guessing one is hopeless (2^-128), so the per-identity lockout is only a
   brake on noise, and junk from anyone never ends someone's pending run.
3. A promotion/rollback request is signed the same way over (action, model, version, nonce, time): `--requested-by`
   is whoever signed, checked against the governance roles; the nonce is consumed once, old requests expire.
4. Audit entries are JSON lines with a sequence number, the sha256 of the previous line, and an ed25519 signature
   by the audit key (private half readable by the promotion worker only; public half in governance, so anyone can
   verify). The chain head (seq, line hash) is also written on the MLflow version's decision tags: truncating or
   deleting the file is detected against those anchors. Appends are serialised with an exclusive file lock.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path

from llmops.errors import AccessDenied, GovernanceTampered, LLMOpsError
from llmops.governance.audit import AuditLog, verify_audit_log
from llmops.governance.keys import generate_keypair, sign, verify_signature
from llmops.governance.policy import Governance
from llmops.governance.store import GovernanceStore

APPROVAL_DOMAIN = "llmops-approval-v2"
REQUEST_DOMAIN = "llmops-request-v1"


def actor() -> str:
    """Who runs this process, as the kernel says (effective uid), not as `$USER` (which anyone can set)."""
    import pwd

    uid = os.geteuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


# --------------------------------------------------------------------------------- governance admin


def init_governance(path: str | Path | None = None) -> Governance:
    """Create the governance file (default roles, no users) and the audit signing key, both mode 600."""
    from llmops.files import write_text_atomic
    from llmops.governance.policy import load_governance

    g = load_governance(path)
    if g.path.is_file():
        raise LLMOpsError("governance file already exists", str(g.path), "edit it, or use `llmops users add`")
    pem, pub = generate_keypair()
    g.audit.public_key = pub
    g.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = g.resolve(g.audit.signing_key)
    if key_path.exists():
        raise LLMOpsError("an audit signing key already exists", str(key_path), "move it away or reuse its file")
    write_text_atomic(key_path, pem, mode=0o600)
    commit_governance(g, "governance-created")
    return g


def enrol_user(g: Governance, name: str, roles: list[str]) -> str:
    """Add or re-key `name`; returns the private key PEM (shown once, never stored by llmops)."""
    from llmops.governance.policy import User

    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise LLMOpsError(f"invalid user name '{name}'", "llmops users add", "use letters, digits, - _ .")
    if unknown := sorted(set(roles) - set(g.roles)):
        import difflib

        hint = difflib.get_close_matches(unknown[0], list(g.roles), n=1)
        raise LLMOpsError(
            f"unknown roles {unknown}" + (f" (did you mean '{hint[0]}'?)" if hint else ""),
            str(g.path),
            f"use one of {sorted(g.roles)}",
        )
    pem, pub = generate_keypair()
    g.users[name] = User(roles=sorted(set(roles)), public_key=pub)
    commit_governance(g, "user-enrolled", user=name, roles=sorted(set(roles)))
    return pem


def commit_governance(g: Governance, decision: str, **entry) -> dict:
    """The one way governance changes: write the file, keep a snapshot of it beside the governance store, and sign an
    admin entry carrying its full digest into the audit log. The promotion worker refuses a governance file whose
    digest is not the one in the latest such entry (`verified_governance`), so a hand edit is detected, not obeyed."""
    g.save()
    store = GovernanceStore(g.state_db)
    store.snapshot(g.digest(), json.dumps(g.model_dump(mode="json"), sort_keys=True))
    return AuditLog.for_governance(g).append(
        action="governance", decision=decision, policy=g.digest()[:16], governance=g.digest(), by=actor(), **entry
    )


def _private_path(p: Path, what: str) -> None:
    st = p.stat()
    if st.st_uid != os.geteuid():
        raise GovernanceTampered(
            f"{what} is owned by uid {st.st_uid}, not by this worker (uid {os.geteuid()})",
            str(p),
            "chown it to the admin / promotion worker user, or run as its owner",
        )
    if st.st_mode & 0o077:
        raise GovernanceTampered(
            f"{what} is accessible by group/others (mode {oct(st.st_mode & 0o777)})",
            str(p),
            f"chmod {'700' if p.is_dir() else '600'} {p}",
        )


def verified_governance(path: str | Path | None = None) -> Governance:
    """Governance as the promotion worker (and every admin command) must see it: file and directory owned by this uid
    and private, the audit log intact up to its anchored head, and the file's digest equal to the one in the latest
    signed admin entry. Raises GovernanceTampered naming the divergence."""
    from llmops.governance.policy import load_governance

    g = load_governance(path, required=True)
    _private_path(g.path, "the governance file")
    _private_path(g.home, "the governance directory")
    store = GovernanceStore(g.state_db)
    entries = verified_entries(g, store)
    admin = [e for e in entries if e.get("action") == "governance"]
    if not admin:
        raise GovernanceTampered(
            "the audit log holds no signed governance entry",
            str(g.audit_log),
            "an admin runs `llmops governance adopt --reason ...` to sign the file in force",
        )
    want, have = admin[-1].get("governance") or admin[-1].get("policy", ""), g.digest()
    if not have.startswith(want) or len(want) < 16:
        fields = store.diff(want, g) or ["(no snapshot of the audited version to compare)"]
        raise GovernanceTampered(
            f"the governance file was changed outside `llmops` (digest {have[:16]}, audited {want[:16]} at audit "
            f"entry {admin[-1]['seq']}; differs in: {', '.join(fields)})",
            str(g.path),
            "undo the edit (`llmops governance restore`), or make the change with `llmops governance set`/`users` "
            "commands; an admin may sign the file as it is with `llmops governance adopt --reason ...`",
        )
    return g


def verified_entries(g: Governance, store: GovernanceStore | None = None) -> list[dict]:
    """The audit log's entries after checking signatures, chain and the head anchored in the governance store."""
    store = store or GovernanceStore(g.state_db)
    verify_audit_log(g.audit_log, g.audit.public_key, head=store.audit_head())
    return AuditLog.for_governance(g).entries()


# ------------------------------------------------------------------------------------- approval codes


def approval_subject(action: str, model: str, version: str) -> str:
    """What an approver signs besides the run: the flow checks it against what it will really do, so a display
    forged through the Prefect API (run parameters, artifacts) cannot get a signature for something else."""
    return f"{action} {model} v{version}"


def approval_message(run_id: str, subject: str, approve: bool, challenge: str, expires: int) -> bytes:
    """The bytes a release manager signs: this run, this *execution* of it (a fresh CSPRNG challenge the flow draws
    when it starts and shows on the form), the subject, the decision, and when the code stops being valid. A run
    forced back to Scheduled and executed again draws another challenge, so sniffed codes approve nothing."""
    return (
        f"{APPROVAL_DOMAIN}\n{run_id}\n{challenge}\n{int(expires)}\n{subject}\n{'approve' if approve else 'reject'}"
    ).encode()


def approval_code(key, run_id: str, subject: str, approve: bool = True, challenge: str = "", expires: int = 0) -> str:
    """What `llmops approval-code RUN_ID` prints: valid for this execution, subject and decision only, once."""
    return sign(key, approval_message(str(run_id), subject, approve, challenge, expires))


CHALLENGE_ARTIFACT = "approval-challenge"


def challenge_markdown(run_id: str, challenge: str, expires: int) -> str:
    return (
        f"Approval challenge for flow run `{run_id}` (this execution only): `llmops-challenge {run_id} {challenge} "
        f"{int(expires)}`. Codes from `llmops approval-code` sign it; they expire at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))}."
    )


def parse_challenge(markdown: str, run_id: str) -> tuple[str, int] | None:
    m = re.search(r"llmops-challenge (\S+) ([0-9a-f]{32}) ([0-9]+)", markdown or "")
    return (m[2], int(m[3])) if m and m[1] == str(run_id) else None


# ------------------------------------------------------------------------------------------ requests

_NONCE = re.compile(r"[0-9a-f]{32}")


def make_request(key, user: str, action: str, model: str, version: str, **extra) -> str:
    """A signed, single-use promotion/rollback request (passed to the flow as its `request` parameter)."""
    body = {
        "v": 1,
        "user": user,
        "action": action,
        "model": model,
        "version": str(version),
        "nonce": secrets.token_hex(16),
        "ts": int(time.time()),
        **extra,
    }
    body["sig"] = sign(key, _request_message(body))
    return json.dumps(body, sort_keys=True)


def _request_message(body: dict) -> bytes:
    unsigned = {k: v for k, v in body.items() if k != "sig"}
    return (REQUEST_DOMAIN + "\n" + json.dumps(unsigned, sort_keys=True, separators=(",", ":"))).encode()


def verify_request(g: Governance, store: GovernanceStore, request: str, action: str, model: str, version: str) -> dict:
    """The verified request body; raises AccessDenied. Consumes (user, nonce): whatever the JSON or signature text
    looks like, one signed request starts one run, once."""
    where = f"promotion request for {model} v{version}"
    try:
        body = json.loads(request or "")
        user = body["user"]
        if not isinstance(user, str) or not isinstance(body.get("nonce"), str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise AccessDenied(
            "the request is not a signed llmops request",
            where,
            "start promotions with `llmops promote --requested-by YOU --key-file YOUR.key`",
        ) from None
    pub = g.users[user].public_key if user in g.users else None
    if not _NONCE.fullmatch(body["nonce"]) or not verify_signature(pub, _request_message(body), body.get("sig", "")):
        raise AccessDenied(
            f"request signature does not verify for user '{user}'",
            where,
            "sign with your own key (`--key-file`); an admin enrols users with `llmops users add`",
        )
    if (body.get("action"), body.get("model"), str(body.get("version"))) != (action, model, str(version)):
        raise AccessDenied(
            f"the request was signed for {body.get('action')} of {body.get('model')} v{body.get('version')}",
            where,
            "sign a request for this action and version",
        )
    try:
        age = time.time() - float(body.get("ts", 0))
    except (TypeError, ValueError):
        age = float("inf")
    if not -60 <= age <= g.approvals.request_max_age_s:
        raise AccessDenied(
            f"the request is {age:.0f} s old (limit {g.approvals.request_max_age_s} s)", where, "sign a fresh request"
        )
    perm = f"request-{'promotion' if action == 'promote' else 'rollback'}"
    if not g.can(user, perm):
        raise AccessDenied(
            f"user '{user}' lacks permission '{perm}'", str(g.path), "ask an admin to grant a role with that action"
        )
    if not store.consume("request", f"{user}\n{body['nonce']}", user, body["nonce"]):
        raise AccessDenied("this signed request was already used", where, "sign a new request")
    return body


def verify_approval(
    g: Governance,
    store: GovernanceStore,
    *,
    run_id: str,
    approver: str,
    code: str,
    approve: bool,
    action: str,
    requested_by: str,
    subject: str,
    challenge: str,
    expires: int,
) -> None:
    """Raise AccessDenied (a reason safe to log and audit) unless `approver` signed this decision for this execution
    of this run and this subject, before it expired, may approve `action`, is not the requester, and has not decided
    in this execution before (consumed by approver + run + challenge, never by the code's text)."""
    if time.time() > expires:
        raise AccessDenied(
            "the approval window of this run has closed", f"flow run {run_id}", "request the promotion again"
        )
    pub = g.users[approver].public_key if approver in g.users else None
    if not verify_signature(pub, approval_message(run_id, subject, approve, challenge, expires), code):
        raise AccessDenied(
            f"invalid approver or code (for {subject}, {'approve' if approve else 'reject'})",
            f"approver '{approver}'",
            f"compute the code with `llmops approval-code {run_id}` {'' if approve else '--reject '}and your key",
        )
    perm = f"approve-{'promotion' if action == 'promote' else 'rollback'}"
    if not g.can(approver, perm):
        raise AccessDenied(
            f"user '{approver}' lacks permission '{perm}'", str(g.path), "ask an admin to grant a role with that action"
        )
    if approver == requested_by:
        raise AccessDenied(
            f"'{approver}' requested this {action} and cannot also approve it",
            "separation of duties",
            "another release manager must approve",
        )
    if not store.consume("approval", f"{approver}\n{run_id}\n{challenge}", approver, run_id):
        raise AccessDenied(
            "this approver already decided in this run",
            f"approver '{approver}'",
            "each code works once; one decision per person per run",
        )


def submission_delay(bad_submissions: int, free: int, cap_s: float) -> float:
    """Seconds a run waits before it accepts the next form after `bad_submissions` invalid ones: the first `free`
    cost nothing, then the wait doubles up to `cap_s` (at most 64 s: a brake on noise, not a lock). Per run (the only source Prefect's form lets us see), never
    per approver identity, so junk typed into one form locks nobody out of anything."""
    over = bad_submissions - free
    return 0.0 if over < 0 else float(min(cap_s, 64, 2 ** min(over, 6)))
