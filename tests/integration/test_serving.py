"""Serving with real Ray Serve on 127.0.0.1 and the tiny model: the official `openai` client as a foreign client,
the response cache, blue/green (a failed smoke test keeps the old version), a replica killed under load, limits.

    .venv/bin/python -m pytest tests/integration/test_serving.py -q       # one Ray instance for the module (~60-90 s)
"""

import asyncio
import concurrent.futures as cf
import ipaddress
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from llmops.serving import control
from llmops.serving.cache import MemoryCache, RedisCache, cache_key, params_of, request_text
from llmops.serving.settings import ServeSettings
from tests.conftest import _free_port

control.use_loopback_ray()  # before Ray is imported: it reads this once (see control.LOOPBACK_ENV)
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

TINY = dict(arch="llama", layers=1, hidden=32, heads=2)


def _tiny(root: Path, seed: int):
    from tasks.model import resolve_model

    return resolve_model("tiny", root, tiny={**TINY, "seed": seed}, max_len=128)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Ray (2 CPUs, 127.0.0.1) + Serve on a free port + tiny model v1 behind the gateway, 2 replicas."""
    import ray
    from ray import serve

    from llmops.serving import control

    root = tmp_path_factory.mktemp("serving")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # unix socket paths must stay short
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    import psutil

    # this process's listeners from before Ray (e.g. another test's server): not Ray's, not judged below
    before = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process().net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    }
    ray.init(**control.local_ray(temp, num_cpus=2)["init_kwargs"], logging_level=logging.WARNING, log_to_driver=False)
    settings = ServeSettings(
        http_port=_free_port(),
        replicas=2,
        num_cpus=0.5,
        limits={
            "max_tokens": 32,
            "default_max_tokens": 8,
            "max_prompt_tokens": 48,
            "max_prompt_chars": 2000,
            "timeout_s": 20,
        },
    )
    v1, v2 = _tiny(root, 0), _tiny(root, 1)
    try:
        report = control.rollout("m", "1", v1.path, v1.digest, settings, {"eval.eval_loss": 20.0})
        url = f"http://127.0.0.1:{settings.http_port}"
        control.wait_http(f"{url}/healthz")
        yield {
            "url": url,
            "settings": settings,
            "v1": v1,
            "v2": v2,
            "report": report,
            "root": root,
            "listeners_before_ray": before,
        }
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _is_loopback(ip: str) -> bool:
    a = ipaddress.ip_address(ip)
    return (getattr(a, "ipv4_mapped", None) or a).is_loopback  # gRPC binds 127.0.0.1 as ::ffff:127.0.0.1


def _ray_listeners(driver) -> list[tuple[str, int, str]]:
    """(ip, port, process) of every listening TCP socket of `driver` (this process: Ray's driver) and of the Ray
    processes it started (GCS, raylet, dashboard, monitor, and their children: agents, workers, Serve actors)."""
    import psutil
    import ray

    ray_dir = os.path.dirname(ray.__file__)
    roots = [c for c in driver.children() if ray_dir in " ".join(c.cmdline()) or "-m ray." in " ".join(c.cmdline())]
    out = []
    for p in [driver, *roots, *[d for r in roots for d in r.children(recursive=True)]]:
        try:
            name = " ".join(os.path.basename(a) for a in p.cmdline()[:2]).strip()[:60]  # "gcs_server --log..."
            conns = p.net_connections(kind="tcp")
        except psutil.NoSuchProcess:  # a worker that just exited
            continue
        out += [(c.laddr.ip, c.laddr.port, f"{p.pid} {name}") for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_every_ray_listener_is_on_loopback(served):
    """The project rule, for Ray: every TCP listener of the driver and of every Ray process it started (GCS, raylet,
    object manager, workers, agents, monitor, dashboard, Serve controller/proxy/replicas) is on 127.0.0.1."""
    import psutil

    listeners = [x for x in _ray_listeners(psutil.Process()) if x[:2] not in served["listeners_before_ray"]]
    names = " | ".join(sorted({n.split(" ", 1)[1] for _, _, n in listeners}))
    for part in (
        "gcs_server",
        "raylet",
        "ray::DashboardAgent",
        "ray::RuntimeEnvAgent",
        "ray::ServeController",
        "ray::ProxyActor",
        "ray::ServeReplica:llmops-m-v1:ModelServer",
        "ray::ServeReplica:llmops-gateway",
    ):
        assert part in names, f"no listener of {part} found (the check would prove nothing): {names}"
    assert any(port == served["settings"].http_port for _, port, _ in listeners)
    exposed = [x for x in listeners if not _is_loopback(x[0])]
    assert not exposed, f"Ray listens beyond 127.0.0.1 (see control.local_ray): {exposed}"


@pytest.mark.slow  # ~20 s: a second Ray head, the one `llmops serve` starts (`ray start`), beside the module's
def test_llmops_serve_ray_head_and_driver_listen_on_loopback_only(tmp_path):
    """`llmops serve`'s path: control.connect in a fresh process (without the setting in its environment) starts the
    head with `ray start` and joins it as a driver; the head's processes (incl. the Ray client server `ray start`
    always runs) and the driver listen on 127.0.0.1 only."""
    import psutil

    home = tmp_path / "serving"
    code = (
        "import json, sys\nfrom pathlib import Path\nimport psutil\nfrom llmops.serving import control\n"
        "from llmops.serving.settings import ServeSettings\ncontrol.connect(ServeSettings(), Path(sys.argv[1]))\n"
        "print(json.dumps([c.laddr.ip for c in psutil.Process().net_connections('tcp') if c.status == 'LISTEN']))"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, str(home)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert r.returncode == 0, r.stderr[-3000:]
        driver_ips = json.loads(r.stdout.strip().splitlines()[-1])
        assert driver_ips and all(_is_loopback(ip) for ip in driver_ips), driver_ips
        head = psutil.Process(control.local_head(home)["pid"])  # `ray start --block`
        client_port = int(next(a for a in head.cmdline() if a.startswith("--ray-client-server-port=")).split("=")[1])
        deadline = time.time() + 60
        while client_port not in [port for _, port, _ in _ray_listeners(head)]:  # `ray start` starts it last
            assert time.time() < deadline, f"the Ray client server (port {client_port}) never listened"
            time.sleep(0.5)
        listeners = _ray_listeners(head)
        names = " | ".join(sorted({n.split(" ", 1)[1] for _, _, n in listeners}))
        for part in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
            assert part in names, f"no listener of {part} found: {names}"
        exposed = [x for x in listeners if not _is_loopback(x[0])]
        assert not exposed, f"llmops serve's Ray head listens beyond 127.0.0.1 (see control.local_ray): {exposed}"
    finally:
        info = control.local_head(home)
        control.stop_local(home)
        if info:
            shutil.rmtree(info["temp_dir"], ignore_errors=True)


def test_ray_imported_without_the_loopback_setting_is_refused():
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import; a process that imported Ray without it would
    bind to the host's address, so llmops refuses to start or join a local Ray there and says what to do."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    code = "import ray\nfrom llmops.serving import control\ncontrol.use_loopback_ray()"
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 1 and "Ray was imported before llmops could keep its listeners on 127.0.0.1" in r.stderr
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in r.stderr


def _client(served):
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)


def _post(url, body, raw: bytes | None = None):
    req = urllib.request.Request(
        url, data=raw if raw is not None else json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _metric(served, result: str) -> float:
    with urllib.request.urlopen(served["url"] + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith("llmops_cache_total{") and f'result="{result}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_openai_client_completion_chat_and_streaming(served):
    c = _client(served)
    assert [(m.id, m.version) for m in c.models.list().data] == [("m", "1")]
    comp = c.completions.create(model="m", prompt="Hello there", max_tokens=6, temperature=0)
    assert comp.choices[0].finish_reason in ("stop", "length") and comp.usage.completion_tokens <= 6
    assert comp.usage.prompt_tokens > 0 and comp.object == "text_completion"
    chat = c.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    pieces, finishes = [], []
    for chunk in c.completions.create(model="m", prompt="Hello there", max_tokens=6, temperature=0, stream=True):
        pieces.append(chunk.choices[0].text)
        finishes.append(chunk.choices[0].finish_reason)
    assert "".join(pieces) == comp.choices[0].text and finishes[-1] == comp.choices[0].finish_reason
    deltas = [
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0, stream=True
        )
    ]
    assert "".join(deltas) == chat.choices[0].message.content
    assert served["report"]["smoke"]["loss"] < 20.0  # the smoke test ran against the evaluated figure


def test_cache_hit_returns_the_same_text_and_is_counted(served):
    c = _client(served)
    hits, misses = _metric(served, "hit"), _metric(served, "miss")
    prompt = f"Cache me {time.time()}"
    first = c.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=8, temperature=0)
    again = c.completions.with_raw_response.create(model="m", prompt=f"  {prompt}\n", max_tokens=8, temperature=0)
    assert (first.headers["x-llmops-cache"], again.headers["x-llmops-cache"]) == ("miss", "hit")
    assert again.parse().choices[0].text == first.parse().choices[0].text
    assert (_metric(served, "hit"), _metric(served, "miss")) == (hits + 1, misses + 1)
    other = c.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=7, temperature=0)
    assert other.headers["x-llmops-cache"] == "miss"  # other params, other key
    sampled = c.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=8, temperature=0.9)
    assert sampled.headers["x-llmops-cache"] == "bypass"  # not deterministic: never cached
    seeded = [
        c.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=8, temperature=0.9, seed=7)
        for _ in range(2)
    ]
    assert [s.headers["x-llmops-cache"] for s in seeded] == ["miss", "hit"]
    assert seeded[0].parse().choices[0].text == seeded[1].parse().choices[0].text


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"prompt": "x", "max_tokens": 33}, 400, "max_tokens"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "word " * 60, "max_tokens": 4}, 400, "prompt"),  # > max_prompt_tokens (48)
        ({"prompt": "y" * 2001}, 400, "prompt"),  # > max_prompt_chars
        ({"prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"prompt": "x", "n": 2}, 400, "n"),
        ({"prompt": ["a", "b"]}, 400, "prompt"),
        ({"prompt": "x", "model": "nope"}, 404, "model"),
        ({"prompt": "x", "stop": [1]}, 400, "stop"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]"),
    ],
)
def test_bad_requests_get_4xx_in_openai_error_format(served, body, status, param):
    kind = "chat/completions" if "messages" in body else "completions"
    code, _, out = _post(f"{served['url']}/v1/{kind}", {"model": "m", **body})
    assert code == status and out["error"]["param"] == param and out["error"]["message"], out


def test_malformed_json_is_400_and_the_replicas_keep_serving(served):
    code, _, out = _post(f"{served['url']}/v1/completions", None, raw=b"{not json")
    assert code == 400 and "not valid JSON" in out["error"]["message"]
    assert _client(served).completions.create(model="m", prompt="still up", max_tokens=2).choices


def test_replica_killed_under_bounded_load_loses_no_accepted_request(served):
    """40 requests, 8 at a time, bounded to 120 s; one of the 2 replicas is killed while they run. Every request
    gets its answer, or at worst a retryable 503 that succeeds when retried once; the test counts both."""
    import ray

    url, n = served["url"] + "/v1/completions", 40
    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::llmops-m-v1#ModelServer")
    ]
    assert len(replicas) == 2
    started = []

    def one(i):
        started.append(i)
        body = {"model": "m", "prompt": f"load {i}", "max_tokens": 24, "temperature": 0.7}  # uncached
        code, _, out = _post(url, body)
        retried = code == 503
        if retried:
            code, _, out = _post(url, body)
        return code, retried

    deadline = time.time() + 120
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(n)]
        while len(started) < 12:
            time.sleep(0.02)
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        results = [f.result(timeout=max(1, deadline - time.time())) for f in futures]
    codes = [c for c, _ in results]
    assert codes.count(200) == n, results
    assert sum(r for _, r in results) <= n
    from ray import serve

    t0 = time.time()  # Serve replaces the dead replica
    while time.time() - t0 < 60:
        live = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::llmops-m-v1#ModelServer")
        ]
        healthy = str(serve.status().applications["llmops-m-v1"].status).endswith("RUNNING")
        if len(live) == 2 and replicas[0]["name"] not in [a["name"] for a in live] and healthy:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"dead replica not replaced (healthy: {healthy}): {live}")


def test_failed_smoke_test_keeps_the_old_version_then_a_good_one_switches_and_invalidates(served):
    from llmops.serving import control
    from llmops.serving.control import SmokeTestFailed

    c, s, v2 = _client(served), served["settings"], served["v2"]
    prompt = "Switch me"
    c.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0)  # cached for v1
    with pytest.raises(SmokeTestFailed, match="exceeds the evaluated"):  # the evaluated loss is far lower
        control.rollout("m", "2", v2.path, v2.digest, s, {"eval.eval_loss": 0.5})
    assert [m.version for m in c.models.list().data] == ["1"]
    assert "llmops-m-v2" not in control.status()["applications"]
    still = c.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=8, temperature=0)
    assert still.headers["x-llmops-version"] == "1" and still.headers["x-llmops-cache"] == "hit"
    report = control.rollout("m", "2", v2.path, v2.digest, s, {"eval.eval_loss": 20.0})
    assert report["previous"]["version"] == "1" and report["seconds"]["total"] > 0
    after = c.completions.with_raw_response.create(model="m", prompt=prompt, max_tokens=8, temperature=0)
    assert after.headers["x-llmops-version"] == "2" and after.headers["x-llmops-cache"] == "miss"
    assert after.parse().choices[0].text  # answered by v2's replicas: v1's application is being deleted
    deadline = time.time() + 30
    while "llmops-m-v1" in control.status()["applications"] and time.time() < deadline:
        time.sleep(0.5)
    assert list(control.status()["applications"]) == ["llmops-gateway", "llmops-m-v2"]


# ---------------------------------------------------------------------------------------- cache without Ray


def test_cache_keys_are_hashes_of_version_text_and_params():
    body = {"prompt": "Hi\r\n", "max_tokens": 8, "temperature": 0, "seed": 3}
    k1 = cache_key("digest-1", "completion", request_text("completion", body), params_of(body))
    assert len(k1) == 64 and int(k1, 16) >= 0 and "Hi" not in k1
    assert k1 == cache_key(
        "digest-1",
        "completion",
        request_text("completion", {"prompt": " Hi"}),
        params_of({"max_tokens": 8, "temperature": 0.0}),
    )  # greedy: the seed is irrelevant
    assert k1 != cache_key("digest-2", "completion", "Hi", params_of(body))


def test_memory_cache_ttl_and_lru_bound():
    now = [0.0]
    cache = MemoryCache(ttl_s=10, max_entries=2, max_entry_bytes=100, clock=lambda: now[0])

    async def go():
        await cache.put("a", {"text": "A"})
        await cache.put("b", {"text": "B"})
        assert await cache.get("a") == {"text": "A"}  # a is now the most recent
        await cache.put("c", {"text": "C"})
        assert await cache.get("b") is None and len(cache) == 2
        await cache.put("big", {"text": "x" * 200})
        assert await cache.get("big") is None
        now[0] = 11
        assert await cache.get("a") is None

    asyncio.run(go())


@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if not exe:
        pytest.skip("needs Debian's redis-server (apt-get install redis-server; .ci/run does)")
    port = _free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--maxmemory",
            "64mb",
            "--maxmemory-policy",
            "allkeys-lru",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.time() + 10
    while True:
        try:
            r.ping()
            break
        except redis.ConnectionError:
            assert time.time() < deadline and proc.poll() is None, "redis-server did not start"
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_cache_backend_against_real_redis(redis_url):
    import redis

    body = {"prompt": "secret prompt text", "max_tokens": 4, "temperature": 0}
    key = cache_key("d", "completion", request_text("completion", body), params_of(body))

    async def go():
        cache = RedisCache(redis_url, ttl_s=2, max_entry_bytes=1000)
        assert await cache.get(key) is None
        await cache.put(key, {"text": "answer"})
        assert await cache.get(key) == {"text": "answer"}
        await cache.put("big", {"text": "x" * 2000})  # over the entry bound: not stored
        return cache

    asyncio.run(go())
    r = redis.Redis.from_url(redis_url)
    keys = [k.decode() for k in r.keys("*")]
    assert keys == [f"llmops:cache:{key}"] and "secret" not in keys[0] and 0 < r.ttl(keys[0]) <= 2
    time.sleep(2.2)
    assert r.keys("*") == []  # expired


def test_redis_outage_is_a_miss_not_an_error():
    async def go():
        cache = RedisCache(f"redis://127.0.0.1:{_free_port()}/0", ttl_s=5, max_entry_bytes=100)
        assert await cache.get("k") is None
        await cache.put("k", {"text": "x"})
        return cache.errors

    assert asyncio.run(go()) == 2


def test_engine_stops_at_the_deadline(tmp_path):
    from llmops.serving.engine import TorchEngine

    eng = TorchEngine(Path(_tiny(tmp_path, 0).path))
    out = list(eng.stream(eng.encode("hello"), 20, deadline=time.monotonic() - 1))
    assert out[-1] == ("", "timeout") and len(out) == 2


@pytest.mark.gpu
def test_vllm_engine_on_cuda(tmp_path):
    """On a GPU box the same replica runs vLLM (engine auto picks it when vllm is installed)."""
    pytest.importorskip("vllm")
    from llmops.serving.engine import VllmEngine, pick_engine

    path = Path(_tiny(tmp_path, 0).path)
    assert pick_engine(path, "auto") == "vllm"
    eng = VllmEngine(path)
    text = "".join(p for p, _ in eng.stream(eng.encode("hello"), 4))
    assert isinstance(text, str) and eng.loss(["hello world"]) > 0


# ---------------------------------------------------------------------------------- promotion to a serve target


@pytest.mark.slow  # ~2-3 min here: 3 promotions + 1 rollback through Prefect, 4 blue/green deploys
def test_promotion_to_a_serve_target_blue_green_smoke_failure_and_rollback(served, prefect_harness, tmp_path):
    """Governance target `live` (kind serve): an approved promotion deploys blue/green; a version whose evaluated
    loss the served model cannot match fails its smoke test: promotion failed, audited, v1 keeps serving; the
    rollback flow switches serving back."""
    from flows.promotion import promotion_flow, rollback_flow
    from llmops.config import PipelineConfig
    from llmops.files import write_text_atomic
    from llmops.governance.access import commit_governance, enrol_user, init_governance, make_request
    from llmops.governance.audit import AuditLog
    from llmops.governance.keys import load_private_key
    from llmops.governance.policy import TargetSpec, load_governance
    from llmops.services import connect_registry
    from tasks.registry import register_candidate
    from tests.conftest import ledger_backed_tags
    from tests.unit.test_promotion_flow import GOOD_TAGS, _code, _paused, _start, _submit

    g = init_governance()
    keys = {
        n: load_private_key(write_text_atomic(tmp_path / f"{n}.key", enrol_user(g, n, [r]), mode=0o600))
        for n, r in (("alice", "ml-engineer"), ("bob", "release-manager"), ("carol", "release-manager"))
    }
    live = served["settings"].model_copy(update={"replicas": 1, "num_cpus": 0.25})  # room beside m's replicas
    g.targets = {"live": TargetSpec(kind="serve", uri=served["url"], serve=live)}
    state = tmp_path / "state"
    g.registry_uri = uri = connect_registry(None, state)
    commit_governance(g, "test-setup")
    g = load_governance(required=True)
    for i, (model, loss) in enumerate(((served["v1"], 20.0), (served["v2"], 0.5), (served["v2"], 20.0))):
        register_candidate(
            uri=uri,
            state_dir=str(state),
            experiment="e",
            model_name="pm",
            model_dir=model.path,
            params={},
            metrics={"eval.eval_loss": loss},
            step_metrics=[],
            artifacts={},
            texts={},
            tags={},
            set_alias=False,
            version_tags=ledger_backed_tags(GOOD_TAGS, [f"rec-{i}"], model_dir=model.path),
        )
    cfg = PipelineConfig.model_validate({"state_dir": str(state), "registry": {"model_name": "pm"}})
    c = _client(served)

    def run(fn, action, signed_version, **kw):
        t, out = _start(
            fn,
            config=cfg,
            request=make_request(
                keys["alice" if action == "promote" else "bob"],
                "alice" if action == "promote" else "bob",
                action,
                "pm",
                signed_version,
            ),
            **kw,
        )
        rid = _paused(f"llmops-{'promotion' if action == 'promote' else 'rollback'}", exclude=seen)
        seen.add(rid)
        approver = "carol" if action == "rollback" else "bob"  # bob requests rollbacks: carol approves them
        _submit(rid, approver, _code(keys[approver], rid))
        t.join(timeout=240)
        return out

    seen = set()
    assert run(promotion_flow, "promote", "1", version="1").get("result", {}).get("status") == "promoted"
    served_versions = {m.id: m.version for m in c.models.list().data}
    assert served_versions["pm"] == "1"
    out = run(promotion_flow, "promote", "2", version="2")
    assert "smoke" in str(out.get("error")).lower() or "exceeds the evaluated" in str(out.get("error")), out
    assert {m.id: m.version for m in c.models.list().data}["pm"] == "1"  # the old version keeps serving
    assert c.completions.create(model="pm", prompt="still v1", max_tokens=3, temperature=0).choices
    decisions = [a["decision"] for a in AuditLog.for_governance(g).entries() if a.get("version") == "2"]
    assert decisions[-1] == "smoke-failed"
    assert run(promotion_flow, "promote", "3", version="3").get("result", {}).get("status") == "promoted"
    assert {m.id: m.version for m in c.models.list().data}["pm"] == "3"
    assert run(rollback_flow, "rollback", "1").get("result", {}).get("status") == "rolled-back"
    assert {m.id: m.version for m in c.models.list().data}["pm"] == "1"  # serving switched back


def test_concurrency_limit_gives_429_with_retry_after_and_the_replica_keeps_serving(served):
    """Model `q`: 1 replica, 1 request at a time, 1 queued; 8 concurrent requests: the excess get 429 at once."""
    from llmops.serving import control

    s = served["settings"].model_copy(
        update={
            "replicas": 1,
            "limits": served["settings"].limits.model_copy(update={"max_ongoing_per_replica": 1, "max_queued": 1}),
        }
    )
    v1 = served["v1"]
    control.rollout("q", "1", v1.path, v1.digest + "-q", s, {})
    url = served["url"] + "/v1/completions"
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda i: _post(url, {"model": "q", "prompt": f"busy {i}", "max_tokens": 32, "temperature": 0.5}),
                range(8),
            )
        )
    codes = sorted(code for code, _, _ in results)
    assert codes.count(200) >= 1 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    refused = next(r for r in results if r[0] == 429)
    assert refused[1].get("retry-after") == "1" and refused[2]["error"]["type"] == "rate_limit_error"
    assert _post(url, {"model": "q", "prompt": "after", "max_tokens": 2})[0] == 200


def test_request_timeout_gives_408_and_the_replica_keeps_serving(served):
    """The gateway's timeout (here 1 ms, a gateway-only change: model replicas are not restarted) -> 408."""
    from llmops.serving import control

    s = served["settings"].model_copy(
        update={"limits": served["settings"].limits.model_copy(update={"timeout_s": 0.001})}
    )
    entry = control.gateway_config()["models"]["q"]
    control.switch("q", entry["version"], entry["app"], entry["digest"], s)
    code, _, out = _post(
        served["url"] + "/v1/completions", {"model": "q", "prompt": "slow", "max_tokens": 32, "temperature": 0.5}
    )
    assert code == 408 and out["error"]["code"] == "request_timeout", out
    control.switch("q", entry["version"], entry["app"], entry["digest"], served["settings"])
    assert _post(served["url"] + "/v1/completions", {"model": "q", "prompt": "fast", "max_tokens": 2})[0] == 200
