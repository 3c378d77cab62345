"""Access control for open-source Prefect: users → roles → actions, hashed credentials, separation of duties,
and a tamper-evident audit log.

OSS Prefect has one shared basic-auth string and no RBAC, so approvals are authenticated here:
- the roles file (YAML) maps users to roles and stores only PBKDF2-SHA256 hashes of their credentials
  (`llmops users add NAME --role release-manager` writes one; the secret is read from a prompt or stdin);
- verification recomputes the hash and compares in constant time; unknown users cost the same as known ones;
- every decision is appended to an audit log (JSON lines, each line chained to the previous line's sha256,
  so an edited or deleted line is detected by `verify_audit_log`). Credentials never reach logs or the audit.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmops.errors import LLMOpsError
from llmops.files import write_text_atomic

ACTIONS = ("trigger-training", "request-promotion", "approve-promotion", "rollback")
DEFAULT_ROLES = {
    "ml-engineer": ["trigger-training", "request-promotion"],
    "release-manager": ["approve-promotion", "rollback"],
    "admin": list(ACTIONS),
}
ITERATIONS = 240_000  # PBKDF2-SHA256 work factor (OWASP 2023 guidance is >= 210k)


class AccessDenied(LLMOpsError):
    """Authentication or authorisation failed."""


def hash_secret(secret: str, iterations: int = ITERATIONS) -> str:
    if len(secret) < 12:
        raise LLMOpsError("credential is shorter than 12 characters", "credential", "choose a longer secret")
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", secret.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


_DUMMY = "pbkdf2_sha256$240000$AAAAAAAAAAAAAAAAAAAAAA==$" + base64.b64encode(b"\0" * 32).decode()


def check_secret(secret: str, stored: str | None) -> bool:
    """Constant-time check; an unknown user is checked against a dummy hash so timing does not reveal them."""
    algo, iters, salt, digest = (stored or _DUMMY).split("$")
    if algo != "pbkdf2_sha256":
        return False
    got = hashlib.pbkdf2_hmac("sha256", (secret or "").encode(), base64.b64decode(salt), int(iters))
    return hmac.compare_digest(got, base64.b64decode(digest)) and stored is not None


@dataclass
class Policy:
    users: dict[str, dict]
    roles: dict[str, list[str]]
    path: str = ""

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        p = Path(path)
        if not p.is_file():
            raise AccessDenied("roles file not found", str(p), "create it with `llmops users add NAME --role ROLE`")
        data = yaml.safe_load(p.read_text()) or {}
        roles = data.get("roles") or DEFAULT_ROLES
        for role, actions in roles.items():
            if bad := sorted(set(actions) - set(ACTIONS)):
                raise AccessDenied(f"role '{role}' names unknown actions {bad}", str(p), f"use {list(ACTIONS)}")
        return cls(users=data.get("users") or {}, roles=roles, path=str(p))

    def save(self) -> None:
        write_text_atomic(self.path, yaml.safe_dump({"roles": self.roles, "users": self.users}, sort_keys=True),
                          mode=0o600)

    def add_user(self, name: str, roles: list[str], secret: str) -> None:
        if unknown := sorted(set(roles) - set(self.roles)):
            raise LLMOpsError(f"unknown roles {unknown}", self.path, f"use one of {sorted(self.roles)}")
        self.users[name] = {"roles": sorted(roles), "credential": hash_secret(secret)}

    def can(self, user: str, action: str) -> bool:
        roles = (self.users.get(user) or {}).get("roles", [])
        return any(action in self.roles.get(r, []) for r in roles)


def authorize(policy: Policy, user: str, secret: str, action: str, requested_by: str | None = None) -> None:
    """Raise AccessDenied (with a reason safe to log) unless `user` proves identity and may do `action`."""
    ok = check_secret(secret, (policy.users.get(user) or {}).get("credential"))
    if not ok:
        raise AccessDenied("invalid user or credential", f"approver '{user}'", "check the name and credential")
    if not policy.can(user, action):
        raise AccessDenied(f"user '{user}' lacks permission '{action}'", policy.path,
                           "ask an admin to grant a role with that action")
    if requested_by and user == requested_by:
        raise AccessDenied(f"'{user}' requested this promotion and cannot also approve it", "separation of duties",
                           "another release manager must approve")


class AuditLog:
    """Append-only JSON lines; each entry carries the sha256 of the previous line (tamper evidence)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, **entry) -> dict:
        assert "credential" not in entry and "secret" not in entry, "credentials never enter the audit log"
        prev = "0" * 64
        if self.path.exists():
            lines = self.path.read_bytes().splitlines()
            if lines:
                prev = hashlib.sha256(lines[-1]).hexdigest()
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry, "prev": prev}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return record

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]


def verify_audit_log(path: str | Path) -> int:
    """Number of entries if the chain is intact; raises LLMOpsError naming the first broken line."""
    prev = "0" * 64
    lines = Path(path).read_bytes().splitlines() if Path(path).exists() else []
    for n, line in enumerate(lines, 1):
        if json.loads(line).get("prev") != prev:
            raise LLMOpsError("audit log chain broken (edited or deleted entry)", f"{path}:{n}",
                              "investigate; restore the log from backup")
        prev = hashlib.sha256(line).hexdigest()
    return len(lines)
