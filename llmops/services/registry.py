"""What clients ask of the services: which MLflow a state dir's clients use (`connect_registry`), links into
the UIs, and the rows of `llmops status`.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmops.errors import RegistryError
from llmops.files import pid_alive
from llmops.services.local import (
    RECORD,
    create_sqlite_schema_once,
    healthy,
    mlflow_healthy,
    prefect_port,
    read_record,
    recorded_mlflow,
)
from llmops.services.team import redis_ping, use_team_mlflow_credentials


# ------------------------------------------------------------------------------------------------ status
def service_rows(state_dir: str | Path) -> list[dict]:
    """name, url, pid, healthy for each recorded service."""
    rows = []
    for name, e in read_record(state_dir).items():
        if not isinstance(e, dict):
            continue
        url, pid = e.get("url", ""), e.get("pid")
        if name == "prefect":
            ok = healthy(url)
        elif name == "mlflow":
            ok = mlflow_healthy(url)
        elif name == "postgres":
            import socket

            try:
                socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2).close()
                ok = True
            except OSError:
                ok = False
        elif name == "redis":  # answers, and only with the password
            ok = redis_ping(int(url.rsplit(":", 1)[1].split("/")[0])).startswith("NOAUTH")
        else:
            ok = bool(pid and pid_alive(pid))
        rows.append({"name": name, "url": e.get("ui", url), "pid": pid, "healthy": ok, "log": e.get("log")})
    return rows


def ui_run_url(run_id: str, port: int | None = None, ui: str | None = None) -> str:
    return f"{ui or f'http://127.0.0.1:{port or prefect_port()}'}/runs/flow-run/{run_id}"


# ------------------------------------------------------------------------------------------- the registry


def connect_registry(configured: str | None, state_dir: str | Path) -> str:
    """Connect to the registry runs of this state dir use, and return its tracking URI: registry.tracking_uri, else
    $LLMOPS_TRACKING_URI (workers in infra/), else the MLflow server that `llmops services start` recorded for this
    state dir, else sqlite in the state dir.

    Not a getter: it checks that a recorded server answers, creates the state dir and the sqlite schema (under a
    lock), and puts team mode's MLflow credentials into this process's environment (where MLflow's client reads them).

    Not $MLFLOW_TRACKING_URI: mlflow.set_tracking_uri() writes that variable, so it would leak between runs.
    A recorded server that does not answer is an error, not a silent switch to the file: runs it created keep their
    artifacts behind the server (mlflow-artifacts:/), so the file alone would show them half.

    Team mode's server (basic auth): MLFLOW_TRACKING_USERNAME/PASSWORD as set, else the operator's from the secrets
    file when this user can read it (use_team_mlflow_credentials).
    """
    if configured or os.environ.get("LLMOPS_TRACKING_URI"):
        uri = configured or os.environ["LLMOPS_TRACKING_URI"]
        use_team_mlflow_credentials(uri, state_dir)  # team mode's server wants a user (basic auth)
        return uri
    if server := recorded_mlflow(state_dir):
        if not mlflow_healthy(server):
            raise RegistryError(
                f"the MLflow server recorded for this state dir ({server}) does not answer",
                str(Path(state_dir).resolve() / RECORD),
                "`llmops services start` (or `llmops services stop` to use the sqlite file directly)",
            )
        use_team_mlflow_credentials(server, state_dir)
        return server
    db = Path(state_dir).resolve() / "mlflow.db"
    create_sqlite_schema_once(db)
    return f"sqlite:///{db}"


def model_version_url(uri: str, name: str, version: str | int) -> str | None:
    """The MLflow UI page of a registered version (model card, plots, lineage), when the registry is a server."""
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/models/{name}/versions/{version}"
