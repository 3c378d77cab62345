"""The deployment's privacy ledger: every training attempt charged, every record's spend, the evidence a release is
checked against.

The epsilon we report must hold against an informed adversary: one who reads the model card, the MLflow params and
the Prefect API, controls a run's config and can re-run, delete run directories or edit records. So:
- the ledger lives where governance says (a file mode 0600 in the governance dir, or the team's PostgreSQL), never in
  a run's state dir; it reserves under `BEGIN IMMEDIATE` (check and write in one locked transaction) and charges
  every *attempt*, keyed by a random attempt id, not by a run directory;
- the plan of an attempt (`privacy_plan`: data, base model and curve digests, sigma, q, steps, sampling, secure mode)
  and why it is not private (`plan_problems`) are stored at reserve time, so "not private" never lives in an editable
  tag; resumes, checkpoints and launches are recorded against the reserved plan (`plan_mismatch`);
- a record is identified by its normalised text (`llmops.text.identity`) and its near-duplicate keys
  (`llmops.text.neardup`), so an invisible edit or a variant is the same record;
- model and artifact digests are bound to the attempt: what is published or served is checked against them.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from llmops.errors import PrivacyError
from llmops.governance.accounting import epsilon_of, guarantee_problems


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file, read once (a FIFO or device could hand the hash check and the trainer different
    contents; so the caller hashes and parses these same bytes)."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PrivacyError(
                "not a regular file",
                str(path),
                "training and evaluation data are plain files written by the data step; re-run the flow",
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def sha256_of(path: str | Path) -> str:
    import hashlib

    try:
        return hashlib.sha256(read_regular(path)).hexdigest()
    except (OSError, PrivacyError):
        return "missing"


def privacy_plan(spec, train_digest: str | None = None, eval_digest: str | None = None) -> dict:
    """What the ledger reserves an attempt *for*: every field the epsilon depends on, the digests of the training file,
    the base model and the loss-curve text. The rank refuses a spec.json that differs from the reserved plan (the run
    dir is writable; the ledger is governance-side), and re-planning continues an attempt only if its plan is this one.
    `train_digest`/`eval_digest`: the sha256 of the bytes the caller read (the rank hashes what it trains on)."""
    return {
        "version": 2,
        "private": bool(spec.private),
        "fingerprint": spec.fingerprint,
        "n_train": int(spec.n_train),
        "train_digest": train_digest or sha256_of(spec.train_path),
        "base_digest": spec.base_digest,
        "curve": [
            int(spec.curve_points),
            int(spec.curve_records),
            (eval_digest or sha256_of(spec.eval_path)) if spec.eval_path and spec.curve_points else "",
        ],
        "noise_multiplier": float(spec.noise_multiplier),
        "max_grad_norm": float(spec.max_grad_norm),
        "sample_rate": float(spec.sample_rate),
        "steps": int(spec.steps),
        "delta": float(spec.delta),
        "accountant": spec.accountant,
        "sampling": spec.sampling,
        "secure_mode": bool(spec.secure_mode),
        "reproducible_insecure": bool(spec.reproducible_insecure),
        "noise_seed": spec.noise_seed,
        "world_size": int(spec.world_size),
        "run_key": spec.run_id,
    }


def plan_problems(plan: dict, epsilon: float) -> list[str]:
    """`guarantee_problems` of a plan, before anything is trained: stored in the ledger row at reserve time, so "not
    private" is a governance-side fact, not an editable tag."""
    return guarantee_problems(
        {
            "dp_sgd": plan["private"],
            "noise_multiplier": plan["noise_multiplier"],
            "epsilon": epsilon,
            "sampling": plan["sampling"],
            "reproducible_insecure": plan["reproducible_insecure"],
        }
    )


def plan_mismatch(reserved: dict, plan: dict) -> list[str]:
    """Fields in which `plan` differs from the reserved one (empty = the same attempt). Pure."""
    if not reserved:
        return ["the ledger row has no plan (reserved before plans were recorded)"]
    return [
        f"{k}: reserved {reserved.get(k)!r}, now {plan.get(k)!r}"
        for k in sorted(set(reserved) | set(plan))
        if reserved.get(k) != plan.get(k)
    ]


# --------------------------------------------------------------------------------------------------- ledger


@dataclass
class LedgerEntry:
    run_id: str  # the attempt id (one per training attempt)
    fingerprint: str
    status: str
    delta: float
    accountant: str
    history: list
    epsilon: float
    created: float
    run_key: str = ""  # the run's content key (its directory name): several attempts may share it
    model_digest: str = ""  # dir_digest of the model the completed attempt produced (what promotions must publish)
    plan: dict = field(default_factory=dict)  # privacy_plan at reserve time: what a resume/reuse must equal
    problems: list = field(default_factory=list)  # plan_problems at reserve time: non-empty = never promotable


