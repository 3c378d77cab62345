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
import hashlib
import json
import os
import re
import secrets
import socket
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmops.errors import LLMOpsError
from llmops.files import exclusive_lock, pid_alive
from llmops.governance import Governance

APPROVAL_DOMAIN = "llmops-approval-v2"
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


_SIG_TEXT = re.compile(r"[A-Za-z0-9_-]{86}")


def decode_signature(text) -> bytes | None:
    """The 64 signature bytes of `text`, or None unless `text` is *the* canonical encoding of them: unpadded
    base64url, exactly 86 characters of the url-safe alphabet, zero trailing bits. So `sig+"="`, `+/` for `-_`,
    whitespace or a changed padding bit are not "another" code that verifies: there is one text per signature."""
    if not isinstance(text, str) or not _SIG_TEXT.fullmatch(text):
        return None
    raw = base64.urlsafe_b64decode(text + "==")
    return raw if len(raw) == 64 and _b64url(raw) == text else None


def decode_public_key(text) -> bytes | None:
    """The 32 raw bytes of an enrolled public key (standard base64, strict), or None."""
    try:
        raw = base64.b64decode(text or "", validate=True)
    except (ValueError, TypeError):
        return None
    return raw if len(raw) == 32 and base64.b64encode(raw).decode() == text else None


def sign(key, message: bytes) -> str:
    return _b64url(key.sign(message))


