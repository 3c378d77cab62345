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

import base64
import fcntl
import hashlib
import json
import os
import secrets
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from llmops.errors import LLMOpsError
from llmops.files import pid_alive
from llmops.governance import Governance

APPROVAL_DOMAIN = "llmops-approval-v1"
REQUEST_DOMAIN = "llmops-request-v1"
GENESIS = "0" * 64


class AccessDenied(LLMOpsError):
    """Authentication or authorisation failed."""


class AuditTampered(LLMOpsError):
    """The audit trail does not verify."""


# ---------------------------------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[str, str]:
    """(private key PEM, public key base64). The private half is shown once and never stored by llmops."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, base64.b64encode(pub).decode()


def load_private_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization

    p = Path(path).expanduser()
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except FileNotFoundError:
        raise AccessDenied("key file not found", str(p), "pass the key file `llmops users add` gave you") from None
    except (ValueError, TypeError):
        raise AccessDenied("not an llmops private key (ed25519 PEM)", str(p),
                           "pass the key file `llmops users add` gave you") from None
    if p.stat().st_mode & 0o077:
        raise AccessDenied("private key file is readable by others", str(p), f"chmod 600 {p}")
    return key


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def _unb64url(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def sign(key, message: bytes) -> str:
    return _b64url(key.sign(message))


def verify_signature(public_key_b64: str | None, message: bytes, signature: str) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        pub = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64 or ""))
        pub.verify(_unb64url((signature or "").strip()), message)
        return True
    except (InvalidSignature, ValueError, TypeError, AttributeError):
        return False


# --------------------------------------------------------------------------------- governance admin


def init_governance(path: str | Path | None = None) -> Governance:
    """Create the governance file (default roles, no users) and the audit signing key, both mode 600."""
    from llmops.files import write_text_atomic
    from llmops.governance import load_governance

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
    g.save()
    return g


def enrol_user(g: Governance, name: str, roles: list[str]) -> str:
    """Add or re-key `name`; returns the private key PEM (shown once, never stored by llmops)."""
    from llmops.governance import User

    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise LLMOpsError(f"invalid user name '{name}'", "llmops users add", "use letters, digits, - _ .")
    if unknown := sorted(set(roles) - set(g.roles)):
        import difflib

        hint = difflib.get_close_matches(unknown[0], list(g.roles), n=1)
        raise LLMOpsError(f"unknown roles {unknown}" + (f" (did you mean '{hint[0]}'?)" if hint else ""),
                          str(g.path), f"use one of {sorted(g.roles)}")
    pem, pub = generate_keypair()
    g.users[name] = User(roles=sorted(set(roles)), public_key=pub)
    g.save()
    return pem


# ------------------------------------------------------------------------------------- approval codes


def approval_subject(action: str, model: str, version: str) -> str:
    """What an approver signs besides the run: the flow checks it against what it will really do, so a display
    forged through the Prefect API (run parameters, artifacts) cannot get a signature for something else."""
    return f"{action} {model} v{version}"


def approval_message(run_id: str, subject: str, approve: bool) -> bytes:
    return f"{APPROVAL_DOMAIN}\n{run_id}\n{subject}\n{'approve' if approve else 'reject'}".encode()


def approval_code(key, run_id: str, subject: str, approve: bool = True) -> str:
    """What `llmops approval-code RUN_ID` prints: valid for this run, this subject and this decision only, once."""
    return sign(key, approval_message(str(run_id), subject, approve))


# ------------------------------------------------------------------------------------------ requests


def make_request(key, user: str, action: str, model: str, version: str, **extra) -> str:
    """A signed, single-use promotion/rollback request (passed to the flow as its `request` parameter)."""
    body = {"v": 1, "user": user, "action": action, "model": model, "version": str(version),
            "nonce": secrets.token_hex(16), "ts": int(time.time()), **extra}
    body["sig"] = sign(key, _request_message(body))
    return json.dumps(body, sort_keys=True)


def _request_message(body: dict) -> bytes:
    unsigned = {k: v for k, v in body.items() if k != "sig"}
    return (REQUEST_DOMAIN + "\n" + json.dumps(unsigned, sort_keys=True, separators=(",", ":"))).encode()


def verify_request(g: Governance, store: "GovernanceStore", request: str, action: str, model: str,
                   version: str) -> dict:
    """The verified request body; raises AccessDenied. Consumes the nonce (a request starts one run, once)."""
    where = f"promotion request for {model} v{version}"
    try:
        body = json.loads(request or "")
        user = body["user"]
    except (ValueError, KeyError, TypeError):
        raise AccessDenied("the request is not a signed llmops request", where,
                           "start promotions with `llmops promote --requested-by YOU --key-file YOUR.key`") from None
    pub = g.users[user].public_key if user in g.users else None
    if not verify_signature(pub, _request_message(body), body.get("sig", "")):
        raise AccessDenied(f"request signature does not verify for user '{user}'", where,
                           "sign with your own key (`--key-file`); an admin enrols users with `llmops users add`")
    if (body.get("action"), body.get("model"), str(body.get("version"))) != (action, model, str(version)):
        raise AccessDenied(f"the request was signed for {body.get('action')} of {body.get('model')} "
                           f"v{body.get('version')}", where, "sign a request for this action and version")
    age = time.time() - float(body.get("ts", 0))
    if not -60 <= age <= g.approvals.request_max_age_s:
        raise AccessDenied(f"the request is {int(age)} s old (limit {g.approvals.request_max_age_s} s)", where,
                           "sign a fresh request")
    perm = f"request-{'promotion' if action == 'promote' else 'rollback'}"
    if not g.can(user, perm):
        raise AccessDenied(f"user '{user}' lacks permission '{perm}'", str(g.path),
                           "ask an admin to grant a role with that action")
    if not store.consume("request", body["sig"], user, body["nonce"]):
        raise AccessDenied("this signed request was already used", where, "sign a new request")
    return body


# ------------------------------------------------------------------------------ governance-side state


class GovernanceStore:
    """Used codes, per-identity failures and promotion intents, in SQLite beside the governance file.
    Every read-modify-write runs under BEGIN IMMEDIATE (one writer at a time, reads included)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS used (digest TEXT PRIMARY KEY, kind TEXT, user TEXT, scope TEXT, "
                       "ts REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS failures (user TEXT, ts REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS intents (run_id TEXT PRIMARY KEY, pid INTEGER, host TEXT, "
                       "body TEXT, ts REAL)")

    @contextmanager
    def _tx(self):
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def consume(self, kind: str, token: str, user: str, scope: str) -> bool:
        """True the first time this token is seen, False ever after."""
        digest = hashlib.sha256(f"{kind}\n{token.strip()}".encode()).hexdigest()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM used WHERE digest=?", (digest,)).fetchone():
                return False
            db.execute("INSERT INTO used VALUES (?,?,?,?,?)", (digest, kind, user, scope, time.time()))
            return True

    def locked_until(self, user: str, max_failures: int, window_s: int) -> float | None:
        with self._tx() as db:
            rows = [r[0] for r in db.execute("SELECT ts FROM failures WHERE user=? AND ts>? ORDER BY ts",
                                             (user, time.time() - window_s))]
        return rows[-max_failures] + window_s if len(rows) >= max_failures else None

    def fail(self, user: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO failures VALUES (?,?)", (user, time.time()))

    def begin_intent(self, run_id: str, body: dict) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO intents VALUES (?,?,?,?,?)",
                       (run_id, os.getpid(), socket.gethostname(), json.dumps(body), time.time()))

    def end_intent(self, run_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM intents WHERE run_id=?", (run_id,))

    def dead_intents(self) -> list[dict]:
        """Intents of promotions whose process died (SIGKILL, OOM, reboot) on this host."""
        with self._tx() as db:
            rows = db.execute("SELECT run_id, pid, host, body FROM intents").fetchall()
        return [{"run_id": r, "pid": p, **json.loads(b)} for r, p, h, b in rows
                if h == socket.gethostname() and not pid_alive(p)]


def verify_approval(g: Governance, store: GovernanceStore, *, run_id: str, approver: str, code: str, approve: bool,
                    action: str, requested_by: str, subject: str) -> None:
    """Raise AccessDenied (a reason safe to log and audit) unless `approver` signed this decision for this run and
    this subject (`approval_subject`), may approve `action`, is not the requester, and the code was never used."""
    pol = g.approvals
    if until := store.locked_until(approver, pol.max_failures_per_approver, pol.lockout_s):
        raise AccessDenied(f"'{approver}' is locked out for {int(until - time.time())} s after "
                           f"{pol.max_failures_per_approver} invalid codes", "approval",
                           "wait, or ask an admin to check the audit log for an attack on this identity")
    pub = g.users[approver].public_key if approver in g.users else None
    if not verify_signature(pub, approval_message(run_id, subject, approve), code):
        store.fail(approver)
        raise AccessDenied(f"invalid approver or code (for {subject}, {'approve' if approve else 'reject'})",
                           f"approver '{approver}'", f"compute the code with `llmops approval-code {run_id}` "
                           f"{'' if approve else '--reject '}and your key")
    perm = f"approve-{'promotion' if action == 'promote' else 'rollback'}"
    if not g.can(approver, perm):
        raise AccessDenied(f"user '{approver}' lacks permission '{perm}'", str(g.path),
                           "ask an admin to grant a role with that action")
    if approver == requested_by:
        raise AccessDenied(f"'{approver}' requested this {action} and cannot also approve it", "separation of duties",
                           "another release manager must approve")
    if not store.consume("approval", code, approver, run_id):
        raise AccessDenied("this approval code was already used", f"approver '{approver}'",
                           "each code works once; one approval per person per run")


# ----------------------------------------------------------------------------------------------- audit


def _canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditLog:
    """Append-only, signed, hash-chained JSON lines. `append` returns the entry with its `seq` and line `hash`
    (the anchor to store outside the file)."""

    def __init__(self, path: str | Path, signing_key_path: str | Path | None = None):
        self.path = Path(path)
        self.key_path = Path(signing_key_path) if signing_key_path else None

    @classmethod
    def for_governance(cls, g: Governance) -> "AuditLog":
        return cls(g.audit_log, g.resolve(g.audit.signing_key))

    @contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, **entry) -> dict:
        if {"credential", "secret", "code", "key"} & set(entry):
            raise ValueError("credentials and codes never enter the audit log")
        if self.key_path is None:
            raise AccessDenied("no audit signing key configured", "governance audit.signing_key",
                               "an admin runs `llmops governance init`")
        key = load_private_key(self.key_path)
        with self._locked():
            seq, prev = 0, GENESIS
            if self.path.exists() and self.path.stat().st_size:
                last = _last_line(self.path)
                try:
                    seq = int(json.loads(last)["seq"])
                except (ValueError, KeyError, TypeError):
                    raise AuditTampered("the last audit line is not a valid entry", f"{self.path}",
                                        "run `llmops audit verify`; restore the log from backup") from None
                prev = line_hash(last)
            record = {"seq": seq + 1, "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry,
                      "prev": prev}
            record["sig"] = sign(key, _canonical(record))
            line = json.dumps(record, sort_keys=True).encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        return {**record, "hash": line_hash(line)}

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _last_line(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        block = b""
        pos = size
        while pos > 0 and block.count(b"\n") < 2:
            step = min(4096, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step) + block
    return block.rstrip(b"\n").rsplit(b"\n", 1)[-1]


def verify_audit_log(path: str | Path, public_key: str, anchors: list[tuple[int, str, str]] = ()) -> int:
    """Number of entries if every line parses, is signed by the audit key, chains to the previous line and every
    external anchor (seq, line hash, where it was found) matches. Raises AuditTampered naming `file:line`."""
    p = Path(path)
    if not public_key:
        raise AuditTampered("no audit public key in governance", "governance audit.public_key",
                            "an admin runs `llmops governance init`")
    lines = p.read_bytes().split(b"\n") if p.exists() else []
    if lines and lines[-1] == b"":
        lines.pop()
    if not p.exists() and anchors:
        raise AuditTampered(f"audit log is missing, but {len(anchors)} decision(s) anchored in the registry "
                            f"reference it (e.g. {anchors[0][2]})", str(p), "restore the log from backup; investigate")
    prev, hashes = GENESIS, {}
    for n, line in enumerate(lines, 1):
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
            sig, body = rec.pop("sig"), rec
            ok_shape = isinstance(body.get("seq"), int)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AuditTampered("malformed audit line (not a signed JSON entry)", where,
                                "the log was edited; restore it from backup and investigate") from None
        if not ok_shape or body["seq"] != n:
            raise AuditTampered(f"sequence number {body.get('seq')} where {n} was expected (line inserted, deleted "
                                "or reordered)", where, "restore the log from backup and investigate")
        if body.get("prev") != prev:
            raise AuditTampered("chain broken: this line does not follow the previous one", where,
                                "restore the log from backup and investigate")
        if not verify_signature(public_key, _canonical(body), sig):
            raise AuditTampered("signature does not verify (entry edited or forged)", where,
                                "restore the log from backup and investigate")
        prev = hashes[n] = line_hash(line)
    for seq, h, source in anchors:
        if seq not in hashes:
            raise AuditTampered(f"audit log truncated: it ends at entry {len(lines)} but entry {seq} is anchored in "
                                f"the registry ({source})", str(p), "restore the log from backup and investigate")
        if hashes[seq] != h:
            raise AuditTampered(f"entry {seq} differs from its registry anchor ({source})", f"{p}:{seq}",
                                "restore the log from backup and investigate")
    return len(lines)
