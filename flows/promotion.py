"""Promotion and rollback flows: the decision run once per approved request (its rules: llmops/governance/).

    llmops promote --config configs/demo.yaml --version 3 --requested-by ml-alice --key-file alice.key --background
    llmops approval-code <flow-run-id> --approver rm-bob --key-file bob.key     # prints a single-use code
    llmops approve <flow-run-id> --approver rm-bob --key-file bob.key           # or: Resume in the Prefect UI
    llmops rollback --config configs/demo.yaml --requested-by rm-carol --key-file carol.key

Property: the only way a version reaches `@production` or a target is an approved, audited decision executed once;
every byte published or served is the byte that was evaluated. Attackers: a requester with the CLI and the Prefect
REST API (re-run a finished run, re-encode signatures, force states), anyone with MLflow EDIT (move aliases, replace
artifacts), anyone with write access to a target directory (symlinks, planted directories).

The flow reads governance from its own environment (never from the run config) and refuses it unless its digest is
the one the latest signed admin entry recorded; consumes its flow-run id (a run executes once: a second execution is
refused and audited); verifies the signed request (consumed by user + nonce); reads what is released from the signed
audit log (MLflow aliases are caches: one that disagrees is refused, named); checks the candidate's evidence against
the ledger; then pauses with a form. The approval message signs this execution's CSPRNG challenge, the subject, the
decision and an expiry; each approver decides once per execution. After enough distinct approvals the release state
is re-read from the log (compare-and-swap), every file is checked against the ledger's digests, the targets are
written (no symlink followed), the aliases follow the log. Every way the run ends is audited.
"""

from __future__ import annotations

import json
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.runtime import flow_run
from pydantic import Field

from llmops.config import PipelineConfig
from llmops.errors import AccessDenied, PromotionError
from llmops.governance.access import (
    CHALLENGE_ARTIFACT,
    approval_subject,
    challenge_markdown,
    submission_delay,
    verified_entries,
    verified_governance,
    verify_approval,
    verify_request,
)
from llmops.governance.audit import AuditLog, ReleaseState, release_divergences, release_state
from llmops.governance.decision import PolicyInForce, pinned_config, policy_in_force, release_lock
from llmops.governance.evidence import artifact_digest_problem, check_evidence, ledger_problems, model_digest_problem
from llmops.governance.policy import Governance, TargetSpec
from llmops.governance.store import GovernanceStore
from llmops.services import connect_registry, model_version_url
from tasks.promotion import file_manifest, make_target
from tasks.registry import download_hf_model, retry


class ApprovalInput(RunInput):
    approve: bool = Field(False, title="Approve", description="On = approve, off = reject")
    approver: str = Field(..., title="Approver", description="Your user name in governance")
    code: str = Field(
        ...,
        title="Approval code",
        description="Printed by `llmops approval-code <this run id> --approver YOU` (add --reject to "
        "reject): valid for this run and decision only, once",
    )
    comment: str = Field("", title="Comment", description="Why (kept in the audit log)")


@dataclass
class Gov:
    g: Governance
    store: GovernanceStore
    audit: AuditLog
    ended: bool = field(default=False)  # a terminal decision for this run is in the audit log


TERMINAL = {
    "refused",
    "timeout",
    "rejected",
    "promoted",
    "rolled-back",
    "aborted",
    "smoke-failed",
    "interrupted",
    "ended",
}


def _governance() -> Gov:
    g = verified_governance()
    return Gov(g, GovernanceStore(g.state_db), AuditLog.for_governance(g))


def released(gov: Gov, model: str) -> ReleaseState:
    """What the signed audit log (verified: signatures, chain, anchored head) says is released for `model`."""
    return release_state(verified_entries(gov.g, gov.store), model)


def _client(cfg: PipelineConfig):
    import mlflow

    uri = connect_registry(cfg.registry.tracking_uri, cfg.state_dir)
    return mlflow.MlflowClient(uri), uri