def new_attempt_id() -> str:
    """A fresh, unguessable id per training attempt: the ledger's charge key (never derived from the run config)."""
    return secrets.token_hex(12)


def open_ledger(location: str | None = None) -> PrivacyLedger:
    """The deployment's ledger, where governance puts it (`privacy.ledger`), never in a run's state dir.

    A requester who can change the run config or LLMOPS_HOME must not get a fresh, empty ledger that way.
    """
    if location is None:
        from llmops.governance.policy import load_governance

        location = load_governance().ledger
    if location.startswith(("postgresql://", "postgres://")):
        return PostgresLedger(location)
    if "://" in location:
        scheme = location.split("://", 1)[0]
        raise PrivacyError(
            f"privacy ledger '{scheme}://...' is not supported",
            "governance file: privacy.ledger",
            "use an SQLite path (one machine) or a postgresql:// URL (a team)",
        )
    return PrivacyLedger(location)


MODELS_TABLE = "CREATE TABLE IF NOT EXISTS models (run_id TEXT PRIMARY KEY, digest TEXT NOT NULL)"
# Other files an attempt produced that a target may publish or a server may serve (e.g. the ONNX edge bundle):
ARTIFACTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS artifacts (run_id TEXT NOT NULL, name TEXT NOT NULL, digest TEXT NOT NULL, "
    "PRIMARY KEY (run_id, name))"
)
# Near-duplicate identity (llmops/text/neardup.py): each record's keys, so a variant, part or concatenation of a record an
# earlier attempt trained on is charged with that record's history, whatever its exact text.
KEYS_TABLE = (
    "CREATE TABLE IF NOT EXISTS record_keys (record TEXT NOT NULL, key BIGINT NOT NULL, PRIMARY KEY (record, key))"
)
KEYS_INDEX = "CREATE INDEX IF NOT EXISTS record_keys_key ON record_keys (key)"
SIZES_TABLE = "CREATE TABLE IF NOT EXISTS record_sizes (record TEXT PRIMARY KEY, n INTEGER NOT NULL)"
UNACCOUNTED_TABLE = "CREATE TABLE IF NOT EXISTS unaccounted (digest TEXT PRIMARY KEY, why TEXT NOT NULL)"
LAUNCHES_TABLE = (
    "CREATE TABLE IF NOT EXISTS launches (run_id TEXT NOT NULL, start_step INTEGER NOT NULL, "
    "created REAL NOT NULL, PRIMARY KEY (run_id, start_step))"
)
CHECKPOINTS_TABLE = (
    "CREATE TABLE IF NOT EXISTS checkpoints (run_id TEXT NOT NULL, step INTEGER NOT NULL, "
    "digest TEXT NOT NULL, created REAL NOT NULL, PRIMARY KEY (run_id, step))"
)
_ENTRY_COLS = (
    "run_id, fingerprint, status, delta, accountant, history, epsilon, created, run_key, digest, plan, problems"
)
_NEW_COLUMNS = (
    ("run_key", "TEXT NOT NULL DEFAULT ''"),
    ("plan", "TEXT NOT NULL DEFAULT ''"),
    ("problems", "TEXT NOT NULL DEFAULT '[]'"),
)


def _entry(r) -> LedgerEntry:
    return LedgerEntry(
        r[0],
        r[1],
        r[2],
        r[3],
        r[4],
        json.loads(r[5]),
        r[6],
        r[7],
        r[8],
        r[9] or "",
        json.loads(r[10]) if r[10] else {},
        json.loads(r[11] or "[]"),
    )


def _same_history(a: list, b: list) -> bool:
    merged = lambda h: [[float(x[0]), float(x[1]), int(x[2])] for x in h if int(x[2]) > 0]  # noqa: E731
    ha, hb = merged(a), merged(b)
    return len(ha) == len(hb) and all(
        abs(x[0] - y[0]) <= 1e-9 * max(1, abs(y[0])) and abs(x[1] - y[1]) <= 1e-12 and x[2] == y[2]
        for x, y in zip(ha, hb)
    )