def verify_signature(public_key_b64: str | None, message: bytes, signature: str) -> bool:
    """Strict: a non-canonical encoding of a valid signature is refused (see `decode_signature`)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw_sig, raw_pub = decode_signature(signature), decode_public_key(public_key_b64)
    if raw_sig is None or raw_pub is None:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(raw_pub).verify(raw_sig, message)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


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
    commit_governance(g, "governance-created")
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
    commit_governance(g, "user-enrolled", user=name, roles=sorted(set(roles)))
    return pem


def commit_governance(g: Governance, decision: str, **entry) -> dict:
    """The one way governance changes: write the file, keep a snapshot of it beside the governance store, and sign an
    admin entry carrying its full digest into the audit log. The promotion worker refuses a governance file whose
    digest is not the one in the latest such entry (`verified_governance`), so a hand edit is detected, not obeyed."""
    g.save()
    store = GovernanceStore(g.state_db)
    store.snapshot(g.digest(), json.dumps(g.model_dump(mode="json"), sort_keys=True))
    return AuditLog.for_governance(g).append(action="governance", decision=decision, policy=g.digest()[:16],
                                             governance=g.digest(), by=actor(), **entry)


class GovernanceTampered(LLMOpsError):
    """The governance file is not the one the signed audit log last recorded, or others can read/write it."""


def _private_path(p: Path, what: str) -> None:
    st = p.stat()
    if st.st_uid != os.geteuid():
        raise GovernanceTampered(f"{what} is owned by uid {st.st_uid}, not by this worker (uid {os.geteuid()})",
                                 str(p), "chown it to the admin / promotion worker user, or run as its owner")
    if st.st_mode & 0o077:
        raise GovernanceTampered(f"{what} is accessible by group/others (mode {oct(st.st_mode & 0o777)})", str(p),
                                 f"chmod {'700' if p.is_dir() else '600'} {p}")


def verified_governance(path: str | Path | None = None) -> Governance:
    """Governance as the promotion worker (and every admin command) must see it: file and directory owned by this uid
    and private, the audit log intact up to its anchored head, and the file's digest equal to the one in the latest
    signed admin entry. Raises GovernanceTampered naming the divergence."""
    from llmops.governance import load_governance

    g = load_governance(path, required=True)
    _private_path(g.path, "the governance file")
    _private_path(g.home, "the governance directory")
    store = GovernanceStore(g.state_db)
    entries = verified_entries(g, store)
    admin = [e for e in entries if e.get("action") == "governance"]
    if not admin:
        raise GovernanceTampered("the audit log holds no signed governance entry", str(g.audit_log),
                                 "an admin runs `llmops governance adopt --reason ...` to sign the file in force")
    want, have = admin[-1].get("governance") or admin[-1].get("policy", ""), g.digest()
    if not have.startswith(want) or len(want) < 16:
        fields = store.diff(want, g) or ["(no snapshot of the audited version to compare)"]
        raise GovernanceTampered(
            f"the governance file was changed outside `llmops` (digest {have[:16]}, audited {want[:16]} at audit "
            f"entry {admin[-1]['seq']}; differs in: {', '.join(fields)})", str(g.path),
            "undo the edit (`llmops governance restore`), or make the change with `llmops governance set`/`users` "
            "commands; an admin may sign the file as it is with `llmops governance adopt --reason ...`")
    return g


def verified_entries(g: Governance, store: "GovernanceStore | None" = None) -> list[dict]:
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
    return (f"{APPROVAL_DOMAIN}\n{run_id}\n{challenge}\n{int(expires)}\n{subject}\n"
            f"{'approve' if approve else 'reject'}").encode()


def approval_code(key, run_id: str, subject: str, approve: bool = True, challenge: str = "",
                  expires: int = 0) -> str:
    """What `llmops approval-code RUN_ID` prints: valid for this execution, subject and decision only, once."""
    return sign(key, approval_message(str(run_id), subject, approve, challenge, expires))


CHALLENGE_ARTIFACT = "approval-challenge"


def challenge_markdown(run_id: str, challenge: str, expires: int) -> str:
    return (f"Approval challenge for flow run `{run_id}` (this execution only): `llmops-challenge {run_id} {challenge} "
            f"{int(expires)}`. Codes from `llmops approval-code` sign it; they expire at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))}.")


def parse_challenge(markdown: str, run_id: str) -> tuple[str, int] | None:
    m = re.search(r"llmops-challenge (\S+) ([0-9a-f]{32}) ([0-9]+)", markdown or "")
    return (m[2], int(m[3])) if m and m[1] == str(run_id) else None


# ------------------------------------------------------------------------------------------ requests

_NONCE = re.compile(r"[0-9a-f]{32}")


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
    """The verified request body; raises AccessDenied. Consumes (user, nonce): whatever the JSON or signature text
    looks like, one signed request starts one run, once."""
    where = f"promotion request for {model} v{version}"
    try:
        body = json.loads(request or "")
        user = body["user"]
        if not isinstance(user, str) or not isinstance(body.get("nonce"), str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise AccessDenied("the request is not a signed llmops request", where,
                           "start promotions with `llmops promote --requested-by YOU --key-file YOUR.key`") from None
    pub = g.users[user].public_key if user in g.users else None
    if not _NONCE.fullmatch(body["nonce"]) or not verify_signature(pub, _request_message(body), body.get("sig", "")):
        raise AccessDenied(f"request signature does not verify for user '{user}'", where,
                           "sign with your own key (`--key-file`); an admin enrols users with `llmops users add`")
    if (body.get("action"), body.get("model"), str(body.get("version"))) != (action, model, str(version)):
        raise AccessDenied(f"the request was signed for {body.get('action')} of {body.get('model')} "
                           f"v{body.get('version')}", where, "sign a request for this action and version")
    try:
        age = time.time() - float(body.get("ts", 0))
    except (TypeError, ValueError):
        age = float("inf")
    if not -60 <= age <= g.approvals.request_max_age_s:
        raise AccessDenied(f"the request is {age:.0f} s old (limit {g.approvals.request_max_age_s} s)", where,
                           "sign a fresh request")
    perm = f"request-{'promotion' if action == 'promote' else 'rollback'}"
    if not g.can(user, perm):
        raise AccessDenied(f"user '{user}' lacks permission '{perm}'", str(g.path),
                           "ask an admin to grant a role with that action")
    if not store.consume("request", f"{user}\n{body['nonce']}", user, body["nonce"]):
        raise AccessDenied("this signed request was already used", where, "sign a new request")
    return body


# ------------------------------------------------------------------------------ governance-side state


class GovernanceStore:
    """Governance-side state in SQLite beside the governance file (worker only): consumed requests, approvals and
    flow-run executions; promotion intents; the audit chain's head; snapshots of audited governance; the target
    debris journal. Every read-modify-write runs under BEGIN IMMEDIATE (one writer at a time, reads included)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._tx() as db:
            db.execute("CREATE TABLE IF NOT EXISTS used (digest TEXT PRIMARY KEY, kind TEXT, user TEXT, scope TEXT, "
                       "ts REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS intents (run_id TEXT PRIMARY KEY, pid INTEGER, host TEXT, "
                       "body TEXT, ts REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER, "
                       "hash TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS snapshots (digest TEXT PRIMARY KEY, body TEXT, ts REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS debris (path TEXT PRIMARY KEY, kind TEXT, final TEXT, pid INTEGER, "
                       "host TEXT, ts REAL)")
        os.chmod(self.path, 0o600)

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
        """True the first time (kind, token) is seen, False ever after. Tokens are canonical identities (user +
        nonce, approver + run + challenge, run id), never an encoding of a signature."""
        digest = hashlib.sha256(f"{kind}\n{token}".encode()).hexdigest()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM used WHERE digest=?", (digest,)).fetchone():
                return False
            db.execute("INSERT INTO used VALUES (?,?,?,?,?)", (digest, kind, user, scope, time.time()))
            return True

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

    # the audit chain's head: written inside the audit log's lock after every append
    def set_audit_head(self, seq: int, h: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO audit_head VALUES (1, ?, ?)", (seq, h))

    def audit_head(self) -> tuple[int, str] | None:
        with self._tx() as db:
            row = db.execute("SELECT seq, hash FROM audit_head WHERE id=1").fetchone()
        return (int(row[0]), row[1]) if row else None

    # snapshots of each audited governance (to name what a hand edit changed, and to restore)
    def snapshot(self, digest: str, body: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO snapshots VALUES (?,?,?)", (digest, body, time.time()))

    def snapshot_body(self, digest_prefix: str) -> dict | None:
        with self._tx() as db:
            row = db.execute("SELECT body FROM snapshots WHERE digest LIKE ? ORDER BY ts DESC",
                             (digest_prefix + "%",)).fetchone()
        return json.loads(row[0]) if row else None

    def diff(self, digest_prefix: str, g: Governance) -> list[str]:
        old = self.snapshot_body(digest_prefix)
        if old is None:
            return []
        return _diff_paths(old, g.model_dump(mode="json"))

    # the debris journal: the only names a target publisher ever renames or removes are the ones it recorded here
    def record_debris(self, path: Path, kind: str, final: str = "") -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO debris VALUES (?,?,?,?,?,?)",
                       (str(path), kind, final, os.getpid(), socket.gethostname(), time.time()))

    def forget_debris(self, path: Path) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM debris WHERE path=?", (str(path),))

    def debris_under(self, root: Path) -> list[dict]:
        """Recorded debris directly under `root` whose publishing process is gone (on this host)."""
        with self._tx() as db:
            rows = db.execute("SELECT path, kind, final, pid, host FROM debris").fetchall()
        return [{"path": Path(p), "kind": k, "final": f} for p, k, f, pid, h in rows
                if Path(p).parent == Path(root) and not (h == socket.gethostname() and pid_alive(pid))]


def _diff_paths(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_paths(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "(root)"]


def verify_approval(g: Governance, store: GovernanceStore, *, run_id: str, approver: str, code: str, approve: bool,
                    action: str, requested_by: str, subject: str, challenge: str, expires: int) -> None:
    """Raise AccessDenied (a reason safe to log and audit) unless `approver` signed this decision for this execution
    of this run and this subject, before it expired, may approve `action`, is not the requester, and has not decided
    in this execution before (consumed by approver + run + challenge, never by the code's text)."""
    if time.time() > expires:
        raise AccessDenied("the approval window of this run has closed", f"flow run {run_id}",
                           "request the promotion again")
    pub = g.users[approver].public_key if approver in g.users else None
    if not verify_signature(pub, approval_message(run_id, subject, approve, challenge, expires), code):
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
    if not store.consume("approval", f"{approver}\n{run_id}\n{challenge}", approver, run_id):
        raise AccessDenied("this approver already decided in this run", f"approver '{approver}'",
                           "each code works once; one decision per person per run")


def submission_delay(bad_submissions: int, free: int, cap_s: float) -> float:
    """Seconds a run waits before it accepts the next form after `bad_submissions` invalid ones: the first `free`
    cost nothing, then the wait doubles up to `cap_s` (at most 64 s: a brake on noise, not a lock). Per run (the only source Prefect's form lets us see), never
    per approver identity, so junk typed into one form locks nobody out of anything."""
    over = bad_submissions - free
    return 0.0 if over < 0 else float(min(cap_s, 64, 2 ** min(over, 6)))


# ----------------------------------------------------------------------------------------------- audit


def _canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditLog:
    """Append-only, signed, hash-chained JSON lines. `append` returns the entry with its `seq` and line `hash`
    (the anchor to store outside the file)."""

    def __init__(self, path: str | Path, signing_key_path: str | Path | None = None,
                 head_db: str | Path | None = None):
        self.path = Path(path)
        self.key_path = Path(signing_key_path) if signing_key_path else None
        self.head_db = Path(head_db) if head_db else None  # GovernanceStore holding the anchored chain head

    @classmethod
    def for_governance(cls, g: Governance) -> "AuditLog":
        return cls(g.audit_log, g.resolve(g.audit.signing_key), g.state_db)

    @contextmanager
    def _locked(self):
        with exclusive_lock(self.path.with_name(self.path.name + ".lock"), 0o600):
            yield

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
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
            try:
                os.write(fd, line + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            if self.head_db is not None:  # anchor every append (admin entries too): truncation is then detected
                GovernanceStore(self.head_db).set_audit_head(record["seq"], line_hash(line))
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


def verify_audit_log(path: str | Path, public_key: str, anchors: list[tuple[int, str, str]] = (),
                     head: tuple[int, str] | None = None) -> int:
    """Number of entries if every line parses, is signed by the audit key, chains to the previous line and every
    external anchor (seq, line hash, where it was found) matches. Raises AuditTampered naming `file:line`."""
    p = Path(path)
    if not public_key:
        raise AuditTampered("no audit public key in governance", "governance audit.public_key",
                            "an admin runs `llmops governance init`")
    lines = p.read_bytes().split(b"\n") if p.exists() else []
    if lines and lines[-1] == b"":
        lines.pop()
    if head is not None:  # the chain head the governance store recorded at the last append
        anchors = [*anchors, (head[0], head[1], "the governance store's audit head")]
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
                                f"{'the registry (' + source + ')' if 'store' not in source else source}", str(p), "restore the log from backup and investigate")
        if hashes[seq] != h:
            raise AuditTampered(f"entry {seq} differs from its registry anchor ({source})", f"{p}:{seq}",
                                "restore the log from backup and investigate")
    return len(lines)


# ------------------------------------------------------------------------------------ releases, from the log


@dataclass
class ReleaseState:
    """What the signed audit log says is released for one model: the promotion stack (each audited promotion pushes,
    each audited rollback pops), and per target the version its pointer must name."""

    model: str
    stack: list[str]
    targets: dict[str, str]
    seq: int  # the last audit entry that changed it (0 = never released)

    @property
    def production(self) -> str | None:
        return self.stack[-1] if self.stack else None

    @property
    def previous(self) -> str | None:
        return self.stack[-2] if len(self.stack) > 1 else None

    @property
    def promoted(self) -> set[str]:
        return set(self.stack)


def release_state(entries: list[dict], model: str) -> ReleaseState:
    """Replay the audit log: MLflow aliases and targets' `current.json` are caches of this, never its source."""
    st = ReleaseState(model, [], {}, 0)
    for e in entries:
        if e.get("model") != model:
            continue
        v = str(e.get("version"))
        if (e.get("action"), e.get("decision")) == ("promote", "promoted"):
            if not st.stack or st.stack[-1] != v:
                st.stack.append(v)
        elif (e.get("action"), e.get("decision")) == ("rollback", "rolled-back"):
            if st.stack:
                st.stack.pop()
            if not st.stack or st.stack[-1] != v:
                st.stack.append(v)
        else:
            continue
        st.seq = int(e.get("seq", 0))
        for t in e.get("targets") or []:
            st.targets[t] = v
    return st


def release_divergences(st: ReleaseState, aliases: dict[str, str | None],
                        pointers: dict[str, str | None]) -> list[str]:
    """How the caches (MLflow aliases, target pointers) differ from the log; empty = they agree."""
    out = []
    for alias, want in (("production", st.production), ("previous", st.previous)):
        if alias in aliases and aliases[alias] != want:
            out.append(f"MLflow {st.model}@{alias} is {_v(aliases[alias])} but the signed audit log says {_v(want)}")
    for t, have in pointers.items():  # a target the log never published this model to must point nowhere
        if have != st.targets.get(t):
            out.append(f"target '{t}' points {st.model} at {_v(have)} but the signed audit log says "
                       f"{_v(st.targets.get(t))}")
    return out


def _v(x) -> str:
    return f"v{x}" if x else "nothing"
