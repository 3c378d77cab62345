"""`llmops serve`: serve a registered model version with Ray Serve on 127.0.0.1 (OpenAI-compatible API).

    llmops serve --model m@production [--config configs/demo.yaml] [--replicas 2] [--port 8000] [--engine onnx]
    llmops serve status [--port 8000]
    llmops serve stop

The first `serve` starts a local Ray head (127.0.0.1, no dashboard; logs in $LLMOPS_HOME/serving/) that keeps
serving after the command returns; a later `serve` of another version is a blue/green rollout (smoke test first).
`--engine onnx` serves the version's ONNX edge bundle (the run's `edge` artifact) with onnxruntime.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from flows.cli.common import _config_or_default, _state_dir
from llmops.errors import LLMOpsError


def _settings(args):
    from llmops.serving.settings import ServeSettings

    over = {
        k: v
        for k, v in {"replicas": args.replicas, "http_port": args.port, "engine": args.engine}.items()
        if v is not None
    }
    return ServeSettings(**over)


def _cache_of(info: dict) -> tuple:
    return info.get("backend"), info.get("redis_url", info.get("url"))


def _gateway_cache() -> dict:
    """The response cache the running gateway uses (asked from the gateway itself, not re-derived here)."""
    from ray import serve

    from llmops.serving.control import GATEWAY_APP

    try:
        return serve.get_app_handle(GATEWAY_APP).cache_info.remote().result(timeout_s=30)
    except Exception as e:  # noqa: BLE001 - no gateway yet, or one deployed before cache_info existed
        return {"backend": "unknown", "why": f"{type(e).__name__}: the gateway did not say"}


def _registry_uri(args) -> str:
    from llmops.governance.policy import load_governance
    from llmops.services import connect_registry

    cfg = _config_or_default(args)
    return connect_registry(load_governance().registry_uri or cfg.registry.tracking_uri, cfg.state_dir)


def fetch_model(uri: str, spec: str, engine: str, home: Path) -> tuple[str, str, Path, dict]:
    """(name, version, local dir, evaluated metrics) of `NAME@ALIAS` or `NAME/VERSION`, cached under `home`.

    Nothing is served unverified: `@production`/`@previous` are what the signed audit log says (an alias that
    disagrees is refused, named), and the files, cached or fresh, must have the digest the version's training attempt
    recorded in the privacy ledger (the model, or the edge bundle for the onnx engine)."""
    import mlflow

    from tasks.registry import download_hf_model, retry

    m = re.fullmatch(r"([^@/]+)(?:@([\w-]+)|/(\d+))", spec)
    if not m:
        raise LLMOpsError(f"--model {spec!r} is not NAME@ALIAS or NAME/VERSION", "--model", "e.g. --model m@production")
    name, alias, number = m.groups()
    client = mlflow.MlflowClient(uri)
    try:
        mv = (
            retry(lambda: client.get_model_version_by_alias(name, alias))
            if alias
            else retry(lambda: client.get_model_version(name, number))
        )
    except Exception as e:  # noqa: BLE001 - MlflowException for unknown names/aliases
        raise LLMOpsError(
            f"no registered version {spec} ({type(e).__name__})",
            uri,
            "check the name and alias (`@production` exists after a promotion)",
        ) from None
    version = str(mv.version)
    if alias in ("production", "previous"):
        logged = _released(name, alias)
        if logged != version:
            raise LLMOpsError(
                f"MLflow {name}@{alias} is v{version} but the signed audit log says "
                f"{'v' + logged if logged else 'nothing'}",
                spec,
                "serve what the log says (an admin runs `llmops audit verify` / `audit reconcile`)",
            )
    metrics = client.get_run(mv.run_id).data.metrics
    out = home / "models" / name / version / engine
    files = out / "files"
    if not (out / ".complete").is_file():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if engine == "onnx":
            try:
                client.download_artifacts(mv.run_id, "edge", str(out))
            except Exception:  # noqa: BLE001
                raise LLMOpsError(
                    f"{name} v{version} has no ONNX edge bundle",
                    f"run {mv.run_id}",
                    "train with compression.export_onnx, or serve with the default engine",
                ) from None
            (out / "edge").rename(files)
        else:
            download_hf_model(uri, name, version, out / "dl").rename(files)
        (out / ".complete").write_text(json.dumps({"model": name, "version": version}))
    _verify_served(dict(mv.tags), "edge" if engine == "onnx" else "model", files, f"{name} v{version}")
    return name, version, files, {k: v for k, v in metrics.items() if k.startswith("eval.")}


def _released(name: str, alias: str) -> str | None:
    from llmops.governance.audit import AuditLog, release_state
    from llmops.governance.policy import load_governance

    g = load_governance()
    if not os.access(g.audit_log, os.R_OK):
        raise LLMOpsError(
            f"cannot check {name}@{alias} against the signed audit log: not readable here",
            str(g.audit_log),
            "serve from the promotion worker's host (LLMOPS_GOVERNANCE), or serve a version number",
        )
    st = release_state(AuditLog.for_governance(g).entries(), name)
    return st.production if alias == "production" else st.previous


def _verify_served(tags: dict, kind: str, path: Path, what: str) -> None:
    from llmops.files import dir_digest
    from llmops.governance.ledger import open_ledger
    from llmops.governance.policy import load_governance

    aid = tags.get("llmops.dp.attempt_id", "")
    ledger = open_ledger(load_governance().ledger)
    entry = ledger.entry(aid) if aid else None
    want = (entry.model_digest if entry else None) if kind == "model" else ledger.artifact_digest(aid, kind)
    if not want:
        raise LLMOpsError(
            f"{what}: the privacy ledger records no {kind} digest for its training attempt {aid or '(none)'}",
            "llmops serve",
            "serve a version trained by llmops train (retrain)",
        )
    got = dir_digest(path)
    if got != want:
        raise LLMOpsError(
            f"{what}: the {kind} files (digest {got[:12]}) are not the ones its training attempt "
            f"produced ({want[:12]}); registry artifacts or the local cache were changed",
            str(path),
            "nothing was served; investigate, then delete the cache dir and serve again",
        )


def _refuse_unreleased_on_a_release_target(name: str, version: str, settings) -> None:
    """The port of a governance `serve` target serves only what the signed log released there: `llmops serve` may
    run any ledger-verified version for testing, but not onto the gateway release managers approve for."""
    from urllib.parse import urlparse

    from llmops.governance.access import verified_entries
    from llmops.governance.audit import release_state
    from llmops.governance.policy import load_governance

    g = load_governance()
    for tname, t in g.targets.items():
        if t.kind != "serve" or not t.allows(name) or urlparse(t.uri).port != settings.http_port:
            continue
        released = release_state(verified_entries(g), name).targets.get(tname)
        if str(version) != str(released or ""):
            raise LLMOpsError(
                f"port {settings.http_port} is governance serve target '{tname}', which the signed "
                f"audit log has serving {name} {f'v{released}' if released else 'nothing'}, not "
                f"v{version}",
                "llmops serve --port",
                "serve test versions on another port (--port), or promote the version (release managers approve it)",
            )


def cmd_serve(args) -> int:
    import os

    from llmops.serving import control

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the console is for people
    logging.getLogger("ray").setLevel(logging.WARNING)
    home = control.serving_home()
    if args.op == "stop":
        stopped = control.stop_local(home)
        print("serving stopped (local Ray head ended)" if stopped else "nothing to stop: no local Ray head running")
        return 0
    settings = _settings(args)
    if args.op == "status":
        if not control.local_head(home) and not settings.ray_address:
            print("not serving (start with `llmops serve --model NAME@production`)")
            return 0
        control.connect(settings, home)
        print(json.dumps({**control.status(), "cache": _gateway_cache()}, indent=2))
        return 0
    if not args.model:
        raise LLMOpsError("no --model given", "llmops serve", "e.g. llmops serve --model m@production")
    from llmops.files import dir_digest
    from llmops.serving.settings import resolve_cache

    settings = resolve_cache(settings, _state_dir().resolve())  # team mode's Redis unless a cache backend is named
    engine = "onnx" if settings.engine == "onnx" else "hf"
    name, version, path, evaluated = fetch_model(_registry_uri(args), args.model, engine, home)
    _refuse_unreleased_on_a_release_target(name, version, settings)
    control.connect(settings, home)
    digest = dir_digest(path)
    report = control.rollout(name, version, path, digest, settings, evaluated)
    if report.get("unchanged") and _cache_of(_gateway_cache()) != _cache_of(settings.cache.model_dump()):
        control.finish_rollout(name, version, digest, settings)  # same version: only the gateway takes the new cache
    url = f"http://127.0.0.1:{settings.http_port}"
    control.wait_http(f"{url}/healthz")
    what = "already serving" if report.get("unchanged") else f"serving (rollout {report['seconds']['total']}s)"
    cache = " ".join(str(x) for x in _cache_of(_gateway_cache()) if x)
    print(
        f"{name} v{version} {what} at {url}/v1 (OpenAI API; model id '{name}'; response cache: {cache}); "
        f"`llmops serve status`, `llmops serve stop`"
    )
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "serve",
        help="serve a registered version with Ray Serve (OpenAI API on 127.0.0.1)",
        epilog="example: llmops serve --model m@production --replicas 2",
    )
    sp.add_argument("op", nargs="?", choices=["start", "status", "stop"], default="start")
    sp.add_argument("--model", help="NAME@ALIAS or NAME/VERSION")
    sp.add_argument("--config", "-c", help="PipelineConfig YAML (for its registry); governance's pin wins")
    sp.add_argument("--replicas", type=int)
    sp.add_argument("--port", type=int, help="HTTP port on 127.0.0.1 (default 8000; fixed once Serve runs)")
    sp.add_argument("--engine", choices=["auto", "transformers", "onnx", "vllm"])
    sp.set_defaults(func=cmd_serve, set=None)