TAGGED_FIELDS = (
    "seq",
    "ts",
    "action",
    "decision",
    "approver",
    "requested_by",
    "approved_by",
    "reason",
    "comment",
    "from_version",
    "previous",
    "targets",
    "flow_run_id",
    "policy",
)


def _decide(cfg: PipelineConfig, gov: Gov, **entry) -> dict:
    """Append a decision to the signed audit log (the record of truth) and anchor it on the MLflow version as
    `llmops.decision.NNN` (who, what, when, why, the policy digest, and the audit line's seq:hash)."""
    record = gov.audit.append(policy=gov.g.digest()[:16], **entry)
    gov.ended = gov.ended or entry.get("decision") in TERMINAL
    name, version = entry.get("model"), entry.get("version")
    try:
        client, _ = _client(cfg)
        tags = retry(lambda: client.get_model_version(name, version)).tags
        n = sum(1 for k in tags if k.startswith("llmops.decision."))
        value = {
            k: (record[k][:200] if isinstance(record[k], str) else record[k])
            for k in TAGGED_FIELDS
            if record.get(k) not in (None, "")
        }
        value["audit"] = f"{record['seq']}:{record['hash']}"
        retry(
            lambda: client.set_model_version_tag(
                name, version, f"llmops.decision.{n + 1:03d}", json.dumps(value, sort_keys=True)[:4000]
            )
        )
    except Exception as e:  # noqa: BLE001 - the audit log already holds the decision
        get_run_logger().warning(
            "decision %s is in the audit log but could not be anchored on %s v%s (%s)",
            entry.get("decision"),
            name,
            version,
            type(e).__name__,
        )
    return record


@task(name="read-version", retries=2, retry_delay_seconds=3, persist_result=False)
def read_version(cfg: PipelineConfig, version: str, prod_version: str | None) -> dict:
    """The version's tags and metrics; `prod_version` is production as the signed audit log says (not the alias)."""
    client, uri = _client(cfg)
    name = cfg.registry.model_name
    mv = retry(lambda: client.get_model_version(name, version))
    run = retry(lambda: client.get_run(mv.run_id))
    prod_metrics = {}
    if prod_version:
        prod_metrics = retry(lambda: client.get_run(client.get_model_version(name, prod_version).run_id)).data.metrics
    return {
        "tags": dict(mv.tags),
        "metrics": run.data.metrics,
        "run_id": mv.run_id,
        "production_version": prod_version,
        "production_metrics": prod_metrics,
        "mlflow_url": model_version_url(uri, name, version),
    }


