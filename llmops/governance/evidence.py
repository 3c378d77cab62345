"""Promotion evidence: what must be true of a registered version before anyone may approve it, checked against the
ledger (governance-side), never only against registry tags (anyone with MLflow EDIT writes those).

`check_evidence` reads the lineage tags (a fast first refusal with readable reasons); `check_ledger` and
`ledger_problems` hold the tags to the training attempt the ledger charged; `model_digest_problem` and
`artifact_digest_problem` hold the files about to be published to the digests that attempt bound; and
`inside_privacy_problem` re-reads the privacy.json inside those verified files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmops.files import dir_digest
from llmops.governance.accounting import guarantee_problems
from llmops.governance.ledger import open_ledger
from llmops.governance.policy import Governance


def check_evidence(version_tags: dict) -> list[str]:
    """Problems that forbid promotion (empty = promotable). Pure: reads the lineage tags set at registration."""
    problems = []
    if version_tags.get("llmops.validation") not in ("passed", "not-run"):
        problems.append(f"data validation: {version_tags.get('llmops.validation', 'missing')}")
    if not version_tags.get("llmops.gate", "").startswith("passed"):
        problems.append(f"evaluation gate: {version_tags.get('llmops.gate', 'missing')}")
    if version_tags.get("llmops.dp.private") != "True":
        problems.append("model was not trained with differential privacy")
    if version_tags.get("llmops.dp.reproducible_insecure") == "True":
        problems.append("model was trained with privacy.reproducible_insecure (seeded batches/noise): never promotable")
    if version_tags.get("llmops.dp.sampling", "poisson") != "poisson":
        problems.append(f"sampling '{version_tags['llmops.dp.sampling']}' is not Poisson: epsilon does not hold")
    try:
        if not math.isfinite(float(version_tags.get("llmops.dp.epsilon", "inf"))):
            problems.append("privacy epsilon is infinite (or missing)")
    except ValueError:
        problems.append(f"privacy epsilon tag is not a number: {version_tags.get('llmops.dp.epsilon')!r}")
    try:
        spent = float(version_tags["llmops.dp.epsilon_cumulative"])
        budget = float(version_tags["llmops.dp.budget"])
        if spent > budget:
            problems.append(f"dataset epsilon {spent:.3f} exceeds budget {budget:.3f}")
    except (KeyError, ValueError):
        problems.append("privacy tags missing (llmops.dp.epsilon_cumulative / llmops.dp.budget)")
    return problems


def check_ledger(version_tags: dict, entry, spent: float | None, budget: float) -> list[str]:
    """The version's privacy claims against the deployment's ledger. Evidence tags can be written by anyone with
    EDIT on the registered model; the ledger is governance-side (not a run's), so a claim with no charged,
    completed attempt behind it, or a smaller epsilon than the ledger's, is refused. Pure: the caller reads the ledger
    (`entry` = the attempt's LedgerEntry or None, `spent` = its dataset's worst-record epsilon)."""
    aid = version_tags.get("llmops.dp.attempt_id")
    if not aid:
        return ["no llmops.dp.attempt_id tag: the version cannot be matched to a charged training attempt"]
    if entry is None:
        return [
            f"training attempt {aid} is not in the deployment's privacy ledger (evidence tags not backed by a "
            "charged private run)"
        ]
    problems = [f"ledger: training attempt {aid} was planned as not private: {why}" for why in entry.problems]
    if entry.status != "completed":
        problems.append(f"ledger: training attempt {aid} is '{entry.status}', not completed")
    if not math.isfinite(entry.epsilon):
        problems.append(f"ledger: training attempt {aid} has epsilon = inf")
    try:
        claimed = float(version_tags.get("llmops.dp.epsilon", "nan"))
        if not abs(claimed - entry.epsilon) <= 1e-3 * max(1.0, entry.epsilon):
            problems.append(
                f"epsilon tag {claimed:.6g} disagrees with the ledger's {entry.epsilon:.6g} for attempt {aid}"
            )
    except ValueError:
        problems.append("epsilon tag is not a number")
    if spent is not None and spent > budget + 1e-9:
        problems.append(
            f"ledger: the dataset's worst-record epsilon {spent:.3f} exceeds the governance budget {budget:.3f}"
        )
    return problems


PLAN_OUTPUT_FIELDS = {
    "noise_multiplier": "noise_multiplier",
    "sample_rate": "sample_rate",
    "steps": "steps",
    "delta": "delta",
    "max_grad_norm": "max_grad_norm",
    "sampling": "sampling",
    "secure_mode": "secure_mode",
    "reproducible_insecure": "reproducible_insecure",
    "noise_seed": "noise_seed",
    "dataset_fingerprint": "fingerprint",
    "n_train": "n_train",
    "world_size": "world_size",
    "accountant": "accountant",
}


def output_mismatch(entry, privacy: dict) -> list[str]:
    """How a model's privacy.json disagrees with the ledger row it claims (empty = it is that attempt's output)."""
    if entry is None:
        return [f"attempt {privacy.get('attempt_id')!r} is not in the ledger"]
    problems = (
        []
        if privacy.get("attempt_id") == entry.run_id
        else [f"attempt_id {privacy.get('attempt_id')!r} is not {entry.run_id}"]
    )
    if not privacy.get("dp_sgd"):
        problems.append("dp_sgd is false")
    for out_key, plan_key in PLAN_OUTPUT_FIELDS.items():
        if entry.plan and privacy.get(out_key) != entry.plan.get(plan_key):
            problems.append(f"{out_key}: {privacy.get(out_key)!r}, reserved {entry.plan.get(plan_key)!r}")
    return problems


def ledger_problems(g: Governance, tags: dict) -> list[str]:
    """Cross-check the version's privacy tags against the deployment's ledger (see llmops.governance.evidence.check_ledger)."""

    ledger = open_ledger(g.ledger)
    entry = ledger.entry(tags.get("llmops.dp.attempt_id", "")) if tags.get("llmops.dp.attempt_id") else None
    spent = ledger.spent(entry.fingerprint, g.privacy.budget_delta, entry.accountant) if entry else None
    return check_ledger(tags, entry, spent, g.privacy.dataset_budget_epsilon)


def model_digest_problem(g: Governance, tags: dict, model_dir: Path) -> str | None:
    """The files about to be published against the model the ledger's training attempt produced: registry tags can be
    copied onto another version and artifacts replaced by anyone with EDIT; the ledger row is governance-side."""

    aid = tags.get("llmops.dp.attempt_id", "")
    entry = open_ledger(g.ledger).entry(aid) if aid else None
    if entry is None:
        return f"training attempt {aid or '(none)'} is not in the deployment's privacy ledger"
    if not entry.model_digest:
        return (
            f"the ledger records no model for training attempt {aid} (trained before model digests were "
            "recorded, or the attempt did not complete): retrain to promote"
        )
    got = dir_digest(model_dir)
    if got != entry.model_digest:
        return (
            f"the registered model files (digest {got[:12]}) are not the model training attempt {aid} produced "
            f"({entry.model_digest[:12]})"
        )
    return inside_privacy_problem(entry, model_dir)


def inside_privacy_problem(entry, model_dir: Path) -> str | None:
    """The privacy.json inside the digest-verified files, re-checked: it must be the ledger attempt's own output and
    describe a guarantee (tags are editable; these bytes are the ones the ledger recorded)."""
    try:
        inside = json.loads((model_dir / "privacy.json").read_text())
    except (OSError, ValueError):
        return "the registered model has no readable privacy.json"
    if problems := output_mismatch(entry, inside) + guarantee_problems(inside) + list(entry.problems):
        return f"the model's own privacy.json: {'; '.join(dict.fromkeys(problems))}"
    return None


def artifact_digest_problem(g: Governance, tags: dict, name: str, path: Path) -> str | None:
    """Another published tree (the edge bundle) against the digest its training attempt bound in the ledger."""

    aid = tags.get("llmops.dp.attempt_id", "")
    want = open_ledger(g.ledger).artifact_digest(aid, name) if aid else None
    if not want:
        return (
            f"the ledger binds no {name} bundle to training attempt {aid or '(none)'}: it was never evaluated "
            "as this model's (retrain with compression.export_onnx)"
        )
    got = dir_digest(path)
    if got != want:
        return f"the registered {name} bundle (digest {got[:12]}) is not the one attempt {aid} produced ({want[:12]})"
    return None
