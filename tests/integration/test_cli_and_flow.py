import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def llmops(*args, env=None, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_cli_bad_config_is_one_line_and_exit_2(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("privacy:\n  target_epsilon: 1\n  noise_multiplier: 1\n")
    r = llmops("train", "--config", str(p))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: {p}:1: privacy: set exactly one of")


def test_cli_missing_paths(tmp_path):
    r = llmops("train", "--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    r = llmops("check-config", str(ROOT / "configs/tiny.yaml"), "--set", "data.path=/no/such/data")
    assert r.returncode == 2 and "data.path=/no/such/data: data path does not exist" in r.stderr
    r = llmops(
        "check-config",
        str(ROOT / "configs/tiny.yaml"),
        "--set",
        "model.source=local",
        "--set",
        f"model.path={tmp_path}",
    )
    assert r.returncode == 2 and f"{tmp_path}: no config.json" in r.stderr and "Traceback" not in r.stderr


def test_cli_bad_data_inside_flow_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken}\n')
    import os

    env = dict(os.environ, LLMOPS_HOME=str(tmp_path / "state"), PREFECT_HOME=str(tmp_path / "prefect"))
    r = llmops("train", "--config", str(ROOT / "configs/tiny.yaml"), "--set", f"data.path={bad}", env=env)
    assert r.returncode == 2
    assert "Traceback" not in r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {bad}:2: malformed JSON (Expecting value, column 10) — fix or remove that line"]


def test_training_flow_trains_evaluates_and_registers(prefect_harness, tiny_config):
    from flows.training import training_flow

    cfg = tiny_config
    cfg.evaluation.require_private = True
    out = training_flow(config=cfg)
    assert out["data"]["n_records"] == 200 and out["base_model"]["source"] == "tiny"
    assert out["finetune"]["privacy"]["private"] and 0 < out["finetune"]["privacy"]["epsilon"] < 10
    assert Path(out["finetune"]["model_path"], "privacy.json").is_file()
    assert out["eval"]["eval_tokens"] > 0 and len(out["eval"]["generations"]) == 2
    assert out["production_eval"] is None and out["gate"]["passed"]
    assert out["registered"]["version"] == "1" and out["registered"]["alias"] == "candidate"
    # the ledger records the trained model's digest; what the registry hands a promotion has exactly that digest
    from llmops.files import dir_digest
    from llmops.governance.ledger import open_ledger
    from llmops.services import connect_registry as _uri
    from tasks.registry import download_hf_model

    recorded = open_ledger().entry(out["finetune"]["attempt_id"]).model_digest
    assert recorded == dir_digest(Path(out["finetune"]["model_path"]))
    downloaded = download_hf_model(_uri(None, cfg.state_dir), cfg.registry.model_name, "1", cfg.state_dir / "dl")
    assert dir_digest(downloaded) == recorded
    # Pictures where people look, and only what may leave the machine: the logged curves are the few held-out
    # evaluation points and epsilon per step, never a per-step training loss.
    import json

    import mlflow

    from llmops.services import connect_registry
    from tasks.finetune import curve_steps

    client = mlflow.MlflowClient(connect_registry(None, cfg.state_dir))
    run_id, steps = out["registered"]["run_id"], out["finetune"]["privacy"]["steps"]
    curve = client.get_metric_history(run_id, "heldout.eval_loss")
    assert sorted(m.step for m in curve) == sorted(curve_steps(steps, cfg.evaluation.curve_points))
    assert [p["eval_loss"] for p in out["finetune"]["curve"]] == pytest.approx([m.value for m in curve])
    assert len(client.get_metric_history(run_id, "train.epsilon")) == steps
    logged = set(client.get_run(run_id).data.metrics)
    assert not {k for k in logged if "loss" in k and k != "heldout.eval_loss" and not k.startswith("eval.")}
    assert {"plots/training.png", "plots/series.json"} <= {a.path for a in client.list_artifacts(run_id, "plots")}
    series = json.loads(Path(out["figures"]["training.png"]).with_name("series.json").read_text())["training"]
    assert set(series) == {"heldout_loss", "epsilon"} and len(series["heldout_loss"]) == len(curve)
    card = client.get_model_version(cfg.registry.model_name, "1").description
    assert card.startswith("# Model card") and "plots/training.png" in card


def test_unchanged_rerun_reuses_cached_steps(prefect_harness, tiny_config):
    """Same data bytes + config + code: the second run trains nothing and charges no new epsilon."""
    import time

    from flows.training import training_flow
    from llmops.governance.ledger import open_ledger

    t0 = time.perf_counter()
    first = training_flow(config=tiny_config)
    t1 = time.perf_counter()
    second = training_flow(config=tiny_config)
    t2 = time.perf_counter()
    assert second["finetune"]["run_id"] == first["finetune"]["run_id"]
    assert second["eval"] == first["eval"]
    assert (t2 - t1) < 0.7 * (t1 - t0)
    # the same registration again is the same MLflow version (no second copy of the weights)
    assert second["registered"]["version"] == first["registered"]["version"] == "1"
    ledger = open_ledger()  # the deployment's (governance) ledger, not the state dir's
    assert len(ledger.entries(first["data"]["fingerprint"])) == 1
    # with a production model, its evaluation on this split is computed once, then cached on (version, split bytes)
    import mlflow

    from llmops.services import connect_registry
    from tasks import evaluation

    client = mlflow.MlflowClient(connect_registry(None, tiny_config.state_dir))
    client.set_registered_model_alias(tiny_config.registry.model_name, "production", "1")
    third = training_flow(config=tiny_config)
    assert third["production_eval"]["version"] == "1"

    def no_scoring(*a, **k):
        raise AssertionError("evaluated again although nothing changed")

    real, evaluation.evaluate_model = evaluation.evaluate_model, no_scoring
    try:
        fourth = training_flow(config=tiny_config)
    finally:
        evaluation.evaluate_model = real
    assert fourth["production_eval"] == third["production_eval"]
    assert fourth["registered"]["version"] == third["registered"]["version"]
    # editing one record's bytes changes the cache key: the data step recomputes and the fingerprint moves
    path = Path(tiny_config.data.path)
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace('"text": "', '"text": "EDITED ')
    path.write_text("\n".join(lines) + "\n")
    from prefect import flow

    from flows.steps import prepare_data_task

    @flow
    def only_data(cfg):
        return prepare_data_task(cfg)

    assert only_data(tiny_config)["fingerprint"] != first["data"]["fingerprint"]


def test_retraining_skips_when_production_has_the_same_data(prefect_harness, tiny_config):
    import mlflow

    from flows.retraining import retraining_flow
    from llmops.services import connect_registry

    first = retraining_flow(config=tiny_config, open_promotion=False)
    assert first["status"] == "trained"
    client = mlflow.MlflowClient(connect_registry(None, tiny_config.state_dir))
    client.set_registered_model_alias(tiny_config.registry.model_name, "production", first["registered"]["version"])
    again = retraining_flow(config=tiny_config, open_promotion=False)
    assert again["status"] == "skipped" and again["production"] == first["registered"]["version"]


def test_flow_with_compression_logs_table_and_edge_bundle(prefect_harness, tiny_config):
    import mlflow

    from flows.training import training_flow
    from llmops.services import connect_registry

    cfg = tiny_config
    cfg.compression = cfg.compression.model_validate(
        {
            "enabled": True,
            "quantize": "int8_weight_only",
            "export_onnx": True,
            "onnx_int8": False,
            "max_perplexity_increase": 0.5,
            "min_speedup": 0.01,
            "bench_rounds": 3,
            "max_eval_records": 8,
        }
    )
    out = training_flow(config=cfg)
    names = {v["name"] for v in out["compression"]["variants"]}
    assert {"int8-weight-only", "onnx"} <= names and out["compression"]["edge"]
    client = mlflow.MlflowClient(connect_registry(None, cfg.state_dir))
    run_id = out["registered"]["run_id"]
    edge = {a.path for a in client.list_artifacts(run_id, "edge")}
    assert any(p.endswith(".onnx") for p in edge)
    assert "reports/compression.md" in {a.path for a in client.list_artifacts(run_id, "reports")}


def test_cli_ledger_shows_worst_record_epsilon(tmp_path):
    import json
    import os

    from llmops.governance.accounting import epsilon_of, noise_for_target
    from llmops.governance.ledger import PrivacyLedger

    env = dict(os.environ, LLMOPS_HOME=str(tmp_path))
    r = llmops("ledger", env=env)
    assert r.returncode == 0 and "no privacy ledger yet" in r.stdout
    delta, q, steps = 1e-5, 0.05, 50
    run = [[noise_for_target(3.0, delta, q, steps), q, steps]]
    from llmops.governance.policy import load_governance

    ledger = PrivacyLedger(load_governance().ledger)  # LLMOPS_GOVERNANCE is inherited by the CLI process
    ledger.reserve("a", "f" * 64, run, delta, "prv", 10.0, records=["x", "y"])
    ledger.reserve("b", "e" * 64, run, delta, "prv", 10.0, records=["y", "z", "w"])  # shares record y
    r = llmops("ledger", "--json", env=env)
    assert r.returncode == 0, r.stderr
    rows = {x["fingerprint"][:1]: x for x in json.loads(r.stdout)}
    twice = epsilon_of(run * 2, delta, "prv")
    assert rows["f"]["epsilon"] == rows["e"]["epsilon"] == pytest.approx(twice)  # record y paid for both runs
    assert rows["f"]["records"] == 2 and rows["e"]["records"] == 3 and rows["e"]["runs"] == 1
    text = llmops("ledger", env=env).stdout
    assert "2 dataset(s)" in text and f"{twice:.3f}" in text