def _alias(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(retry(lambda: client.get_model_version_by_alias(name, alias)).version)
    except MlflowException:
        return None


def alias_divergences(client, st: ReleaseState) -> list[str]:
    """MLflow's @production/@previous against the signed log (the aliases are a cache anyone with EDIT can move)."""
    return release_divergences(st, {a: _alias(client, st.model, a) for a in ("production", "previous")}, {})


def set_release_aliases(client, st_after: ReleaseState) -> None:
    """Make MLflow's aliases the cache of the log's state after a decision (production, previous or none)."""
    from mlflow.exceptions import MlflowException

    name = st_after.model
    for alias, v in (("production", st_after.production), ("previous", st_after.previous)):
        if v:
            retry(lambda: client.set_registered_model_alias(name, alias, v))
        else:
            try:
                client.delete_registered_model_alias(name, alias)
            except MlflowException:
                pass


def summary_markdown(
    name: str,
    version: str,
    info: dict,
    requested_by: str,
    action: str,
    policy: PolicyInForce,
    challenge: str = "",
    expires: int = 0,
) -> str:
    t, m, pm = info["tags"], info["metrics"], info["production_metrics"]
    rows = []
    for key in ("eval.eval_loss", "eval.perplexity", "eval.latency_ms_per_token_p50", "eval.size_bytes"):
        if key in m:
            prod = f"{pm[key]:.4g}" if key in pm else "—"
            rows.append(f"| {key.removeprefix('eval.')} | {m[key]:.4g} | {prod} |")
    table = "\n".join(rows)
    targets = ", ".join(f"{n} ({t.kind} {t.uri})" for n, t in policy.targets.items())
    url = info.get("mlflow_url")
    mlflow_link = (
        f"[{name} version {version}]({url}) (model card, plots, lineage)" if url else f"models:/{name}/{version}"
    )
    return f"""## {action}: `{name}` version {version}
Requested by **{requested_by}** (signed request, verified). Production now (signed audit log): {("version " + info["production_version"]) if info["production_version"] else "none"}.

| metric | candidate | production |
|---|---|---|
{table}

- Privacy: ε = {t.get("llmops.dp.epsilon")} (δ = {t.get("llmops.dp.delta")}) this run; dataset total ε = {t.get("llmops.dp.epsilon_cumulative")} of budget {t.get("llmops.dp.budget")}
- Data fingerprint `{t.get("llmops.data_fingerprint", "")[:16]}…`; validation: {t.get("llmops.validation")}; PII: {t.get("llmops.pii")}
- Gate: {t.get("llmops.gate")}
- Code: {t.get("llmops.git_commit")}; training run: {t.get("prefect.flow_run_url") or t.get("prefect.flow_run_id")}
- MLflow: {mlflow_link}
- **Policy in force** (governance digest `{policy.digest[:16]}`): {policy.required} distinct approval(s) from {", ".join(policy.approvers) or "nobody enrolled"}; targets: {targets}

Approve: run `llmops approval-code {flow_run.id} --approver YOU --key-file YOUR.key` (add `--reject` to reject): it
signs **{approval_subject("promote" if action == "Promotion" else "rollback", name, version)}** for this execution of
this run only (challenge `{challenge}`, valid until {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))}),
switch **Approve** on (off = reject), enter your user name and the code, then **Resume**.
"""


def _forget_run_input() -> None:
    """Delete the submitted form from Prefect's run-input store (a code is single-use, but keep the store clean)."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.id
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        for item in client.filter_flow_run_input(
            flow_run_id=run_id, key_prefix="paused-", limit=200, exclude_keys=set()
        ):
            if item.key.endswith("-response"):
                client.delete_flow_run_input(flow_run_id=run_id, key=item.key)


class RunInterrupted(PromotionError):
    """The run's state was changed from outside (Prefect API/UI) while it waited for approval."""


def wait_for_form(form, timeout_s: int, poll_s: float = 2.0, on_planted=None):
    """Prefect's in-process pause with input, except that it notices when the run's state is forced elsewhere
    through the API (Cancelled, Completed, Scheduled, ...) instead of waiting out the timeout unseen: such an end
    raises RunInterrupted so that it is audited. Raises FlowPauseTimeout after `timeout_s`."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.flow_runs import (
        Paused,
        _observed_flow_pauses,
        keyset_from_paused_state,
        propose_state_sync,
        run_input_subclass_from_type,
    )

    ctx = FlowRunContext.get()
    run_id = ctx.flow_run.id
    proposed = Paused(timeout_seconds=timeout_s, reschedule=False, pause_key=str(_observed_flow_pauses(ctx)))
    form = run_input_subclass_from_type(form)
    keyset = keyset_from_paused_state(proposed)
    proposed.state_details.run_input_keyset = keyset
    with get_client(sync_client=True) as client:
        state = propose_state_sync(client=client, state=proposed, flow_run_id=run_id)
        if not state.is_paused():
            raise RunInterrupted(
                f"the run could not pause (state {state.name})", f"flow run {run_id}", "request the promotion again"
            )
        form.save(keyset, flow_run_id=run_id)
        deadline = time.monotonic() + timeout_s
        planted_seen = False
        while time.monotonic() < deadline:
            time.sleep(poll_s)
            st = client.read_flow_run(run_id).state
            if st is not None and st.is_paused() and _has_input(client, run_id, keyset["response"]):
                # Prefect's resume stores the response and sets Running in one request, so a response key that
                # stays while the run is still Paused was planted through the run-input API: it would make every
                # real approval fail with 409. Removed (and reported) on the second sighting.
                if planted_seen:
                    client.delete_flow_run_input(flow_run_id=run_id, key=keyset["response"])
                    if on_planted:
                        on_planted(keyset["response"])
                    planted_seen = False
                else:
                    planted_seen = True
                continue
            planted_seen = False
            if st is not None and st.is_running():
                try:
                    return form.load(keyset, flow_run_id=run_id)
                except Exception as e:  # noqa: BLE001 - resumed through the API without a form
                    raise RunInterrupted(
                        f"the run was set Running without an approval form ({type(e).__name__})",
                        f"flow run {run_id}",
                        "request the promotion again",
                    ) from None
            if st is None or not st.is_paused():
                raise RunInterrupted(
                    f"the run's state was forced to {st.name if st else 'none'} through the "
                    "Prefect API while it waited for approval",
                    f"flow run {run_id}",
                    "request the promotion again; check who changed it",
                )
    raise FlowPauseTimeout("Flow run was paused and never resumed.")


def _has_input(client, run_id, key: str) -> bool:
    import httpx
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_flow_run_input(flow_run_id=run_id, key=key)
        return True
    except ObjectNotFound:
        return False
    except httpx.HTTPStatusError as e:
        if e.response.status_code == 404:
            return False
        raise


def collect_approvals(
    cfg: PipelineConfig,
    gov: Gov,
    action: str,
    subject: dict,
    summary: str,
    requested_by: str,
    policy: PolicyInForce,
    challenge: str,
    expires: int,
) -> list[str]:
    """Pause until `policy.required` distinct verified approvals arrive; a verified rejection, a timeout or a state
    forced from outside raises PromotionError (audited). Invalid submissions are audited and the run keeps waiting;
    after `max_failures_per_approver` of them each next form waits longer (per run: nobody is locked out)."""
    logger, approvals, run_id, bad = get_run_logger(), [], str(flow_run.id), 0
    pol = gov.g.approvals
    while len(approvals) < policy.required:
        left = int(expires - time.time())
        try:
            if left <= 0:
                raise FlowPauseTimeout("expired")
            form = wait_for_form(
                ApprovalInput.with_initial_data(description=summary),
                left,
                on_planted=lambda key: (
                    logger.warning(
                        "removed a response planted in the run-input store (%s) that blocked approvals", key
                    ),
                    _decide(
                        cfg,
                        gov,
                        decision="denied",
                        flow_run_id=run_id,
                        reason=f"a response planted through the run-input API ({key}) blocked every approval; removed",
                        **subject,
                    ),
                ),
            )
        except FlowPauseTimeout:
            _decide(cfg, gov, decision="timeout", **subject, flow_run_id=run_id)
            raise PromotionError(
                f"no approval within {policy.timeout_s}s: nothing was changed",
                f"flow run {run_id}",
                "start the flow again when an approver is available",
            ) from None
        except RunInterrupted as e:
            _decide(
                cfg,
                gov,
                decision="interrupted",
                reason=e.what,
                requested_by=requested_by,
                **subject,
                flow_run_id=run_id,
            )
            raise
        _forget_run_input()
        approver = form.approver.strip()[:64]
        entry = dict(
            approver=approver, requested_by=requested_by, comment=form.comment[:500], **subject, flow_run_id=run_id
        )
        try:
            verify_approval(
                gov.g,
                gov.store,
                run_id=run_id,
                approver=approver,
                code=form.code.strip(),
                approve=form.approve,
                action=action,
                requested_by=requested_by,
                subject=approval_subject(action, subject["model"], subject["version"]),
                challenge=challenge,
                expires=expires,
            )
        except AccessDenied as e:
            bad += 1
            _decide(cfg, gov, decision="denied", reason=e.what, **entry)
            logger.warning("submission refused: %s", e.what)
            time.sleep(submission_delay(bad, pol.max_failures_per_approver, pol.lockout_s))
            continue
        if not form.approve:
            _decide(cfg, gov, decision="rejected", **entry)
            raise PromotionError(
                f"rejected by {approver}: {form.comment or 'no comment'}", action, "nothing was changed"
            )
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
    return _target(
        TargetSpec(**{k: v for k, v in spec.items() if k != "journal"}),
        spec.get("credentials_file"),
        spec.get("journal"),
    ).publish(Path(src), manifest)


def _target(t: TargetSpec, creds=None, journal=None):
    return make_target(t.kind, t.uri, t.endpoint_url, t.sse, credentials_file=creds, serve=t.serve, journal=journal)


def _spec(g: Governance, t: TargetSpec) -> dict:
    """Target spec with the credentials path resolved against governance (the path, never the secret) and the
    worker's debris journal (the governance store)."""
    d = t.model_dump(mode="json")
    if t.credentials_file:
        d["credentials_file"] = str(g.resolve(t.credentials_file))
    d["journal"] = str(g.state_db)
    return d


def target_of(g: Governance, t: TargetSpec):
    spec = _spec(g, t)
    return _target(t, spec.get("credentials_file"), spec["journal"])


def _workdir(g: Governance, run_id: str) -> Path:
    return g.resolve(g.state) / "work" / run_id


def publish_everywhere(
    cfg: PipelineConfig, gov: Gov, policy: PolicyInForce, version: str, info: dict, approved_by: list[str]
) -> list[dict]:
    client, uri = _client(cfg)
    name, work = cfg.registry.model_name, _workdir(gov.g, str(flow_run.id))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, mode=0o700)
    results = []
    try:
        model_dir = download_hf_model(uri, name, version, work / "model")
        if problem := model_digest_problem(gov.g, info["tags"], model_dir):
            raise PromotionError(
                problem,
                f"models:/{name}/{version}",
                "promote a version registered by llmops train from that attempt, unmodified",
            )
        extra = {
            "data_fingerprint": info["tags"].get("llmops.data_fingerprint"),
            "epsilon": info["tags"].get("llmops.dp.epsilon"),
            "approved_by": approved_by,
            "policy": policy.digest,  # a serve target's smoke test holds the new version to these:
            "evaluated": {
                k: v for k, v in info["metrics"].items() if k in ("eval.eval_loss", "eval.latency_ms_per_token_p50")
            },
        }
        manifests = {}
        for t in policy.targets.values():
            src = model_dir
            if t.kind == "edge":
                src = work / "edge"
                if not src.exists():
                    try:
                        client.download_artifacts(info["run_id"], "edge", str(work))
                    except Exception:  # noqa: BLE001 - reported by the edge target as a missing bundle
                        src.mkdir(exist_ok=True)
                    if problem := artifact_digest_problem(gov.g, info["tags"], "edge", src):
                        raise PromotionError(
                            problem,
                            f"models:/{name}/{version} (run {info['run_id']} edge/)",
                            "publish only the bundle the training attempt produced: retrain",
                        )
            key = str(src)
            manifests.setdefault(key, file_manifest(src, name, version, extra))  # hash each tree once
            results.append(publish_task(_spec(gov.g, t), key, manifests[key]))
        for t in policy.targets.values():  # pointers move only after every target holds the full model
            target_of(gov.g, t).point_current(name, version)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def recover_aborted(cfg: PipelineConfig, gov: Gov) -> list[str]:
    """Promotions whose process died (SIGKILL, OOM, reboot): audit them as aborted, mark their Prefect run Failed,
    and remove their download and (journal-recorded) target debris. Runs at the start of every promotion/rollback."""
    from prefect.client.orchestration import get_client
    from prefect.states import Failed

    from tasks.promotion import clean_debris

    done = []
    for it in gov.store.dead_intents():
        rid = it["run_id"]
        _decide(
            cfg,
            gov,
            action=it.get("action", "promote"),
            decision="aborted",
            model=it.get("model"),
            version=it.get("version"),
            flow_run_id=rid,
            requested_by=it.get("requested_by"),
            reason=f"process {it['pid']} died during stage '{it.get('stage')}'; nothing after it happened",
        )
        gov.ended = False  # that entry ended another run, not this one
        shutil.rmtree(_workdir(gov.g, rid), ignore_errors=True)
        for t in gov.g.targets.values():
            if t.kind in ("onprem", "edge") and not t.uri.startswith("s3://"):
                try:
                    clean_debris(Path(t.uri.removeprefix("file://")) / str(it.get("model")), gov.store)
                except (OSError, PromotionError) as e:
                    get_run_logger().warning("target %s: debris not cleaned (%s)", t.uri, e)
        try:
            with get_client(sync_client=True) as pc:
                pc.set_flow_run_state(rid, Failed(message="aborted: the promotion process died"), force=True)
        except Exception as e:  # noqa: BLE001 - the audit entry is what counts
            get_run_logger().warning("could not mark flow run %s failed (%s)", rid, type(e).__name__)
        gov.store.end_intent(rid)
        done.append(rid)
    return done


