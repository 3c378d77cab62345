"""`llmops promote`, `rollback`, `approval-code`, `approve`: signed requests, the paused flows, their approval."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from flows.cli.common import _config, _key_file, _quiet_user_errors, _record_background, _state_dir, with_config
from llmops.errors import LLMOpsError


def _resolve_version(cfg, version: str) -> str:
    if version.isdigit():
        return version
    import mlflow

    from llmops.services import connect_registry

    client = mlflow.MlflowClient(connect_registry(cfg.registry.tracking_uri, cfg.state_dir))
    try:
        return str(client.get_model_version_by_alias(cfg.registry.model_name, version).version)
    except Exception:  # noqa: BLE001
        raise LLMOpsError(
            f"no version under alias '{version}'",
            f"model {cfg.registry.model_name}",
            "train a model that passes the gate, or pass a version number",
        ) from None


def _background(args, flow_name: str, registry: str = "") -> int:
    """Re-run this very command (every option kept, minus --background) in a detached process, wait until its
    flow pauses, print how to approve it."""
    import subprocess
    import time

    from llmops import services

    if not os.environ.get("PREFECT_API_URL"):
        raise LLMOpsError(
            "a background approval needs a running Prefect server",
            "PREFECT_API_URL",
            "run `llmops services start` and export the PREFECT_API_URL it prints",
        )
    import secrets

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    state = _state_dir(args)
    run_name = f"{flow_name.removeprefix('llmops-')}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    log = state / "logs" / f"{run_name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    argv = [a for a in args.argv if a != "--background"]
    # the child names its flow run; we look for that name only (never "a recent paused run of this flow")
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *argv],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, RUN_NAME_ENV: run_name},
    )
    _record_background(_state_dir(), run_name, proc.pid)  # services' home
    with get_client(sync_client=True) as client:
        while time.time() - started < 600:
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name]))):
                if run.state and run.state.is_paused():
                    return _print_approval_help(run.id, args.requested_by, log, services, registry)
                if run.state and run.state.is_final():
                    raise LLMOpsError(f"{flow_name} ended as {run.state.name} before pausing", str(log), "read the log")
            if proc.poll() not in (None, 0):
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
                raise LLMOpsError(f"{flow_name} stopped before pausing: {tail[0][:300]}", str(log), "read the log")
            time.sleep(1)
    raise LLMOpsError(f"{flow_name} did not pause within 10 minutes", str(log), "read the log")


RUN_NAME_ENV = "LLMOPS_FLOW_RUN_NAME"


def _named(flow):
    """The flow with the run name `--background` chose for it (so the parent finds exactly this run)."""
    name = os.environ.pop(RUN_NAME_ENV, None)
    return flow.with_options(flow_run_name=name) if name else flow


def _print_approval_help(run_id, requested_by: str, log: Path, services, registry: str = "") -> int:
    from llmops.governance.policy import load_governance

    g = load_governance()
    who = ", ".join(g.holders("approve-promotion")) or "nobody yet (an admin runs `llmops users add`)"
    print(f"""
Waiting for approval (requested by {requested_by}, signed). Release managers: {who}.{registry}
  Prefect UI : {services.ui_run_url(str(run_id), ui=os.environ.get("PREFECT_API_URL", "").removesuffix("/api") or None)}
               1. llmops approval-code {run_id} --approver <release-manager> --key-file <their key>
               2. in the UI: Resume, switch Approve on, enter the approver name + that code, Resume
  CLI        : llmops approve {run_id} --approver <release-manager> --key-file <their key>
               (add --reject --comment "why" to reject)
  Flow log   : {log}
""")
    return 0


def _signed_request(args, action: str, model: str, version: str) -> str:
    from llmops.governance.access import make_request
    from llmops.governance.keys import load_private_key

    return make_request(load_private_key(_key_file(args)), args.requested_by, action, model, version)


def _promotion_config(args):
    """The run config with governance's pinned registry (if this machine has governance)."""
    from llmops.governance.decision import pinned_config
    from llmops.governance.policy import load_governance

    return pinned_config(_config(args), load_governance())


