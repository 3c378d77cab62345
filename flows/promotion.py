"""Promotion and rollback flows: wiring only (logic in tasks/promotion.py and tasks/access.py).

    llmops promote --config configs/demo.yaml --version 3 --requested-by alice   # pauses for approval
    llmops approve <flow-run-id> --approver bob                                   # or: Resume in the Prefect UI
    llmops rollback --config configs/demo.yaml --requested-by alice               # pauses for approval too

The flow checks the candidate's evidence, then pauses with a form (approve, approver, credential, comment).
Each submitted form is authenticated against the roles file, audited, and removed from Prefect's run-input
store right after it is read. Only after `promotion.required_approvals` distinct authorised approvals are the
targets written; then MLflow alias `production` moves (the old one becomes `previous`).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field, SecretStr

from llmops.config import PipelineConfig
from tasks.access import AccessDenied, AuditLog, Policy, authorize
from tasks.promotion import PromotionError, check_evidence, file_manifest, make_target, move_production_alias
from tasks.registry import download_hf_model, retry, tracking_uri

MAX_BAD_ATTEMPTS = 5


class ApprovalInput(RunInput):
    approve: bool = Field(False, title="Approve", description="On = approve, off = reject")
    approver: str = Field(..., title="Approver", description="Your user name in the roles file")
    credential: SecretStr = Field(..., title="Credential", description="Your approver credential (never stored)")
    comment: str = Field("", title="Comment", description="Why (kept in the audit log)")


def _client(cfg: PipelineConfig):
    import mlflow

    uri = tracking_uri(cfg.registry.tracking_uri, cfg.state_dir)
    return mlflow.MlflowClient(uri), uri


def _audit(cfg: PipelineConfig) -> AuditLog:
    return AuditLog(Path(cfg.state_dir) / "audit.log")


TAGGED_FIELDS = ("ts", "action", "decision", "approver", "requested_by", "approved_by", "reason", "comment",
                 "from_version", "flow_run_id")


def _decide(cfg: PipelineConfig, audit: AuditLog, **entry) -> dict:
    """Append a decision to the audit log (the record of truth, hash-chained) and tag it on the MLflow model version
    as `llmops.decision.NNN` (who, what, when, why; never a credential)."""
    record = audit.append(**entry)
    name, version = entry.get("model"), entry.get("version")
    try:
        client, _ = _client(cfg)
        tags = retry(lambda: client.get_model_version(name, version)).tags
        n = sum(1 for k in tags if k.startswith("llmops.decision."))
        value = json.dumps({k: (record[k][:200] if isinstance(record[k], str) else record[k])
                            for k in TAGGED_FIELDS if record.get(k) not in (None, "")}, sort_keys=True)
        retry(lambda: client.set_model_version_tag(name, version, f"llmops.decision.{n + 1:03d}", value[:4000]))
    except Exception as e:  # noqa: BLE001 - the audit log already holds the decision
        get_run_logger().warning("decision %s is in the audit log but could not be tagged on %s v%s (%s)",
                                 entry.get("decision"), name, version, type(e).__name__)
    return record


def _policy(cfg: PipelineConfig) -> Policy:
    return Policy.load(cfg.promotion.roles_file or Path(cfg.state_dir) / "roles.yaml")


@task(name="read-version", retries=2, retry_delay_seconds=3, persist_result=False)
def read_version(cfg: PipelineConfig, version: str) -> dict:
    client, _ = _client(cfg)
    name = cfg.registry.model_name
    mv = retry(lambda: client.get_model_version(name, version))
    run = retry(lambda: client.get_run(mv.run_id))
    try:
        prod = retry(lambda: client.get_model_version_by_alias(name, "production"))
        prod_metrics = retry(lambda: client.get_run(prod.run_id)).data.metrics
        prod_version = str(prod.version)
    except Exception:  # noqa: BLE001 - no production model yet
        prod_metrics, prod_version = {}, None
    return {"tags": dict(mv.tags), "metrics": run.data.metrics, "run_id": mv.run_id,
            "production_version": prod_version, "production_metrics": prod_metrics}


def summary_markdown(name: str, version: str, info: dict, requested_by: str, action: str) -> str:
    t, m, pm = info["tags"], info["metrics"], info["production_metrics"]
    rows = []
    for key in ("eval.eval_loss", "eval.perplexity", "eval.latency_ms_per_token_p50", "eval.size_bytes"):
        if key in m:
            prod = f"{pm[key]:.4g}" if key in pm else "—"
            rows.append(f"| {key.removeprefix('eval.')} | {m[key]:.4g} | {prod} |")
    table = "\n".join(rows)
    return f"""## {action}: `{name}` version {version}
