"""`llmops` command line: thin entry points over the flows.

    llmops train --config configs/demo.yaml [--set training.max_steps=5]
    llmops check-config configs/demo.yaml
    llmops prepare-model --config configs/demo.yaml
    llmops validate --config configs/demo.yaml                  # GX + PII/PHI report, no training
    llmops services start|stop [--team]                         # Prefect + MLflow (UIs) on 127.0.0.1
    llmops status [--json]                                      # services, pending approvals, production
    llmops governance init|show|target NAME --kind K --uri U    # admin: the policy outside any run config
    llmops users add NAME --role release-manager [--key-out F]  # admin: enrol; prints the private key once
    llmops promote --config configs/demo.yaml --requested-by ml-alice --key-file alice.key [--background]
    llmops approval-code RUN_ID --approver rm-bob --key-file bob.key [--reject]   # single-use, this run only
    llmops approve RUN_ID --approver rm-bob --key-file bob.key [--reject] [--comment TEXT]
    llmops rollback --config configs/demo.yaml --requested-by rm-carol --key-file carol.key [--background]
    llmops audit verify [--config F]

Errors a user can fix print one line (`error: <where>: <what> — <fix>`) and exit 2; no tracebacks.
Heavy libraries are imported inside commands so `llmops --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from llmops.errors import LLMOpsError


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise LLMOpsError(f"override '{pair}' has no '='", "--set", "write --set section.field=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)  # so 3 -> int, true -> bool, [a, b] -> list
    return out


def _config(args):
    from llmops.config import load_config

    return load_config(args.config, _overrides(args.set))


def _user_error_names() -> tuple[str, ...]:
    seen, todo = set(), [LLMOpsError]
    while todo:
        cls = todo.pop()
        seen.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return tuple(seen)


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs a failing task's exception up to four times (task failed, task state, flow failed, flow state);
    for errors the user can fix the CLI prints the message once itself, so those log records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], LLMOpsError):
            return False
        msg = record.getMessage()
        return not any(f"{name}:" in msg or f"{name}(" in msg for name in _user_error_names())


def _quiet_user_errors() -> None:
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTracebackForUserErrors())


def preflight_data(cfg) -> None:
    """What reading and validating the data needs (no training settings)."""
    if not Path(cfg.data.path).exists():
        raise LLMOpsError("data path does not exist", f"data.path={cfg.data.path}", "point it at a file or directory")
    if cfg.model.source == "local":
        from tasks.model import check_hf_dir

        check_hf_dir(Path(cfg.model.path))


def preflight(cfg) -> None:
    """Cheap checks before a flow starts, so common mistakes fail in one line without touching state."""
    preflight_data(cfg)
    if not Path(cfg.training.deepspeed_config).is_file():
        raise LLMOpsError("DeepSpeed config not found", f"training.deepspeed_config={cfg.training.deepspeed_config}",
                          "use one of infra/deepspeed/*.json")


def validate(cfg, reuse: bool = True):
    """The data validation `validate` and `train` run before anything else; raises one DataValidationError line."""
    from tasks.model import validation_tokenizer
    from tasks.validation import failed_error, validate_data

    m = cfg.model
    tok = validation_tokenizer(m.source, cfg.state_dir, m.path, m.tokenizer_path)
    rep = validate_data(cfg.data, cfg.validation, Path(cfg.state_dir) / "validation", tok,
                        workers=cfg.validation.workers, progress=sys.stderr.isatty(), reuse=reuse)
    return rep, (failed_error(rep, cfg.data.path) if not rep.passed else None)


def cmd_train(args) -> int:
    cfg = _config(args)
    preflight(cfg)
    if cfg.validation.enabled:  # fail fast: bad data stops here, before Prefect starts or the model is resolved
        _, error = validate(cfg, reuse=cfg.use_cache)
        if error:
            raise error
    import time

    from llmops import console

    started = time.time()
    import secrets

    # unique per run: two runs started in the same second (a schedule and a person) must not share a log
    log = console.start(Path(cfg.state_dir) / "logs" / f"train-{time.strftime('%Y%m%d-%H%M%S')}-"
                                                        f"{secrets.token_hex(3)}.log")
    print(f"log: {log} (third-party warnings and tracebacks go there)", file=console.terminal())
    from flows.training import training_flow

    try:
        result = training_flow(config=cfg)
    except Exception as e:
        console.log_exception("training run failed")  # the traceback, in the log file only
        if isinstance(e, LLMOpsError):
            raise
        raise LLMOpsError(f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}", str(log),
                          "the traceback is in that log file; re-running resumes from cached steps") from None
    if args.json:
        print(json.dumps(result, indent=2, default=str), file=console.stdout())
        return 0
    from tasks.registry import model_version_url, tracking_uri

    reg = result["registered"]
    mlflow_url = model_version_url(tracking_uri(cfg.registry.tracking_uri, cfg.state_dir), reg["model_name"],
                             reg["version"])
    prefect_url = result.get("prefect_run_url") if os.environ.get("PREFECT_API_URL") else None
    print(console.train_summary(result, time.time() - started, mlflow_url, prefect_url, log), file=console.stdout())
    return 0


def cmd_validate(args) -> int:
    """Validate the data (GX + PII) without training; exit 2 if it fails. Needs no training settings."""
    cfg = _config(args)
    preflight_data(cfg)
    rep, error = validate(cfg, reuse=False)
    print(rep.summary_md)
    if error:
        raise error
    return 0


def cmd_check_config(args) -> int:
    from llmops.config import load_config

    cfg = load_config(args.file, _overrides(args.set))
    preflight(cfg)
    print(f"{args.file}: valid")
    if args.show:
        from llmops.config import pii_defaults

        print(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
        print("# effective PII/PHI policy (validation.pii, merged over the defaults)")
        defaults = pii_defaults()
        for cat, policy in cfg.validation.pii.items():
            print(f"#   {cat:<12} {policy:<7} {'(default)' if defaults.get(cat) == policy else '(set)'}")
    return 0


def cmd_prepare_model(args) -> int:
    from tasks.model import resolve_model

    cfg = _config(args)
    m = cfg.model
    ref = resolve_model(m.source, cfg.state_dir, m.path, m.tokenizer_path, m.tiny.model_dump(), m.max_seq_len)
    print(json.dumps(ref.__dict__, indent=2))
    return 0


def _state_dir(args) -> Path:
    from llmops.config import load_config

    return Path(load_config(args.config, _overrides(getattr(args, "set", None))).state_dir) if args.config \
        else Path(os.environ.get("LLMOPS_HOME", ".llmops"))


def _move_ledger(g, uri: str) -> int:
    """Point governance's privacy ledger at `uri`, carrying every charge over first (a fresh ledger would reset every
    record's budget); audited, without the URL's password."""
    from tasks.privacy import copy_ledger

    from tasks.access import commit_governance

    moved = copy_ledger(g.ledger, uri if "://" in uri else str(g.resolve(uri)))
    g.privacy.ledger = uri
    commit_governance(g, "ledger-moved", ledger=uri.split("@")[-1], attempts_copied=moved)
    return moved


def _team_governance(info: dict):
    """Point the admin's governance at team mode (ledger on Postgres, registry = the MLflow server, an `s3` target
    in SeaweedFS), each change audited like `llmops governance`; the old SQLite ledger's charges move along."""
    from llmops.governance import TargetSpec, load_governance
    from tasks.access import commit_governance, init_governance, verified_governance

    g = load_governance()
    g = init_governance() if not g.path.is_file() else verified_governance()
    if g.ledger != info["ledger"]:
        _move_ledger(g, info["ledger"])
    if g.registry_uri != info["mlflow"]:
        g.registry_uri = info["mlflow"]
        commit_governance(g, "registry-pinned", registry=info["mlflow"])
    s3 = TargetSpec(kind="s3", uri="s3://models/", endpoint_url=info["s3"], credentials_file=info["s3_credentials"])
    if g.targets.get("s3") != s3:
        g.targets["s3"] = s3
        commit_governance(g, "target-set", target="s3", kind="s3", uri=s3.uri, models=s3.models)
    return g


