"""Promotion: access control, audit, targets (real S3-compatible server), and the paused approval flow."""

import json

import boto3
import pytest

from llmops.errors import LLMOpsError, PromotionError
from llmops.governance.evidence import check_evidence
from tasks.promotion import DirTarget, EdgeTarget, file_manifest

GOOD_TAGS = {
    "llmops.validation": "passed",
    "llmops.gate": "passed: no production model yet",
    "llmops.dp.private": "True",
    "llmops.dp.epsilon": "2.5",
    "llmops.dp.epsilon_cumulative": "2.5",
    "llmops.dp.budget": "10.0",
    "llmops.data_fingerprint": "ab" * 32,
    "llmops.dp.delta": "1e-05",
}


@pytest.mark.parametrize(
    "tags,problem",
    [
        ({"llmops.validation": "failed"}, "data validation: failed"),
        ({"llmops.gate": "failed: worse"}, "evaluation gate"),
        ({"llmops.dp.private": "False"}, "not trained with differential privacy"),
        ({"llmops.dp.epsilon_cumulative": "12"}, "exceeds budget"),
    ],
)
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


def test_edge_bundle_and_served_files_must_be_the_ledger_bound_bytes(tmp_path, monkeypatch):
    """Attack: the edge bundle replaced in the registry after approval was published; `llmops serve` downloaded
    registry files without a digest check. Both now compare the files with what the training attempt bound in the
    ledger (the model's digest at finish, the edge bundle's after compression)."""
    from flows.cli.serve import _verify_served
    from llmops.errors import PrivacyError
    from llmops.governance.evidence import artifact_digest_problem
    from llmops.governance.ledger import open_ledger
    from llmops.governance.policy import load_governance
    from tasks.finetune import bind_artifact
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
