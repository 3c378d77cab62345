"""The release decision's rules: the policy in force (governance, only ever tightened by a run's config), the registry
governance pins, and one release decision per model at a time.

The promotion and rollback flows (flows/promotion.py) run the decision; these are the rules they obey. None of them
reads a value a requester can set except to make it stricter.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from llmops.config import PipelineConfig
from llmops.errors import PromotionError
from llmops.governance.policy import Governance, TargetSpec


@dataclass
class PolicyInForce:
    """Governance, tightened (never loosened) by the run config."""

    required: int
    timeout_s: int
    targets: dict[str, TargetSpec]
    digest: str
    approvers: list[str]


def policy_in_force(g: Governance, cfg: PipelineConfig, model: str, action: str) -> PolicyInForce:
    pc = cfg.promotion
    allowed = {n: t for n, t in g.targets.items() if t.allows(model)}
    if pc.targets is not None:
        if bad := [n for n in pc.targets if n not in allowed]:
            raise PromotionError(
                f"target(s) {bad} are not allowed for model '{model}' by governance",
                "promotion.targets",
                f"choose among {sorted(allowed)} (an admin manages targets in {g.path})",
            )
        allowed = {n: allowed[n] for n in pc.targets}
    if not allowed:
        raise PromotionError(
            f"governance allows no target for model '{model}'",
            str(g.path),
            "an admin adds one: `llmops governance target NAME --kind onprem --uri DIR`",
        )
    perm = "approve-promotion" if action == "promote" else "approve-rollback"
    return PolicyInForce(
        required=max(g.approvals.required_for(model), pc.required_approvals or 0),
        timeout_s=min(g.approvals.timeout_s, pc.approval_timeout_s or g.approvals.timeout_s),
        targets=allowed,
        digest=g.digest(),
        approvers=g.holders(perm),
    )


def pinned_config(cfg: PipelineConfig, g: Governance) -> PipelineConfig:
    """The run config with governance's registry: a requester must not point a promotion at an MLflow of their own
    (where any evidence tag can be written)."""
    if not g.registry_uri:
        return cfg
    mine = cfg.registry.tracking_uri
    if mine and mine != g.registry_uri:
        raise PromotionError(
            f"registry.tracking_uri {mine!r} is not the registry governance pins for promotions",
            "registry.tracking_uri",
            f"leave it unset (governance uses {g.registry_uri!r})",
        )
    return cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"tracking_uri": g.registry_uri})})


@contextmanager
def release_lock(g: Governance, model: str):
    """One release decision per model at a time on this worker: without it two approved runs both pass the
    compare-and-swap against the same old log state and both publish (the second over the first). An exclusive
    flock on a file in the governance directory (the promotion worker's; team mode runs promotions on one pool)."""
    import hashlib

    from llmops.files import exclusive_lock

    locks = g.home / "locks"
    locks.mkdir(mode=0o700, exist_ok=True)
    with exclusive_lock(locks / f"release-{hashlib.sha256(model.encode()).hexdigest()[:16]}.lock", 0o600):
        yield