def cmd_services(args) -> int:
    import time

    from llmops import services

    state = Path(os.environ.get("LLMOPS_HOME", ".llmops"))
    t0 = time.time()
    if args.action == "env":
        env = services.team_env(state, cache=True) if services.read_record(state).get("mode") == "team" else {
            "PREFECT_API_URL": services.read_record(state).get("prefect", {}).get("url", services.api_url())}
        print("".join(f"export {k}={v}\n" for k, v in env.items()), end="")
        return 0
    if args.action == "stop":
        if not args.team and services.read_record(state).get("mode") == "team":
            raise LLMOpsError("team mode runs for this state dir", str(state / services.RECORD),
                              "stop it with `llmops services stop --team`")
        url = services.read_record(state).get("prefect", {}).get("url") or os.environ.get("PREFECT_API_URL")
        if ended := end_background_runs(state, url):  # their flows audit 'interrupted' while the server is up
            print(f"ended background run(s): {', '.join(ended)} (audited as interrupted)")
        stopped = services.stop_team(state) if args.team else services.stop_embedded(state)
        print(f"stopped: {', '.join(stopped)}" if stopped else "not running")
        return 0
    if args.team:
        from llmops.governance import governance_path

        rec = services.start_team(state, governance_path(), configure=_team_governance)
    else:
        rec = services.start_embedded(state)
    print(f"services up in {time.time() - t0:.1f}s ({'team mode' if args.team else 'embedded'}, state {state}):")
    for name, e in rec.items():
        if isinstance(e, dict):
            print(f"  {name:<17} {e.get('ui', e['url']):<32} pid {e.get('pid') or '-':<8} log {e.get('log', '')}")
    if args.team:
        print(f"Clients: eval \"$(llmops services env)\"  (Prefect API URL + auth string from "
              f"{services.team_dir(state) / 'secrets.json'}, mode 600)")
    else:
        print(f"export PREFECT_API_URL={rec['prefect']['url']}")
    return 0


def cmd_status(args) -> int:
    from llmops import status

    report = status.collect(Path(os.environ.get("LLMOPS_HOME", ".llmops")))
    print(json.dumps(report, indent=2) if args.json else status.render(report))
    return 0


def _key_file(args) -> Path:
    path = args.key_file or os.environ.get("LLMOPS_KEY_FILE")
    if not path:
        raise LLMOpsError("no private key given", "--key-file",
                          "pass the key file `llmops users add` gave you (or set LLMOPS_KEY_FILE)")
    return Path(path)


