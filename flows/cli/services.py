"""`llmops services`, `status`: the local Prefect + MLflow servers (or team mode) and what they hold."""

from __future__ import annotations

import json
import os

from flows.cli.common import _move_ledger, _state_dir, end_background_runs
from llmops.errors import LLMOpsError


def _team_governance(info: dict):
    """Point the admin's governance at team mode (ledger on Postgres, registry = the MLflow server, an `s3` target
    in SeaweedFS), each change audited like `llmops governance`; the old SQLite ledger's charges move along."""
    from llmops.governance.access import commit_governance, init_governance, verified_governance
    from llmops.governance.policy import TargetSpec, load_governance

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

    state = _state_dir()
    t0 = time.time()
    if args.action == "env":
        env = (
            services.team_env(state, cache=True)
            if services.read_record(state).get("mode") == "team"
            else {"PREFECT_API_URL": services.read_record(state).get("prefect", {}).get("url", services.api_url())}
        )
        print("".join(f"export {k}={v}\n" for k, v in env.items()), end="")
        return 0
    if args.action == "stop":
        if not args.team and services.read_record(state).get("mode") == "team":
            raise LLMOpsError(
                "team mode runs for this state dir",
                str(state / services.RECORD),
                "stop it with `llmops services stop --team`",
            )
        url = services.read_record(state).get("prefect", {}).get("url") or os.environ.get("PREFECT_API_URL")
        if ended := end_background_runs(state, url):  # their flows audit 'interrupted' while the server is up
            print(f"ended background run(s): {', '.join(ended)} (audited as interrupted)")
        stopped = services.stop_team(state) if args.team else services.stop_embedded(state)
        print(f"stopped: {', '.join(stopped)}" if stopped else "not running")
        return 0
    if args.team:
        from llmops.governance.policy import governance_path

        rec = services.start_team(state, governance_path(), configure=_team_governance)
    else:
        rec = services.start_embedded(state)
    print(f"services up in {time.time() - t0:.1f}s ({'team mode' if args.team else 'embedded'}, state {state}):")
    for name, e in rec.items():
        if isinstance(e, dict):
            print(f"  {name:<17} {e.get('ui', e['url']):<32} pid {e.get('pid') or '-':<8} log {e.get('log', '')}")
    if args.team:
        print(
            f'Clients: eval "$(llmops services env)"  (Prefect API URL + auth string from '
            f"{services.team_dir(state) / 'secrets.json'}, mode 600)"
        )
    else:
        print(f"export PREFECT_API_URL={rec['prefect']['url']}")
    return 0


def cmd_status(args) -> int:
    from llmops import status

    report = status.collect(_state_dir())
    print(json.dumps(report, indent=2) if args.json else status.render(report))
    return 0


def add_parser(sub) -> None:
    sv = sub.add_parser(
        "services",
        help="start/stop the local Prefect + MLflow servers (--team: on Postgres + S3)",
        epilog='example: llmops services start --team && eval "$(llmops services env)"',
    )
    sv.add_argument("action", choices=["start", "stop", "env"], help="env prints the client settings to export")
    sv.add_argument(
        "--team",
        action="store_true",
        help="PostgreSQL, SeaweedFS, Prefect with API auth, MLflow on "
        "Postgres + S3, Redis (serving cache), training and "
        "promotion workers",
    )
    sv.set_defaults(func=cmd_services)
    st = sub.add_parser(
        "status",
        help="services, pending approvals, production version per model",
        epilog="example: llmops status --json",
    )
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