def _refuse_multiple_copies(near: dict[str, set[str]], records: set[str]) -> None:
    """A recorded record that two records of the new dataset are both near-copies of (say its two halves), while it is
    not itself in the dataset, would be trained twice in one attempt: a group of two, which composition does not
    cover. Refused, naming them (within a dataset, related records were already deduplicated by llmops/text/neardup)."""
    copies: dict[str, list[str]] = {}
    for new, stored in near.items():
        for old in stored:
            if old not in records:
                copies.setdefault(old, []).append(new)
    if bad := {old: news for old, news in copies.items() if len(news) > 1}:
        old, news = next(iter(bad.items()))
        raise PrivacyError(
            f"{sum(len(v) for v in bad.values())} records are near-copies (parts or variants) of "
            f"{len(bad)} record(s) an earlier attempt trained on, several of one record (e.g. records "
            f"{', '.join(n[:12] for n in news[:3])} of earlier record {old[:12]})",
            "training data",
            "remove all but one copy of each, or train on the original record",
        )


def _private_file(path: Path) -> None:
    """Create the ledger file 0600 (SQLite's -wal/-journal files copy its mode); an existing one of ours with wider
    permissions is narrowed. The ledger names which texts trained which attempt: it is not for other users."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


class PrivacyLedger:
    """Durable composition of privacy loss per *record*, across datasets and runs (SQLite, owned by governance).

    Every training *attempt* is recorded with its dataset fingerprint and (sigma, q, steps) history; the dataset's
    training records are recorded by normalised content hash. A record's epsilon composes the histories of every
    attempt whose dataset contained it, whatever that dataset was called: retraining on a grown, shrunk or edited copy
    of the data keeps paying for the records it shares with earlier runs. A dataset's spent epsilon is the worst over
    its records; the budget is enforced per record (`dataset_budget_epsilon` caps what any one record can lose).

    An attempt *reserves* its full planned history before training starts, so a killed attempt is charged in full.
    The key is a random attempt id: deleting a run directory and running again is a new attempt, charged again; only
    a resume from an intact checkpoint of the same attempt reuses that attempt's charge. `reserve` checks and writes
    in one transaction opened with `BEGIN IMMEDIATE` (the write lock is taken before the first read), so of
    concurrent reservations that together exceed the budget exactly the ones that fit pass.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _private_file(self.path)
        with self._tx() as db:
            db.execute("""CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,
                status TEXT NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL, history TEXT NOT NULL,
                epsilon REAL NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, run_key TEXT NOT NULL DEFAULT '')""")
            db.execute("""CREATE TABLE IF NOT EXISTS members (fingerprint TEXT NOT NULL, record TEXT NOT NULL,
                PRIMARY KEY (fingerprint, record)) WITHOUT ROWID""")
            db.execute("CREATE INDEX IF NOT EXISTS members_record ON members (record)")
            db.execute(MODELS_TABLE)
            db.execute(ARTIFACTS_TABLE)
            db.execute(CHECKPOINTS_TABLE)
            for ddl in (KEYS_TABLE, KEYS_INDEX, SIZES_TABLE, LAUNCHES_TABLE, UNACCOUNTED_TABLE):
                db.execute(ddl)
            have = {r[1] for r in db.execute("PRAGMA table_info(runs)")}
            for col, decl in _NEW_COLUMNS:  # a ledger from an older llmops
                if col not in have:
                    db.execute(f"ALTER TABLE runs ADD COLUMN {col} {decl}")

    @contextmanager
    def _tx(self):
        """One transaction holding SQLite's write lock from its first statement (reads included)."""
        db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def entries(self, fingerprint: str) -> list[LedgerEntry]:
        with self._tx() as db:
            rows = db.execute(
                f"SELECT {_ENTRY_COLS} FROM runs LEFT JOIN models USING (run_id) WHERE fingerprint=? ORDER BY created",
                (fingerprint,),
            ).fetchall()
        return [_entry(r) for r in rows]

    def entry(self, attempt_id: str) -> LedgerEntry | None:
        with self._tx() as db:
            r = db.execute(
                f"SELECT {_ENTRY_COLS} FROM runs LEFT JOIN models USING (run_id) WHERE run_id=?", (attempt_id,)
            ).fetchone()
        return _entry(r) if r else None

    def records(self, fingerprint: str) -> list[str]:
        with self._tx() as db:
            return [r[0] for r in db.execute("SELECT record FROM members WHERE fingerprint=?", (fingerprint,))]

    def known(self, records, keys: dict | None = None) -> int:
        """How many of `records` (normalised content hashes) any recorded attempt trained on, counting a record as
        known when it is a near-copy (`keys`: hash -> llmops.text.neardup keys) of one that was."""
        records = list(records)
        with self._tx() as db:
            if keys:
                near = self._related_stored(db, {r: keys[r] for r in records if r in keys})
                records_near = {r for r, stored in near.items() if stored}
            else:
                records_near = set()
            db.execute("CREATE TEMP TABLE IF NOT EXISTS probe (record TEXT PRIMARY KEY) WITHOUT ROWID")
            db.execute("DELETE FROM probe")
            db.executemany("INSERT OR IGNORE INTO probe VALUES (?)", ((r,) for r in records))
            exact = {
                r[0] for r in db.execute("SELECT DISTINCT p.record FROM probe p JOIN members m ON m.record = p.record")
            }
            db.execute("DELETE FROM probe")
        return len(exact | records_near)

    def _related_stored(self, db, keys: dict[str, list[int]]) -> dict[str, set[str]]:
        """For each new record (hash -> its llmops.text.neardup keys), the recorded records it is related to (a variant,
        part, or concatenation of), by the same rule as `llmops.text.neardup.related`, counted in SQL over the key index."""
        from llmops.text.neardup import related_counts

        if not keys:
            return {}
        db.execute("CREATE TEMP TABLE IF NOT EXISTS probe_keys (record TEXT NOT NULL, key BIGINT NOT NULL)")
        db.execute("DELETE FROM probe_keys")
        db.executemany("INSERT INTO probe_keys VALUES (?, ?)", ((r, int(k)) for r, ks in keys.items() for k in set(ks)))
        rows = db.execute(
            "SELECT p.record, k.record, COUNT(*), MAX(s.n) FROM probe_keys p "
            "JOIN record_keys k ON k.key = p.key JOIN record_sizes s ON s.record = k.record "
            "WHERE k.record <> p.record GROUP BY p.record, k.record"
        ).fetchall()
        db.execute("DELETE FROM probe_keys")
        out: dict[str, set[str]] = {r: set() for r in keys}
        for new, old, shared, n_old in rows:
            if related_counts(int(shared), len(set(keys[new])), int(n_old)):
                out[new].add(old)
        return out

    def _signatures(
        self, db, fingerprint: str, records: list[str] | None, exclude: str | None, keys: dict | None = None
    ) -> tuple[set[frozenset], dict[str, list]]:
        """The distinct sets of prior attempts that trained on the dataset's records (one set per group of records
        that share a history), and every prior attempt's history."""
        histories = {
            r[0]: (r[1], json.loads(r[2]))
            for r in db.execute("SELECT run_id, fingerprint, history FROM runs")
            if r[0] != exclude
        }
        same = frozenset(rid for rid, (fp, _) in histories.items() if fp == fingerprint)
        if records is None:
            records = [r[0] for r in db.execute("SELECT record FROM members WHERE fingerprint=?", (fingerprint,))]
        if not records:
            return ({same} if same else set()), {k: v[1] for k, v in histories.items()}
        db.execute("CREATE TEMP TABLE IF NOT EXISTS wanted (record TEXT PRIMARY KEY) WITHOUT ROWID")
        db.execute("DELETE FROM wanted")
        db.executemany("INSERT OR IGNORE INTO wanted VALUES (?)", ((r,) for r in records))
        runs_of_fp: dict[str, set] = {}
        for rid, (fp, _) in histories.items():
            runs_of_fp.setdefault(fp, set()).add(rid)
        per_record: dict[str, set] = {}
        for rec, fp in db.execute("SELECT m.record, m.fingerprint FROM members m JOIN wanted w ON m.record = w.record"):
            per_record.setdefault(rec, set()).update(runs_of_fp.get(fp, ()))
        db.execute("DELETE FROM wanted")
        if keys:  # near-copies of recorded records pay those records' histories too
            near = self._related_stored(db, {r: keys[r] for r in records if r in keys})
            _refuse_multiple_copies(near, set(records))
            olds = sorted({o for stored in near.values() for o in stored})
            fps_of: dict[str, set] = {}
            for i in range(0, len(olds), 500):
                chunk = olds[i : i + 500]
                q = ",".join("?" * len(chunk))
                for rec, fp in db.execute(f"SELECT record, fingerprint FROM members WHERE record IN ({q})", chunk):
                    fps_of.setdefault(rec, set()).add(fp)
            for new, stored in near.items():
                for old in stored:
                    for fp in fps_of.get(old, ()):
                        per_record.setdefault(new, set()).update(runs_of_fp.get(fp, ()))
        groups = {frozenset(per_record.get(rec, set()) | same) for rec in records}
        return groups, {k: v[1] for k, v in histories.items()}

    def _worst(
        self, groups: set[frozenset], histories: dict[str, list], extra: list, delta: float, kind: str
    ) -> tuple[float, int]:
        """(worst record epsilon, how many prior attempts that record was in)."""
        worst, n_runs = 0.0, 0
        for sig in groups:
            history = [h for rid in sorted(sig) for h in histories.get(rid, [])] + list(extra)
            eps = epsilon_of(history, delta, kind) if history else 0.0
            if eps > worst or (eps == worst and len(sig) > n_runs):
                worst, n_runs = eps, len(sig)
        return worst, n_runs

    def summary(self, budget_delta: float | None = None) -> list[dict]:
        """One row per dataset fingerprint: attempts, recorded training records, worst-record epsilon (at the
        governance's budget delta when given, else the delta of its latest attempt; the accountant of its latest)."""
        out = []
        with self._tx() as db:
            runs = db.execute(
                "SELECT fingerprint, run_id, status, delta, accountant, created FROM runs ORDER BY created"
            ).fetchall()
            counts = dict(db.execute("SELECT fingerprint, COUNT(*) FROM members GROUP BY fingerprint").fetchall())
            by_fp: dict[str, list] = {}
            for r in runs:
                by_fp.setdefault(r[0], []).append(r)
            for fp, rs in by_fp.items():
                last = rs[-1]
                out.append(
                    {
                        "fingerprint": fp,
                        "runs": len(rs),
                        "statuses": sorted({r[2] for r in rs}),
                        "records": counts.get(fp, 0),
                        "delta": budget_delta or last[3],
                        "accountant": last[4],
                        "epsilon": self._spent(db, fp, budget_delta or last[3], last[4]),
                        "last_run": last[1],
                        "updated": last[5],
                    }
                )
        return out

    def _spent(self, db, fingerprint: str, delta: float, kind: str, exclude: str | None = None) -> float:
        groups, histories = self._signatures(db, fingerprint, None, exclude)
        return self._worst(groups, histories, [], delta, kind)[0]

    def spent(self, fingerprint: str, delta: float, kind: str = "prv", exclude: str | None = None) -> float:
        """Worst epsilon over the records of `fingerprint`, composing every attempt that trained on each record."""
        with self._tx() as db:
            return self._spent(db, fingerprint, delta, kind, exclude)

    def reserve(
        self,
        attempt_id: str,
        fingerprint: str,
        history: list,
        delta: float,
        kind: str,
        budget: float,
        records: list[str] | None = None,
        run_key: str = "",
        plan: dict | None = None,
        problems: list | None = None,
        budget_delta: float | None = None,
        keys: dict | None = None,
    ) -> float:
        """Record a planned attempt on `records` (normalised content hashes of its training records); refuse,
        before any training and leaving nothing behind, if any record's composed epsilon would exceed the budget.
        The budget is an (epsilon, delta) pair: every record's composition is converted at `budget_delta` (the
        governance's; `delta` is this run's, for its own epsilon). `plan` and its `problems` are stored with the row:
        resuming, reusing and promoting compare against them. Reserving the same attempt id again (a resume)
        charges nothing new, and only for the same plan."""
        at = budget_delta or delta
        if not all(h[0] > 0 for h in history):
            raise PrivacyError(
                "a run without noise (noise_multiplier=0) has epsilon = inf and cannot be charged as private",
                "privacy.noise_multiplier",
                "set privacy.noise_multiplier > 0 (or target_epsilon), or privacy.enabled: false for "
                "a non-private comparison run",
            )
        with self._tx() as db:
            row = db.execute("SELECT plan FROM runs WHERE run_id=?", (attempt_id,)).fetchone()
            if row:
                if plan is not None and (diff := plan_mismatch(json.loads(row[0]) if row[0] else {}, plan)):
                    raise PrivacyError(
                        f"attempt {attempt_id} was reserved for another plan ({'; '.join(diff[:3])})",
                        str(self.path),
                        "re-run without the copied run directory: a new attempt is planned and charged",
                    )
                return self._spent(db, fingerprint, at, kind)
            groups, histories = self._signatures(db, fingerprint, records, None, keys)
            before, _ = self._worst(groups, histories, [], at, kind)
            after, n_prior = self._worst(groups or {frozenset()}, histories, list(history), at, kind)
            if not math.isfinite(budget) or not after <= budget + 1e-9:
                shared = "" if not records else " (records shared with earlier runs count, whatever their dataset)"
                raise PrivacyError(
                    f"this run would bring records of dataset {fingerprint[:12]} to epsilon={after:.2f} "
                    f"(already spent {before:.2f} over {n_prior} run(s){shared}; budget {budget:.2f} at "
                    f"delta {at:.3g})",
                    "privacy.dataset_budget_epsilon",
                    "lower privacy.target_epsilon / train fewer steps; the budget is the governance file's "
                    "privacy.dataset_budget_epsilon (a run config can only lower it)",
                )
            now = time.time()
            db.execute(
                "INSERT INTO runs (run_id, fingerprint, status, delta, accountant, history, epsilon, created, "
                "updated, run_key, plan, problems) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    attempt_id,
                    fingerprint,
                    "reserved",
                    delta,
                    kind,
                    json.dumps(history),
                    epsilon_of(history, delta, kind),
                    now,
                    now,
                    run_key,
                    json.dumps(plan, sort_keys=True) if plan is not None else "",
                    json.dumps(problems or []),
                ),
            )
            if records:
                db.executemany("INSERT OR IGNORE INTO members VALUES (?,?)", ((fingerprint, r) for r in records))
            if keys:
                db.executemany(
                    "INSERT OR IGNORE INTO record_keys VALUES (?, ?)",
                    ((r, int(k)) for r, ks in keys.items() for k in set(ks)),
                )
                db.executemany(
                    "INSERT OR IGNORE INTO record_sizes VALUES (?, ?)",
                    ((r, len(set(ks))) for r, ks in keys.items() if ks),
                )
        return after

    def finish(self, attempt_id: str, history: list, status: str = "completed", model_digest: str = "") -> None:
        """Mark an attempt completed and record the digest of the model it produced: a promotion publishes only files
        with that digest (tags in the registry can be edited, artifacts replaced; this row is governance-side).
        The charge stays the reserved plan: a completed attempt ran all of it, so `history` must equal it (a history
        taken from a forged checkpoint, e.g. "step 399 of 400, nothing before", is refused, and the reservation
        stands). Finishing again with the same history and model is a no-op."""
        with self._tx() as db:
            row = db.execute(
                "SELECT delta, accountant, history, status FROM runs WHERE run_id=?", (attempt_id,)
            ).fetchone()
            if row is None:
                raise PrivacyError(
                    f"attempt {attempt_id} was never reserved", str(self.path), "reserve before training"
                )
            reserved = json.loads(row[2])
            if not _same_history(history, reserved):
                raise PrivacyError(
                    f"attempt {attempt_id} reports history {history}, but it reserved {reserved}: a "
                    "completed attempt is charged its whole plan",
                    str(self.path),
                    "re-run the flow (the reservation is kept; a new attempt is charged in full)",
                )
            if row[3] not in ("reserved", status):
                raise PrivacyError(f"attempt {attempt_id} is '{row[3]}'", str(self.path), "train again (a new attempt)")
            db.execute("UPDATE runs SET status=?, updated=? WHERE run_id=?", (status, time.time(), attempt_id))
            if model_digest:
                had = db.execute("SELECT digest FROM models WHERE run_id=?", (attempt_id,)).fetchone()
                if had and had[0] != model_digest:
                    raise PrivacyError(
                        f"attempt {attempt_id} already recorded another model",
                        str(self.path),
                        "an attempt produces one model: train again (a new attempt)",
                    )
                db.execute("INSERT OR IGNORE INTO models (run_id, digest) VALUES (?, ?)", (attempt_id, model_digest))

    def checkpoint(self, attempt_id: str, step: int, digest: str) -> None:
        """Record that the reserved attempt saved a checkpoint after `step` steps, with that file digest: the only
        checkpoint a resume may load, at the step and history the ledger derives (the plan's sigma and q, `step`
        steps), never at what the checkpoint's own client state says."""
        with self._tx() as db:
            row = db.execute("SELECT status, history FROM runs WHERE run_id=?", (attempt_id,)).fetchone()
            if row is None or row[0] != "reserved":
                raise PrivacyError(
                    f"attempt {attempt_id} is not a reserved attempt in the ledger",
                    str(self.path),
                    "checkpoints are recorded by the attempt's own training ranks",
                )
            planned = sum(int(h[2]) for h in json.loads(row[1]))
            last = db.execute("SELECT MAX(step) FROM checkpoints WHERE run_id=?", (attempt_id,)).fetchone()[0]
            if not 0 < step < planned or (last is not None and step <= last):
                raise PrivacyError(
                    f"checkpoint step {step} of attempt {attempt_id} is out of order (last {last}, plan {planned})",
                    str(self.path),
                    "this is a bug or a forged call: report it",
                )
            db.execute(
                "INSERT INTO checkpoints (run_id, step, digest, created) VALUES (?, ?, ?, ?)",
                (attempt_id, int(step), digest, time.time()),
            )

    def record_unaccounted(self, digest: str, why: str) -> None:
        """A model trained on records without a charge that holds (privacy.enabled=false, reproducible_insecure): it
        may never be the base of a private run (fine-tuning it further would launder its unaccounted training)."""
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO unaccounted (digest, why) VALUES (?, ?)", (digest, why))

    def unaccounted(self, digest: str) -> str | None:
        with self._tx() as db:
            row = db.execute("SELECT why FROM unaccounted WHERE digest=?", (digest,)).fetchone()
        return row[0] if row else None

    def claim_launch(self, attempt_id: str, start_step: int) -> None:
        """A reserved attempt trains from a given step once: launching the rank again from step 0 (or from the same
        checkpoint) would train several models on one charge and let someone keep the best. A resume claims the
        ledger's latest checkpoint step, once."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM runs WHERE run_id=?", (attempt_id,)).fetchone()
            if row is None or row[0] != "reserved":
                raise PrivacyError(
                    f"attempt {attempt_id} is not a reserved attempt in the ledger", str(self.path), "re-run the flow"
                )
            if db.execute(
                "SELECT 1 FROM launches WHERE run_id=? AND start_step=?", (attempt_id, int(start_step))
            ).fetchone():
                raise PrivacyError(
                    f"attempt {attempt_id} already trained from step {start_step}: one charge, one training",
                    str(self.path),
                    "re-run the flow: a new attempt is planned and charged",
                )
            db.execute(
                "INSERT INTO launches (run_id, start_step, created) VALUES (?, ?, ?)",
                (attempt_id, int(start_step), time.time()),
            )

    def last_checkpoint(self, attempt_id: str) -> tuple[int, str] | None:
        """(step, digest) of the attempt's latest recorded checkpoint, or None."""
        with self._tx() as db:
            row = db.execute(
                "SELECT step, digest FROM checkpoints WHERE run_id=? ORDER BY step DESC LIMIT 1", (attempt_id,)
            ).fetchone()
        return (int(row[0]), row[1]) if row else None

    def bind_artifact(self, attempt_id: str, name: str, digest: str) -> None:
        """Record the digest of another file tree the completed attempt produced (the edge bundle): publishing and
        serving verify it before use. Write-once per (attempt, name): a later, different bundle is refused."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM runs WHERE run_id=?", (attempt_id,)).fetchone()
            if row is None or row[0] != "completed":
                raise PrivacyError(
                    f"attempt {attempt_id} is not a completed attempt in the ledger",
                    str(self.path),
                    "bind artifacts after the training attempt completed",
                )
            had = db.execute("SELECT digest FROM artifacts WHERE run_id=? AND name=?", (attempt_id, name)).fetchone()
            if had and had[0] != digest:
                raise PrivacyError(
                    f"attempt {attempt_id} already recorded another {name}",
                    str(self.path),
                    "an attempt produces one bundle of each kind: train again",
                )
            if not had:
                db.execute("INSERT INTO artifacts (run_id, name, digest) VALUES (?, ?, ?)", (attempt_id, name, digest))

    def artifact_digest(self, attempt_id: str, name: str) -> str | None:
        with self._tx() as db:
            row = db.execute("SELECT digest FROM artifacts WHERE run_id=? AND name=?", (attempt_id, name)).fetchone()
        return row[0] if row else None


class _PgConn:
    """The few SQLite idioms PrivacyLedger uses, spoken to PostgreSQL (psycopg 3): `?` placeholders, INSERT OR
    IGNORE, WITHOUT ROWID, REAL (float8 here: epoch seconds and deltas need it)."""

    def __init__(self, conn):
        self.conn = conn

    @staticmethod
    def _sql(sql: str) -> str:
        sql = sql.replace("?", "%s").replace(" WITHOUT ROWID", "").replace(" REAL", " DOUBLE PRECISION")
        if "INSERT OR IGNORE" in sql:
            sql = sql.replace("INSERT OR IGNORE", "INSERT") + " ON CONFLICT DO NOTHING"
        return sql

    def execute(self, sql: str, params=()):
        if sql.startswith("PRAGMA"):
            return iter(())
        return self.conn.execute(self._sql(sql), params or None)

    def executemany(self, sql: str, rows):
        with self.conn.cursor() as cur:
            cur.executemany(self._sql(sql), list(rows))


class PostgresLedger(PrivacyLedger):
    """The same ledger on PostgreSQL, for a team (several training workers, one deployment). Every transaction
    first takes one transaction-scoped advisory lock, so ledger transactions run one at a time, reads included:
    the check-then-write of `reserve` cannot interleave (the Postgres counterpart of SQLite's BEGIN IMMEDIATE)."""

    LOCK_KEY = 0x6C6C6D6F7073  # "llmops"

    def __init__(self, url: str):
        self.url = url
        self.path = url.split("@")[-1]  # for messages: host/db, never the password
        with self._tx() as db:
            db.execute("""CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,
                status TEXT NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL, history TEXT NOT NULL,
                epsilon REAL NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, run_key TEXT NOT NULL DEFAULT '')""")
            db.execute("""CREATE TABLE IF NOT EXISTS members (fingerprint TEXT NOT NULL, record TEXT NOT NULL,
                PRIMARY KEY (fingerprint, record))""")
            db.execute("CREATE INDEX IF NOT EXISTS members_record ON members (record)")
            db.execute(MODELS_TABLE)
            db.execute(ARTIFACTS_TABLE)
            db.execute(CHECKPOINTS_TABLE)
            for ddl in (KEYS_TABLE, KEYS_INDEX, SIZES_TABLE, LAUNCHES_TABLE, UNACCOUNTED_TABLE):
                db.execute(ddl)
            for col, decl in _NEW_COLUMNS:
                db.execute(f"ALTER TABLE runs ADD COLUMN IF NOT EXISTS {col} {decl}")

    @contextmanager
    def _tx(self):
        try:
            import psycopg
        except ImportError:
            raise PrivacyError(
                "the postgresql:// ledger needs psycopg",
                "governance file: privacy.ledger",
                "pip install 'llmops[team]' (psycopg[binary])",
            ) from None
        try:
            conn = psycopg.connect(self.url, connect_timeout=10)
        except psycopg.OperationalError as e:
            raise PrivacyError(
                f"cannot reach the privacy ledger ({str(e).splitlines()[0][:160]})",
                self.path,
                "check governance privacy.ledger and that PostgreSQL is up",
            ) from None
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.LOCK_KEY,))
                yield _PgConn(conn)
        finally:
            conn.close()


