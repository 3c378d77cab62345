"""Local services, started and stopped by the project, listening on 127.0.0.1 only.

Embedded (the demo, one person; sqlite + files in the state dir):
    llmops services start          # Prefect server (UI :4200) + MLflow tracking server (UI :5000)
    llmops services stop
Team mode on one machine (the step before a cluster: infra/docker-compose.yml describes the same topology):
    llmops services start --team   # PostgreSQL, SeaweedFS (S3), Prefect on Postgres with API auth, MLflow on
                                   # Postgres + S3 artifacts, Redis (the serving cache), a training worker,
                                   # a promotion worker
    llmops services stop --team    # data stays in the state dir; `start --team` again picks it up
    llmops status                  # what runs, pending approvals, production versions

Everything runs in the background (own session, pid file, log in the state dir, never the terminal), so a paused
promotion stays approvable after the command that started it returns. `<state>/services.json` records what runs for
this state dir; clients on the same state dir (train, promote, status) use its MLflow server through
`llmops.services.connect_registry`. A configured or governance-pinned tracking URI always wins over the record.

Team-mode secrets (database roles, S3 keys, the Prefect API auth string, the Redis password, the MLflow users'
passwords) come from the OS CSPRNG at the first start and live in `<state>/team/secrets.json` (mode 600; the Redis
password also in the mode-600 redis.conf and password file beside Redis, the MLflow admin's in the mode-600 ini of
MLflow's basic-auth app): never printed, never a flow parameter. Each worker has its own MLflow identity
(MLFLOW_GRANTS says what it may do). Print the client settings on
purpose with `eval "$(llmops services env)"`.

Modules: `local` (embedded Prefect + MLflow, the record, process helpers), `team` (team mode), `registry`
(which MLflow clients use, UI links, status rows). Everything is re-exported here: `llmops.services.X` is the API.
"""

from llmops.services.local import (
    _SCHEMA_READY,
    DEFAULT_PORT,
    MLFLOW_PORT,
    RECORD,
    _base_env,
    _get,
    _pid,
    _port_taken,
    _record,
    _spawn,
    _stop_pid,
    api_url,
    create_sqlite_schema_once,
    healthy,
    mlflow_argv,
    mlflow_healthy,
    mlflow_port,
    prefect_port,
    read_record,
    recorded_mlflow,
    start_embedded,
    start_mlflow,
    start_prefect,
    stop_embedded,
    stop_mlflow,
    stop_prefect,
)
from llmops.services.registry import (
    connect_registry,
    model_version_url,
    service_rows,
    ui_run_url,
)
from llmops.services.team import (
    MLFLOW_ADMIN,
    MLFLOW_AUTH_CACHE_S,
    MLFLOW_GRANTS,
    PG_BIN,
    REDIS_SERVER,
    REPO,
    SEAWEED_PORTS,
    TEAM_SERVICES,
    _add_missing_secrets,
    _as_pg,
    _db_url,
    _mlflow_api,
    _pg_cluster,
    _pg_roles,
    _resp,
    _worker_ready,
    ledger_url,
    mlflow_accounts,
    mlflow_auth_ini,
    mlflow_credentials,
    mlflow_server_env,
    redis_argv,
    redis_conf,
    redis_password_file,
    redis_ping,
    redis_url,
    remove_postgres_cluster,
    s3_client,
    start_postgres,
    start_redis,
    start_s3,
    start_team,
    start_worker,
    stop_postgres,
    stop_team,
    team_cache,
    team_dir,
    team_env,
    team_ports,
    team_secrets,
    use_team_mlflow_credentials,
    write_training_view,
)

__all__ = [
    "DEFAULT_PORT",
    "MLFLOW_PORT",
    "RECORD",
    "prefect_port",
    "mlflow_port",
    "api_url",
    "_get",
    "healthy",
    "mlflow_healthy",
    "read_record",
    "_record",
    "recorded_mlflow",
    "_pid",
    "_spawn",
    "_stop_pid",
    "_base_env",
    "_port_taken",
    "start_prefect",
    "stop_prefect",
    "mlflow_argv",
    "_SCHEMA_READY",
    "create_sqlite_schema_once",
    "start_mlflow",
    "stop_mlflow",
    "start_embedded",
    "stop_embedded",
    "REPO",
    "PG_BIN",
    "REDIS_SERVER",
    "TEAM_SERVICES",
    "MLFLOW_AUTH_CACHE_S",
    "MLFLOW_ADMIN",
    "MLFLOW_GRANTS",
    "SEAWEED_PORTS",
    "team_dir",
    "team_secrets",
    "_add_missing_secrets",
    "team_ports",
    "_db_url",
    "ledger_url",
    "_pg_cluster",
    "_as_pg",
    "start_postgres",
    "_pg_roles",
    "stop_postgres",
    "remove_postgres_cluster",
    "s3_client",
    "start_s3",
    "redis_url",
    "redis_password_file",
    "redis_conf",
    "redis_argv",
    "_resp",
    "redis_ping",
    "start_redis",
    "team_cache",
    "team_env",
    "mlflow_auth_ini",
    "mlflow_server_env",
    "_mlflow_api",
    "mlflow_accounts",
    "mlflow_credentials",
    "use_team_mlflow_credentials",
    "_worker_ready",
    "start_worker",
    "write_training_view",
    "start_team",
    "stop_team",
    "service_rows",
    "ui_run_url",
    "connect_registry",
    "model_version_url",
]
