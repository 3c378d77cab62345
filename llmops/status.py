"""`llmops status`: what runs for this state dir, what waits for a release manager, what is in production.

    llmops status          # a table for people
    llmops status --json   # the same for scripts

Services come from the state dir's record (`llmops services start [--team]`); pending approvals are the paused
promotion/rollback runs on its Prefect server (with API auth in team mode: the auth string from the secrets file);
production versions come from the registry promotions use (governance's pinned one, else the state dir's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmops import services

APPROVAL_FLOWS = ("llmops-promotion", "llmops-rollback")


def _prefect_settings(state: Path) -> dict:
    rec = services.read_record(state)
    if rec.get("mode") == "team":
        env = services.team_env(state)
        return {"url": env["PREFECT_API_URL"], "auth": env["PREFECT_API_AUTH_STRING"]}
    url = (rec.get("prefect") or {}).get("url") or os.environ.get("PREFECT_API_URL")
    return {"url": url, "auth": os.environ.get("PREFECT_API_AUTH_STRING")}


def pending_approvals(state: Path) -> tuple[list[dict], str | None]:
    """Paused promotion/rollback runs, newest first; (rows, why none could be read)."""
    s = _prefect_settings(state)
    if not s["url"] or not services.healthy(s["url"]):
        return [], "no Prefect server for this state dir (llmops services start)"
    import prefect.settings as ps
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    ui = s["url"].removesuffix("/api")
    settings = {ps.PREFECT_API_URL: s["url"]} | ({ps.PREFECT_API_AUTH_STRING: s["auth"]} if s["auth"] else {})
    rows = []
    with ps.temporary_settings(settings), get_client(sync_client=True) as client:
        flows = {
            f.id: f.name
            for f in client.read_flows(flow_filter=FlowFilter(name=FlowFilterName(any_=list(APPROVAL_FLOWS))))
        }
        if not flows:
            return [], None
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=list(APPROVAL_FLOWS))),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))
            ),
            limit=50,
        )
        for run in runs:
            try:
                req = json.loads(run.parameters.get("request") or "{}")
            except (TypeError, ValueError):
                req = {}
            rows.append(
                {
                    "run_id": str(run.id),
                    "flow": flows.get(run.flow_id, "?"),
                    "run_name": run.name,
                    "action": req.get("action", "?"),
                    "model": req.get("model", "?"),
                    "version": str(req.get("version", run.parameters.get("version", "?"))),
                    "requested_by": req.get("user", "?"),
                    "since": run.state.timestamp.isoformat() if run.state and run.state.timestamp else None,
                    "url": services.ui_run_url(str(run.id), ui=ui),
                }
            )
    return rows, None


def production_versions(state: Path) -> tuple[list[dict], str | None]:
    """Every registered model with its @production version (None when nothing is promoted yet)."""
    from llmops.errors import LLMOpsError
    from llmops.governance.policy import load_governance
    from llmops.services import connect_registry, model_version_url

    try:
        uri = connect_registry(load_governance().registry_uri, state)  # governance's pin wins; team auth
    except LLMOpsError as e:
        return [], str(e)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return [], None  # no registry yet (and do not create one here)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    client, rows = mlflow.MlflowClient(uri), []
    try:
        models = client.search_registered_models()
    except Exception as e:  # noqa: BLE001 - a status page shows what it cannot read, it does not crash
        return [], f"{uri}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    logged = _logged_production()
    for rm in models:
        aliases = dict(getattr(rm, "aliases", None) or {})
        prod = aliases.get("production")
        diverged = None
        if logged is not None and str(prod or "") != (logged.get(rm.name) or ""):
            diverged = (
                f"MLflow @production is {'v' + str(prod) if prod else 'nothing'} but the signed audit log says "
                f"{'v' + logged[rm.name] if logged.get(rm.name) else 'nothing'}"
            )
        rows.append(
            {
                "model": rm.name,
                "production": str(prod) if prod else None,
                "audit_log_production": logged.get(rm.name) if logged is not None else None,
                "diverged": diverged,
                "candidate": str(aliases["candidate"]) if aliases.get("candidate") else None,
                "url": model_version_url(uri, rm.name, prod) if prod else None,
                "registry": uri,
            }
        )
    return rows, None


def _logged_production() -> dict[str, str | None] | None:
    """Production per model from the signed audit log, where this process can read and verify it (else None)."""
    from llmops.governance.access import verified_entries
    from llmops.governance.audit import release_state
    from llmops.governance.policy import load_governance

    try:
        g = load_governance()
        if not os.access(g.audit_log, os.R_OK):
            return None
        entries = verified_entries(g)
    except Exception:  # noqa: BLE001 - `llmops audit verify` names the problem; status shows what it can
        return None
    return {m: release_state(entries, m).production for m in {e.get("model") for e in entries if e.get("model")}}


def collect(state: Path) -> dict:
    state = Path(state).resolve()
    try:
        approvals, why_a = pending_approvals(state)
    except Exception as e:  # noqa: BLE001 - a status page shows what it cannot read (e.g. 401: wrong auth string)
        approvals, why_a = [], f"Prefect: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    models, why_m = production_versions(state)
    return {
        "state_dir": str(state),
        "mode": services.read_record(state).get("mode"),
        "services": services.service_rows(state),
        "pending_approvals": approvals,
        "models": models,
        "problems": [w for w in (why_a, why_m) if w],
    }


def render(r: dict) -> str:
    out = [f"state dir {r['state_dir']} ({r['mode'] or 'no services running: llmops services start'})", "", "SERVICES"]
    for s in r["services"]:
        out.append(f"  {s['name']:<17} {'up  ' if s['healthy'] else 'DOWN'}  {s['url']:<34} pid {s['pid'] or '-'}")
    if not r["services"]:
        out.append("  (none)")
    out += ["", "PENDING APPROVALS"]
    for a in r["pending_approvals"]:
        out.append(f"  {a['action']:<9} {a['model']} v{a['version']} requested by {a['requested_by']}  {a['url']}")
        out.append(f"            llmops approve {a['run_id']} --approver <release-manager> --key-file <their key>")
    if not r["pending_approvals"]:
        out.append("  (none)")
    out += ["", "PRODUCTION"]
    for m in r["models"]:
        where = m["url"] or ""
        out.append(
            f"  {m['model']:<24} {('v' + m['production']) if m['production'] else '(none)':<8} "
            f"candidate {('v' + m['candidate']) if m['candidate'] else '-':<6} {where}"
        )
        if m.get("diverged"):
            out.append(f"    DIVERGED: {m['diverged']} (llmops audit verify)")
    if not r["models"]:
        out.append("  (no registered models)")
    out += [f"note: {p}" for p in r["problems"]]
    return "\n".join(out)
