"""S3 targets on a real S3-compatible server: round trip, interrupted upload, checksum mismatch (tests/unit/test_promotion.py: the rest)."""

import hashlib
import subprocess
import sys

import pytest

from llmops.errors import PromotionError
from tasks.promotion import S3Target, file_manifest, make_target
from tests.unit.test_promotion import _s3, model_dir  # noqa: F401


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