def cmd_promote(args) -> int:
    cfg = _promotion_config(args)
    version = _resolve_version(cfg, args.version)
    if args.background:
        from llmops.services import connect_registry, model_version_url

        uri = connect_registry(cfg.registry.tracking_uri, cfg.state_dir)
        link = model_version_url(uri, cfg.registry.model_name, version)
        where = (
            f"\n  MLflow UI  : {link}  (model card, plots, evidence)"
            if link
            else f"\n  MLflow     : models:/{cfg.registry.model_name}/{version} (tracking URI {uri}; `llmops services "
            f"start` serves the MLflow UI)"
        )
        return _background(args, "llmops-promotion", where)
    from prefect.logging.configuration import setup_logging

    from flows.promotion import promotion_flow

    request = _signed_request(args, "promote", cfg.registry.model_name, version)
    setup_logging()
    _quiet_user_errors()
    out = _quiet_console(cfg, "promotion")
    print(json.dumps(_named(promotion_flow)(version=version, request=request, config=cfg), indent=2), file=out)
    return 0


def _quiet_console(cfg, kind: str):
    """The same console as `train`: library noise to a log file of its own, the flow's lines and errors on the
    terminal; returns the real stdout for the result."""
    import secrets
    import time

    from llmops import console

    log = console.start(
        Path(cfg.state_dir) / "logs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.log"
    )
    print(f"log: {log} (third-party warnings and tracebacks go there)", file=console.terminal())
    return console.stdout()


def cmd_rollback(args) -> int:
    cfg = _promotion_config(args)
    if args.background:
        return _background(args, "llmops-rollback")
    from flows.promotion import rollback_flow

    prev = _rollback_target(cfg)
    if not prev:
        raise LLMOpsError(
            "nothing to roll back to (no earlier audited promotion)",
            f"model {cfg.registry.model_name}",
            "promote at least two versions first",
        )
    request = _signed_request(args, "rollback", cfg.registry.model_name, prev)
    out = _quiet_console(cfg, "rollback")
    print(json.dumps(_named(rollback_flow)(request=request, config=cfg), indent=2), file=out)
    return 0


def read_challenge(client, run_id: str) -> tuple[str, int] | None:
    """(challenge, expires) the run's current execution published (its newest `approval-challenge` artifact)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from llmops.governance.access import CHALLENGE_ARTIFACT, parse_challenge

    arts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[CHALLENGE_ARTIFACT]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
        ),
        sort=ArtifactSort.CREATED_DESC,
        limit=1,
    )
    return parse_challenge(str(arts[0].data), run_id) if arts else None


def _rollback_target(cfg) -> str | None:
    """The version a rollback returns to: from the signed audit log where this process can read it (the worker,
    an admin), else MLflow's @previous as a hint (the flow checks it against the log and refuses a mismatch)."""
    from llmops.governance.audit import AuditLog, release_state
    from llmops.governance.policy import load_governance

    g = load_governance()
    if os.access(g.audit_log, os.R_OK):
        return release_state(AuditLog.for_governance(g).entries(), cfg.registry.model_name).previous
    import mlflow

    from flows.promotion import _alias
    from llmops.services import connect_registry

    return _alias(
        mlflow.MlflowClient(connect_registry(cfg.registry.tracking_uri, cfg.state_dir)),
        cfg.registry.model_name,
        "previous",
    )


def _run_subject(run_id: str) -> tuple[str, str, tuple[str, int]]:
    """(subject the code signs, a description, (challenge, expires)) of a paused promotion/rollback, read from the
    Prefect API. None of it is trusted by the flow: a forged display only yields a code that verifies nowhere."""
    from llmops.governance.access import approval_subject

    if not os.environ.get("PREFECT_API_URL"):
        raise LLMOpsError(
            "cannot read the flow run to know what you approve",
            "PREFECT_API_URL",
            "export the PREFECT_API_URL of the server where the run waits",
        )
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
            challenge = read_challenge(client, str(run.id))
        req = json.loads((run.parameters or {}).get("request") or "{}")
        subject = approval_subject(req["action"], req["model"], req["version"])
    except (KeyError, ValueError, TypeError):
        raise LLMOpsError(
            "this flow run is not a signed promotion or rollback", f"flow run {run_id}", "check the run id"
        ) from None
    except Exception as e:  # noqa: BLE001 - unreachable server, unknown id
        raise LLMOpsError(
            f"could not read the flow run ({type(e).__name__})",
            f"flow run {run_id}",
            "check the run id and PREFECT_API_URL",
        ) from None
    if challenge is None:
        raise LLMOpsError(
            "the run has not published its approval challenge (not waiting for approval yet?)",
            f"flow run {run_id}",
            "wait until it is Paused, then run this again",
        )
    state = run.state.name if run.state else "?"
    return (
        subject,
        (
            f"flow run {run_id} ({run.name}): {subject}, requested by {req.get('user', '?')}; state "
            f"{state}; challenge {challenge[0][:8]}…"
        ),
        challenge,
    )