def _resolve_version(cfg, version: str) -> str:
    if version.isdigit():
        return version
    import mlflow

    from tasks.registry import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(cfg.registry.tracking_uri, cfg.state_dir))
    try:
        return str(client.get_model_version_by_alias(cfg.registry.model_name, version).version)
    except Exception:  # noqa: BLE001
        raise LLMOpsError(f"no version under alias '{version}'", f"model {cfg.registry.model_name}",
                          "train a model that passes the gate, or pass a version number") from None


def _background(args, flow_name: str, registry: str = "") -> int:
    """Re-run this very command (every option kept, minus --background) in a detached process, wait until its
    flow pauses, print how to approve it."""
    import subprocess
    import time

    from llmops import services

    if not os.environ.get("PREFECT_API_URL"):
        raise LLMOpsError("a background approval needs a running Prefect server", "PREFECT_API_URL",
                          "run `llmops services start` and export the PREFECT_API_URL it prints")
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
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, RUN_NAME_ENV: run_name})
    _record_background(Path(os.environ.get("LLMOPS_HOME", ".llmops")), run_name, proc.pid)  # services' home
    with get_client(sync_client=True) as client:
        while time.time() - started < 600:
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name]))):
                if run.state and run.state.is_paused():
                    return _print_approval_help(run.id, args.requested_by, log, services, registry)
                if run.state and run.state.is_final():
                    raise LLMOpsError(f"{flow_name} ended as {run.state.name} before pausing", str(log),
                                      "read the log")
            if proc.poll() not in (None, 0):
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
                raise LLMOpsError(f"{flow_name} stopped before pausing: {tail[0][:300]}", str(log), "read the log")
            time.sleep(1)
    raise LLMOpsError(f"{flow_name} did not pause within 10 minutes", str(log), "read the log")


RUN_NAME_ENV = "LLMOPS_FLOW_RUN_NAME"


def _record_background(state: Path, run_name: str, pid: int) -> None:
    d = state / "background"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{run_name}.json").write_text(json.dumps({"run_name": run_name, "pid": pid}))


def end_background_runs(state: Path, api_url: str | None, wait_s: float = 20.0) -> list[str]:
    """`services stop`: end this state dir's background promotions/rollbacks before their server goes. Each run's
    state is set Cancelled through the API, which the waiting flow notices and audits ('interrupted'); a process that
    has not exited after `wait_s` is terminated. Returns the run names ended."""
    import signal
    import time

    from llmops.files import pid_alive

    ended = []
    for f in sorted((state / "background").glob("*.json")):
        try:
            rec = json.loads(f.read_text())
            pid, name = int(rec["pid"]), str(rec["run_name"])
        except (OSError, ValueError, KeyError):
            f.unlink(missing_ok=True)
            continue
        if not pid_alive(pid):
            f.unlink(missing_ok=True)
            continue
        if api_url:
            try:
                _cancel_by_name(api_url, name)
            except Exception:  # noqa: BLE001 - the server may already be gone: terminate below
                pass
        deadline = time.time() + wait_s
        while pid_alive(pid) and time.time() < deadline:
            time.sleep(0.3)
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except OSError:
                pass
        f.unlink(missing_ok=True)
        ended.append(name)
    return ended


def _cancel_by_name(api_url: str, run_name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name]))):
            if run.state and not run.state.is_final():
                client.set_flow_run_state(run.id, Cancelled(message="llmops services stop"), force=True)


def _named(flow):
    """The flow with the run name `--background` chose for it (so the parent finds exactly this run)."""
    name = os.environ.pop(RUN_NAME_ENV, None)
    return flow.with_options(flow_run_name=name) if name else flow


def _print_approval_help(run_id, requested_by: str, log: Path, services, registry: str = "") -> int:
    from llmops.governance import load_governance

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
    from tasks.access import load_private_key, make_request

    return make_request(load_private_key(_key_file(args)), args.requested_by, action, model, version)


def _promotion_config(args):
    """The run config with governance's pinned registry (if this machine has governance)."""
    from flows.promotion import pinned_config
    from llmops.governance import load_governance

    return pinned_config(_config(args), load_governance())


def cmd_promote(args) -> int:
    cfg = _promotion_config(args)
    version = _resolve_version(cfg, args.version)
    if args.background:
        from tasks.registry import tracking_uri

        from tasks.registry import model_version_url

        uri = tracking_uri(cfg.registry.tracking_uri, cfg.state_dir)
        link = model_version_url(uri, cfg.registry.model_name, version)
        where = f"\n  MLflow UI  : {link}  (model card, plots, evidence)" if link else \
            f"\n  MLflow     : models:/{cfg.registry.model_name}/{version} (tracking URI {uri}; `llmops services " \
            f"start` serves the MLflow UI)"
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

    log = console.start(Path(cfg.state_dir) / "logs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-"
                                                        f"{secrets.token_hex(3)}.log")
    print(f"log: {log} (third-party warnings and tracebacks go there)", file=console.terminal())
    return console.stdout()