def _start(cfg: PipelineConfig, gov: Gov, action: str, request: str, version: str) -> str:
    """Consume this flow-run id (a run executes once), recover dead runs, verify the signed request (audited)."""
    name, run_id = cfg.registry.model_name, str(flow_run.id)
    if not gov.store.consume("execution", run_id, "", action):
        _decide(
            cfg,
            gov,
            action=action,
            decision="refused",
            model=name,
            version=str(version),
            flow_run_id=run_id,
            reason="this flow run already executed once (re-run through the Prefect API?): a run id executes once",
        )
        raise PromotionError(
            f"flow run {run_id} already executed: a promotion run executes once",
            f"flow run {run_id}",
            "request a new promotion (`llmops promote`)",
        )
    recover_aborted(cfg, gov)
    try:
        body = verify_request(gov.g, gov.store, request, action, name, version)
    except AccessDenied as e:
        _decide(
            cfg,
            gov,
            action=action,
            decision="refused",
            reason=e.what,
            model=name,
            version=str(version),
            flow_run_id=run_id,
        )
        raise
    return body["user"]


def _stage(gov: Gov, subject: dict, requested_by: str, stage: str) -> None:
    gov.store.begin_intent(str(flow_run.id), {**subject, "requested_by": requested_by, "stage": stage})


