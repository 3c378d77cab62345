"""Proof obligations for DP-SGD inside DeepSpeed (see tasks/privacy.py). Tiny models, CPU, fixed seeds."""

import math

import pytest
import torch

from llmops.errors import PrivacyError
from llmops.governance.accounting import epsilon_of, noise_for_target
from llmops.governance.ledger import PrivacyLedger
from tasks.finetune import FinetuneSpec, prepare_trainable
from tasks.lm import encode, per_sample_loss
from tasks.model import load_model, resolve_model
from tasks.privacy import PerSampleClipper, dp_linear_modules, make_noise_generator

TEXTS = [
    "To be, or not to be, that is the question",
    "Shall I compare thee to a summer's day?",
    "O Romeo, Romeo, wherefore art thou Romeo?",
    "Now is the winter of our discontent",
    "All the world's a stage",
    "Friends, Romans, countrymen, lend me your ears",
]


@pytest.fixture
def lora_model(state_dir):
    ref = resolve_model("tiny", state_dir, tiny=dict(arch="llama", layers=2, hidden=64, heads=4, seed=0), max_len=32)
    torch.manual_seed(0)
    model, tok = load_model(ref.path)
    spec = FinetuneSpec(
        run_id="t",
        model_path=ref.path,
        train_path="",
        output_dir="",
        fingerprint="",
        n_train=1,
        lora_r=4,
        lora_target_modules=["q_proj", "v_proj", "up_proj"],
    )
    model = prepare_trainable(model, spec)
    for p in model.parameters():  # LoRA B starts at zero; make every adapter weight matter for the test
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model, tok