Requested by **{requested_by}**. Production now: {('version ' + info['production_version']) if info['production_version'] else 'none'}.

| metric | candidate | production |
|---|---|---|
{table}

- Privacy: ε = {t.get('llmops.dp.epsilon')} (δ = {t.get('llmops.dp.delta')}) this run; dataset total ε = {t.get('llmops.dp.epsilon_cumulative')} of budget {t.get('llmops.dp.budget')}
- Data fingerprint `{t.get('llmops.data_fingerprint', '')[:16]}…`; validation: {t.get('llmops.validation')}; PII: {t.get('llmops.pii')}
- Gate: {t.get('llmops.gate')}
- Code: {t.get('llmops.git_commit')}; training run: {t.get('prefect.flow_run_url') or t.get('prefect.flow_run_id')}

Approve: switch **Approve** on, enter your user name and credential, then **Resume**. Off = reject.
"""


def _forget_run_input() -> None:
    """Delete the submitted form (it held a credential) from Prefect's run-input store."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.id
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        for item in client.filter_flow_run_input(flow_run_id=run_id, key_prefix="paused-", limit=200,
                                                 exclude_keys=set()):
            if item.key.endswith("-response"):
                client.delete_flow_run_input(flow_run_id=run_id, key=item.key)


def collect_approvals(cfg: PipelineConfig, action: str, subject: dict, summary: str, requested_by: str) -> list[str]:
    """Pause until enough distinct authorised approvals arrive; a rejection or timeout raises PromotionError."""
    logger, audit, policy = get_run_logger(), _audit(cfg), _policy(cfg)
    approvals: list[str] = []
    bad = 0
    while len(approvals) < cfg.promotion.required_approvals:
        try:
            form = pause_flow_run(wait_for_input=ApprovalInput.with_initial_data(description=summary),
                                  timeout=cfg.promotion.approval_timeout_s, poll_interval=2)
        except FlowPauseTimeout:
            _decide(cfg, audit, action=action, decision="timeout", **subject, flow_run_id=str(flow_run.id))
            raise PromotionError(f"no approval within {cfg.promotion.approval_timeout_s}s: nothing was changed",
                                 f"flow run {flow_run.id}", "start the flow again when an approver is available")
        _forget_run_input()
        secret = form.credential.get_secret_value()
        entry = dict(action=action, approver=form.approver, requested_by=requested_by, comment=form.comment[:500],
                     **subject, flow_run_id=str(flow_run.id))
        try:
            authorize(policy, form.approver, secret, "approve-promotion" if action == "promote" else "rollback",
                      requested_by)
        except AccessDenied as e:
            bad += 1
            _decide(cfg, audit, decision="denied", reason=e.what, **entry)
            logger.warning("approval refused: %s (%d/%d bad attempts)", e.what, bad, MAX_BAD_ATTEMPTS)
            if bad >= MAX_BAD_ATTEMPTS:
                raise PromotionError("too many refused approval attempts", f"flow run {flow_run.id}",
                                     "start a new promotion") from None
            continue
        if not form.approve:
            _decide(cfg, audit, decision="rejected", **entry)
            raise PromotionError(f"rejected by {form.approver}: {form.comment or 'no comment'}", action,
                                 "nothing was changed")
        if form.approver in approvals:
            _decide(cfg, audit, decision="duplicate", **entry)
            continue
        approvals.append(form.approver)
        _decide(cfg, audit, decision="approved", **entry)
        logger.info("approval %d/%d by %s", len(approvals), cfg.promotion.required_approvals, form.approver)
    return approvals