def _code(args) -> str:
    from llmops.governance.access import approval_code
    from llmops.governance.keys import load_private_key

    subject, about, (challenge, expires) = _run_subject(args.run_id)
    if args.expect and args.expect != subject.split(" v")[-1]:
        raise LLMOpsError(
            f"the run is '{subject}', not version {args.expect}",
            f"flow run {args.run_id}",
            "do not approve; tell the requester and an admin",
        )
    print(about, file=sys.stderr)
    return approval_code(
        load_private_key(_key_file(args)),
        args.run_id,
        subject,
        approve=not args.reject,
        challenge=challenge,
        expires=expires,
    )


def cmd_approval_code(args) -> int:
    """Print the single-use code for one run, its subject and one decision (approve, or --reject)."""
    print(_code(args))
    print(
        f"({'reject' if args.reject else 'approve'} code for flow run {args.run_id} only, valid once; enter it "
        f"with approver '{args.approver}')",
        file=sys.stderr,
    )
    return 0


def cmd_approve(args) -> int:
    from prefect.flow_runs import resume_flow_run

    code = args.code or _code(args)
    try:
        resume_flow_run(
            args.run_id,
            run_input={
                "approve": not args.reject,
                "approver": args.approver,
                "code": code,
                "comment": args.comment or "",
            },
        )
    except Exception as e:  # noqa: BLE001 - Prefect raises several types for a bad id / not paused
        raise LLMOpsError(
            f"could not resume ({str(e).splitlines()[0][:200]})",
            f"flow run {args.run_id}",
            "check the run id and that the run is still paused",
        ) from None
    print(
        f"submitted {'rejection' if args.reject else 'approval'} by {args.approver}; the flow verifies it "
        f"(see the run's logs and `llmops audit verify`)"
    )
    return 0


def add_parser(sub) -> None:
    pr = with_config(sub.add_parser("promote", help="run the promotion flow (pauses for approval)"))
    pr.add_argument("--version", default="candidate", help="version number or alias (default: candidate)")
    pr.add_argument("--requested-by", required=True, help="your enrolled user name (the request is signed)")
    pr.add_argument("--key-file", help="your private key (default: $LLMOPS_KEY_FILE)")
    pr.add_argument("--background", action="store_true", help="return once paused; print how to approve")
    pr.set_defaults(func=cmd_promote)
    rb = with_config(sub.add_parser("rollback", help="re-point production to @previous (pauses for approval)"))
    rb.add_argument("--requested-by", required=True, help="your enrolled user name (needs request-rollback)")
    rb.add_argument("--key-file", help="your private key (default: $LLMOPS_KEY_FILE)")
    rb.add_argument("--background", action="store_true")
    rb.set_defaults(func=cmd_rollback)
    ac = sub.add_parser(
        "approval-code",
        help="print your single-use code for one paused run",
        epilog="example: llmops approval-code 0b6c...e1 --approver rm-bob --key-file ~/bob.key",
    )
    ac.add_argument("run_id")
    ac.add_argument("--approver", required=True)
    ac.add_argument("--key-file", help="your private key (default: $LLMOPS_KEY_FILE)")
    ac.add_argument("--reject", action="store_true", help="a code that rejects instead")
    ac.add_argument("--expect", metavar="VERSION", help="refuse unless the run promotes this version")
    ac.set_defaults(func=cmd_approval_code)
    ap = sub.add_parser(
        "approve",
        help="approve (or --reject) a paused promotion/rollback",
        epilog="example: llmops approve 0b6c...e1 --approver rm-bob --key-file ~/bob.key",
    )
    ap.add_argument("run_id")
    ap.add_argument("--approver", required=True)
    ap.add_argument("--key-file", help="your private key (default: $LLMOPS_KEY_FILE)")
    ap.add_argument("--code", help="a code from `llmops approval-code` instead of --key-file")
    ap.add_argument("--reject", action="store_true")
    ap.add_argument("--expect", metavar="VERSION", help="refuse unless the run promotes this version")
    ap.add_argument("--comment")
    ap.set_defaults(func=cmd_approve)