def opacus_norms(model, batch):
    """Reference per-sample gradient norms from Opacus' own GradSampleModule (hooks mode)."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    per_sample_loss(gsm, **batch).sum().backward()
    sq = sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in model.parameters() if p.requires_grad)
    gsm._close()
    model.zero_grad(set_to_none=True)
    return sq.sqrt()


@pytest.mark.parametrize("ghost", ["never", "always", "auto"])
def test_per_sample_norms_equal_opacus(lora_model, ghost):
    model, tok = lora_model
    batch = encode(tok, TEXTS, 32)
    expected = opacus_norms(model, batch)
    with PerSampleClipper(model, max_grad_norm=1.0, ghost=ghost) as clip:
        with clip.record():
            losses = per_sample_loss(model, **batch)
        norms = clip.per_sample_norms(losses)
    assert all(p.grad is None for p in model.parameters())  # the norm pass never touches .grad
    torch.testing.assert_close(norms, expected, rtol=1e-4, atol=1e-6)
    assert norms.std() > 0  # samples really differ


def test_clipped_backward_equals_sum_of_clipped_per_sample_grads(lora_model):
    model, tok = lora_model
    batch = encode(tok, TEXTS, 32)
    params = [p for p in model.parameters() if p.requires_grad]
    C = float(opacus_norms(model, batch).sort().values[2:4].mean())  # half the samples clipped
    weights = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])  # a zero weight drops a sample (padding chunk)
    with PerSampleClipper(model, max_grad_norm=C) as clip:
        with clip.record():
            losses = per_sample_loss(model, **batch)
        grads, norms = clip.clipped_sum(losses, weights)
    factors = clip.clip_factors(norms)
    assert (factors < 1).any() and (factors == 1).any()
    assert all(p.grad is None for p in params)
    by_param = {id(p): g for p, g in grads}
    got = [by_param[id(p)] for p in params]
    expected = [torch.zeros_like(p) for p in params]
    for i in [0, 1, 3, 4, 5]:  # brute force: one sample at a time
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1]).sum().backward()
        norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
        assert float(norm) * min(1.0, C / float(norm)) <= C * (1 + 1e-5)
        for e, p in zip(expected, params):
            e += p.grad * min(1.0, C / (float(norm) + 1e-6))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_infinite_clip_bound_clips_nothing(lora_model):
    model, _ = lora_model
    clip = PerSampleClipper(model, max_grad_norm=math.inf)
    assert torch.equal(clip.clip_factors(torch.tensor([0.1, 1e9])), torch.ones(2))


def test_untrainable_layer_types_are_refused(state_dir):
    ref = resolve_model("tiny", state_dir, tiny=dict(arch="llama", layers=1, hidden=32, heads=2, seed=0), max_len=32)
    model, _ = load_model(ref.path)  # everything trainable, including embeddings and norms
    with pytest.raises(PrivacyError, match="no per-sample gradient rule"):
        dp_linear_modules(model)


@pytest.mark.parametrize("kind", ["prv", "rdp"])
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_accountant_round_trips_target_epsilon(kind, target):
    delta, q, steps = 1e-5, 0.01, 500
    sigma = noise_for_target(target, delta, q, steps, kind)
    eps = epsilon_of([[sigma, q, steps]], delta, kind)
    assert target * 0.97 <= eps <= target * 1.0001  # calibration lands just under the target
    assert epsilon_of([[sigma * 1.2, q, steps]], delta, kind) < eps  # more noise, less epsilon
    assert epsilon_of([[sigma, q, steps]] * 2, delta, kind) > eps  # composition costs


def test_ledger_composes_refuses_and_never_double_charges(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    delta, q, steps = 1e-5, 0.02, 200
    sigma = noise_for_target(5.0, delta, q, steps)
    after1 = ledger.reserve("run1", "fp", [[sigma, q, steps]], delta, "prv", budget=6.0)
    assert 4.8 < after1 <= 5.0
    assert ledger.reserve("run1", "fp", [[sigma, q, steps]], delta, "prv", budget=6.0) == pytest.approx(after1)
    with pytest.raises(
        PrivacyError, match=r"would bring records of dataset fp to epsilon=.*already spent (4\.9\d|5\.00) over 1 run"
    ):
        ledger.reserve("run2", "fp", [[sigma, q, steps]], delta, "prv", budget=6.0)
    assert [e.run_id for e in ledger.entries("fp")] == ["run1"]  # the refused run left nothing behind
    ledger.reserve("other-data", "fp2", [[sigma, q, steps]], delta, "prv", budget=6.0)  # budgets are per dataset
    with pytest.raises(PrivacyError, match="charged its whole plan"):  # e.g. a history read from a forged checkpoint
        ledger.finish("run1", [[sigma, q, steps // 2]])
    ledger.finish("run1", [[sigma, q, steps]])
    again = PrivacyLedger(tmp_path / "ledger.sqlite")  # durable across processes
    assert again.spent("fp", delta) == pytest.approx(after1)
    entry = again.entries("fp")[0]
    assert entry.status == "completed" and entry.history == [[sigma, q, steps]]


def test_ledger_charges_records_across_datasets(tmp_path):
    """Retraining on a grown copy of the data (a new fingerprint) keeps paying for the records it shares."""
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    delta, q, steps = 1e-5, 0.02, 200
    sigma = noise_for_target(5.0, delta, q, steps)
    run = [[sigma, q, steps]]
    alone = epsilon_of(run, delta, "prv")
    old = [f"r{i}" for i in range(100)]
    ledger.reserve("day1", "fp-day1", run, delta, "prv", budget=6.0, records=old)
    grown = old + [f"r{i}" for i in range(100, 150)]  # 50 new records appended
    with pytest.raises(PrivacyError, match=r"records of dataset fp-day2 to epsilon=.*over 1 run\(s\) \(records shared"):
        ledger.reserve("day2", "fp-day2", run, delta, "prv", budget=6.0, records=grown)
    assert ledger.entries("fp-day2") == [] and ledger.records("fp-day2") == []  # refused: nothing left behind
    shrunk = old[:10]  # a subset is the same people too
    with pytest.raises(PrivacyError):
        ledger.reserve("subset", "fp-subset", run, delta, "prv", budget=6.0, records=shrunk)
    fresh = [f"n{i}" for i in range(100)]  # disjoint data: only its own run counts
    assert ledger.reserve("other", "fp-other", run, delta, "prv", budget=6.0, records=fresh) == pytest.approx(alone)
    # with a larger budget the grown set is accepted; its worst record (an old one) has paid twice
    both = ledger.reserve("day2", "fp-day2", run, delta, "prv", budget=20.0, records=grown)
    assert both == pytest.approx(epsilon_of(run * 2, delta, "prv")) and both > alone + 1
    assert ledger.spent("fp-day2", delta) == pytest.approx(both)
    assert ledger.spent("fp-day1", delta) == pytest.approx(both)  # day 1's records were charged again by day 2
    assert ledger.spent("fp-other", delta) == pytest.approx(alone)
    assert sorted(ledger.records("fp-day1")) == sorted(old)


def test_secure_mode_refuses_seed_and_draws_fresh_noise():
    with pytest.raises(PrivacyError, match="predictable"):
        make_noise_generator(True, 1)
    from tasks.privacy import gaussian_noise

    ref = [torch.zeros(1000)]
    a, b = gaussian_noise(ref, 1.0, None, True)[0], gaussian_noise(ref, 1.0, None, True)[0]
    assert not torch.equal(a, b) and 0.9 < float(a.std()) < 1.1


def test_ledger_location_and_budget_come_from_governance(isolated_governance, tiny_config):
    """Not from the run config or the state dir: the governance file names the ledger and caps the budget."""
    from dataclasses import asdict

    import yaml

    from llmops.governance.ledger import open_ledger
    from tasks.data import prepare_data
    from tasks.finetune import plan_finetune, privacy_budget

    isolated_governance.parent.mkdir(parents=True, exist_ok=True)
    isolated_governance.write_text(
        yaml.safe_dump({"privacy": {"ledger": "team/ledger.sqlite", "dataset_budget_epsilon": 4.0}})
    )
    isolated_governance.chmod(0o600)
    cfg = tiny_config
    assert privacy_budget(cfg) == 4.0
    cfg.privacy.dataset_budget_epsilon = 3.0  # a run may tighten ...
    assert privacy_budget(cfg) == 3.0
    cfg.privacy.dataset_budget_epsilon = 50.0  # ... never loosen
    assert privacy_budget(cfg) == 4.0
    data = asdict(prepare_data(cfg.data.path, cfg.state_dir, cfg.data.eval_fraction))
    model = asdict(resolve_model("tiny", cfg.state_dir, tiny=cfg.model.tiny.model_dump(), max_len=64))
    spec, _ = plan_finetune(cfg, data, model)
    ledger_file = isolated_governance.parent / "team" / "ledger.sqlite"
    assert open_ledger().path == ledger_file and ledger_file.is_file()
    assert [e.run_id for e in PrivacyLedger(ledger_file).entries(spec.fingerprint)] == [spec.attempt_id]
    assert not list(cfg.state_dir.rglob("*ledger*"))


def test_ledger_locations_other_than_sqlite_and_postgres_are_refused_and_errors_name_the_setting():
    from llmops.governance.ledger import open_ledger

    with pytest.raises(PrivacyError, match="'mysql://...' is not supported") as e:
        open_ledger("mysql://ledger@db/llmops")
    assert "governance file: privacy.ledger" in str(e.value)
    port = __import__("tests.conftest", fromlist=["_free_port"])._free_port()  # nothing listens there
    with pytest.raises(PrivacyError, match="cannot reach the privacy ledger") as e:
        open_ledger(f"postgresql://ledger:s3cret@127.0.0.1:{port}/llmops")
    assert "s3cret" not in str(e.value)  # the URL's password never reaches a message


def test_csprng_poisson_sample_rate_and_independence():
    from tasks.privacy import poisson_sample

    draws = [poisson_sample(10_000, 0.05) for _ in range(20)]
    sizes = [len(d) for d in draws]
    assert abs(sum(sizes) / len(sizes) - 500) < 25  # E[|batch|] = q n
    assert len({tuple(d.tolist()) for d in draws}) == 20  # never the same sample twice
    assert all(bool((d[1:] > d[:-1]).all()) for d in draws)  # sorted, no repeats
    assert torch.equal(poisson_sample(1000, 0.1, seed=3), poisson_sample(1000, 0.1, seed=3))  # reproducible mode
    assert len(poisson_sample(100, 1.0)) == 100 and len(poisson_sample(100, 0.0)) == 0