def cmd_rollback(args) -> int:
    cfg = _promotion_config(args)
    if args.background:
        return _background(args, "llmops-rollback")
    from flows.promotion import rollback_flow

    prev = _rollback_target(cfg)
    if not prev:
        raise LLMOpsError("nothing to roll back to (no earlier audited promotion)", f"model {cfg.registry.model_name}",
                          "promote at least two versions first")
    request = _signed_request(args, "rollback", cfg.registry.model_name, prev)
    out = _quiet_console(cfg, "rollback")
    print(json.dumps(_named(rollback_flow)(request=request, config=cfg), indent=2), file=out)
    return 0


def read_challenge(client, run_id: str) -> tuple[str, int] | None:
    """(challenge, expires) the run's current execution published (its newest `approval-challenge` artifact)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    from tasks.access import CHALLENGE_ARTIFACT, parse_challenge

    arts = client.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=[CHALLENGE_ARTIFACT]), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])),
        sort=ArtifactSort.CREATED_DESC, limit=1)
    return parse_challenge(str(arts[0].data), run_id) if arts else None


def _rollback_target(cfg) -> str | None:
    """The version a rollback returns to: from the signed audit log where this process can read it (the worker,
    an admin), else MLflow's @previous as a hint (the flow checks it against the log and refuses a mismatch)."""
    from llmops.governance import load_governance
    from tasks.access import AuditLog, release_state

    g = load_governance()
    if os.access(g.audit_log, os.R_OK):
        return release_state(AuditLog.for_governance(g).entries(), cfg.registry.model_name).previous
    import mlflow

    from flows.promotion import _alias
    from tasks.registry import tracking_uri

    return _alias(mlflow.MlflowClient(tracking_uri(cfg.registry.tracking_uri, cfg.state_dir)),
                  cfg.registry.model_name, "previous")


def _run_subject(run_id: str) -> tuple[str, str, tuple[str, int]]:
    """(subject the code signs, a description, (challenge, expires)) of a paused promotion/rollback, read from the
    Prefect API. None of it is trusted by the flow: a forged display only yields a code that verifies nowhere."""
    from tasks.access import approval_subject

    if not os.environ.get("PREFECT_API_URL"):
        raise LLMOpsError("cannot read the flow run to know what you approve", "PREFECT_API_URL",
                          "export the PREFECT_API_URL of the server where the run waits")
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
            challenge = read_challenge(client, str(run.id))
        req = json.loads((run.parameters or {}).get("request") or "{}")
        subject = approval_subject(req["action"], req["model"], req["version"])
    except (KeyError, ValueError, TypeError):
        raise LLMOpsError("this flow run is not a signed promotion or rollback", f"flow run {run_id}",
                          "check the run id") from None
    except Exception as e:  # noqa: BLE001 - unreachable server, unknown id
        raise LLMOpsError(f"could not read the flow run ({type(e).__name__})", f"flow run {run_id}",
                          "check the run id and PREFECT_API_URL") from None
    if challenge is None:
        raise LLMOpsError("the run has not published its approval challenge (not waiting for approval yet?)",
                          f"flow run {run_id}", "wait until it is Paused, then run this again")
    state = run.state.name if run.state else "?"
    return subject, (f"flow run {run_id} ({run.name}): {subject}, requested by {req.get('user', '?')}; state "
                     f"{state}; challenge {challenge[0][:8]}…"), challenge


def _code(args) -> str:
    from tasks.access import approval_code, load_private_key

    subject, about, (challenge, expires) = _run_subject(args.run_id)
    if args.expect and args.expect != subject.split(" v")[-1]:
        raise LLMOpsError(f"the run is '{subject}', not version {args.expect}", f"flow run {args.run_id}",
                          "do not approve; tell the requester and an admin")
    print(about, file=sys.stderr)
    return approval_code(load_private_key(_key_file(args)), args.run_id, subject, approve=not args.reject,
                         challenge=challenge, expires=expires)


def cmd_approval_code(args) -> int:
    """Print the single-use code for one run, its subject and one decision (approve, or --reject)."""
    print(_code(args))
    print(f"({'reject' if args.reject else 'approve'} code for flow run {args.run_id} only, valid once; enter it "
          f"with approver '{args.approver}')", file=sys.stderr)
    return 0


def cmd_approve(args) -> int:
    from prefect.flow_runs import resume_flow_run

    code = args.code or _code(args)
    try:
        resume_flow_run(args.run_id, run_input={"approve": not args.reject, "approver": args.approver,
                                                "code": code, "comment": args.comment or ""})
    except Exception as e:  # noqa: BLE001 - Prefect raises several types for a bad id / not paused
        raise LLMOpsError(f"could not resume ({str(e).splitlines()[0][:200]})", f"flow run {args.run_id}",
                          "check the run id and that the run is still paused") from None
    print(f"submitted {'rejection' if args.reject else 'approval'} by {args.approver}; the flow verifies it "
          f"(see the run's logs and `llmops audit verify`)")
    return 0


