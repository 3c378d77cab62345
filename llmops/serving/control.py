"""Start Ray Serve on 127.0.0.1, deploy a model version, smoke-test it, and switch traffic to it (blue/green).

Blue/green, in `rollout()`:
1. the new version comes up as its own Serve application (`llmops-<model>-v<version>`, no HTTP route) beside the
   one serving now; clients keep talking to the old one through the gateway;
2. smoke test against the new replicas: healthy, N prompts answered, latency per token and loss on public smoke
   texts within the version's evaluated figures (`eval.latency_ms_per_token_p50`, `eval.eval_loss`);
3. pass: the gateway's user_config names the new application (a lightweight reconfigure: no restart, no dropped
   requests) and the old application is deleted (Serve drains its in-flight requests first);
   fail: the new application is deleted, the gateway is untouched, `SmokeTestFailed` says what failed.
The local Ray head (when no `ray_address` is given) runs as `ray start --head --block` in its own process group,
every listener bound to 127.0.0.1 (`local_ray()` says how), logs under `<home>/serving/ray/`; `stop_local()` ends that
process group only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from llmops.errors import LLMOpsError
from llmops.serving.settings import ServeSettings

GATEWAY_APP = "llmops-gateway"
LOG = logging.getLogger("llmops.serving")


class ServingError(LLMOpsError):
    """Serving cannot start or a rollout cannot proceed."""


class SmokeTestFailed(ServingError):
    """The new version failed its smoke test; the old version keeps serving."""


def app_name(model: str, version: str) -> str:
    return "llmops-" + re.sub(r"[^A-Za-z0-9_.-]", "_", f"{model}-v{version}")


def serving_home() -> Path:
    from llmops.files import default_state_dir

    return default_state_dir().resolve() / "serving"


# -------------------------------------------------------------------------------------------------- cluster


def _ray_bin() -> str:
    return str(Path(sys.executable).parent / "ray")


LOOPBACK = "127.0.0.1"
# Every Ray 2.60 listener binds by the node IP: the C++ gRPC servers (GCS, raylet, object manager, each worker's and
# the driver's core worker) listen on 127.0.0.1 only when the node IP is loopback, otherwise on all interfaces; the
# dashboard agent, runtime-env agent, Ray client server, autoscaler monitor and metrics servers check
# `is_localhost(node_ip)`. But a loopback `--node-ip-address` / `_node_ip_address` is replaced by the host's routable
# address (ray/_private/services.py `resolve_ip_for_localhost` -> `get_node_ip_address` ->
# `node_ip_address_from_perspective`) unless `ray_constants.ENABLE_RAY_CLUSTER` is false, which is this variable.
# It is Ray's single-host mode (the macOS/Windows default): no other node may join. Ray reads it once, at import.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def local_ray(temp_dir: str | Path, num_cpus: int | None = None, gcs_port: int = 0, client_port: int = 0) -> dict:
    """The one place that keeps a local Ray node on 127.0.0.1: `env` (into os.environ before `import ray`, and into
    `ray start`'s environment), `start_argv` (`ray start --head --block`, for `llmops serve`; needs free `gcs_port`
    and `client_port`) and `init_kwargs` (`ray.init` starting the node in-process: tests, bench).
    `temp_dir` must be short (unix socket paths live under it)."""
    num_cpus = num_cpus or os.cpu_count()
    start = [
        _ray_bin(),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={LOOPBACK}",
        f"--port={gcs_port}",
        "--include-dashboard=false",
        f"--dashboard-host={LOOPBACK}",  # the dashboard process starts anyway
        f"--ray-client-server-port={client_port}",  # always started by `ray start` (port 0 is refused)
        "--dashboard-agent-listen-port=0",  # not the fixed 52365 another Ray on this host may hold
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={num_cpus}",
    ]
    init = {
        "address": "local",
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "dashboard_host": LOOPBACK,
        "_node_ip_address": LOOPBACK,
        "_temp_dir": str(temp_dir),
    }
    return {"env": dict(LOOPBACK_ENV), "start_argv": start, "init_kwargs": init}


def use_loopback_ray() -> None:
    """Put `LOOPBACK_ENV` into this process's environment; raises if Ray was already imported without it (its
    listeners would then bind to the host's address)."""
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and constants.ENABLE_RAY_CLUSTER:
        raise ServingError(
            "Ray was imported before llmops could keep its listeners on 127.0.0.1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
            "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment of this process, or call "
            "llmops.serving.control.use_loopback_ray() before importing ray",
        )


