"""Promotion and rollback flows: wiring only (logic in tasks/promotion.py and tasks/access.py).

    llmops promote --config configs/demo.yaml --version 3 --requested-by ml-alice --key-file alice.key --background
    llmops approval-code <flow-run-id> --approver rm-bob --key-file bob.key     # prints a single-use code
    llmops approve <flow-run-id> --approver rm-bob --key-file bob.key           # or: Resume in the Prefect UI
    llmops rollback --config configs/demo.yaml --requested-by rm-carol --key-file carol.key

The flow reads governance from its own environment (never from the run config), verifies the signed request,
checks the candidate's evidence, then pauses with a form (approve, approver, code, comment). Each submitted code is
verified against the approver's enrolled public key, bound to this run and decision, consumed once, and audited;
the form is removed from Prefect's run-input store right after it is read. After enough distinct approvals the
production alias is re-read (compare-and-swap: refused if it moved since the request), the targets are written,
and the alias moves. A promotion whose process dies is found by the next one and audited as "aborted".
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field

from llmops.config import PipelineConfig
from llmops.governance import Governance, TargetSpec, load_governance
from tasks.access import (AccessDenied, AuditLog, GovernanceStore, approval_subject, verify_approval,
                          verify_request)
from tasks.promotion import PromotionError, check_evidence, file_manifest, make_target, move_production_alias
from tasks.registry import download_hf_model, model_version_url, retry, tracking_uri


class ApprovalInput(RunInput):
    approve: bool = Field(False, title="Approve", description="On = approve, off = reject")
    approver: str = Field(..., title="Approver", description="Your user name in governance")
    code: str = Field(..., title="Approval code",
                      description="Printed by `llmops approval-code <this run id> --approver YOU` (add --reject to "
                                  "reject): valid for this run and decision only, once")
    comment: str = Field("", title="Comment", description="Why (kept in the audit log)")


@dataclass
class Gov:
    g: Governance
    store: GovernanceStore
    audit: AuditLog


def _governance() -> Gov:
    g = load_governance(required=True)
    return Gov(g, GovernanceStore(g.state_db), AuditLog.for_governance(g))


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
            raise PromotionError(f"target(s) {bad} are not allowed for model '{model}' by governance",
                                 "promotion.targets",
                                 f"choose among {sorted(allowed)} (an admin manages targets in {g.path})")
        allowed = {n: allowed[n] for n in pc.targets}
    if not allowed:
        raise PromotionError(f"governance allows no target for model '{model}'", str(g.path),
                             "an admin adds one: `llmops governance target NAME --kind onprem --uri DIR`")
    perm = "approve-promotion" if action == "promote" else "approve-rollback"
    return PolicyInForce(required=max(g.approvals.required_for(model), pc.required_approvals or 0),
                         timeout_s=min(g.approvals.timeout_s, pc.approval_timeout_s or g.approvals.timeout_s),
                         targets=allowed, digest=g.digest(), approvers=g.holders(perm))


def _client(cfg: PipelineConfig):
    import mlflow

    uri = tracking_uri(cfg.registry.tracking_uri, cfg.state_dir)
    return mlflow.MlflowClient(uri), uri


TAGGED_FIELDS = ("seq", "ts", "action", "decision", "approver", "requested_by", "approved_by", "reason", "comment",
                 "from_version", "flow_run_id", "policy")


def _decide(cfg: PipelineConfig, gov: Gov, **entry) -> dict:
    """Append a decision to the signed audit log (the record of truth) and anchor it on the MLflow version as
    `llmops.decision.NNN` (who, what, when, why, the policy digest, and the audit line's seq:hash)."""
    record = gov.audit.append(policy=gov.g.digest()[:16], **entry)
    name, version = entry.get("model"), entry.get("version")
    try:
        client, _ = _client(cfg)
        tags = retry(lambda: client.get_model_version(name, version)).tags
        n = sum(1 for k in tags if k.startswith("llmops.decision."))
        value = {k: (record[k][:200] if isinstance(record[k], str) else record[k])
                 for k in TAGGED_FIELDS if record.get(k) not in (None, "")}
        value["audit"] = f"{record['seq']}:{record['hash']}"
        retry(lambda: client.set_model_version_tag(name, version, f"llmops.decision.{n + 1:03d}",
                                                   json.dumps(value, sort_keys=True)[:4000]))
    except Exception as e:  # noqa: BLE001 - the audit log already holds the decision
        get_run_logger().warning("decision %s is in the audit log but could not be anchored on %s v%s (%s)",
                                 entry.get("decision"), name, version, type(e).__name__)
    return record


@task(name="read-version", retries=2, retry_delay_seconds=3, persist_result=False)
def read_version(cfg: PipelineConfig, version: str) -> dict:
    client, uri = _client(cfg)
    name = cfg.registry.model_name
    mv = retry(lambda: client.get_model_version(name, version))
    run = retry(lambda: client.get_run(mv.run_id))
    prod_version, prod_metrics = _alias(client, name, "production"), {}
    if prod_version:
        prod_metrics = retry(lambda: client.get_run(client.get_model_version(name, prod_version).run_id)).data.metrics
    return {"tags": dict(mv.tags), "metrics": run.data.metrics, "run_id": mv.run_id,
            "production_version": prod_version, "production_metrics": prod_metrics,
            "mlflow_url": model_version_url(uri, name, version)}


def _alias(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(retry(lambda: client.get_model_version_by_alias(name, alias)).version)
    except MlflowException:
        return None


def summary_markdown(name: str, version: str, info: dict, requested_by: str, action: str,
                     policy: PolicyInForce) -> str:
    t, m, pm = info["tags"], info["metrics"], info["production_metrics"]
    rows = []
    for key in ("eval.eval_loss", "eval.perplexity", "eval.latency_ms_per_token_p50", "eval.size_bytes"):
        if key in m:
            prod = f"{pm[key]:.4g}" if key in pm else "—"
            rows.append(f"| {key.removeprefix('eval.')} | {m[key]:.4g} | {prod} |")
    table = "\n".join(rows)
    targets = ", ".join(f"{n} ({t.kind} {t.uri})" for n, t in policy.targets.items())
    url = info.get("mlflow_url")
    mlflow_link = f"[{name} version {version}]({url}) (model card, plots, lineage)" if url else \
        f"models:/{name}/{version}"
    return f"""## {action}: `{name}` version {version}
Requested by **{requested_by}** (signed request, verified). Production now: {('version ' + info['production_version']) if info['production_version'] else 'none'}.

| metric | candidate | production |
|---|---|---|
{table}

- Privacy: ε = {t.get('llmops.dp.epsilon')} (δ = {t.get('llmops.dp.delta')}) this run; dataset total ε = {t.get('llmops.dp.epsilon_cumulative')} of budget {t.get('llmops.dp.budget')}
- Data fingerprint `{t.get('llmops.data_fingerprint', '')[:16]}…`; validation: {t.get('llmops.validation')}; PII: {t.get('llmops.pii')}
- Gate: {t.get('llmops.gate')}
- Code: {t.get('llmops.git_commit')}; training run: {t.get('prefect.flow_run_url') or t.get('prefect.flow_run_id')}
- MLflow: {mlflow_link}
- **Policy in force** (governance digest `{policy.digest[:16]}`): {policy.required} distinct approval(s) from {', '.join(policy.approvers) or 'nobody enrolled'}; targets: {targets}

Approve: run `llmops approval-code {flow_run.id} --approver YOU --key-file YOUR.key` (add `--reject` to reject): it
signs **{approval_subject("promote" if action == "Promotion" else "rollback", name, version)}** for this run only,
switch **Approve** on (off = reject), enter your user name and the code, then **Resume**.
"""


def _forget_run_input() -> None:
    """Delete the submitted form from Prefect's run-input store (a code is single-use, but keep the store clean)."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.id
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        for item in client.filter_flow_run_input(flow_run_id=run_id, key_prefix="paused-", limit=200,
                                                 exclude_keys=set()):
            if item.key.endswith("-response"):
                client.delete_flow_run_input(flow_run_id=run_id, key=item.key)


def collect_approvals(cfg: PipelineConfig, gov: Gov, action: str, subject: dict, summary: str, requested_by: str,
                      policy: PolicyInForce) -> list[str]:
    """Pause until `policy.required` distinct verified approvals arrive; a verified rejection or a timeout raises
    PromotionError. Invalid submissions are audited and the run keeps waiting (nobody can kill it with junk)."""
    logger, approvals, run_id = get_run_logger(), [], str(flow_run.id)
    while len(approvals) < policy.required:
        try:
            form = pause_flow_run(wait_for_input=ApprovalInput.with_initial_data(description=summary),
                                  timeout=policy.timeout_s, poll_interval=2)
        except FlowPauseTimeout:
            _decide(cfg, gov, decision="timeout", **subject, flow_run_id=run_id)
            raise PromotionError(f"no approval within {policy.timeout_s}s: nothing was changed",
                                 f"flow run {run_id}", "start the flow again when an approver is available")
        _forget_run_input()
        approver = form.approver.strip()[:64]
        entry = dict(approver=approver, requested_by=requested_by, comment=form.comment[:500],
                     **subject, flow_run_id=run_id)
        try:
            verify_approval(gov.g, gov.store, run_id=run_id, approver=approver, code=form.code,
                            approve=form.approve, action=action, requested_by=requested_by,
                            subject=approval_subject(action, subject["model"], subject["version"]))
        except AccessDenied as e:
            _decide(cfg, gov, decision="denied", reason=e.what, **entry)
            logger.warning("submission refused: %s", e.what)
            continue
        if not form.approve:
            _decide(cfg, gov, decision="rejected", **entry)
            raise PromotionError(f"rejected by {approver}: {form.comment or 'no comment'}", action,
                                 "nothing was changed")
        if approver in approvals:
            _decide(cfg, gov, decision="duplicate", **entry)
            continue
        approvals.append(approver)
        _decide(cfg, gov, decision="approved", **entry)
        logger.info("approval %d/%d by %s", len(approvals), policy.required, approver)
    return approvals


def _retryable(task, task_run, state) -> bool:
    """A failed smoke test is a verdict on the model, not a transient error: never retried."""
    from llmops.serving.control import SmokeTestFailed

    return not isinstance(state.result(raise_on_failure=False), SmokeTestFailed)


@task(name="publish-target", retries=2, retry_delay_seconds=5, persist_result=False, retry_condition_fn=_retryable)
def publish_task(spec: dict, src: str, manifest: dict) -> dict:
    return _target(TargetSpec(**spec), spec.get("credentials_file")).publish(Path(src), manifest)


def _target(t: TargetSpec, creds=None):
    return make_target(t.kind, t.uri, t.endpoint_url, t.sse, credentials_file=creds, serve=t.serve)


def _spec(g: Governance, t: TargetSpec) -> dict:
    """Target spec with the credentials path resolved against governance (the path, never the secret)."""
    d = t.model_dump(mode="json")
    if t.credentials_file:
        d["credentials_file"] = str(g.resolve(t.credentials_file))
    return d


def _workdir(g: Governance, run_id: str) -> Path:
    return g.resolve(g.state) / "work" / run_id


def publish_everywhere(cfg: PipelineConfig, gov: Gov, policy: PolicyInForce, version: str, info: dict,
                       approved_by: list[str]) -> list[dict]:
    client, uri = _client(cfg)
    name, work = cfg.registry.model_name, _workdir(gov.g, str(flow_run.id))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, mode=0o700)
    results = []
    try:
        model_dir = download_hf_model(uri, name, version, work / "model")
        if problem := model_digest_problem(gov.g, info["tags"], model_dir):
            raise PromotionError(problem, f"models:/{name}/{version}",
                                 "promote a version registered by llmops train from that attempt, unmodified")
        extra = {"data_fingerprint": info["tags"].get("llmops.data_fingerprint"),
                 "epsilon": info["tags"].get("llmops.dp.epsilon"), "approved_by": approved_by,
                 "policy": policy.digest,  # a serve target's smoke test holds the new version to these:
                 "evaluated": {k: v for k, v in info["metrics"].items()
                               if k in ("eval.eval_loss", "eval.latency_ms_per_token_p50")}}
        manifests = {}
        for tname, t in policy.targets.items():
            src = model_dir
            if t.kind == "edge":
                src = work / "edge"
                try:
                    client.download_artifacts(info["run_id"], "edge", str(work))
                except Exception:  # noqa: BLE001 - reported by the edge target as a missing bundle
                    src.mkdir(exist_ok=True)
            key = str(src)
            manifests.setdefault(key, file_manifest(src, name, version, extra))  # hash each tree once
            results.append(publish_task(_spec(gov.g, t), key, manifests[key]))
        for tname, t in policy.targets.items():  # pointers move only after every target holds the full model
            spec = _spec(gov.g, t)
            _target(t, spec.get("credentials_file")).point_current(name, version)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def recover_aborted(cfg: PipelineConfig, gov: Gov) -> list[str]:
    """Promotions whose process died (SIGKILL, OOM, reboot): audit them as aborted, mark their Prefect run Failed,
    and remove their download and target debris. Runs at the start of every promotion and rollback."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    from tasks.promotion import clean_debris

    done = []
    for it in gov.store.dead_intents():
        rid = it["run_id"]
        _decide(cfg, gov, action=it.get("action", "promote"), decision="aborted", model=it.get("model"),
                version=it.get("version"), flow_run_id=rid, requested_by=it.get("requested_by"),
                reason=f"process {it['pid']} died during stage '{it.get('stage')}'; nothing after it happened")
        shutil.rmtree(_workdir(gov.g, rid), ignore_errors=True)
        for t in gov.g.targets.values():
            if t.kind in ("onprem", "edge") and not t.uri.startswith("s3://"):
                clean_debris(Path(t.uri.removeprefix("file://")) / str(it.get("model")))
        try:
            with get_client(sync_client=True) as pc:
                pc.set_flow_run_state(rid, Failed(message="aborted: the promotion process died"), force=True)
        except Exception as e:  # noqa: BLE001 - the audit entry is what counts
            get_run_logger().warning("could not mark flow run %s failed (%s)", rid, type(e).__name__)
        gov.store.end_intent(rid)
        done.append(rid)
    return done


def ledger_problems(g: Governance, tags: dict) -> list[str]:
    """Cross-check the version's privacy tags against the deployment's ledger (see tasks.promotion.check_ledger)."""
    from tasks.promotion import check_ledger
    from tasks.privacy import open_ledger

    ledger = open_ledger(g.ledger)
    entry = ledger.entry(tags.get("llmops.dp.attempt_id", "")) if tags.get("llmops.dp.attempt_id") else None
    spent = ledger.spent(entry.fingerprint, entry.delta, entry.accountant) if entry else None
    return check_ledger(tags, entry, spent, g.privacy.dataset_budget_epsilon)


def model_digest_problem(g: Governance, tags: dict, model_dir: Path) -> str | None:
    """The files about to be published against the model the ledger's training attempt produced: registry tags can be
    copied onto another version and artifacts replaced by anyone with EDIT; the ledger row is governance-side."""
    from tasks.model import dir_digest
    from tasks.privacy import open_ledger

    aid = tags.get("llmops.dp.attempt_id", "")
    entry = open_ledger(g.ledger).entry(aid) if aid else None
    if entry is None:
        return f"training attempt {aid or '(none)'} is not in the deployment's privacy ledger"
    if not entry.model_digest:
        return (f"the ledger records no model for training attempt {aid} (trained before model digests were "
                "recorded, or the attempt did not complete): retrain to promote")
    got = dir_digest(model_dir)
    if got != entry.model_digest:
        return (f"the registered model files (digest {got[:12]}) are not the model training attempt {aid} produced "
                f"({entry.model_digest[:12]})")
    return None


def pinned_config(cfg: PipelineConfig, g: Governance) -> PipelineConfig:
    """The run config with governance's registry: a requester must not point a promotion at an MLflow of their own
    (where any evidence tag can be written)."""
    if not g.registry_uri:
        return cfg
    mine = cfg.registry.tracking_uri
    if mine and mine != g.registry_uri:
        raise PromotionError(f"registry.tracking_uri {mine!r} is not the registry governance pins for promotions",
                             "registry.tracking_uri", f"leave it unset (governance uses {g.registry_uri!r})")
    return cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"tracking_uri": g.registry_uri})})


