"""DP fine-tuning through a real DeepSpeed engine (CPU, gloo), tiny model. See tasks/privacy.py for the design."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmops.errors import LLMOpsError
from tasks.data import prepare_data
from tasks.finetune import FinetuneSpec, deepspeed_config, global_batch, launch, plan_finetune, train
from tasks.model import resolve_model
from tests.conftest import ROOT

DS = ROOT / "infra" / "deepspeed"


@pytest.fixture
def base(tmp_path, tiny_jsonl):
    data = prepare_data(tiny_jsonl, tmp_path / "state", 0.1)
    model = resolve_model(
        "tiny", tmp_path / "state", tiny=dict(arch="llama", layers=2, hidden=64, heads=4, seed=0), max_len=32
    )
    spec = FinetuneSpec(
        run_id="r",
        model_path=model.path,
        train_path=data.train_path,
        output_dir="",
        fingerprint=data.fingerprint,
        n_train=data.n_train,
        max_len=32,
        batch_size=8,
        micro_batch_size=4,
        learning_rate=1e-2,
        steps=3,
        seed=7,
        deepspeed_config=str(DS / "zero0.json"),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=8 / data.n_train,
        noise_seed=11,
        delta=1e-4,
        reproducible_insecure=True,
    )  # the invariants compare runs on the same batches
    return spec, tmp_path


def run(spec, tmp_path, name, **kw):
    s = replace(spec, output_dir=str(tmp_path / name), **kw)
    Path(s.output_dir).mkdir(parents=True, exist_ok=True)
    return train(s)


def weights(result, adapter=False):
    path = (
        Path(result["model_path"]).parent / "adapter" / "adapter_model.safetensors"
        if adapter
        else Path(result["model_path"]) / "model.safetensors"
    )
    return load_file(path)


def assert_same(a, b, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


def plain_reference(spec):
    """The same steps with plain PyTorch (no DeepSpeed, no DP): mean loss over the sampled batch, AdamW."""
    from tasks.data import read_texts
    from tasks.finetune import prepare_trainable
    from tasks.lm import encode, per_sample_loss
    from tasks.model import load_model

    torch.manual_seed(spec.seed)
    model, tok = load_model(spec.model_path)
    model = prepare_trainable(model, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    data = encode(tok, read_texts(Path(spec.train_path)), spec.max_len)
    for step in range(spec.steps):
        idx = global_batch(step, spec, spec.seed)
        loss = per_sample_loss(model, data["input_ids"][idx], data["attention_mask"][idx]).sum() / spec.batch_size
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def test_no_noise_infinite_clip_equals_non_private_and_plain_pytorch(base):
    spec, tmp = base
    dp = run(spec, tmp, "dp", noise_multiplier=0.0, max_grad_norm=math.inf)
    plain = run(spec, tmp, "plain", private=False)
    # Float re-association (micro-batches, weighted sums) moves results by ~1e-6; training moves them by ~1e-2.
    assert_same(weights(dp), weights(plain), rtol=1e-4, atol=2e-5)
    ref = plain_reference(spec)
    got = weights(plain)
    for k in got:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=2e-5)
    base_w = load_file(Path(spec.model_path) / "model.safetensors")
    assert max(float((got[k] - base_w[k]).abs().max()) for k in base_w) > 1e-3  # training really moved them


def test_dp_run_writes_model_privacy_json_and_metrics(base):
    spec, tmp = base
    out = run(spec, tmp, "dp", reproducible_insecure=False, noise_seed=None)
    priv = json.loads((Path(out["model_path"]) / "privacy.json").read_text())
    for key in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps", "accountant"):
        assert key in priv
    assert priv["steps"] == 3 and priv["history"] == [[1.0, spec.sample_rate, 3]] and 0 < priv["epsilon"] < 50
    assert priv["private"] and priv["not_private_because"] == [] and priv["sampling_rng"] == "os.urandom"
    assert [m["step"] for m in out["metrics"]] == [1, 2, 3]
    assert all(set(m) == {"step", "epsilon"} and m["epsilon"] > 0 for m in out["metrics"])  # no loss, no batch size
    assert json.loads((Path(out["model_path"]).parent / "metrics.json").read_text()) == out["metrics"]
    assert len(out["step_seconds"]) == 3  # in memory only (benchmarks), never written
    assert out["metrics"][0]["epsilon"] < out["metrics"][-1]["epsilon"]
    assert (Path(out["model_path"]).parent / "adapter" / "adapter_model.safetensors").is_file()
    assert not (Path(out["model_path"]).parent / "checkpoints").exists()


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_give_the_zero0_result(base, stage):
    spec, tmp = base
    ref = run(spec, tmp, "z0")
    got = run(spec, tmp, f"z{stage}", deepspeed_config=str(DS / f"zero{stage}.json"))
    assert_same(weights(got), weights(ref), rtol=1e-4, atol=2e-5)


def test_noise_std_is_sigma_c_over_b(base):
    """One SGD step (lr=1) with and without seeded noise on the same batch: the difference is exactly z / B."""
    spec, tmp = base
    kw = dict(steps=1, optimizer="sgd", learning_rate=1.0, noise_multiplier=2.0, max_grad_norm=0.5)
    noisy = weights(run(spec, tmp, "noisy", **kw), adapter=True)
    clean = weights(run(spec, tmp, "clean", **{**kw, "noise_multiplier": 0.0}), adapter=True)
    diff = torch.cat([(noisy[k] - clean[k]).flatten() for k in noisy])
    expected = 2.0 * 0.5 / spec.batch_size
    assert diff.numel() > 3000
    assert abs(float(diff.std()) / expected - 1) < 0.05
    assert abs(float(diff.mean())) < 4 * expected / math.sqrt(diff.numel())


def test_two_ranks_equal_one_rank(base):
    spec, tmp = base
    one = run(spec, tmp, "one")
    two_spec = replace(spec, output_dir=str(tmp / "two"), world_size=2)
    Path(two_spec.output_dir).mkdir()
    two_spec.save(Path(two_spec.output_dir) / "spec.json")
    two = launch(two_spec, timeout_s=300)
    assert_same(weights(two), weights(one), rtol=1e-4, atol=2e-5)
    assert two["privacy"]["history"] == one["privacy"]["history"]  # accountant on the *global* sample rate


@pytest.mark.parametrize("path", sorted(DS.glob("*.json")), ids=lambda p: p.name)
def test_every_shipped_deepspeed_config_loads(path):
    raw = json.loads(path.read_text())
    assert raw.get("gradient_clipping", 0) == 0 and all(
        raw[k] == "auto" for k in ("train_batch_size", "train_micro_batch_size_per_gpu")
    )
    if raw["zero_optimization"]["stage"] > 2:
        with pytest.raises(LLMOpsError, match="not supported with DP"):
            deepspeed_config(path, 4, 2, 1, "float32", private=True)
    else:
        assert deepspeed_config(path, 4, 2, 1, "float32", private=True)["train_batch_size"] == 8


def test_zero2_cpu_offload_gives_the_zero0_result(base):
    spec, tmp = base
    ref = run(spec, tmp, "z0")
    got = run(spec, tmp, "offload", deepspeed_config=str(DS / "zero2_offload.json"))
    assert_same(weights(got), weights(ref), rtol=1e-4, atol=2e-5)


def test_deepspeed_config_rules(tmp_path):
    cfg = deepspeed_config(DS / "zero2.json", micro=4, gas=3, world=2, dtype="float32", private=True)
    assert cfg["train_batch_size"] == 24 and cfg["managed_gradient_accumulation"] is False
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gradient_clipping": 1.0}))
    with pytest.raises(LLMOpsError, match="gradient_clipping would clip the noisy aggregate"):
        deepspeed_config(bad, 4, 1, 1, "float32", private=True)
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    with pytest.raises(LLMOpsError, match="conflicts with the run config"):
        deepspeed_config(bad, 4, 1, 1, "float32", private=True)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(LLMOpsError, match="ZeRO stage 3"):
        deepspeed_config(bad, 4, 1, 1, "float32", private=True)


def test_poisson_sampling_is_global_and_seeded(base):
    spec, _ = base
    sizes = [len(global_batch(s, spec, 1)) for s in range(400)]
    assert abs(sum(sizes) / len(sizes) - spec.batch_size) < 0.5  # E[batch] = q * n
    assert len(set(sizes)) > 3  # the batch size really varies (Poisson)
    assert torch.equal(global_batch(5, spec, 1), global_batch(5, spec, 1))


def test_killed_run_resumes_without_double_charging(tiny_config, tmp_path):
    """SIGKILL the training process after a checkpoint; the re-run resumes and ends exactly where an
    uninterrupted run ends, and the ledger holds one entry charged once."""
    from llmops.governance.ledger import open_ledger
    from tasks.finetune import finish_ledger

    cfg = tiny_config.model_copy(
        update={"training": tiny_config.training.model_copy(update={"max_steps": 40, "checkpoint_every": 2})}
    )
    cfg.privacy.reproducible_insecure = True  # seeded, so the resumed run can be compared with a straight one
    cfg.privacy.noise_seed = 3
    data = asdict(prepare_data(cfg.data.path, cfg.state_dir, cfg.data.eval_fraction))
    model = asdict(resolve_model("tiny", cfg.state_dir, tiny=cfg.model.tiny.model_dump(), max_len=64))
    spec, planned = plan_finetune(cfg, data, model)
    from tasks.finetune import rank_env

    env = rank_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.finetune", str(Path(spec.output_dir) / "spec.json")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "killed.log", "w"),
    )
    ledger = open_ledger()
    deadline = time.time() + 120  # the checkpoint that counts is the one the ledger recorded (digest and step)
    while ledger.last_checkpoint(spec.attempt_id) is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL) if proc.poll() is None else None
    proc.wait()
    recorded = ledger.last_checkpoint(spec.attempt_id)
    assert recorded, f"no checkpoint before the kill: {(tmp_path / 'killed.log').read_text()[-2000:]}"
    killed_at = recorded[0]
    assert 0 < killed_at < 40
    assert not (Path(spec.output_dir) / "model").exists()

    spec_again, planned_again = plan_finetune(cfg, data, model)  # the re-run finds the same run id
    assert spec_again.run_id == spec.run_id and planned_again == pytest.approx(planned)
    resumed = launch(spec_again, timeout_s=300)
    assert len(resumed["metrics"]) == 40 and resumed["privacy"]["history"][0][2] == 40
    spent = finish_ledger(cfg, spec_again, resumed["privacy"])
    ledger = open_ledger()
    assert len(ledger.entries(spec.fingerprint)) == 1 and ledger.entries(spec.fingerprint)[0].run_id == spec.attempt_id
    assert spent == pytest.approx(resumed["privacy"]["epsilon"])

    straight = train(replace(spec, output_dir=str(tmp_path / "straight"), attempt_id=""))  # a bare spec
    assert_same(weights(resumed), weights(straight), rtol=1e-4, atol=2e-5)
    # the held-out loss curve survives the kill: its points up to the checkpoint come back with it
    from tasks.finetune import curve_steps

    assert [p["step"] for p in resumed["curve"]] == sorted(curve_steps(40, cfg.evaluation.curve_points))
    assert [p["eval_loss"] for p in resumed["curve"]] == pytest.approx(
        [p["eval_loss"] for p in straight["curve"]], rel=1e-4
    )


def test_plan_refuses_over_budget_before_training(tiny_config):
    cfg = tiny_config
    cfg.privacy.noise_multiplier = 0.3  # far too little noise for the budget
    cfg.training.max_steps = 200
    data = asdict(prepare_data(cfg.data.path, cfg.state_dir, cfg.data.eval_fraction))
    model = asdict(resolve_model("tiny", cfg.state_dir, tiny=cfg.model.tiny.model_dump(), max_len=64))
    from llmops.errors import PrivacyError

    with pytest.raises(PrivacyError, match="budget"):
        plan_finetune(cfg, data, model)
    assert not (Path(cfg.state_dir) / "runs").exists()


def test_retraining_on_grown_data_is_charged_for_the_shared_records(tiny_config, tiny_jsonl, tmp_path):
    """The scheduled-retraining case: day 2's file = day 1's records + new ones (a new fingerprint). Day 1's
    epsilon carries over to the shared records, so a run that fits the budget alone is refused on day 2."""
    from llmops.errors import PrivacyError
    from llmops.governance.ledger import open_ledger

    cfg = tiny_config.model_copy(
        update={
            "privacy": tiny_config.privacy.model_copy(
                update={"noise_multiplier": None, "target_epsilon": 6.0, "dataset_budget_epsilon": 6.5}
            )
        }
    )  # two runs: 6.84 at delta 1e-5
    model = asdict(resolve_model("tiny", cfg.state_dir, tiny=cfg.model.tiny.model_dump(), max_len=64))
    day1 = asdict(prepare_data(tiny_jsonl, cfg.state_dir, cfg.data.eval_fraction))
    spec1, eps1 = plan_finetune(cfg, day1, model)
    assert 5.5 < eps1 <= 6.0
    lines = tiny_jsonl.read_text().splitlines()
    grown = tmp_path / "day2.jsonl"
    grown.write_text(
        "\n".join(
            lines + [json.dumps({"id": f"new{i}", "text": f"A new line of verse, number {i}."}) for i in range(20)]
        )
        + "\n"
    )
    day2 = asdict(prepare_data(grown, cfg.state_dir, cfg.data.eval_fraction))
    assert day2["fingerprint"] != day1["fingerprint"]
    with pytest.raises(PrivacyError, match="records shared with earlier runs"):
        plan_finetune(cfg, day2, model)
    fresh = tmp_path / "other.jsonl"  # data with no record in common: its own budget
    fresh.write_text(
        "".join(
            json.dumps({"id": f"o{i}", "text": f"Unrelated record {i} about the weather."}) + "\n"
            for i in range(len(lines))
        )
    )
    other = asdict(prepare_data(fresh, cfg.state_dir, cfg.data.eval_fraction))
    spec3, eps3 = plan_finetune(cfg, other, model)
    assert eps3 == pytest.approx(eps1, rel=0.05)
    ledger = open_ledger()
    assert len(ledger.records(day1["fingerprint"])) == day1["n_train"]


def test_redacted_records_are_charged_to_their_source_records(tmp_path):
    from llmops.text.identity import text_hash
    from tasks.finetune import training_record_hashes

    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(
            json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(["Call me at [PHONE]", "plain line"])
        )
    )
    src = {
        text_hash("Call me at [PHONE]"): [text_hash("Call me at 555 123 4567"), text_hash("Call me at 555 765 4321")]
    }
    (tmp_path / "map.json").write_text(json.dumps(src))
    got = training_record_hashes({"train_path": str(train), "source_map": str(tmp_path / "map.json")})
    # the sources, and the trained (redacted) text itself: the map is a cache in the state dir, so it may add
    # identities but never hide the text that was trained
    assert got == sorted(
        [
            text_hash("Call me at 555 123 4567"),
            text_hash("Call me at 555 765 4321"),
            text_hash("Call me at [PHONE]"),
            text_hash("plain line"),
        ]
    )
    assert training_record_hashes({"train_path": str(train)}) == sorted(
        [text_hash("Call me at [PHONE]"), text_hash("plain line")]
    )


def test_only_an_intact_checkpoint_of_a_reserved_attempt_is_continued(tiny_config):
    """Re-planning continues the ledger's attempt only when its checkpoint is there (resume) or its finished model
    is (reuse, nothing trained); a run dir without either is a new attempt, charged in full."""
    from llmops.governance.ledger import open_ledger

    cfg = tiny_config
    data = asdict(prepare_data(cfg.data.path, cfg.state_dir, cfg.data.eval_fraction))
    model = asdict(resolve_model("tiny", cfg.state_dir, tiny=cfg.model.tiny.model_dump(), max_len=64))
    from llmops.files import dir_digest

    first, eps1 = plan_finetune(cfg, data, model)
    ckpt = Path(first.output_dir) / "checkpoints"
    (ckpt / "step2").mkdir(parents=True)
    (ckpt / "step2" / "state.pt").write_bytes(b"the rank's state")
    (ckpt / "latest").write_text("step2")
    open_ledger().checkpoint(first.attempt_id, 2, dir_digest(ckpt / "step2"))  # what the rank records
    again, eps_again = plan_finetune(cfg, data, model)
    assert again.attempt_id == first.attempt_id and eps_again == pytest.approx(eps1)  # a resume: no new charge
    shutil.rmtree(ckpt / "step2")  # the checkpoint the ledger recorded is gone: not intact
    third, eps3 = plan_finetune(cfg, data, model)
    assert third.attempt_id != first.attempt_id and eps3 > eps1 + 0.1
    assert not ckpt.exists()  # the other attempt's state is never resumed by this one
    assert {e.run_id for e in open_ledger().entries(first.fingerprint)} == {first.attempt_id, third.attempt_id}
