"""What the command groups share: `--set` overrides and the run config, one-line user errors, the state dir, the
private key, the privacy ledger's move, and the record of background runs (`promote`/`rollback --background` write
it, `services stop` ends them)."""

from __future__ import annotations

import json
import logging
import os
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

    return load_config(args.config, _overrides(getattr(args, "set", None)))


def _config_or_default(args):
    """The run config of --config, else every default (the commands whose --config is optional)."""
    from llmops.config import PipelineConfig

    return _config(args) if args.config else PipelineConfig()


def with_config(sp, required=True):
    sp.add_argument("--config", "-c", required=required, help="PipelineConfig YAML (see configs/)")
    sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override, e.g. training.max_steps=5")
    return sp


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


def _state_dir(args=None) -> Path:
    """The state dir: the run config's (--config, --set) when `args` has one, else $LLMOPS_HOME (default .llmops),
    the services' home. Every command asks here; none derives it itself."""
    if args is not None and getattr(args, "config", None):
        return Path(_config(args).state_dir)
    from llmops.files import default_state_dir

    return default_state_dir()


def _key_file(args) -> Path:
    path = args.key_file or os.environ.get("LLMOPS_KEY_FILE")
    if not path:
        raise LLMOpsError(
            "no private key given",
            "--key-file",
            "pass the key file `llmops users add` gave you (or set LLMOPS_KEY_FILE)",
        )
    return Path(path)


def _move_ledger(g, uri: str) -> int:
    """Point governance's privacy ledger at `uri`, carrying every charge over first (a fresh ledger would reset every
    record's budget); audited, without the URL's password."""
    from llmops.governance.access import commit_governance
    from llmops.governance.ledger import copy_ledger

    moved = copy_ledger(g.ledger, uri if "://" in uri else str(g.resolve(uri)))
    g.privacy.ledger = uri
    commit_governance(g, "ledger-moved", ledger=uri.split("@")[-1], attempts_copied=moved)
    return moved


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