def cmd_users(args) -> int:
    from llmops.governance import load_governance
    from tasks.access import commit_governance, enrol_user, verified_governance

    if args.op == "list":
        for name, u in sorted(load_governance(required=True).users.items()):
            print(f"{name:<20} {', '.join(u.roles)}")
        return 0
    g = verified_governance()  # an admin change starts from the audited governance, never from a hand edit
    if args.op == "remove":
        if args.name not in g.users:
            raise LLMOpsError(f"unknown user '{args.name}'", str(g.path), "see `llmops users list`")
        del g.users[args.name]
        commit_governance(g, "user-removed", user=args.name)
        print(f"{args.name} removed from {g.path} (audited)")
        return 0
    if not args.role:
        raise LLMOpsError("no role given", "--role", f"use one or more of {sorted(g.roles)}")
    if args.key_out and Path(args.key_out).exists():
        raise LLMOpsError("key file already exists", args.key_out, "choose another --key-out or move the old one away")
    pem = enrol_user(g, args.name, args.role)  # audited by enrol_user (commit_governance)
    if args.key_out:
        from llmops.files import write_text_atomic

        write_text_atomic(args.key_out, pem, mode=0o600)
        print(f"{args.name}: roles {sorted(set(args.role))} enrolled in {g.path}; private key written to "
              f"{args.key_out} (mode 600). Hand it to {args.name}; llmops keeps only the public key.")
    else:
        print(f"{args.name}: roles {sorted(set(args.role))} enrolled in {g.path}. Private key (shown once; "
              f"save it as a mode-600 file and pass it with --key-file; llmops keeps only the public key):",
              file=sys.stderr)
        print(pem, end="")
    return 0


def cmd_governance(args) -> int:
    from llmops.governance import TargetSpec, load_governance, set_field
    from tasks.access import (GovernanceStore, commit_governance, init_governance, verified_entries,
                              verified_governance)

    if args.op == "init":
        g = init_governance()
        print(f"governance created: {g.path} (mode 600) with an audit signing key; next: `llmops users add`, "
              f"`llmops governance target`")
        return 0
    if args.op == "show":
        g = load_governance(required=True)
        data = g.model_dump(mode="json")
        for u in data["users"].values():
            u["public_key"] = u["public_key"][:12] + "…"
        print(f"# {g.path}\n# digest {g.digest()}")
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
        return 0
    if args.op == "adopt":  # sign the file as it is (after a hand edit an admin reviewed, or an old deployment)
        if not args.reason:
            raise LLMOpsError("no --reason given", "llmops governance adopt", "say why the file is signed as it is")
        g = load_governance(required=True)
        verified_entries(g)  # the log itself must be intact
        store = GovernanceStore(g.state_db)
        last = [e for e in _audit_entries(g) if e.get("action") == "governance"]
        changed = store.diff((last[-1].get("governance") or "") if last else "", g) if last else []
        commit_governance(g, "governance-adopted", reason=args.reason[:300], changed=changed[:50])
        print(f"governance {g.digest()[:16]} signed into the audit log (changed: {', '.join(changed) or 'unknown'})")
        return 0
    if args.op == "restore":  # back to the last audited governance (undo a hand edit)
        g = load_governance(required=True)
        entries = [e for e in _audit_entries(g) if e.get("action") == "governance"]
        body = GovernanceStore(g.state_db).snapshot_body(entries[-1].get("governance", "")) if entries else None
        if body is None:
            raise LLMOpsError("no snapshot of the last audited governance", str(g.state_db),
                              "restore the file from backup, or `llmops governance adopt --reason ...`")
        from llmops.governance import Governance

        restored = Governance.model_validate(body)
        restored._path = g.path
        restored.save()
        verified_governance()
        print(f"governance restored to the audited {restored.digest()[:16]} ({g.path})")
        return 0
    g = verified_governance()
    if args.op == "set":
        if not args.name:
            raise LLMOpsError("no field given", "llmops governance set FIELD VALUE",
                              "e.g. llmops governance set approvals.models.m 2")
        old, new, g2 = set_field(g, args.name, args.value)
        commit_governance(g2, "governance-set", field=args.name, old=old, new=new)
        print(f"{args.name}: {old!r} -> {new!r} (audited; digest {g2.digest()[:16]})")
        return 0
    if args.op == "ledger":
        if not args.uri:
            raise LLMOpsError("no --uri given", "llmops governance ledger",
                              "e.g. --uri postgresql://ledger:PASSWORD@db.internal:5432/ledger or a SQLite path")
        moved = _move_ledger(g, args.uri)
        print(f"privacy ledger now {args.uri.split('@')[-1]} ({moved} attempt(s) carried over with their charges)")
        return 0
    if args.op == "registry":
        if not args.uri:
            raise LLMOpsError("no --uri given", "llmops governance registry",
                              "e.g. --uri http://mlflow.internal:5000 or sqlite:////srv/llmops/mlflow.db")
        if g.registry_uri == args.uri:
            print(f"registry unchanged ({args.uri})")
            return 0
        g.registry_uri = args.uri
        commit_governance(g, "registry-pinned", registry=args.uri)
        print(f"promotions now read evidence from and move aliases in {args.uri} only")
        return 0
    if args.op == "target":
        if not (args.name and args.kind and args.uri):
            raise LLMOpsError("a target needs a name, --kind and --uri", "llmops governance target",
                              "e.g. llmops governance target onprem --kind onprem --uri /srv/models")
        spec = {"kind": args.kind, "uri": args.uri, "endpoint_url": args.endpoint_url,
                "credentials_file": args.credentials_file, "models": args.models or ["*"]}
        new = TargetSpec(**spec)
        if g.targets.get(args.name) == new:
            print(f"target '{args.name}' unchanged")
            return 0
        g.targets[args.name] = new
        commit_governance(g, "target-set", target=args.name, kind=args.kind, uri=args.uri, models=spec["models"])
        print(f"target '{args.name}' ({args.kind} {args.uri}) saved in {g.path}")
        return 0
    raise LLMOpsError(f"unknown governance operation {args.op!r}", "llmops governance", "see --help")


