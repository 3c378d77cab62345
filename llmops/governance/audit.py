"""The signed audit log, and what it says is released.

Audit entries are JSON lines with a sequence number, the sha256 of the previous line, and an ed25519 signature by the
audit key (private half readable by the promotion worker only; public half in governance, so anyone can verify). The
chain head (seq, line hash) is anchored in the governance store and on the MLflow version's decision tags: truncating
or deleting the file is detected against those anchors. Appends are serialised with an exclusive file lock.

The log is the truth for releases: `release_state` replays it; MLflow aliases and target pointers are caches that
`release_divergences` compares with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from llmops.errors import AccessDenied, AuditTampered
from llmops.files import exclusive_lock
from llmops.governance.keys import load_private_key, sign, verify_signature
from llmops.governance.policy import Governance
from llmops.governance.store import GovernanceStore

GENESIS = "0" * 64


# ----------------------------------------------------------------------------------------------- audit


def _canonical(entry: dict) -> bytes:
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class AuditLog:
    """Append-only, signed, hash-chained JSON lines. `append` returns the entry with its `seq` and line `hash`
    (the anchor to store outside the file)."""

    def __init__(self, path: str | Path, signing_key_path: str | Path | None = None, head_db: str | Path | None = None):
        self.path = Path(path)
        self.key_path = Path(signing_key_path) if signing_key_path else None
        self.head_db = Path(head_db) if head_db else None  # GovernanceStore holding the anchored chain head

    @classmethod
    def for_governance(cls, g: Governance) -> AuditLog:
        return cls(g.audit_log, g.resolve(g.audit.signing_key), g.state_db)

    @contextmanager
    def _locked(self):
        with exclusive_lock(self.path.with_name(self.path.name + ".lock"), 0o600):
            yield

    def append(self, **entry) -> dict:
        if {"credential", "secret", "code", "key"} & set(entry):
            raise ValueError("credentials and codes never enter the audit log")
        if self.key_path is None:
            raise AccessDenied(
                "no audit signing key configured",
                "governance audit.signing_key",
                "an admin runs `llmops governance init`",
            )
        key = load_private_key(self.key_path)
        with self._locked():
            seq, prev = 0, GENESIS
            if self.path.exists() and self.path.stat().st_size:
                last = _last_line(self.path)
                try:
                    seq = int(json.loads(last)["seq"])
                except (ValueError, KeyError, TypeError):
                    raise AuditTampered(
                        "the last audit line is not a valid entry",
                        f"{self.path}",
                        "run `llmops audit verify`; restore the log from backup",
                    ) from None
                prev = line_hash(last)
            record = {"seq": seq + 1, "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **entry, "prev": prev}
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


def verify_audit_log(
    path: str | Path, public_key: str, anchors: list[tuple[int, str, str]] = (), head: tuple[int, str] | None = None
) -> int:
    """Number of entries if every line parses, is signed by the audit key, chains to the previous line and every
    external anchor (seq, line hash, where it was found) matches. Raises AuditTampered naming `file:line`."""
    p = Path(path)
    if not public_key:
        raise AuditTampered(
            "no audit public key in governance", "governance audit.public_key", "an admin runs `llmops governance init`"
        )
    lines = p.read_bytes().split(b"\n") if p.exists() else []
    if lines and lines[-1] == b"":
        lines.pop()
    if head is not None:  # the chain head the governance store recorded at the last append
        anchors = [*anchors, (head[0], head[1], "the governance store's audit head")]
    if not p.exists() and anchors:
        raise AuditTampered(
            f"audit log is missing, but {len(anchors)} decision(s) anchored in the registry "
            f"reference it (e.g. {anchors[0][2]})",
            str(p),
            "restore the log from backup; investigate",
        )
    prev, hashes = GENESIS, {}
    for n, line in enumerate(lines, 1):
        where = f"{p}:{n}"
        try:
            rec = json.loads(line)
            sig, body = rec.pop("sig"), rec
            ok_shape = isinstance(body.get("seq"), int)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AuditTampered(
                "malformed audit line (not a signed JSON entry)",
                where,
                "the log was edited; restore it from backup and investigate",
            ) from None
        if not ok_shape or body["seq"] != n:
            raise AuditTampered(
                f"sequence number {body.get('seq')} where {n} was expected (line inserted, deleted or reordered)",
                where,
                "restore the log from backup and investigate",
            )
        if body.get("prev") != prev:
            raise AuditTampered(
                "chain broken: this line does not follow the previous one",
                where,
                "restore the log from backup and investigate",
            )
        if not verify_signature(public_key, _canonical(body), sig):
            raise AuditTampered(
                "signature does not verify (entry edited or forged)",
                where,
                "restore the log from backup and investigate",
            )
        prev = hashes[n] = line_hash(line)
    for seq, h, source in anchors:
        if seq not in hashes:
            raise AuditTampered(
                f"audit log truncated: it ends at entry {len(lines)} but entry {seq} is anchored in "
                f"{'the registry (' + source + ')' if 'store' not in source else source}",
                str(p),
                "restore the log from backup and investigate",
            )
        if hashes[seq] != h:
            raise AuditTampered(
                f"entry {seq} differs from its registry anchor ({source})",
                f"{p}:{seq}",
                "restore the log from backup and investigate",
            )
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


def release_divergences(st: ReleaseState, aliases: dict[str, str | None], pointers: dict[str, str | None]) -> list[str]:
    """How the caches (MLflow aliases, target pointers) differ from the log; empty = they agree."""
    out = []
    for alias, want in (("production", st.production), ("previous", st.previous)):
        if alias in aliases and aliases[alias] != want:
            out.append(f"MLflow {st.model}@{alias} is {_v(aliases[alias])} but the signed audit log says {_v(want)}")
    for t, have in pointers.items():  # a target the log never published this model to must point nowhere
        if have != st.targets.get(t):
            out.append(
                f"target '{t}' points {st.model} at {_v(have)} but the signed audit log says {_v(st.targets.get(t))}"
            )
    return out


def _v(x) -> str:
    return f"v{x}" if x else "nothing"
