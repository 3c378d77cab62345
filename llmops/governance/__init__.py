"""The trust wing: who may do what, what was decided, what a release and an epsilon rest on. Read it as a unit.

Property. A version reaches `@production` or a target only through an approved, audited decision executed once, and
every byte published or served is the byte that was evaluated; the epsilon reported for a model holds for every record
(and every near-variant of it) across all attempts on the deployment. Insiders this is written against: a requester
(ml-engineer) with the CLI, `--set` and the Prefect REST API; anyone with MLflow EDIT (aliases, tags, artifacts);
anyone who can read Prefect's stores; anyone with write access to a run's state dir or a target directory.

Source of truth. The signed audit log (`audit`) and the privacy ledger (`ledger`) are the truth; MLflow aliases and
tags, target pointers, run dirs and Prefect run inputs are caches, checked against them, never obeyed on their own.

Modules (none imports `tasks/` or `flows/`; none imports torch, Prefect or MLflow at import time):
- `policy`     the governance file: roles, users' public keys, approval policy, targets, budgets (admin-owned, never a
               run parameter); `require_user`.
- `keys`       ed25519 keys and signatures in one canonical text form.
- `access`     identities, signed requests, single-use run-bound approval codes (`verify_request`,
               `verify_approval`), governance admin changes (`commit_governance`, `verified_governance`).
- `store`      governance-side state: consumed requests/approvals/executions, the audit head, governance snapshots.
- `audit`      the signed, hash-chained audit log; `release_state` replays it (what is released, per target).
- `decision`   the release rules: the policy in force (governance, only tightened by a run's config), the pinned
               registry, one release decision per model at a time (`release_lock`).
- `evidence`   what must hold of a version before it may be approved: lineage tags held to the ledger, files to the
               digests the training attempt bound, the model's own privacy.json.
- `accounting` epsilon of a composed DP-SGD history, noise for a target epsilon, `guarantee_problems` (Opacus'
               accountants, imported only when an epsilon is computed).
- `ledger`     the privacy ledger: attempts (plan, charge, checkpoints, launches), record keys and spend, model and
               artifact digests (SQLite beside governance, or the team's PostgreSQL).

The flows that run the decisions (flows/promotion.py, flows/training.py) call into this package; the CLI's admin
commands (flows/cli/admin.py) change governance only through `access.commit_governance`.
"""