def _audit_entries(g) -> list[dict]:
    from tasks.access import AuditLog

    return AuditLog.for_governance(g).entries()


def audit_anchors(cfg) -> list[tuple[int, str, str]]:
    """(seq, line hash, where) of every decision anchored on MLflow model versions."""
    import mlflow

    from tasks.registry import tracking_uri

    uri = tracking_uri(cfg.registry.tracking_uri, cfg.state_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []  # no registry yet, so nothing was ever anchored (and do not create one here)
    client = mlflow.MlflowClient(uri)
    anchors = []
    for rm in client.search_registered_models():
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            for k, v in (mv.tags or {}).items():
                if k.startswith("llmops.decision."):
                    try:
                        seq, h = json.loads(v)["audit"].split(":")
                        anchors.append((int(seq), h, f"{rm.name} v{mv.version} {k}"))
                    except (ValueError, KeyError, TypeError):
                        anchors.append((-1, "", f"{rm.name} v{mv.version} {k} (malformed anchor)"))
    return anchors


def release_report(g, cfg) -> tuple[list[dict], list[str]]:
    """Per released model: what the signed log says vs MLflow's aliases and every governance target's pointer.
    Returns (rows, divergences)."""
    import mlflow

    from flows.promotion import alias_divergences, target_of
    from tasks.access import release_divergences, release_state, verified_entries
    from tasks.registry import tracking_uri

    entries = verified_entries(g)
    logged = {e["model"] for e in entries if e.get("decision") in ("promoted", "rolled-back") and e.get("model")}
    uri = tracking_uri(cfg.registry.tracking_uri, cfg.state_dir)
    no_registry = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()
    client = mlflow.MlflowClient(uri) if logged or not no_registry else None  # never create a registry here
    aliased = set()
    if client is not None:
        try:  # a model the log never released must carry no release alias either (MLflow EDIT can set one)
            aliased = {rm.name for rm in client.search_registered_models()
                       if {"production", "previous"} & set(getattr(rm, "aliases", None) or {})}
        except Exception:  # noqa: BLE001 - no registry reachable: the log's models are still checked below
            aliased = set()
    models = sorted(logged | aliased)
    rows, problems = [], []
    for m in models:
        st = release_state(entries, m)
        diverged = alias_divergences(client, st)
        pointers = {}
        for name, t in g.targets.items():  # every target that may hold the model, published to or not
            if t.allows(m):
                try:
                    pointers[name] = target_of(g, t).read_current(m)
                except Exception as e:  # noqa: BLE001 - a tampered or unreachable target is itself a finding
                    diverged.append(f"target '{name}': cannot read its pointer ({str(e)[:160]})")
        diverged += release_divergences(st, {}, pointers)
        rows.append({"model": m, "production": st.production, "previous": st.previous, "history": st.stack,
                     "targets": st.targets, "audit_seq": st.seq, "diverged": diverged})
        problems += diverged
    return rows, problems


def cmd_audit(args) -> int:
    """Signatures + chain of the governance audit log, its anchored head, every decision anchored in the registry,
    the governance file against the last signed admin entry, and every cache of the release state (MLflow aliases,
    target pointers) against the log. `reconcile` (admin) rewrites the MLflow aliases from the log, audited."""
    from llmops.config import PipelineConfig
    from llmops.governance import load_governance
    from tasks.access import AuditTampered, GovernanceStore, verified_governance, verify_audit_log

    from flows.promotion import pinned_config

    g = load_governance(required=True)
    cfg = pinned_config(_config(args) if args.config else PipelineConfig(), g)
    anchors = audit_anchors(cfg)
    n = verify_audit_log(g.audit_log, g.audit.public_key, anchors, head=GovernanceStore(g.state_db).audit_head())
    g = verified_governance()
    rows, problems = release_report(g, cfg)
    if args.op == "reconcile":
        import mlflow

        from flows.promotion import set_release_aliases
        from tasks.access import AuditLog, actor, release_state
        from tasks.registry import tracking_uri

        client = mlflow.MlflowClient(tracking_uri(cfg.registry.tracking_uri, cfg.state_dir))
        entries = AuditLog.for_governance(g).entries()
        for r in rows:
            if any(d.startswith("MLflow") for d in r["diverged"]):
                set_release_aliases(client, release_state(entries, r["model"]))
                AuditLog.for_governance(g).append(action="governance", decision="aliases-reconciled",
                                                  model=r["model"], governance=g.digest(), policy=g.digest()[:16],
                                                  by=actor(), reason="; ".join(r["diverged"])[:500])
                print(f"{r['model']}: MLflow aliases reset from the signed log (production "
                      f"{r['production']}, previous {r['previous']})")
        rows, problems = release_report(g, cfg)
    if args.json:
        print(json.dumps({"entries": n, "anchors": len(anchors), "models": rows, "diverged": problems}, indent=2))
    else:
        print(f"{g.audit_log}: {n} entries, signatures, chain and anchored head intact; {len(anchors)} registry "
              f"anchor(s) match; governance {g.digest()[:16]} is the audited one")
        for r in rows:
            print(f"  {r['model']}: production {r['production'] or '-'} (previous {r['previous'] or '-'}) per the "
                  f"log, entry {r['audit_seq']}{'' if r['diverged'] else '; aliases and targets agree'}")
    if problems:
        raise AuditTampered("caches disagree with the signed audit log: " + "; ".join(problems), str(g.audit_log),
                            "investigate who changed them; `llmops audit reconcile` resets MLflow aliases from the "
                            "log; a target pointer is rewritten by the next approved promotion or rollback")
    return 0


def cmd_ledger(args) -> int:
    """The deployment's ledger (governance file: privacy.ledger), whatever the run config or LLMOPS_HOME say."""
    from llmops.governance import load_governance
    from tasks.privacy import open_ledger

    g = load_governance()
    path = g.ledger
    if "://" not in path and not Path(path).is_file():
        print(f"{path}: no privacy ledger yet (no private training run has been planned)")
        return 0
    rows = open_ledger(path).summary(budget_delta=g.privacy.budget_delta)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{path}: {len(rows)} dataset(s); epsilon = the most-charged record's, composing every run that trained "
          "on it under any dataset name")
    print(f"{'dataset':<18}{'runs':>5}{'records':>9}{'epsilon':>9}{'delta':>10}  accountant  last run")
    for r in rows:
        print(f"{r['fingerprint'][:16]:<18}{r['runs']:>5}{r['records']:>9}{r['epsilon']:>9.3f}{r['delta']:>10.2g}  "
              f"{r['accountant']:<10}  {r['last_run']}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmops", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, required=True):
        sp.add_argument("--config", "-c", required=required, help="PipelineConfig YAML (see configs/)")
        sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override, e.g. training.max_steps=5")
        return sp

    tr = with_config(sub.add_parser("train", help="run the training flow"))
    tr.add_argument("--json", action="store_true", help="print the full result as JSON on stdout (nothing else)")
    tr.set_defaults(func=cmd_train)
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")
    c.add_argument("--set", action="append", metavar="FIELD=VALUE")
    c.add_argument("--show", action="store_true", help="print the config with all defaults filled in")
    c.set_defaults(func=cmd_check_config)
    with_config(sub.add_parser("validate", help="validate the data (GX + PII/PHI) without training")).set_defaults(
        func=cmd_validate)
    with_config(sub.add_parser("prepare-model", help="convert/cache the base model")).set_defaults(
        func=cmd_prepare_model)
    sv = sub.add_parser("services", help="start/stop the local Prefect + MLflow servers (--team: on Postgres + S3)",
                        epilog="example: llmops services start --team && eval \"$(llmops services env)\"")
    sv.add_argument("action", choices=["start", "stop", "env"], help="env prints the client settings to export")
    sv.add_argument("--team", action="store_true", help="PostgreSQL, SeaweedFS, Prefect with API auth, MLflow on "
                                                        "Postgres + S3, Redis (serving cache), training and "
                                                        "promotion workers")
    sv.set_defaults(func=cmd_services)
    st = sub.add_parser("status", help="services, pending approvals, production version per model",
                        epilog="example: llmops status --json")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
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
    ac = sub.add_parser("approval-code", help="print your single-use code for one paused run",
                        epilog="example: llmops approval-code 0b6c...e1 --approver rm-bob --key-file ~/bob.key")
    ac.add_argument("run_id")
    ac.add_argument("--approver", required=True)
    ac.add_argument("--key-file", help="your private key (default: $LLMOPS_KEY_FILE)")
    ac.add_argument("--reject", action="store_true", help="a code that rejects instead")
    ac.add_argument("--expect", metavar="VERSION", help="refuse unless the run promotes this version")
    ac.set_defaults(func=cmd_approval_code)
    ap = sub.add_parser("approve", help="approve (or --reject) a paused promotion/rollback",
                        epilog="example: llmops approve 0b6c...e1 --approver rm-bob --key-file ~/bob.key")
    ap.add_argument("run_id")
    ap.add_argument("--approver", required=True)
    ap.add_argument("--key-file", help="your private key (default: $LLMOPS_KEY_FILE)")
    ap.add_argument("--code", help="a code from `llmops approval-code` instead of --key-file")
    ap.add_argument("--reject", action="store_true")
    ap.add_argument("--expect", metavar="VERSION", help="refuse unless the run promotes this version")
    ap.add_argument("--comment")
    ap.set_defaults(func=cmd_approve)
    us = sub.add_parser("users", help="enrol users in governance (admin): roles ml-engineer, release-manager, admin",
                        epilog="example: llmops users add rm-bob --role release-manager --key-out bob.key")
    us.add_argument("op", choices=["add", "list", "remove"])
    us.add_argument("name", nargs="?")
    us.add_argument("--role", action="append")
    us.add_argument("--key-out", help="write the new private key here (mode 600) instead of printing it")
    us.set_defaults(func=cmd_users)
    gv = sub.add_parser("governance", help="admin: create/show governance, add a promotion target, pin the registry, "
                                           "move the privacy ledger",
                        epilog="example: llmops governance target onprem --kind onprem --uri /srv/models")
    gv.add_argument("op", choices=["init", "show", "set", "target", "registry", "ledger", "adopt", "restore"])
    gv.add_argument("name", nargs="?", help="target name (for `target`); field (for `set`, e.g. approvals.required)")
    gv.add_argument("value", nargs="?", help="for `set`: the new value (YAML); omit to remove a mapping key")
    gv.add_argument("--reason", help="for `adopt`: why the file is signed as it is (audited)")
    gv.add_argument("--kind", choices=["onprem", "s3", "edge", "serve"])
    gv.add_argument("--uri")
    gv.add_argument("--endpoint-url")
    gv.add_argument("--credentials-file", help="AWS shared-credentials INI the promotion worker reads")
    gv.add_argument("--models", nargs="*", help="registered models allowed to go there (default: all)")
    gv.set_defaults(func=cmd_governance)
    lg = sub.add_parser("ledger", help="show the privacy ledger: epsilon spent per dataset (worst record)")
    lg.add_argument("--config", "-c")
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=cmd_ledger, set=None)
    au = sub.add_parser("audit", help="verify the signed audit log (and its registry anchors with --config)")
    au.add_argument("op", choices=["verify", "reconcile"])
    au.add_argument("--config", "-c")
    au.add_argument("--json", action="store_true")
    au.set_defaults(func=cmd_audit, set=None)
    from flows.serve_cli import add_parser as add_serve_parser  # llmops serve [status|stop]

    add_serve_parser(sub)
    _examples(p, sub)
    return p