def _refuse(cfg: PipelineConfig, gov: Gov, what: str, where: str, fix: str, **entry) -> None:
    _decide(cfg, gov, decision="refused", reason=what, flow_run_id=str(flow_run.id), **entry)
    raise PromotionError(what, where, fix)


def _ended(cfg: PipelineConfig, gov: Gov, subject: dict, requested_by: str | None) -> None:
    """Audit an end no decision covered (an unexpected error, a cancellation): every way a run ends is in the log."""
    if gov.ended:
        return
    e = sys.exc_info()[1]
    try:
        _decide(
            cfg,
            gov,
            decision="ended",
            requested_by=requested_by,
            flow_run_id=str(flow_run.id),
            reason=f"{type(e).__name__}: {str(e)[:300]}" if e else "ended without a decision",
            **subject,
        )
    except Exception:  # noqa: BLE001 - the original error is what the caller must see
        pass


def _challenge(policy: PolicyInForce) -> tuple[str, int]:
    """A fresh CSPRNG challenge for this execution and when its codes expire; published as a Prefect artifact (not
    a secret: it only binds codes to this execution) for `llmops approval-code`."""
    challenge, expires = secrets.token_hex(16), int(time.time()) + policy.timeout_s
    create_markdown_artifact(
        challenge_markdown(str(flow_run.id), challenge, expires),
        key=CHALLENGE_ARTIFACT,
        description="what approval codes for this run sign",
    )
    return challenge, expires