def _start(cfg: PipelineConfig, action: str, request: str, version: str) -> tuple[Gov, str]:
    """Governance from this process's environment; recover dead runs; verify the signed request (audited)."""
    gov = _governance()
    recover_aborted(cfg, gov)
    name = cfg.registry.model_name
    try:
        body = verify_request(gov.g, gov.store, request, action, name, version)
    except AccessDenied as e:
        _decide(cfg, gov, action=action, decision="refused", reason=e.what, model=name, version=str(version),
                flow_run_id=str(flow_run.id))
        raise
    return gov, body["user"]


def _stage(gov: Gov, subject: dict, requested_by: str, stage: str) -> None:
    gov.store.begin_intent(str(flow_run.id), {**subject, "requested_by": requested_by, "stage": stage})


def _refuse(cfg: PipelineConfig, gov: Gov, what: str, where: str, fix: str, **entry) -> None:
    _decide(cfg, gov, decision="refused", reason=what, flow_run_id=str(flow_run.id), **entry)
    raise PromotionError(what, where, fix)


@flow(name="llmops-promotion", log_prints=True)
def promotion_flow(version: str, request: str, config: PipelineConfig = PipelineConfig()) -> dict:
    """`request`: a signed request from `llmops promote` (see tasks/access.make_request); not a secret."""
    cfg, logger, version = pinned_config(config, load_governance(required=True)), get_run_logger(), str(version)
    name = cfg.registry.model_name
    gov, requested_by = _start(cfg, "promote", request, version)
    subject = {"action": "promote", "model": name, "version": version}
    _stage(gov, subject, requested_by, "approval")
    try:
        info = read_version(cfg, version)
        if problems := check_evidence(info["tags"]) + ledger_problems(gov.g, info["tags"]):
            _refuse(cfg, gov, "; ".join(problems), f"models:/{name}/{version}", "train a model that passes every check",
                    requested_by=requested_by, **subject)
        policy = policy_in_force(gov.g, cfg, name, "promote")
        summary = summary_markdown(name, version, info, requested_by, "Promotion", policy)
        create_markdown_artifact(summary, key="promotion-summary", description=f"{name} v{version}")
        _decide(cfg, gov, decision="requested", requested_by=requested_by, flow_run_id=str(flow_run.id),
                reason=f"{policy.required} approval(s); targets {sorted(policy.targets)}", **subject)
        approvals = collect_approvals(cfg, gov, "promote", subject, summary, requested_by, policy)
        client, _ = _client(cfg)
        now = _alias(client, name, "production")
        if now != info["production_version"]:  # compare-and-swap: the approvers saw another production
            _refuse(cfg, gov, f"production moved from {info['production_version']} to {now} since the request",
                    f"models:/{name}@production", "request the promotion again so approvers see the current state",
                    requested_by=requested_by, approved_by=approvals, **subject)
        _stage(gov, subject, requested_by, "publish")
        try:
            results = publish_everywhere(cfg, gov, policy, version, info, approvals)
            old = move_production_alias(client, name, version)
            client.set_model_version_tag(name, version, "llmops.approved_by", ",".join(approvals))
        except Exception as e:
            from llmops.serving.control import SmokeTestFailed  # the old version keeps serving

            _decide(cfg, gov, decision="smoke-failed" if isinstance(e, SmokeTestFailed) else "aborted",
                    requested_by=requested_by, approved_by=approvals,
                    reason=f"{type(e).__name__}: {str(e)[:300]}", flow_run_id=str(flow_run.id), **subject)
            raise
        _decide(cfg, gov, decision="promoted", requested_by=requested_by, approved_by=approvals, previous=old,
                flow_run_id=str(flow_run.id), **subject)
    finally:
        gov.store.end_intent(str(flow_run.id))
    logger.info("%s v%s is now @production (previous: %s); targets: %s", name, version, old, results)
    return {"status": "promoted", "version": version, "previous": old, "approved_by": approvals,
            "requested_by": requested_by, "policy": policy.digest, "targets": results}