@task(name="publish-target", retries=2, retry_delay_seconds=5, persist_result=False)
def publish_task(kind: str, uri: str, endpoint_url: str | None, sse: str | None, src: str, manifest: dict) -> dict:
    return make_target(kind, uri, endpoint_url, sse).publish(Path(src), manifest)


def publish_everywhere(cfg: PipelineConfig, version: str, info: dict, approved_by: list[str]) -> list[dict]:
    client, uri = _client(cfg)
    name = cfg.registry.model_name
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = download_hf_model(uri, name, version, Path(tmp) / "model")
        extra = {"data_fingerprint": info["tags"].get("llmops.data_fingerprint"),
                 "epsilon": info["tags"].get("llmops.dp.epsilon"), "approved_by": approved_by}
        for t in cfg.promotion.targets:
            src = model_dir
            if t.kind == "edge":
                src = Path(tmp) / "edge"
                try:
                    client.download_artifacts(info["run_id"], "edge", str(Path(tmp)))
                except Exception:  # noqa: BLE001 - reported by the edge target as a missing bundle
                    src.mkdir(exist_ok=True)
            manifest = file_manifest(src, name, version, extra)
            results.append(publish_task(t.kind, t.uri, t.endpoint_url, getattr(t, "sse", None), str(src), manifest))
    for t in cfg.promotion.targets:  # pointers move only after every target holds the full model
        make_target(t.kind, t.uri, t.endpoint_url, getattr(t, "sse", None)).point_current(name, version)
    return results


@flow(name="llmops-promotion", log_prints=True)
def promotion_flow(version: str, requested_by: str, config: PipelineConfig = PipelineConfig()) -> dict:
    cfg, logger, audit = config, get_run_logger(), _audit(config)
    name = cfg.registry.model_name
    subject = {"model": name, "version": str(version)}
    info = read_version(cfg, str(version))
    if problems := check_evidence(info["tags"]):
        _decide(cfg, audit, action="promote", decision="refused", reason="; ".join(problems),
                requested_by=requested_by, **subject, flow_run_id=str(flow_run.id))
        raise PromotionError("; ".join(problems), f"models:/{name}/{version}", "train a model that passes every check")
    summary = summary_markdown(name, str(version), info, requested_by, "Promotion")
    create_markdown_artifact(summary, key="promotion-summary", description=f"{name} v{version}")
    approvals = collect_approvals(cfg, "promote", subject, summary, requested_by)
    results = publish_everywhere(cfg, str(version), info, approvals)
    client, _ = _client(cfg)
    old = move_production_alias(client, name, str(version))
    client.set_model_version_tag(name, str(version), "llmops.approved_by", ",".join(approvals))
    _decide(cfg, audit, action="promote", decision="promoted", approved_by=approvals, previous=old, **subject,
            flow_run_id=str(flow_run.id))
    logger.info("%s v%s is now @production (previous: %s); targets: %s", name, version, old, results)
    return {"status": "promoted", "version": str(version), "previous": old, "approved_by": approvals,
            "targets": results}


@flow(name="llmops-rollback", log_prints=True)
def rollback_flow(requested_by: str, config: PipelineConfig = PipelineConfig()) -> dict:
    cfg, audit = config, _audit(config)
    client, _ = _client(cfg)
    name = cfg.registry.model_name
    try:
        prev = str(client.get_model_version_by_alias(name, "previous").version)
        cur = str(client.get_model_version_by_alias(name, "production").version)
    except Exception:  # noqa: BLE001
        raise PromotionError("nothing to roll back to (no @previous / @production)", f"model {name}",
                             "promote at least two versions first") from None
    subject = {"model": name, "version": prev, "from_version": cur}
    info = read_version(cfg, prev)
    summary = summary_markdown(name, prev, info, requested_by, f"Rollback from v{cur} to")
    approvals = collect_approvals(cfg, "rollback", subject, summary, requested_by)
    results = publish_everywhere(cfg, prev, info, approvals)  # idempotent: re-points the targets
    client.set_registered_model_alias(name, "production", prev)
    client.set_registered_model_alias(name, "previous", cur)
    _decide(cfg, audit, action="rollback", decision="rolled-back", approved_by=approvals, **subject,
            flow_run_id=str(flow_run.id))
    return {"status": "rolled-back", "production": prev, "previous": cur, "targets": results}