ROLES = """Roles (governance file, enrolled by an admin with `llmops users add NAME --role ROLE`):
  ml-engineer      trigger training; request a promotion (llmops promote --requested-by YOU --key-file YOUR.key)
  release-manager  approve or reject a promotion (approval-code, approve); request and approve a rollback
  admin            governance init/show/target/registry, users add/list; every action above
Without a role: check-config, validate, prepare-model, train (local), status, ledger, audit verify, services.

Example:
  llmops services start && export PREFECT_API_URL=http://127.0.0.1:4200/api
  llmops train --config configs/tiny.yaml
  llmops <command> --help          # each command's options and an example"""

EXAMPLES = {
    "train": "llmops train --config configs/tiny.yaml\n"
             "llmops train --config configs/demo.yaml --set training.max_steps=5 --json > result.json",
    "check-config": "llmops check-config configs/demo.yaml --show --set privacy.target_epsilon=4",
    "validate": "llmops validate --config configs/demo.yaml --set data.path=my_data/",
    "prepare-model": "llmops prepare-model --config configs/demo.yaml   # converts SmolLM2 once into the state dir",
    "promote": "llmops promote --config configs/demo.yaml --version candidate --requested-by ml-alice \\\n"
               "    --key-file alice.key --background            # ml-engineer",
    "rollback": "llmops rollback --config configs/demo.yaml --requested-by rm-carol --key-file carol.key "
                "--background   # release-manager",
    "approval-code": "llmops approval-code 0b6c...e1 --approver rm-bob --key-file ~/bob.key --expect 3"
                     "   # release-manager",
    "approve": "llmops approve 0b6c...e1 --approver rm-bob --key-file ~/bob.key            # release-manager\n"
               "llmops approve 0b6c...e1 --approver rm-bob --key-file ~/bob.key --reject --comment 'loss too high'",
    "users": "llmops users add rm-bob --role release-manager --key-out bob.key   # admin\nllmops users list",
    "governance": "llmops governance init                                              # admin, once\n"
                  "llmops governance target onprem --kind onprem --uri /srv/models\n"
                  "llmops governance set approvals.models.m 2      # every field; audited\n"
                  "llmops governance show",
    "ledger": "llmops ledger --json",
    "audit": "llmops audit verify --config configs/demo.yaml\n"
             "llmops audit reconcile --config configs/demo.yaml   # admin: MLflow aliases back to the log",
}