@flow(name="llmops-rollback", log_prints=True)
def rollback_flow(request: str, config: PipelineConfig = PipelineConfig()) -> dict:
    """Re-point production to @previous. `request` is signed for action 'rollback' and the version rolled back to."""
    cfg = pinned_config(config, load_governance(required=True))
    client, _ = _client(cfg)
    name = cfg.registry.model_name
    prev, cur = _alias(client, name, "previous"), _alias(client, name, "production")
    if not prev or not cur:
        raise PromotionError("nothing to roll back to (no @previous / @production)", f"model {name}",
                             "promote at least two versions first")
    gov, requested_by = _start(cfg, "rollback", request, prev)
    subject = {"action": "rollback", "model": name, "version": prev, "from_version": cur}
    _stage(gov, subject, requested_by, "approval")
    try:
        info = read_version(cfg, prev)
        policy = policy_in_force(gov.g, cfg, name, "rollback")
        summary = summary_markdown(name, prev, info, requested_by, f"Rollback from v{cur} to", policy)
        _decide(cfg, gov, decision="requested", requested_by=requested_by, flow_run_id=str(flow_run.id), **subject)
        approvals = collect_approvals(cfg, gov, "rollback", subject, summary, requested_by, policy)
        now = (_alias(client, name, "production"), _alias(client, name, "previous"))
        if now != (cur, prev):  # a promotion landed while this rollback waited: re-applying it would be stale
            _refuse(cfg, gov, f"production/previous moved from {cur}/{prev} to {now[0]}/{now[1]} since the request",
                    f"models:/{name}@production", "request the rollback again if it is still wanted",
                    requested_by=requested_by, approved_by=approvals, **subject)
        _stage(gov, subject, requested_by, "publish")
        try:
            results = publish_everywhere(cfg, gov, policy, prev, info, approvals)  # idempotent: re-points targets
            client.set_registered_model_alias(name, "production", prev)
            client.set_registered_model_alias(name, "previous", cur)
        except Exception as e:
            _decide(cfg, gov, decision="aborted", requested_by=requested_by, approved_by=approvals,
                    reason=f"{type(e).__name__}: {str(e)[:300]}", flow_run_id=str(flow_run.id), **subject)
            raise
        _decide(cfg, gov, decision="rolled-back", requested_by=requested_by, approved_by=approvals,
                flow_run_id=str(flow_run.id), **subject)
    finally:
        gov.store.end_intent(str(flow_run.id))
    return {"status": "rolled-back", "production": prev, "previous": cur, "targets": results}
