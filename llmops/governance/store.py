"""Governance-side state (SQLite beside the governance file, worker only): what was consumed, anchored, snapshotted."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from llmops.files import pid_alive
from llmops.governance.policy import Governance

# ------------------------------------------------------------------------------ governance-side state


class GovernanceStore:
    """Governance-side state in SQLite beside the governance file (worker only): consumed requests, approvals and
    flow-run executions; promotion intents; the audit chain's head; snapshots of audited governance; the target
    debris journal. Every read-modify-write runs under BEGIN IMMEDIATE (one writer at a time, reads included)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._tx() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS used (digest TEXT PRIMARY KEY, kind TEXT, user TEXT, scope TEXT, ts REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS intents (run_id TEXT PRIMARY KEY, pid INTEGER, host TEXT, "
                "body TEXT, ts REAL)"
            )
            db.execute(
                "CREATE TABLE IF NOT EXISTS audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER, hash TEXT)"
            )
            db.execute("CREATE TABLE IF NOT EXISTS snapshots (digest TEXT PRIMARY KEY, body TEXT, ts REAL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS debris (path TEXT PRIMARY KEY, kind TEXT, final TEXT, pid INTEGER, "
                "host TEXT, ts REAL)"
            )
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
            db.execute(
                "INSERT OR REPLACE INTO intents VALUES (?,?,?,?,?)",
                (run_id, os.getpid(), socket.gethostname(), json.dumps(body), time.time()),
            )

    def end_intent(self, run_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM intents WHERE run_id=?", (run_id,))

    def dead_intents(self) -> list[dict]:
        """Intents of promotions whose process died (SIGKILL, OOM, reboot) on this host."""
        with self._tx() as db:
            rows = db.execute("SELECT run_id, pid, host, body FROM intents").fetchall()
        return [
            {"run_id": r, "pid": p, **json.loads(b)}
            for r, p, h, b in rows
            if h == socket.gethostname() and not pid_alive(p)
        ]

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
            row = db.execute(
                "SELECT body FROM snapshots WHERE digest LIKE ? ORDER BY ts DESC", (digest_prefix + "%",)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def diff(self, digest_prefix: str, g: Governance) -> list[str]:
        old = self.snapshot_body(digest_prefix)
        if old is None:
            return []
        return _diff_paths(old, g.model_dump(mode="json"))

    # the debris journal: the only names a target publisher ever renames or removes are the ones it recorded here
    def record_debris(self, path: Path, kind: str, final: str = "") -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO debris VALUES (?,?,?,?,?,?)",
                (str(path), kind, final, os.getpid(), socket.gethostname(), time.time()),
            )

    def forget_debris(self, path: Path) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM debris WHERE path=?", (str(path),))

    def debris_under(self, root: Path) -> list[dict]:
        """Recorded debris directly under `root` whose publishing process is gone (on this host)."""
        with self._tx() as db:
            rows = db.execute("SELECT path, kind, final, pid, host FROM debris").fetchall()
        return [
            {"path": Path(p), "kind": k, "final": f}
            for p, k, f, pid, h in rows
            if Path(p).parent == Path(root) and not (h == socket.gethostname() and pid_alive(pid))
        ]


def _diff_paths(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_paths(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if a == b else [prefix or "(root)"]