def _examples(p: argparse.ArgumentParser, sub) -> None:
    """Every command's --help ends with an example (EXAMPLES, else the epilog it was built with); the top-level
    help lists the roles and who may run what."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ROLES
    for name, sp in sub.choices.items():
        sp.formatter_class = argparse.RawDescriptionHelpFormatter
        text = EXAMPLES.get(name) or (sp.epilog or "").removeprefix("example: ")
        if text:
            sp.epilog = "Example:\n" + "\n".join(f"  {line}" for line in text.splitlines())


EPHEMERAL_STARTUP_S = 600


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Cached step results live beside the state they point at: deleting the state dir clears the cache too.
    home = Path(os.environ.get("LLMOPS_HOME", ".llmops")).resolve()
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(home / "prefect-results"))
    if not os.environ.get("PREFECT_API_URL"):
        # No server configured: Prefect starts a temporary one and gives it 20 s, which a 2-core machine under load
        # misses ("Timed out while attempting to connect to ephemeral Prefect API server"). A budget such a machine
        # meets; `llmops services start` keeps a server (and the runs' history) instead.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_S))
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from llmops import console

    try:
        return args.func(args)
    except LLMOpsError as e:  # printed once, on the terminal even when the console sends stderr to a log file
        print(f"error: {e}", file=console.terminal())
        if console.log_path():
            print(f"  (details: {console.log_path()})", file=console.terminal())
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=console.terminal())
        return 130
    except BrokenPipeError:  # `llmops users list | grep -q ...`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