@flow(name="llmops-promotion", log_prints=True)
def promotion_flow(version: str, request: str, config: PipelineConfig = PipelineConfig()) -> dict:
    """`request`: a signed request from `llmops promote` (see llmops.governance.access.make_request); not a secret."""
    gov, logger, version = _governance(), get_run_logger(), str(version)
    cfg = pinned_config(config, gov.g)
    name = cfg.registry.model_name
    subject, requested_by = {"action": "promote", "model": name, "version": version}, None
    try:
        requested_by = _start(cfg, gov, "promote", request, version)
        _stage(gov, subject, requested_by, "approval")
        client, _ = _client(cfg)
        st = released(gov, name)
        if diverged := alias_divergences(client, st):
            _refuse(
                cfg,
                gov,
                "; ".join(diverged),
                f"models:/{name}@production",
                "an admin restores the aliases from the log (`llmops audit reconcile`) and investigates who moved them",
                requested_by=requested_by,
                **subject,
            )
        if version == st.production:
            _refuse(
                cfg,
                gov,
                f"v{version} is already in production",
                f"models:/{name}/{version}",
                "promote another version",
                requested_by=requested_by,
                **subject,
            )
        info = read_version(cfg, version, st.production)
        if problems := check_evidence(info["tags"]) + ledger_problems(gov.g, info["tags"]):
            _refuse(
                cfg,
                gov,
                "; ".join(problems),
                f"models:/{name}/{version}",
                "train a model that passes every check",
                requested_by=requested_by,
                **subject,
            )
        policy = policy_in_force(gov.g, cfg, name, "promote")
        challenge, expires = _challenge(policy)
        summary = summary_markdown(name, version, info, requested_by, "Promotion", policy, challenge, expires)
        create_markdown_artifact(summary, key="promotion-summary", description=f"{name} v{version}")
        _decide(
            cfg,
            gov,
            decision="requested",
            requested_by=requested_by,
            flow_run_id=str(flow_run.id),
            reason=f"{policy.required} approval(s); targets {sorted(policy.targets)}",
            **subject,
        )
        approvals = collect_approvals(cfg, gov, "promote", subject, summary, requested_by, policy, challenge, expires)
        with release_lock(gov.g, name):  # re-read, publish, move aliases, log: one critical section
            now = _unmoved(
                cfg,
                gov,
                client,
                st,
                lambda n: f"production moved from {_vv(st.production)} to {_vv(n.production)} since the request",
                "request the promotion again so approvers see the current state",
                requested_by=requested_by,
                approved_by=approvals,
                **subject,
            )
            _stage(gov, subject, requested_by, "publish")
            try:
                results = publish_everywhere(cfg, gov, policy, version, info, approvals)
                after = ReleaseState(name, [*now.stack, version], {}, 0)
                set_release_aliases(client, after)
                client.set_model_version_tag(name, version, "llmops.approved_by", ",".join(approvals))
            except Exception as e:
                from llmops.serving.control import SmokeTestFailed  # the old version keeps serving

                _decide(
                    cfg,
                    gov,
                    decision="smoke-failed" if isinstance(e, SmokeTestFailed) else "aborted",
                    requested_by=requested_by,
                    approved_by=approvals,
                    reason=f"{type(e).__name__}: {str(e)[:300]}",
                    flow_run_id=str(flow_run.id),
                    **subject,
                )
                raise
            old = now.production
            _decide(
                cfg,
                gov,
                decision="promoted",
                requested_by=requested_by,
                approved_by=approvals,
                previous=old,
                targets=sorted(policy.targets),
                flow_run_id=str(flow_run.id),
                **subject,
            )
    except BaseException:
        _ended(cfg, gov, subject, requested_by)
        raise
    finally:
        gov.store.end_intent(str(flow_run.id))
    logger.info("%s v%s is now @production (previous: %s); targets: %s", name, version, old, results)
    return {
        "status": "promoted",
        "version": version,
        "previous": old,
        "approved_by": approvals,
        "requested_by": requested_by,
        "policy": policy.digest,
        "targets": results,
    }


