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
from tasks.promotion import DirTarget, EdgeTarget, S3Target, file_manifest, make_target
from llmops.errors import PromotionError
from llmops.governance.evidence import check_evidence

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
    import tasks.promotion as promo

    real, calls = promo._copy_file, []

    def dying_copy(src, fout):
        calls.append(src)
        if len(calls) > 1:
            raise OSError("disk full")
        return real(src, fout)

    monkeypatch.setattr(promo, "_copy_file", dying_copy)
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




def test_edge_bundle_and_served_files_must_be_the_ledger_bound_bytes(tmp_path, monkeypatch):
    """Attack: the edge bundle replaced in the registry after approval was published; `llmops serve` downloaded
    registry files without a digest check. Both now compare the files with what the training attempt bound in the
    ledger (the model's digest at finish, the edge bundle's after compression)."""
    from llmops.governance.evidence import artifact_digest_problem
    from flows.cli.serve import _verify_served
    from llmops.errors import LLMOpsError
    from llmops.governance.policy import load_governance
    from tasks.finetune import bind_artifact
    from llmops.errors import PrivacyError
    from llmops.governance.ledger import open_ledger
    from tests.conftest import ledger_backed_tags

    model, edge = tmp_path / "model", tmp_path / "edge"
    for d, name in ((model, "config.json"), (edge, "model.onnx")):
        d.mkdir()
        (d / name).write_bytes(b"evaluated bytes")
    tags = ledger_backed_tags({}, ["r1"], model_dir=str(model))
    g = load_governance()
    assert "binds no edge bundle" in artifact_digest_problem(g, tags, "edge", edge)
    bind_artifact(tags["llmops.dp.attempt_id"], "edge", str(edge))
    assert artifact_digest_problem(g, tags, "edge", edge) is None
    _verify_served(tags, "model", model, "m v1")
    _verify_served(tags, "edge", edge, "m v1")
    (edge / "model.onnx").write_bytes(b"swapped after approval")
    (model / "config.json").write_bytes(b"swapped in the serving cache")
    assert "is not the one attempt" in artifact_digest_problem(g, tags, "edge", edge)
    for kind, path in (("model", model), ("edge", edge)):
        with pytest.raises(LLMOpsError, match="are not the ones its training attempt produced"):
            _verify_served(tags, kind, path, "m v1")
    with pytest.raises(PrivacyError, match="already recorded another edge"):  # bound once, never rebound
        bind_artifact(tags["llmops.dp.attempt_id"], "edge", str(edge))
    with pytest.raises(PrivacyError, match="not a completed attempt"):
        open_ledger().bind_artifact("f" * 24, "edge", "0" * 64)
