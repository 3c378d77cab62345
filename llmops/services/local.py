"""Embedded services (the demo, one person; sqlite + files in the state dir): the Prefect server and the MLflow
tracking server on 127.0.0.1, the record of what runs (`<state>/services.json`), and the process helpers every
service shares (spawn in its own session, pid files, health checks).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from llmops.errors import LLMOpsError
from llmops.files import pid_alive, write_text_atomic

DEFAULT_PORT = 4200
MLFLOW_PORT = 5000
RECORD = "services.json"


def prefect_port() -> int:
    return int(os.environ.get("LLMOPS_PREFECT_PORT", DEFAULT_PORT))


def mlflow_port() -> int:
    return int(os.environ.get("LLMOPS_MLFLOW_PORT", MLFLOW_PORT))


def api_url(port: int | None = None) -> str:
    return f"http://127.0.0.1:{port or prefect_port()}/api"


def _get(url: str, timeout: float = 2) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (OSError, urllib.error.HTTPError):
        return False


def healthy(url: str) -> bool:
    """A Prefect API URL (…/api) answers its health check (unauthenticated even with API auth on)."""
    return _get(f"{url}/health")


def mlflow_healthy(url: str) -> bool:
    return _get(f"{url}/health")


# ------------------------------------------------------------------------------------------------ the record
def read_record(state_dir: str | Path) -> dict:
    p = Path(state_dir).resolve() / RECORD
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _record(state_dir: str | Path, name: str, entry: dict | None) -> None:
    rec = read_record(state_dir)
    if entry is None:
        rec.pop(name, None)
    else:
        rec[name] = entry
    write_text_atomic(Path(state_dir).resolve() / RECORD, json.dumps(rec, indent=2) + "\n")


def recorded_mlflow(state_dir: str | Path) -> str | None:
    """The MLflow server URL `services start` recorded for this state dir, or None."""
    return (read_record(state_dir).get("mlflow") or {}).get("url")


def _pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _spawn(
    what: str,
    argv: list[str],
    env: dict,
    log: Path,
    pid_file: Path,
    ready,
    timeout: float,
    hint: str,
    cwd: Path | None = None,
) -> int:
    """Start `argv` in its own session (so stop kills its children too), output to `log`; wait until `ready()`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
        )
    pid_file.write_text(str(proc.pid))
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            _stop_pid(pid_file)
            raise LLMOpsError(f"{what} did not start within {timeout:.0f}s", str(log), hint)
        time.sleep(0.3)
    return proc.pid


def _stop_pid(pid_file: Path, timeout: float = 30) -> bool:
    pid = _pid(pid_file)
    pid_file.unlink(missing_ok=True)
    if pid is None:
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.time() + (timeout if sig == signal.SIGTERM else 5)
        while time.time() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:  # our own child (a test started it): reap it
                    return True
            except ChildProcessError:
                pass
            if not pid_alive(pid):
                return True
            time.sleep(0.2)
    return True


def _base_env(**extra) -> dict:
    """This process's environment minus the client settings of whatever server the caller talks to."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING_"))}
    return dict(env, PREFECT_SERVER_ANALYTICS_ENABLED="false", MLFLOW_DISABLE_TELEMETRY="true", **extra)


def _port_taken(url: str, pid_file: Path, health, name: str, env_var: str) -> None:
    if health() and _pid(pid_file) is None:
        raise LLMOpsError(
            f"{url} already answers, but not as this state dir's {name}",
            str(pid_file.parent),
            f"stop that server, or pick another port: export {env_var}=<port>",
        )


# ------------------------------------------------------------------------------------------------ embedded
def start_prefect(
    state_dir: str | Path,
    port: int | None = None,
    timeout: float = 120,
    env: dict | None = None,
    home: Path | None = None,
) -> str:
    """Prefect server on 127.0.0.1 (SQLite in `home`, or whatever database `env` names); returns its API URL."""
    port = port or prefect_port()
    url = api_url(port)
    home = home or Path(state_dir).resolve() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    pid_file = home / "server.pid"
    if healthy(url) and _pid(pid_file):
        return url
    _port_taken(url, pid_file, lambda: healthy(url), "Prefect server", "LLMOPS_PREFECT_PORT")
    env = _base_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_API_HOST="127.0.0.1",
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_UI_API_URL=url,
        PREFECT_API_URL=url,
        **(env or {}),
    )
    _spawn(
        "Prefect server",
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env,
        home / "server.log",
        pid_file,
        lambda: healthy(url),
        timeout,
        f"read the log; is port {port} taken? set LLMOPS_PREFECT_PORT",
    )
    return url


def stop_prefect(state_dir: str | Path) -> bool:
    return _stop_pid(Path(state_dir).resolve() / "prefect" / "server.pid")


def mlflow_argv(port: int, artifacts: str, app: str | None = None) -> list[str]:
    """The MLflow server's command line: no store URI, no password (those go by environment / the auth ini)."""
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts,
    ] + (["--app-name", app] if app else [])