def _unmoved(cfg: PipelineConfig, gov: Gov, client, st: ReleaseState, moved, fix: str, **entry) -> ReleaseState:
    """Compare-and-swap on the signed log (call under `release_lock`): the release state now must be the one the
    approvers saw (`st`) and MLflow's aliases must agree with it; otherwise refuse (audited) with `moved(now)` or the
    divergences. Returns the state now."""
    now = released(gov, st.model)
    diverged = alias_divergences(client, now)
    if now.stack != st.stack or diverged:
        _refuse(cfg, gov, "; ".join(diverged) or moved(now), f"models:/{st.model}@production", fix, **entry)
    return now


def _vv(v) -> str:
    return f"v{v}" if v else "none"


@flow(name="llmops-rollback", log_prints=True)
def rollback_flow(request: str, config: PipelineConfig = PipelineConfig()) -> dict:
    """Re-point production to the version before it, as the signed audit log records it: only to an audited
    promotion. `request` is signed for action 'rollback' and the version rolled back to."""
    gov = _governance()
    cfg = pinned_config(config, gov.g)
    client, _ = _client(cfg)
    name = cfg.registry.model_name
    st = released(gov, name)
    prev, cur = st.previous, st.production
    subject, requested_by = (
        {"action": "rollback", "model": name, "version": prev or "", "from_version": cur or ""},
        None,
    )
    try:
        if not prev:
            _refuse(
                cfg,
                gov,
                "nothing to roll back to: the signed audit log records no earlier promotion of this "
                f"model (production {_vv(cur)})",
                f"model {name}",
                "promote at least two versions first",
                **subject,
            )
        requested_by = _start(cfg, gov, "rollback", request, prev)
        _stage(gov, subject, requested_by, "approval")
        if diverged := alias_divergences(client, st):
            _refuse(
                cfg,
                gov,
                "; ".join(diverged),
                f"models:/{name}@production",
                "an admin restores the aliases from the log (`llmops audit reconcile`) and investigates",
                requested_by=requested_by,
                **subject,
            )
        info = read_version(cfg, prev, cur)
        policy = policy_in_force(gov.g, cfg, name, "rollback")
        challenge, expires = _challenge(policy)
        summary = summary_markdown(
            name, prev, info, requested_by, f"Rollback from v{cur} to", policy, challenge, expires
        )
        _decide(cfg, gov, decision="requested", requested_by=requested_by, flow_run_id=str(flow_run.id), **subject)
        approvals = collect_approvals(cfg, gov, "rollback", subject, summary, requested_by, policy, challenge, expires)
        with release_lock(gov.g, name):  # re-read, publish, move aliases, log: one critical section
            # a promotion that landed while this rollback waited would make it stale
            now = _unmoved(
                cfg,
                gov,
                client,
                st,
                lambda n: (
                    f"production/previous moved from {cur}/{prev} to {n.production}/{n.previous} since the request"
                ),
                "request the rollback again if it is still wanted",
                requested_by=requested_by,
                approved_by=approvals,
                **subject,
            )
            _stage(gov, subject, requested_by, "publish")
            try:
                results = publish_everywhere(cfg, gov, policy, prev, info, approvals)  # idempotent: re-points targets
                set_release_aliases(client, ReleaseState(name, now.stack[:-1], {}, 0))
            except Exception as e:
                _decide(
                    cfg,
                    gov,
                    decision="aborted",
                    requested_by=requested_by,
                    approved_by=approvals,
                    reason=f"{type(e).__name__}: {str(e)[:300]}",
                    flow_run_id=str(flow_run.id),
                    **subject,
                )
                raise
            _decide(
                cfg,
                gov,
                decision="rolled-back",
                requested_by=requested_by,
                approved_by=approvals,
                targets=sorted(policy.targets),
                flow_run_id=str(flow_run.id),
                **subject,
            )
    except BaseException:
        _ended(cfg, gov, subject, requested_by)
        raise
    finally:
        gov.store.end_intent(str(flow_run.id))
    after = now.stack[:-1]
    return {
        "status": "rolled-back",
        "production": prev,
        "previous": after[-2] if len(after) > 1 else None,
        "targets": results,
    }