_EXTRA_TABLES = {
    "record_keys": "record, key",
    "record_sizes": "record, n",
    "launches": "run_id, start_step, created",
    "unaccounted": "digest, why",
}


def copy_ledger(source: str, dest: str) -> int:
    """Copy every attempt and record membership of the ledger at `source` into `dest` (moving a deployment from its
    SQLite ledger to a team's Postgres one): charges must follow the records, or moving would reset every budget.
    Rows already in `dest` are kept as they are. Returns the number of attempts copied."""
    if "://" not in source and not Path(source).is_file():
        return 0
    src, dst = open_ledger(source), open_ledger(dest)
    cols = "run_id, fingerprint, status, delta, accountant, history, epsilon, created, updated, run_key, plan, problems"
    with src._tx() as db:
        runs = db.execute(f"SELECT {cols} FROM runs").fetchall()
        members = db.execute("SELECT fingerprint, record FROM members").fetchall()
        models = db.execute("SELECT run_id, digest FROM models").fetchall()
        artifacts = db.execute("SELECT run_id, name, digest FROM artifacts").fetchall()
        checkpoints = db.execute("SELECT run_id, step, digest, created FROM checkpoints").fetchall()
        extra = {t: db.execute(f"SELECT {c} FROM {t}").fetchall() for t, c in _EXTRA_TABLES.items()}
    with dst._tx() as db:
        have = {r[0] for r in db.execute("SELECT run_id FROM runs").fetchall()}
        new = [tuple(r) for r in runs if r[0] not in have]
        db.executemany(f"INSERT INTO runs ({cols}) VALUES ({', '.join('?' * 12)})", new)
        db.executemany("INSERT OR IGNORE INTO members (fingerprint, record) VALUES (?, ?)", [tuple(m) for m in members])
        db.executemany("INSERT OR IGNORE INTO models (run_id, digest) VALUES (?, ?)", [tuple(m) for m in models])
        db.executemany(
            "INSERT OR IGNORE INTO artifacts (run_id, name, digest) VALUES (?, ?, ?)", [tuple(a) for a in artifacts]
        )
        db.executemany(
            "INSERT OR IGNORE INTO checkpoints (run_id, step, digest, created) VALUES (?, ?, ?, ?)",
            [tuple(c) for c in checkpoints],
        )
        for t, c in _EXTRA_TABLES.items():  # near-duplicate keys, launch claims, unaccounted models
            marks = ", ".join("?" * len(c.split(",")))
            db.executemany(f"INSERT OR IGNORE INTO {t} ({c}) VALUES ({marks})", [tuple(r) for r in extra[t]])
    return len(new)
