"""Team mode's Redis (the serving response cache) and how a gateway finds it (budget: <= 5 s here).

Against a real Debian redis-server started by `llmops.services.start_redis` on a free 127.0.0.1 port, as
`llmops services start --team` starts it (the whole team, end to end, is tests/integration/test_team_mode.py).
The property: the password comes from the CSPRNG into the secrets file, reaches redis-server through a mode-600
config file (never its command line, which any local user sees in `ps`) and a gateway through a password file
(never the serve settings, which Ray stores and Prefect may log); the cache is bounded (maxmemory + allkeys-lru)
and not persisted.
"""

import asyncio
import json
import os
import shutil

import pytest

from llmops import services
from llmops.errors import LLMOpsError
from tests.conftest import _free_port

pytestmark = pytest.mark.skipif(
    not services.REDIS_SERVER.exists(),
    reason="needs Debian's redis-server (apt-get install redis-server; .ci/run does)",
)


@pytest.fixture
def team_redis(tmp_path):
    state = tmp_path / "state"
    sec, port = services.team_secrets(state, create=True), _free_port()
    url = services.start_redis(state, port, sec)
    yield state, port, sec["redis"], url
    services._stop_pid(services.team_dir(state) / "redis" / "redis.pid")


def _client(port: int, password: str | None):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # no retries: redis-py 8 backs off for ~4 s on an authentication error by default
    return redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=5, retry=Retry(NoBackoff(), 0))


def test_team_redis_settings_port_auth_bound_and_no_password_in_argv(team_redis):
    import redis

    state, port, password, url = team_redis
    home = services.team_dir(state) / "redis"
    assert url == f"redis://127.0.0.1:{port}/0" and password not in url
    assert (
        len(password) >= 40 and json.loads((services.team_dir(state) / "secrets.json").read_text())["redis"] == password
    )
    for f in (home / "redis.conf", services.redis_password_file(state)):
        assert f.stat().st_mode & 0o777 == 0o600, f
    assert f"requirepass {password}" in (home / "redis.conf").read_text()
    pid = services._pid(home / "redis.pid")
    cmdline = open(f"/proc/{pid}/cmdline").read()
    assert password not in cmdline and password not in " ".join(services.redis_argv(home / "redis.conf"))

    assert services.redis_ping(port).startswith("NOAUTH")  # unauthenticated: refused
    assert services.redis_ping(port, "not-the-password").startswith("WRONGPASS")
    with pytest.raises(redis.AuthenticationError):
        _client(port, None).get("k")
    r = _client(port, password)
    cfg = {
        k: v
        for k, v in r.config_get("*").items()
        if k in ("port", "bind", "maxmemory", "maxmemory-policy", "save", "appendonly", "dir")
    }
    assert cfg == {
        "port": str(port),
        "bind": "127.0.0.1",
        "maxmemory": str(256 * 2**20),
        "maxmemory-policy": "allkeys-lru",
        "save": "",
        "appendonly": "no",
        "dir": str(home),
    }
    assert services.TEAM_SERVICES["redis"]["maxmemory"] == "256mb"
    assert services.start_redis(state, port, services.team_secrets(state)) == url  # reused, not restarted
    assert services._pid(home / "redis.pid") == pid


def test_a_port_taken_by_another_redis_is_refused(team_redis, tmp_path):
    _, port, _, _ = team_redis
    other = tmp_path / "other"
    with pytest.raises(LLMOpsError, match=f"127.0.0.1:{port} already answers"):
        services.start_redis(other, port, services.team_secrets(other, create=True))


def test_a_gateway_configured_from_team_mode_uses_the_team_redis(team_redis):
    from llmops.serving.cache import RedisCache, cache_key, make_cache, params_of, request_text
    from llmops.serving.settings import CacheSettings, ServeSettings, resolve_cache

    state, port, password, url = team_redis
    assert resolve_cache(ServeSettings(), state).cache.backend == "memory"  # Redis alone is not team mode
    services._record(state, "mode", "team")  # what start_team records once every service is up
    services._record(state, "redis", {"url": url})
    settings = resolve_cache(ServeSettings(), state)
    assert (settings.cache.backend, settings.cache.redis_url) == ("redis", url)
    # what Ray stores as the gateway's init argument (control.gateway_args): no password in it
    shipped = ServeSettings(limits=settings.limits, cache=settings.cache).model_dump_json()
    assert password not in shipped
    cache = make_cache(ServeSettings.model_validate_json(shipped).cache)  # as the Gateway builds it
    assert isinstance(cache, RedisCache)
    body = {"prompt": "team prompt", "max_tokens": 4, "temperature": 0}
    key = cache_key("digest", "completion", request_text("completion", body), params_of(body))

    async def go():
        assert await cache.reachable()
        await cache.put(key, {"text": "cached answer"})
        return await cache.get(key), cache.errors

    assert asyncio.run(go()) == ({"text": "cached answer"}, 0)
    r = _client(port, password)  # it reached the team Redis, with a TTL
    assert json.loads(r.get(f"llmops:cache:{key}")) == {"text": "cached answer"} and r.ttl(f"llmops:cache:{key}") > 0

    # a backend the settings name wins over team mode
    named = ServeSettings(cache=CacheSettings(backend="memory"))
    assert resolve_cache(named, state).cache.backend == "memory"
    # a password file others can read is refused, naming the file and the fix
    os.chmod(services.redis_password_file(state), 0o644)
    with pytest.raises(LLMOpsError, match="readable by others") as e:
        resolve_cache(ServeSettings(), state)
    assert e.value.where == str(services.redis_password_file(state)) and e.value.fix.startswith("chmod 600")


def test_client_env_exports_the_cache_only_on_request(team_redis):
    state, port, password, url = team_redis
    workers, client = services.team_env(state), services.team_env(state, cache=True)
    assert "REDISCLI_AUTH" not in workers and "LLMOPS_REDIS_URL" not in workers  # workers' environment
    assert client["LLMOPS_REDIS_URL"] == services.redis_url(services.team_ports(state)["redis"])
    assert client["REDISCLI_AUTH"] == password
    if shutil.which("redis-cli"):  # what `eval "$(llmops services env)"` gives a shell
        import subprocess

        out = subprocess.run(
            ["redis-cli", "-u", url, "ping"],
            capture_output=True,
            text=True,
            timeout=10,
            env=dict(os.environ, REDISCLI_AUTH=client["REDISCLI_AUTH"]),
        )
        assert out.stdout.strip() == "PONG", out


def test_state_made_before_redis_joined_team_mode_gets_a_port_and_a_password(tmp_path):
    state = tmp_path / "state"
    tdir = services.team_dir(state)
    tdir.mkdir(parents=True)
    old_ports = {k: v for k, v in services.team_ports(state).items() if k != "redis"} | {"postgres": 15433}
    (tdir / "ports.json").write_text(json.dumps(old_ports))
    old = {k: v for k, v in services.team_secrets(state, create=True).items() if k != "redis"}
    (tdir / "secrets.json").write_text(json.dumps(old))
    ports = services.team_ports(state)
    assert ports["redis"] == services.TEAM_SERVICES["redis"]["port"] and ports["postgres"] == 15433
    sec = services.team_secrets(state, create=True)
    assert {k: sec[k] for k in old} == old and len(sec["redis"]) >= 40
    assert (tdir / "secrets.json").stat().st_mode & 0o777 == 0o600
