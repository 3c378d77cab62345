"""Fail fast and once (issue 13): `llmops train` validates the data before Prefect starts or the model is resolved
and prints one error line; config paths resolve relative to the config file; `validate` needs no training
settings; `check-config --show` prints the effective PII policy; unknown keys get a did-you-mean."""

import json
import os
import subprocess
import sys
from pathlib import Path

from llmops.config import load_config
from tests.conftest import ROOT, write_jsonl


def llmops(*args, cwd=ROOT, home=None):
    env = dict(os.environ, PREFECT_HOME=str(Path(home).parent / "prefect-home")) if home else None
    if home:
        env["LLMOPS_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def _bad_data(tmp_path) -> Path:
    rows = [json.loads(x) for x in (ROOT / "data/sample/shakespeare.jsonl").read_text().splitlines()[:200]]
    rows[4]["text"] += " SSN 123-45-6789"
    return write_jsonl(tmp_path / "bad.jsonl", rows)


def test_config_paths_are_relative_to_the_config_file(tmp_path, monkeypatch):
    proj = tmp_path / "proj"
    (proj / "cfg").mkdir(parents=True)
    write_jsonl(proj / "records.jsonl", [{"text": "x"}])
    (proj / "cfg" / "run.yaml").write_text(
        "data:\n  path: ../records.jsonl\ntraining:\n  deepspeed_config: ds.json\nmodel:\n  source: tiny\n"
        "  tokenizer_path: ~/tok\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(proj / "cfg" / "run.yaml")
    assert cfg.data.path == proj / "records.jsonl" and cfg.training.deepspeed_config == proj / "cfg" / "ds.json"
    assert cfg.model.tokenizer_path == Path("~/tok").expanduser()
    cfg = load_config(Path("proj/cfg/run.yaml"), {"data.path": "other.jsonl"})  # --set: from the working directory
    assert cfg.data.path == Path("other.jsonl") and cfg.training.deepspeed_config == Path("proj/cfg/ds.json")


def test_shipped_configs_work_from_the_repo_root_and_from_anywhere(tmp_path):
    for name in ("tiny.yaml", "demo.yaml"):
        for cwd, path in ((ROOT, f"configs/{name}"), (tmp_path, str(ROOT / "configs" / name))):
            r = llmops("check-config", path, cwd=cwd, home=tmp_path / "home")
            assert r.returncode == 0, (cwd, r.stderr)
    from_root = llmops("check-config", "configs/tiny.yaml", "--show", home=tmp_path / "home")
    assert "path: data/sample/shakespeare.jsonl" in from_root.stdout  # same paths as before, from the repo root
    r = llmops("validate", "--config", str(ROOT / "configs/tiny.yaml"), cwd=tmp_path, home=tmp_path / "home")
    assert r.returncode == 0 and "Data validation: PASSED" in r.stdout, r.stderr


def test_validate_needs_no_training_settings(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"data:\n  path: {ROOT / 'data/sample/shakespeare.jsonl'}\n  max_records: 300\nmodel:\n"
        "  source: tiny\ntraining:\n  deepspeed_config: missing.json\n"
    )
    r = llmops("validate", "--config", str(cfg), home=tmp_path / "home")
    assert r.returncode == 0, r.stderr
    r = llmops("train", "--config", str(cfg), home=tmp_path / "home")
    assert r.returncode == 2 and "DeepSpeed config not found" in r.stderr


def test_check_config_show_prints_the_effective_pii_policy(tmp_path):
    r = llmops(
        "check-config", "configs/tiny.yaml", "--show", "--set", "validation.pii.email=block", home=tmp_path / "home"
    )
    assert r.returncode == 0, r.stderr
    rows = {line.split()[1]: line.split()[2:] for line in r.stdout.splitlines() if line.startswith("#   ")}
    assert rows["email"] == ["block", "(set)"] and rows["ssn"] == ["block", "(default)"]
    assert rows["phone"] == ["redact", "(default)"] and rows["ip_address"] == ["redact", "(default)"]


def test_unknown_keys_get_a_did_you_mean(tmp_path):
    r = llmops("check-config", "configs/tiny.yaml", "--set", "validation.pii.emial=block", home=tmp_path / "home")
    assert r.returncode == 2 and "did you mean 'email'?" in r.stderr and len(r.stderr.splitlines()) == 1
    r = llmops("check-config", "configs/tiny.yaml", "--set", "validation.control_char=block", home=tmp_path / "home")
    assert r.returncode == 2 and "did you mean 'control_chars'?" in r.stderr
    r = llmops("check-config", "configs/tiny.yaml", "--set", "data.encodng=latin-1", home=tmp_path / "home")
    assert r.returncode == 2 and "did you mean 'encoding'?" in r.stderr