def quiet_serve_logs(home: Path | None = None) -> None:
    """Ray Serve's driver-side INFO lines go to `<home>/serve-driver.log`, not the console (the import of ray.serve
    installs a console handler at INFO, so this runs after it)."""
    import ray.serve  # noqa: F401 - configures the "ray.serve" logger

    log = logging.getLogger("ray.serve")
    target = (home or serving_home()) / "serve-driver.log"
    if not any(isinstance(h, logging.FileHandler) for h in log.handlers):
        target.parent.mkdir(parents=True, exist_ok=True)
        for h in list(log.handlers):
            log.removeHandler(h)
        log.addHandler(logging.FileHandler(target))
        log.propagate = False
    log.setLevel(logging.INFO)


def _quiet_ray_init(**kw) -> None:
    import ray

    ray.init(**kw, logging_level=logging.WARNING, log_to_driver=False, configure_logging=True, namespace="llmops")


def _auth_env(home: Path) -> dict:
    """Token authentication for the local head, with a token of our own (mode 600 in the serving home) instead of
    Ray's default ~/.ray/auth_token: every process that talks to the head (CLI, promotion worker) reads this file."""
    import secrets

    from llmops.files import write_text_atomic

    path = home / "ray-auth-token"
    if not path.is_file():
        write_text_atomic(path, secrets.token_hex(32), mode=0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def start_local_head(home: Path, num_cpus: int | None = None, gcs_port: int = 0) -> dict:
    """`ray start --head --block` on 127.0.0.1 (dashboard off), recorded in `<home>/head.json`."""
    import socket

    home.mkdir(parents=True, exist_ok=True)
    info = local_head(home)
    if info:
        return info

    def free_port() -> int:
        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            return s.getsockname()[1]

    gcs_port = gcs_port or free_port()
    temp = Path("/tmp") / f"llmops-ray-{os.getuid()}-{gcs_port}"  # unix socket paths must stay short
    ray_cfg = local_ray(temp, num_cpus, gcs_port=gcs_port, client_port=free_port())
    log = open(home / "ray-head.log", "ab")
    env = {**os.environ, **ray_cfg["env"], **_auth_env(home)}
    proc = subprocess.Popen(
        ray_cfg["start_argv"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    info = {"pid": proc.pid, "address": f"{LOOPBACK}:{gcs_port}", "temp_dir": str(temp)}
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServingError(
                f"ray head exited with {proc.returncode}",
                str(home / "ray-head.log"),
                "read the log; is the port taken?",
            )
        if (temp / "session_latest").exists():
            (home / "head.json").write_text(json.dumps(info))
            return info
        time.sleep(0.5)
    raise ServingError("ray head did not start within 90 s", str(home / "ray-head.log"), "read the log")


def local_head(home: Path) -> dict | None:
    from llmops.files import pid_alive

    f = home / "head.json"
    if not f.is_file():
        return None
    info = json.loads(f.read_text())
    return info if pid_alive(info["pid"]) else None


def stop_local(home: Path) -> bool:
    info = local_head(home)
    if info is None:
        return False
    try:
        os.killpg(info["pid"], signal.SIGTERM)  # the process group `ray start --block` leads
    except ProcessLookupError:
        pass
    deadline = time.time() + 15
    from llmops.files import pid_alive

    while pid_alive(info["pid"]) and time.time() < deadline:
        time.sleep(0.3)
    if pid_alive(info["pid"]):
        os.killpg(info["pid"], signal.SIGKILL)
    (home / "head.json").unlink(missing_ok=True)
    return True


def connect(settings: ServeSettings, home: Path | None = None) -> None:
    """Connect this process to Ray (an existing connection is kept: tests and the bench own theirs)."""
    if not settings.ray_address and "ray" not in sys.modules:
        os.environ.update({**LOOPBACK_ENV, **_auth_env(home or serving_home())})  # Ray reads both at import
    quiet_serve_logs(home)
    if sys.modules["ray"].is_initialized():
        return
    if settings.ray_address:
        _quiet_ray_init(address=settings.ray_address)
        return
    use_loopback_ray()  # the driver's own gRPC server binds by the node IP too
    home = home or serving_home()
    info = start_local_head(home)
    _quiet_ray_init(address=info["address"], _node_ip_address=LOOPBACK)


def start_serve(settings: ServeSettings) -> None:
    from ray import serve

    quiet_serve_logs()
    serve.start(
        http_options={"host": LOOPBACK, "port": settings.http_port},
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )


# -------------------------------------------------------------------------------------------------- deploy


def deploy_version(model: str, version: str, model_dir: str | Path, digest: str, settings: ServeSettings) -> str:
    """Bring up `model` v`version` as its own application (no HTTP route); returns its name."""
    from ray import serve

    from llmops.serving.app import ModelServer

    app = app_name(model, version)
    info = {"model": model, "version": str(version), "digest": digest}
    bound = ModelServer.options(**settings.deployment_options()).bind(
        str(model_dir), settings.engine, max(1, int(settings.num_cpus)), info, settings.limits.model_dump()
    )
    from ray.serve.api import _run

    _run(bound, name=app, route_prefix=None, _blocking=False)  # serve.run would wait forever for unplaceable replicas
    deadline = time.time() + settings.deploy_timeout_s
    while True:
        st = serve.status().applications.get(app)
        state = str(st.status).split(".")[-1] if st else "MISSING"
        if state == "RUNNING":
            return app
        if state in ("DEPLOY_FAILED", "UNHEALTHY") or time.time() > deadline:
            import ray

            serve.delete(app)
            why = (st.message or "").strip().splitlines()[-1][:300] if st and st.message else state
            free = ray.available_resources().get("CPU", 0.0)
            raise ServingError(
                f"{model} v{version} did not start within {settings.deploy_timeout_s:.0f}s: {why}",
                str(model_dir),
                f"check the model files and the Ray logs; blue/green needs room for "
                f"both versions at once ({free:g} CPUs free now; lower num_cpus or "
                f"replicas)",
            )
        time.sleep(0.5)


def gateway_config() -> dict:
    from ray import serve

    try:
        return serve.get_app_handle(GATEWAY_APP).config.remote().result(timeout_s=30)
    except Exception:  # noqa: BLE001 - no gateway yet
        return {"models": {}}


def gateway_args(settings: ServeSettings) -> str:
    """Only what the gateway uses (limits, cache): a change of replicas or engine must not restart it."""
    return ServeSettings(limits=settings.limits, cache=settings.cache).model_dump_json()


def switch(model: str, version: str, app: str, digest: str, settings: ServeSettings) -> dict:
    """Point the gateway at `app` for `model` (deploys the gateway the first time). Returns the previous entry."""
    from ray import serve

    from llmops.serving.app import Gateway

    cfg = gateway_config()
    previous = cfg["models"].get(model)
    cfg["models"][model] = {"app": app, "version": str(version), "digest": digest, "created": int(time.time())}
    serve.run(Gateway.options(user_config=cfg).bind(gateway_args(settings)), name=GATEWAY_APP, route_prefix="/")
    return previous or {}


def smoke_test(app: str, settings: ServeSettings, evaluated: dict) -> dict:
    """Health, N prompts, latency per token and loss against the evaluated figures; raises SmokeTestFailed."""
    from ray import serve

    from llmops.serving.app import SMOKE_TEXTS

    s = settings.smoke
    handle = serve.get_deployment_handle("ModelServer", app_name=app)
    status = serve.status().applications.get(app)
    if status is None or str(status.status).split(".")[-1] != "RUNNING":
        raise SmokeTestFailed(
            f"application {app} is not healthy ({status.status if status else 'missing'})",
            app,
            "the old version keeps serving; read the replica logs",
        )
    lat, report = [], {}
    for i in range(s.prompts):
        req = {
            "kind": "completion",
            "prompt": SMOKE_TEXTS[i % len(SMOKE_TEXTS)],
            "max_tokens": 8,
            "temperature": 0.0,
            "top_p": None,
            "seed": None,
            "stop": None,
            "deadline": time.time() + settings.limits.timeout_s,
        }
        t0 = time.perf_counter()
        out = handle.generate.remote(req).result(timeout_s=settings.limits.timeout_s + 10)
        dt = time.perf_counter() - t0
        if "error" in out or out.get("finish_reason") not in ("stop", "length"):
            raise SmokeTestFailed(
                f"smoke prompt {i} failed: {out.get('error') or out.get('finish_reason')}",
                app,
                "the old version keeps serving",
            )
        lat.append(1000 * dt / max(1, out["completion_tokens"]))
    report["latency_ms_per_token_p50"] = sorted(lat)[len(lat) // 2]
    bound = s.max_latency_ms_per_token
    if bound is None and evaluated.get("eval.latency_ms_per_token_p50"):
        bound = s.latency_factor * float(evaluated["eval.latency_ms_per_token_p50"])
    if bound is not None and report["latency_ms_per_token_p50"] > bound:
        raise SmokeTestFailed(
            f"latency {report['latency_ms_per_token_p50']:.1f} ms/token exceeds {bound:.1f}",
            app,
            "the old version keeps serving; add replicas/CPUs or raise smoke.latency_factor",
        )
    report["loss"] = float(handle.score.remote(SMOKE_TEXTS).result(timeout_s=120))
    if "eval.eval_loss" in evaluated:
        limit = float(evaluated["eval.eval_loss"]) * (1 + s.loss_tolerance)
        report["loss_limit"] = limit
        if not report["loss"] <= limit:
            raise SmokeTestFailed(
                f"loss on the smoke texts {report['loss']:.3f} exceeds the evaluated "
                f"{float(evaluated['eval.eval_loss']):.3f} x (1 + {s.loss_tolerance})",
                app,
                "the old version keeps serving; the served model is not the one that was evaluated",
            )
    return report


def rollout(
    model: str,
    version: str,
    model_dir: str | Path,
    digest: str,
    settings: ServeSettings,
    evaluated: dict | None = None,
    switch_traffic: bool = True,
) -> dict:
    """Blue/green (module docstring). Returns timings, the smoke report and the version it replaced.
    `switch_traffic=False` stops after the smoke test (a promotion switches once every target holds the model)."""
    from ray import serve

    t0 = time.perf_counter()
    start_serve(settings)
    app = app_name(model, version)
    current = gateway_config()["models"].get(model, {})
    if current.get("app") == app and current.get("digest") == digest:
        return {"model": model, "version": str(version), "app": app, "unchanged": True, "previous": current}
    deploy_version(model, version, model_dir, digest, settings)
    t_up = time.perf_counter()
    try:
        smoke = smoke_test(app, settings, evaluated or {})
    except Exception:
        serve.delete(app)
        raise
    t_smoke = time.perf_counter()
    out = {
        "model": model,
        "version": str(version),
        "app": app,
        "smoke": smoke,
        "previous": current,
        "seconds": {"deploy": round(t_up - t0, 2), "smoke": round(t_smoke - t_up, 2)},
    }
    if switch_traffic:
        finish_rollout(model, version, digest, settings)
        out["seconds"]["switch"] = round(time.perf_counter() - t_smoke, 2)
    out["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    return out


def finish_rollout(model: str, version: str, digest: str, settings: ServeSettings) -> dict:
    """Switch the gateway to the (smoke-tested) application of `version`, then delete the one it replaced."""
    from ray import serve

    app = app_name(model, version)
    status = serve.status().applications.get(app)
    if status is None or str(status.status).split(".")[-1] != "RUNNING":
        raise ServingError(
            f"{app} is not deployed and healthy; nothing was switched",
            app,
            "run the rollout again (deploy + smoke test first)",
        )
    previous = switch(model, version, app, digest, settings)
    if previous.get("app") and previous["app"] != app:
        serve.delete(previous["app"], _blocking=False)
    return previous


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                    return
        except (OSError, ValueError):
            pass
        if time.time() > deadline:
            raise ServingError(f"{url} did not answer within {timeout:.0f}s", url, "read the serving logs")
        time.sleep(0.3)


def status() -> dict:
    from ray import serve

    apps = serve.status().applications
    return {
        "gateway": gateway_config(),
        "applications": {n: str(a.status).split(".")[-1] for n, a in apps.items() if n.startswith("llmops-")},
    }


def undeploy(model: str, settings: ServeSettings) -> None:
    """Stop serving `model` (the gateway stays up for the others)."""
    from ray import serve

    from llmops.serving.app import Gateway

    cfg = gateway_config()
    entry = cfg["models"].pop(model, None)
    if entry:
        serve.run(Gateway.options(user_config=cfg).bind(gateway_args(settings)), name=GATEWAY_APP, route_prefix="/")
        serve.delete(entry["app"])
