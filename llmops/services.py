"""Embedded local services for the demo and a single machine: a Prefect server on 127.0.0.1.

    llmops services start      # Prefect API + UI at http://127.0.0.1:4200 (state in $LLMOPS_HOME/prefect)
    llmops services stop

Runs in the background (pid file in the state dir) so a paused promotion stays approvable after the demo
command returns. Production uses Prefect server on Postgres (infra/), not this.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from llmops.errors import LLMOpsError

DEFAULT_PORT = 4200


def prefect_port() -> int:
    return int(os.environ.get("LLMOPS_PREFECT_PORT", DEFAULT_PORT))


def api_url(port: int | None = None) -> str:
    return f"http://127.0.0.1:{port or prefect_port()}/api"


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_prefect(state_dir: str | Path, port: int | None = None, timeout: float = 120) -> str:
    port = port or prefect_port()
    url = api_url(port)
    if healthy(url):
        return url
    home = Path(state_dir).resolve() / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port),
               PREFECT_UI_API_URL=url, PREFECT_API_URL=url)
    log = open(home / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (home / "server.pid").write_text(str(proc.pid))
    deadline = time.time() + timeout
    while not healthy(url):
        if proc.poll() is not None or time.time() > deadline:
            raise LLMOpsError("Prefect server did not start", str(home / "server.log"),
                              f"read the log; is port {port} taken? set LLMOPS_PREFECT_PORT")
        time.sleep(0.5)
    return url


def stop_prefect(state_dir: str | Path) -> bool:
    pid_file = Path(state_dir).resolve() / "prefect" / "server.pid"
    if not pid_file.is_file():
        return False
    pid = int(pid_file.read_text())
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    pid_file.unlink()
    return True


def ui_run_url(run_id: str, port: int | None = None) -> str:
    return f"http://127.0.0.1:{port or prefect_port()}/runs/flow-run/{run_id}"
