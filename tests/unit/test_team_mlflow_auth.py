"""Team mode's MLflow server runs MLflow's basic-auth app (no server here: ~0.5 s; the server itself is exercised in
tests/integration/test_team_mode.py). The attacker: any process on the host that reaches 127.0.0.1:<mlflow port> and would
move `@production`, edit lineage tags or delete versions. These tests pin what keeps it out: CSPRNG passwords kept
in the mode-600 secrets file, an auth ini of mode 600 (the admin's and the auth database's passwords never on a
command line), each worker its own identity, and credentials filled in only for this state dir's team server.
"""

import json
import os
import stat

from llmops import services


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_auth_ini_and_server_env_keep_passwords_off_the_command_line(tmp_path, monkeypatch):
    state = tmp_path / "state"
    sec = services.team_secrets(state, create=True)
    users = sec["mlflow_users"]
    assert set(users) == {services.MLFLOW_ADMIN, "llmops-training", "llmops-promotion"}
    assert len(set(users.values())) == 3 and all(len(pw) >= 24 for pw in users.values())  # CSPRNG, >= 12 (MLflow)
    env = services.mlflow_server_env(state, sec, 5433)
    ini = env["MLFLOW_AUTH_CONFIG_PATH"]
    assert _mode(ini) == 0o600 and _mode(services.team_dir(state) / "secrets.json") == 0o600
    # MLflow's own reader understands the file: READ for everyone else, the auth tables in their own database
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", ini)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    from mlflow.server.auth.config import read_auth_config

    cfg = read_auth_config()
    assert cfg.default_permission == "READ" and cfg.admin_username == services.MLFLOW_ADMIN
    assert cfg.admin_password == users[services.MLFLOW_ADMIN]
    assert cfg.auth_cache_ttl_seconds == services.MLFLOW_AUTH_CACHE_S > 0  # not a PBKDF2 check on every request
    assert cfg.database_uri == f"postgresql+psycopg://mlflow_auth:{sec['db']['mlflow_auth']}@127.0.0.1:5433/mlflow_auth"
    argv = " ".join(services.mlflow_argv(5000, "s3://mlflow-artifacts", services.TEAM_SERVICES["mlflow"]["app"]))
    assert "--app-name basic-auth" in argv
    for value in (*users.values(), *sec["db"].values(), sec["mlflow_flask_key"]):
        assert value not in argv  # `ps` shows argv to every user


def test_each_worker_gets_its_own_identity_and_clients_the_operators(tmp_path):
    state = tmp_path / "state"
    sec = services.team_secrets(state, create=True)
    services.team_ports(state)
    for worker in ("worker-training", "worker-promotion"):
        user = services.TEAM_SERVICES[worker]["mlflow_user"]
        env = services.team_env(state, mlflow_user=user)
        assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == (user, sec["mlflow_users"][user])
    operator = services.team_env(state, cache=True)  # what `llmops services env` prints
    assert operator["MLFLOW_TRACKING_USERNAME"] == services.MLFLOW_ADMIN
    # only the promotion identity is granted edits on models without training's experiment rights
    assert services.MLFLOW_GRANTS["llmops-promotion"] == [("registered_model", "EDIT")]


def test_credentials_are_filled_in_only_for_this_state_dirs_team_server(tmp_path, monkeypatch):
    state = tmp_path / "state"
    sec = services.team_secrets(state, create=True)
    url = "http://127.0.0.1:5999"
    (state / services.RECORD).write_text(json.dumps({"mode": "team", "mlflow": {"url": url, "auth": True}}))
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "")  # recorded, so the values the code under test writes are undone afterwards
        monkeypatch.delenv(var)  # (they leaked into later tests' subprocesses: a wrong MLflow login)
    services.use_team_mlflow_credentials("http://127.0.0.1:6000", state)  # another server never gets them
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ
    services.use_team_mlflow_credentials(url, state)
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == services.MLFLOW_ADMIN
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == sec["mlflow_users"][services.MLFLOW_ADMIN]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "someone")  # set by the caller: left alone
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "theirs")
    services.use_team_mlflow_credentials(url, state)
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "theirs"


def test_secrets_made_before_mlflow_auth_gain_its_passwords_and_keep_the_rest(tmp_path):
    from llmops.files import write_text_atomic

    state = tmp_path / "state"
    old = services.team_secrets(state, create=True)
    for key in ("mlflow_users", "mlflow_flask_key"):
        old.pop(key)
    old["db"].pop("mlflow_auth")
    write_text_atomic(services.team_dir(state) / "secrets.json", json.dumps(old), mode=0o600)
    sec = services.team_secrets(state, create=True)
    assert {k: sec[k] for k in old if k != "db"} == {k: v for k, v in old.items() if k != "db"}
    assert {k: sec["db"][k] for k in old["db"]} == old["db"] and sec["db"]["mlflow_auth"]
    assert set(sec["mlflow_users"]) == {services.MLFLOW_ADMIN, *services.MLFLOW_GRANTS}
    assert _mode(services.team_dir(state) / "secrets.json") == 0o600
