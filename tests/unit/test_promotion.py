"""Promotion: access control, audit, targets (real S3-compatible server), and the paused approval flow."""
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import pytest

from llmops.errors import LLMOpsError
from tasks.promotion import (DirTarget, EdgeTarget, PromotionError, S3Target, check_evidence, file_manifest,
                             make_target)

GOOD_TAGS = {"llmops.validation": "passed", "llmops.gate": "passed: no production model yet",
             "llmops.dp.private": "True", "llmops.dp.epsilon": "2.5", "llmops.dp.epsilon_cumulative": "2.5",
             "llmops.dp.budget": "10.0", "llmops.data_fingerprint": "ab" * 32, "llmops.dp.delta": "1e-05"}


@pytest.mark.parametrize("tags,problem", [
    ({"llmops.validation": "failed"}, "data validation: failed"),
    ({"llmops.gate": "failed: worse"}, "evaluation gate"),
    ({"llmops.dp.private": "False"}, "not trained with differential privacy"),
    ({"llmops.dp.epsilon_cumulative": "12"}, "exceeds budget"),
])
def test_evidence_checks(tags, problem):
    assert check_evidence(GOOD_TAGS) == []
    assert any(problem in p for p in check_evidence(GOOD_TAGS | tags))


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    (d / "tokenizer.json").write_text("{}")
    return d


def test_dir_target_is_atomic_and_idempotent(tmp_path, model_dir, monkeypatch):
    target = DirTarget(str(tmp_path / "onprem"))
    man = file_manifest(model_dir, "m", "1")
    assert target.publish(model_dir, man)["skipped"] is False
    assert target.read_manifest("m", "1") == man
    assert target.publish(model_dir, man)["skipped"] is True
    target.point_current("m", "1")
    assert json.loads((tmp_path / "onprem/m/current.json").read_text())["version"] == "1"
    # a copy that dies half-way leaves neither the version dir nor a temp dir behind
    import shutil

    def dying_copy(src, dst, **kw):
        Path(dst).mkdir(parents=True)
        (Path(dst) / "config.json").write_text("partial")
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copytree", dying_copy)
    with pytest.raises(OSError):
        target.publish(model_dir, file_manifest(model_dir, "m", "2"))
    assert sorted(p.name for p in (tmp_path / "onprem/m").iterdir()) == ["1", "current.json"]


def test_edge_target_needs_onnx(tmp_path, model_dir):
    with pytest.raises(PromotionError, match="no .onnx file"):
        EdgeTarget(str(tmp_path / "edge")).publish(model_dir, file_manifest(model_dir, "m", "1"))
    (model_dir / "model.onnx").write_bytes(b"onnx")
    assert EdgeTarget(str(tmp_path / "edge")).publish(model_dir, file_manifest(model_dir, "m", "1"))["files"] == 4


def _s3(endpoint):
    return boto3.client("s3", endpoint_url=endpoint)


def test_s3_target_round_trip_with_independent_reader(s3_env, model_dir, monkeypatch):
    import tasks.promotion as promo

    monkeypatch.setattr(promo, "PART_SIZE", 5 * 1024 * 1024)  # S3's minimum part; a 6 MiB file goes multipart
    (model_dir / "big.bin").write_bytes(b"x" * (6 * 1024 * 1024))
    _s3(s3_env).create_bucket(Bucket="llmops-models")
    target = make_target("s3", "s3://llmops-models/prod", s3_env)
    man = file_manifest(model_dir, "m", "7", {"epsilon": "2.5"})
    assert target.publish(model_dir, man) == {"target": "s3://llmops-models/prod", "skipped": False, "files": 4}
    assert target.publish(model_dir, man)["skipped"] is True  # idempotent re-run
    # read back with a separate process and a plain client: every file matches the manifest's sha256
    code = f"""
import boto3, hashlib, json
s3 = boto3.client("s3", endpoint_url="{s3_env}")
man = json.loads(s3.get_object(Bucket="llmops-models", Key="prod/m/7/manifest.json")["Body"].read())
for rel, meta in man["files"].items():
    body = s3.get_object(Bucket="llmops-models", Key="prod/m/7/" + rel)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == meta["sha256"], rel
print(len(man["files"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "4", r.stderr[-1500:]


def test_interrupted_s3_upload_leaves_no_visible_model(s3_env, model_dir, monkeypatch):
    _s3(s3_env).create_bucket(Bucket="llmops-partial")
    target = S3Target("s3://llmops-partial/p", s3_env)
    real_verify, calls = S3Target._verify, []

    def flaky(self, s3, key, path, meta):
        calls.append(key)
        if len(calls) == 2:
            raise PromotionError("connection dropped", key, "retry")
        return real_verify(self, s3, key, path, meta)

    monkeypatch.setattr(S3Target, "_verify", flaky)
    with pytest.raises(PromotionError, match="connection dropped"):
        target.publish(model_dir, file_manifest(model_dir, "m", "1"))
    assert target.read_manifest("m", "1") is None  # a reader never sees the partial model
    monkeypatch.setattr(S3Target, "_verify", real_verify)
    target.publish(model_dir, file_manifest(model_dir, "m", "1"))
    assert target.read_manifest("m", "1") is not None


def test_s3_checksum_mismatch_is_caught(s3_env, model_dir):
    _s3(s3_env).create_bucket(Bucket="llmops-bad")
    man = file_manifest(model_dir, "m", "1")
    man["files"]["config.json"]["sha256"] = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(PromotionError, match="checksum mismatch"):
        S3Target("s3://llmops-bad/p", s3_env).publish(model_dir, man)
    assert S3Target("s3://llmops-bad/p", s3_env).read_manifest("m", "1") is None