_SCHEMA_READY: set[Path] = set()


def create_sqlite_schema_once(db: Path) -> None:
    """Create (or migrate) MLflow's tables in the state dir's sqlite file under an exclusive lock, once per process.

    MLflow's own stores check "are all tables there?" and then create them, unlocked: two runs that touch a fresh
    state dir at the same time (a schedule and a person; the busy-machine test) both create them and one fails with
    "table ... already exists" / "duplicate column name". Under the lock the second finds them complete."""
    if db in _SCHEMA_READY:
        return
    from llmops.files import exclusive_lock

    with exclusive_lock(db.with_name(".mlflow.db.lock")):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore

        uri = f"sqlite:///{db}"
        quiet = [logging.getLogger(n) for n in ("mlflow.store.db.utils", "alembic")]  # "Creating initial tables"
        levels = [q.level for q in quiet]
        for q in quiet:
            q.setLevel(logging.WARNING)
        try:
            TrackingStore(uri, (db.parent / "mlartifacts").as_uri()).engine.dispose()  # creates + migrates
            RegistryStore(uri).engine.dispose()
        finally:
            for q, level in zip(quiet, levels):
                q.setLevel(level)
    _SCHEMA_READY.add(db)


def start_mlflow(
    state_dir: str | Path,
    port: int | None = None,
    timeout: float = 120,
    backend: str | None = None,
    artifacts: str | None = None,
    env: dict | None = None,
    home: Path | None = None,
    app: str | None = None,
) -> str:
    """MLflow tracking server + UI on 127.0.0.1 (default: the state dir's sqlite and artifact dir, the same store
    that runs without a server use, so nothing moves); returns its URL. `app`: e.g. "basic-auth" (team mode)."""
    state = Path(state_dir).resolve()
    port = port or mlflow_port()
    url = f"http://127.0.0.1:{port}"
    home = home or state / "mlflow-server"
    home.mkdir(parents=True, exist_ok=True)
    pid_file = home / "server.pid"
    if mlflow_healthy(url) and _pid(pid_file):
        return url
    _port_taken(url, pid_file, lambda: mlflow_healthy(url), "MLflow server", "LLMOPS_MLFLOW_PORT")
    if backend is None:  # the state dir's file: its tables exist before the server and a run both open it
        create_sqlite_schema_once(state / "mlflow.db")
    # the backend URI goes by environment: a password in argv would show in `ps` for every user
    env = _base_env(
        MLFLOW_BACKEND_STORE_URI=backend or f"sqlite:///{state}/mlflow.db",
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        **(env or {}),
    )
    argv = mlflow_argv(port, artifacts or str(state / "mlartifacts"), app)
    _spawn(
        "MLflow server",
        argv,
        env,
        home / "server.log",
        pid_file,
        lambda: mlflow_healthy(url),
        timeout,
        f"read the log; is port {port} taken? set LLMOPS_MLFLOW_PORT",
        cwd=home,
    )
    return url


def stop_mlflow(state_dir: str | Path) -> bool:
    return _stop_pid(Path(state_dir).resolve() / "mlflow-server" / "server.pid")


def start_embedded(state_dir: str | Path) -> dict:
    state = Path(state_dir).resolve()
    if read_record(state).get("mode") == "team":
        raise LLMOpsError(
            "team mode runs for this state dir",
            str(state / RECORD),
            "use it (llmops status), or `llmops services stop --team` first",
        )
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # both wait on their own startup; together, not one after the other
        prefect_f, mlflow_f = pool.submit(start_prefect, state), pool.submit(start_mlflow, state)
        try:
            prefect, mlflow = prefect_f.result(), mlflow_f.result()
        except BaseException:
            mlflow_f.exception(), prefect_f.exception()  # both done before stopping what did start
            stop_embedded(state)
            raise
    rec = {
        "mode": "embedded",
        "prefect": {
            "url": prefect,
            "ui": prefect.removesuffix("/api"),
            "pid": _pid(state / "prefect/server.pid"),
            "log": str(state / "prefect/server.log"),
        },
        "mlflow": {
            "url": mlflow,
            "ui": mlflow,
            "pid": _pid(state / "mlflow-server/server.pid"),
            "log": str(state / "mlflow-server/server.log"),
        },
    }
    write_text_atomic(state / RECORD, json.dumps(rec, indent=2) + "\n")
    return rec


def stop_embedded(state_dir: str | Path) -> list[str]:
    state = Path(state_dir).resolve()
    stopped = [n for n, stop in (("mlflow", stop_mlflow), ("prefect", stop_prefect)) if stop(state)]
    if read_record(state).get("mode") != "team":
        (state / RECORD).unlink(missing_ok=True)
    return stopped
