"""One test per way an informed adversary could make the reported epsilon false (issue 12).

The adversary reads the model card, MLflow params and the Prefect API (so knows training.seed), controls a run's
config (`--set`, the UI form), can re-run, delete run directories, point LLMOPS_HOME elsewhere, edit records, start
runs concurrently, and names the "public" data used after training. Each test below failed on 9b982bf.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmops.errors import PrivacyError
from llmops.governance.accounting import epsilon_of, noise_for_target
from llmops.governance.ledger import PrivacyLedger
from llmops.text.identity import text_hash
from tasks.data import prepare_data
from tasks.finetune import FinetuneSpec, plan_finetune, rank_env, train
from tasks.model import resolve_model
from tests.conftest import ROOT

HELPER = Path(__file__).with_name("_rank_probe.py")


@pytest.fixture
def tiny_spec(tmp_path, tiny_jsonl):
    data = prepare_data(tiny_jsonl, tmp_path / "state", 0.1)
    model = resolve_model(
        "tiny", tmp_path / "state", tiny=dict(arch="llama", layers=2, hidden=64, heads=4, seed=0), max_len=32
    )
    return FinetuneSpec(
        run_id="r",
        model_path=model.path,
        train_path=data.train_path,
        output_dir="",
        fingerprint=data.fingerprint,
        n_train=data.n_train,
        max_len=32,
        batch_size=16,
        micro_batch_size=8,
        learning_rate=1e-2,
        steps=3,
        seed=7,
        deepspeed_config=str(ROOT / "infra/deepspeed/zero0.json"),
        noise_multiplier=0.0,
        max_grad_norm=math.inf,
        sample_rate=16 / data.n_train,
        delta=1e-4,
    ), tmp_path


def _plan_inputs(cfg):
    data = asdict(prepare_data(cfg.data.path, cfg.state_dir, cfg.data.eval_fraction))
    model = asdict(resolve_model("tiny", cfg.state_dir, tiny=cfg.model.tiny.model_dump(), max_len=64))
    return data, model


# ------------------------------------------------------------------------------------------- predictable batches


def test_two_runs_of_the_same_config_draw_different_batches(tiny_spec):
    """training.seed is published; it must not determine the batches. Without noise and clipping the only
    randomness left is the sample, so equal weights would mean equal batches."""
    spec, tmp = tiny_spec
    outs = []
    for name in ("a", "b"):
        s = replace(spec, output_dir=str(tmp / name))
        Path(s.output_dir).mkdir()
        outs.append(load_file(Path(train(s)["model_path"]) / "model.safetensors"))
    assert any(not torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_a_two_rank_step_never_trains_a_record_twice(tiny_spec):
    """Each rank records the token rows it trains on; within a step no record may appear on both ranks (which
    happens when every rank draws its own sample and takes idx[rank::world])."""
    spec, tmp = tiny_spec
    spec = replace(
        spec,
        output_dir=str(tmp / "two"),
        world_size=2,
        batch_size=96,
        micro_batch_size=24,
        sample_rate=96 / spec.n_train,
        steps=3,
        secure_mode=True,
    )  # secure: the mode that drew per rank
    Path(spec.output_dir).mkdir()
    spec.save(Path(spec.output_dir) / "spec.json")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_port()}",
            str(HELPER),
            str(Path(spec.output_dir) / "spec.json"),
            str(tmp / "probe"),
        ],
        env=rank_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    per_rank = [json.loads((tmp / "probe" / f"rank{k}.json").read_text()) for k in range(2)]
    for step in range(spec.steps):
        rows = [[tuple(x) for x in per_rank[k][str(step)]] for k in range(2)]
        assert rows[0] and rows[1]
        assert not set(rows[0]) & set(rows[1]), f"step {step}: a record trained on both ranks"
        assert len(set(rows[0] + rows[1])) == len(rows[0]) + len(rows[1])


def _port() -> int:
    from tasks.finetune import free_port

    return free_port()


# ------------------------------------------------------------------------------------------------ ledger bypasses


@pytest.mark.parametrize("n,fit", [(4, 1), (5, 2)])
def test_concurrent_reserves_under_a_budget_only_the_ones_that_fit_pass(tmp_path, n, fit):
    delta, q, steps = 1e-5, 0.02, 200
    run = [[noise_for_target(3.0, delta, q, steps), q, steps]]
    budget = (epsilon_of(run * fit, delta, "prv") + epsilon_of(run * (fit + 1), delta, "prv")) / 2
    path = tmp_path / "ledger.sqlite"
    PrivacyLedger(path)
    barrier, passed, refused = threading.Barrier(n), [], []

    def go(i):
        ledger = PrivacyLedger(path)
        barrier.wait()
        try:
            ledger.reserve(f"attempt{i}", "fp", run, delta, "prv", budget, records=["a", "b", "c"])
            passed.append(i)
        except PrivacyError:
            refused.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(passed) == fit and len(refused) == n - fit
    assert PrivacyLedger(path).spent("fp", delta) <= budget


def test_deleted_run_dir_and_rerun_is_charged_again(tiny_config):
    import shutil

    cfg = tiny_config
    data, model = _plan_inputs(cfg)
    spec1, eps1 = plan_finetune(cfg, data, model)
    shutil.rmtree(spec1.output_dir)  # the attacker deletes the run and trains the same config again
    spec2, eps2 = plan_finetune(cfg, data, model)
    assert spec2.run_id == spec1.run_id
    assert eps2 == pytest.approx(
        epsilon_of([[spec1.noise_multiplier, spec1.sample_rate, spec1.steps]] * 2, spec1.delta, "prv"), rel=1e-6
    )
    assert eps2 > eps1 + 0.1


def test_another_state_dir_does_not_start_an_empty_ledger(tiny_config, tmp_path):
    cfg = tiny_config
    data, model = _plan_inputs(cfg)
    _, eps1 = plan_finetune(cfg, data, model)
    elsewhere = cfg.model_copy(update={"state_dir": tmp_path / "elsewhere"})  # LLMOPS_HOME=/tmp/x llmops train
    _, eps2 = plan_finetune(elsewhere, data, model)
    assert eps2 > eps1 + 0.1  # the same records, charged in the same (governance) ledger


def test_run_config_cannot_raise_the_budget(tiny_config):
    cfg = tiny_config
    cfg.privacy.noise_multiplier = 0.3  # far too little noise for governance's default budget (10)
    cfg.training.max_steps = 200
    cfg.privacy.dataset_budget_epsilon = 1e6  # a requester's attempt to loosen it
    data, model = _plan_inputs(cfg)
    with pytest.raises(PrivacyError, match="budget 10.00"):
        plan_finetune(cfg, data, model)


# ------------------------------------------------------------------------------------------------ record identity


@pytest.mark.parametrize("edit", ["\u200b", "\ufeff", "\u2060", "\u00ad", "\x08", " ", "\n"])
def test_invisible_edits_do_not_make_a_new_record(edit):
    text = "Shall I compare thee to a summer's day?"
    assert text_hash(text + edit) == text_hash(text)
    assert text_hash(text.replace(" ", edit + " ", 1)) == text_hash(text)
    assert text_hash("Ｓhall I compare thee to a summer's day?") == text_hash(text)  # NFKC: fullwidth S
    assert text_hash(text.replace(" ", "  \t")) == text_hash(text)
    assert text_hash(text.replace("S", "s")) != text_hash(text)  # a visible edit is a different record


def test_zero_width_edit_of_every_record_is_still_charged(tiny_config, tiny_jsonl, tmp_path):
    cfg = tiny_config.model_copy(
        update={
            "privacy": tiny_config.privacy.model_copy(
                update={"noise_multiplier": None, "target_epsilon": 6.0, "dataset_budget_epsilon": 6.5}
            )
        }
    )  # two runs: 6.84 at delta 1e-5
    data, model = _plan_inputs(cfg)
    plan_finetune(cfg, data, model)
    rows = [json.loads(x) for x in tiny_jsonl.read_text().splitlines()]
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r | {"text": r["text"] + "\u200b"}) + "\n" for r in rows))
    day2 = asdict(prepare_data(edited, cfg.state_dir, cfg.data.eval_fraction))
    with pytest.raises(PrivacyError, match="records shared with earlier runs"):
        plan_finetune(cfg, day2, model)


def test_duplicate_rows_are_removed_before_training_and_reported(tmp_path, tiny_jsonl):
    rows = [json.loads(x) for x in tiny_jsonl.read_text().splitlines()]
    doubled = tmp_path / "doubled.jsonl"
    doubled.write_text("".join(json.dumps(r) + "\n" for r in rows + rows[:50]))
    once = prepare_data(tiny_jsonl, tmp_path / "a", 0.1)
    ref = prepare_data(doubled, tmp_path / "b", 0.1)
    texts = [json.loads(x)["text"] for x in Path(ref.train_path).read_text().splitlines()]
    assert len({text_hash(t) for t in texts}) == len(texts) == ref.n_train == once.n_train
    # every copy is dropped before the split (train and held out alike), on top of what near-dedupe drops anyway
    assert ref.n_duplicates_removed == once.n_duplicates_removed + 50


# ----------------------------------------------------------------------------------- non-private passing as private


def _registration(cfg, privacy: dict):
    from tasks.evaluation import GatePolicy, decision_dict, should_promote
    from tasks.registry import registration_inputs

    evaluation = {"eval_loss": 2.0, "perplexity": 7.4}
    decision = decision_dict(should_promote(evaluation, None, GatePolicy(require_private=True), privacy))
    data = {"fingerprint": "f" * 64, "n_records": 10, "n_train": 9, "n_eval": 1, "source": "x"}
    tuned = {
        "privacy": privacy,
        "cumulative_epsilon": privacy["epsilon"],
        "model_path": "/nonexistent",
        "run_id": "r",
        "metrics": [{"step": 1, "epsilon": 1.0}],
    }
    out = registration_inputs(
        cfg,
        data=data,
        base_model={"digest": "d" * 64},
        tuned=tuned,
        evaluation=evaluation,
        decision=decision,
        validation=None,
        flow_run_id=None,
        flow_run_url=None,
    )
    return decision, out


OLD_STYLE = {
    "private": True,
    "epsilon": 3.0,
    "delta": 1e-5,
    "noise_multiplier": 1.0,
    "max_grad_norm": 1.0,
    "sample_rate": 0.01,
    "steps": 10,
    "accountant": "prv",
    "sampling": "poisson",
    "history": [],
}


@pytest.mark.parametrize(
    "change,why",
    [
        ({"noise_multiplier": 0.0, "epsilon": math.inf}, "noise_multiplier is 0"),
        ({"epsilon": math.inf}, "epsilon is infinite"),
        ({"sampling": "shuffle"}, "not the Poisson sampling"),
        ({"reproducible_insecure": True}, "reproducible_insecure"),
    ],
)
def test_no_guarantee_is_never_tagged_private_gated_or_promotable(tiny_config, change, why):
    from llmops.governance.evidence import check_evidence

    decision, reg = _registration(tiny_config, OLD_STYLE | change)
    tags = reg["version_tags"]
    assert tags["llmops.dp.private"] == "False" and tags["llmops.dp.epsilon"] == "inf"
    assert not decision["passed"] and why in decision["summary"]
    assert check_evidence(tags | {"llmops.gate": "passed"})  # refused at promotion even with a forged gate tag
    assert "NOT PRIVATE" in reg["texts"]["model_card.md"]


def test_reproducible_insecure_is_refused_even_when_non_private_models_are_allowed(tiny_config):
    from llmops.governance.evidence import check_evidence
    from tasks.evaluation import GatePolicy, should_promote

    priv = OLD_STYLE | {"reproducible_insecure": True}
    assert not should_promote({"eval_loss": 1.0}, None, GatePolicy(require_private=False), priv).passed
    _, reg = _registration(tiny_config, priv)
    assert reg["version_tags"]["llmops.dp.reproducible_insecure"] == "True"
    assert reg["params"]["dp.reproducible_insecure"] == "True"
    forged = reg["version_tags"] | {
        "llmops.dp.private": "True",
        "llmops.dp.epsilon": "3",
        "llmops.gate": "passed",
        "llmops.dp.epsilon_cumulative": "3",
    }
    assert any("reproducible_insecure" in p for p in check_evidence(forged))


def test_zero_noise_under_an_infinite_budget_is_refused_before_training(tiny_config):
    cfg = tiny_config
    cfg.privacy.noise_multiplier = 0.0
    cfg.privacy.dataset_budget_epsilon = math.inf
    data, model = _plan_inputs(cfg)
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        plan_finetune(cfg, data, model)


def test_noise_seed_needs_reproducible_insecure_and_is_recorded(tiny_spec):
    from llmops.config import load_config
    from llmops.errors import ConfigError

    with pytest.raises(ConfigError, match="reproducible_insecure"):
        load_config(ROOT / "configs/tiny.yaml", {"privacy.noise_seed": 3})
    spec, tmp = tiny_spec
    s = replace(
        spec,
        output_dir=str(tmp / "rep"),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        noise_seed=5,
        reproducible_insecure=True,
    )
    Path(s.output_dir).mkdir()
    priv = json.loads((Path(train(s)["model_path"]) / "privacy.json").read_text())
    assert priv["reproducible_insecure"] and priv["noise_seed"] == 5 and priv["sampling_rng"] == "seeded"
    assert not priv["private"] and any("reproducible_insecure" in p for p in priv["not_private_because"])


# ------------------------------------------------------------------------------------ released outside the mechanism


def test_training_loss_and_batch_size_are_not_released(tiny_config):
    _, reg = _registration(tiny_config, OLD_STYLE)
    assert "held-out private records: NOT covered by ε" in reg["texts"]["model_card.md"]
    rows = [{"step": 1, "loss": 3.1, "batch": 17, "tokens_per_s": 9.0, "epsilon": 0.5}]
    from tasks.registry import _log_run

    class Client:
        logged: list = []

        def log_batch(self, run_id, params=(), metrics=()):
            self.logged += [m.key for m in metrics]

    c = Client()
    _log_run(c, "run", {}, {}, rows, {}, {})
    assert c.logged == ["train.epsilon"]


def test_distillation_on_the_train_split_plus_one_record_is_refused(tiny_config, tmp_path):
    from tasks import compression

    cfg = tiny_config
    data, model = _plan_inputs(cfg)
    plan_finetune(cfg, data, model)  # the ledger now holds the training records
    train_texts = [json.loads(x)["text"] for x in Path(data["train_path"]).read_text().splitlines()]
    sneaky = tmp_path / "public.jsonl"
    sneaky.write_text("".join(json.dumps({"text": t + " "}) + "\n" for t in train_texts + ["One new public line."]))
    with pytest.raises(PrivacyError, match="private training set or the privacy ledger"):
        compression.check_public(sneaky, None)  # the ledger alone catches it
    with pytest.raises(PrivacyError):
        compression.check_public(data["train_path"], [data["train_path"], data["eval_path"]])
    one_eval = tmp_path / "one-eval.jsonl"  # a held-out record is private too
    one_eval.write_text(Path(data["eval_path"]).read_text().splitlines()[0] + "\n")
    with pytest.raises(PrivacyError):
        compression.check_public(one_eval, [data["train_path"], data["eval_path"]])


def test_public_eval_data_with_a_private_record_is_refused(tiny_config, tmp_path):
    from tasks.evaluation import public_eval_split

    cfg = tiny_config
    data, model = _plan_inputs(cfg)
    public = ROOT / "data" / "public" / "macbeth.txt"
    assert Path(public_eval_split(public, tmp_path, [data["train_path"], data["eval_path"]])).is_file()
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(
        public.read_text(encoding="utf-8")
        + "\n\n"
        + json.loads(Path(data["eval_path"]).read_text().splitlines()[0])["text"]
        + "\n"
    )
    with pytest.raises(PrivacyError, match="public evaluation data"):
        public_eval_split(mixed, tmp_path, [data["train_path"], data["eval_path"]])


# -------------------------------------------------------------------------------------------------- shared weights


def test_trainable_weight_shared_between_two_linears_is_refused():
    from tasks.privacy import PerSampleClipper, dp_linear_modules

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(PrivacyError, match="shared with another layer"):
        dp_linear_modules(Tied())
    with pytest.raises(PrivacyError, match="shared"):
        PerSampleClipper(Tied(), 1.0)


def _pg_reserve(args):
    url, attempt, fp, run, delta, budget = args
    from llmops.errors import PrivacyError
    from llmops.governance.ledger import open_ledger

    ledger = open_ledger(url)
    try:
        ledger.reserve(attempt, fp, run, delta, "prv", budget, records=[f"{fp}-{r}" for r in "abc"])
        ledger.finish(attempt, run)
        return True
    except PrivacyError:
        return False
