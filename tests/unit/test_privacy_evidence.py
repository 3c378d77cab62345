"""The epsilon must not depend on files and tags a requester can write (tasks/privacy.py, tasks/finetune.py).

Each test is an attack by someone who can edit a run's config, write its state dir and MLflow tags, and read the
published seed; the ledger (governance-side) is the evidence, the run dir a cache checked against it."""

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmops.errors import LLMOpsError, PrivacyError
from llmops.files import dir_digest
from llmops.governance.accounting import epsilon_of
from llmops.governance.ledger import PrivacyLedger, open_ledger
from tasks.data import prepare_data
from tasks.finetune import FinetuneSpec, finish_ledger, launch, plan_finetune, train
from tasks.model import resolve_model
from tasks.privacy import gaussian_noise, make_noise_generator
from tests.conftest import ROOT


def _inputs(cfg, path=None):
    data = asdict(prepare_data(path or cfg.data.path, cfg.state_dir, cfg.data.eval_fraction))
    model = asdict(resolve_model("tiny", cfg.state_dir, tiny=cfg.model.tiny.model_dump(), max_len=64))
    return data, model


# ------------------------------------------------------------------------------------------------------ noise


@pytest.mark.parametrize("secure", [False, True])
def test_noise_never_follows_the_published_training_seed(secure):
    """`training.seed` seeds torch's global generator (model init) and is published; the noise must not be a
    function of it in either mode (secure mode used to draw from the global generator)."""
    ref = [torch.zeros(64, 8)]
    draws = []
    for _ in range(2):
        torch.manual_seed(42)  # what train() does with training.seed
        gen = make_noise_generator(secure, None)
        draws.append(gaussian_noise(ref, 1.0, gen, secure)[0])
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(42)
    plain = torch.normal(0.0, 1.0, size=(64, 8))  # the global generator's draw under the published seed
    assert not torch.allclose(draws[0], plain) and not torch.allclose(draws[0], plain * 2 / 2)
    assert 0.8 < float(draws[0].std()) < 1.2  # still N(0, 1)


def test_secure_noise_refuses_any_generator():
    with pytest.raises(PrivacyError):
        gaussian_noise([torch.zeros(3)], 1.0, torch.Generator().manual_seed(1), True)
    with pytest.raises(PrivacyError):  # non-secure noise from the global generator is refused too
        gaussian_noise([torch.zeros(3)], 1.0, None, False)


@pytest.fixture
def full_batch_spec(tmp_path, tiny_jsonl):
    """q = 1: every record in every step, so the batches are identical and the noise is the only randomness."""
    data = prepare_data(tiny_jsonl, tmp_path / "state", 0.1)
    model = resolve_model(
        "tiny", tmp_path / "state", tiny=dict(arch="llama", layers=2, hidden=64, heads=4, seed=0), max_len=32
    )
    n = data.n_train
    return FinetuneSpec(
        run_id="r",
        model_path=model.path,
        train_path=data.train_path,
        output_dir="",
        fingerprint=data.fingerprint,
        n_train=n,
        max_len=32,
        batch_size=n,
        micro_batch_size=n,
        learning_rate=1e-2,
        steps=2,
        seed=7,
        deepspeed_config=str(ROOT / "infra/deepspeed/zero0.json"),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=1.0,
        delta=1e-4,
    ), tmp_path


def _weights(spec, tmp, name, **kw):
    s = replace(spec, output_dir=str(tmp / name), **kw)
    Path(s.output_dir).mkdir(parents=True)
    return load_file(Path(train(s)["model_path"]) / "model.safetensors")


@pytest.mark.parametrize("secure", [False, True])
def test_two_runs_with_the_same_seed_and_batches_release_different_noise(full_batch_spec, secure):
    """End to end through DeepSpeed: same training.seed, same (full) batches, so equal weights = equal noise, from
    which the noiseless clipped sum is the difference of two releases. Positive control: seeded noise is equal."""
    spec, tmp = full_batch_spec
    a = _weights(spec, tmp, f"a{secure}", secure_mode=secure)
    b = _weights(spec, tmp, f"b{secure}", secure_mode=secure)
    assert any(not torch.equal(a[k], b[k]) for k in a)
    if not secure:
        c = _weights(spec, tmp, "c", reproducible_insecure=True, noise_seed=5)
        d = _weights(spec, tmp, "d", reproducible_insecure=True, noise_seed=5)
        assert all(torch.equal(c[k], d[k]) for k in c)  # the comparison can see equal noise


# ------------------------------------------------------------------------------------------- resume evidence


def test_a_forged_checkpoint_is_not_resumed_and_history_below_the_plan_is_refused(tiny_config):
    """A checkpoint the ledger did not record ('step 2 of 3, no history') makes the re-plan a new attempt (charged
    in full); the ledger settles a completed attempt only at its whole plan."""
    cfg = tiny_config
    data, model = _inputs(cfg)
    first, eps1 = plan_finetune(cfg, data, model)
    ckpt = Path(first.output_dir) / "checkpoints"
    (ckpt / "step2").mkdir(parents=True)
    (ckpt / "step2" / "mp_rank_00_model_states.pt").write_bytes(b"forged")
    (ckpt / "latest").write_text("step2")
    again, eps_again = plan_finetune(cfg, data, model)
    assert again.attempt_id != first.attempt_id and eps_again > eps1 + 0.1  # charged again, not "resumed"
    assert not ckpt.exists()
    ledger = open_ledger()
    with pytest.raises(PrivacyError, match="whole plan"):
        ledger.finish(first.attempt_id, [[first.noise_multiplier, first.sample_rate, 1]])
    assert ledger.entry(first.attempt_id).status == "reserved"


def test_the_rank_takes_its_start_from_the_ledger_and_refuses_swapped_checkpoint_files(tiny_config):
    cfg = tiny_config
    data, model = _inputs(cfg)
    spec, _ = plan_finetune(cfg, data, model)
    ckpt = Path(spec.output_dir) / "checkpoints"
    real = ckpt / "step2"
    real.mkdir(parents=True)
    (real / "state.pt").write_bytes(b"what the rank saved")
    open_ledger().checkpoint(spec.attempt_id, 2, dir_digest(real))
    (real / "state.pt").write_bytes(b"swapped after the ledger recorded it")
    with pytest.raises(PrivacyError, match="not the one the ledger recorded"):
        train(spec)
    again, _ = plan_finetune(cfg, data, model)
    assert again.attempt_id != spec.attempt_id  # the swapped files are not this attempt's state
    with pytest.raises(PrivacyError, match="out of order"):  # the ledger's checkpoints only move forward
        open_ledger().checkpoint(spec.attempt_id, 1, "x")


def test_a_lowered_sigma_in_spec_json_is_refused_by_the_rank(tiny_config):
    cfg = tiny_config
    data, model = _inputs(cfg)
    spec, _ = plan_finetune(cfg, data, model)
    for forged in (
        replace(spec, noise_multiplier=spec.noise_multiplier / 10),
        replace(spec, private=False),
        replace(spec, steps=spec.steps * 10),
        replace(spec, secure_mode=not spec.secure_mode),
    ):
        forged.save(Path(spec.output_dir) / "spec.json")
        with pytest.raises(PrivacyError, match="differs from the plan"):
            train(FinetuneSpec.load(Path(spec.output_dir) / "spec.json"))
    # a swapped training file (same length, other records) is another plan too
    lines = Path(spec.train_path).read_text().splitlines()
    Path(spec.train_path).write_text("\n".join(reversed(lines)) + "\n")
    with pytest.raises(PrivacyError, match="train_digest"):
        train(spec)


def test_a_planted_model_dir_is_trained_over_not_reused(tiny_config):
    cfg = tiny_config
    data, model = _inputs(cfg)
    spec, _ = plan_finetune(cfg, data, model)
    planted = Path(spec.output_dir) / "model"
    shutil.copytree(model["path"], planted)  # any weights
    (planted / "privacy.json").write_text(
        json.dumps(
            {
                "dp_sgd": True,
                "epsilon": 0.01,
                "attempt_id": spec.attempt_id,
                "history": [[spec.noise_multiplier, spec.sample_rate, 1]],
            }
        )
    )
    (Path(spec.output_dir) / "metrics.json").write_text("[]")
    planted_digest = dir_digest(planted)
    result = launch(spec, timeout_s=300)
    assert result["reused"] is False and len(result["privacy"]["history"]) == 1
    assert result["privacy"]["history"][0][2] == spec.steps
    finish_ledger(cfg, spec, result["privacy"], result["model_path"])
    assert open_ledger().entry(spec.attempt_id).model_digest == dir_digest(Path(result["model_path"])) != planted_digest
    # after completion, reuse only the recorded bytes: a swapped model dir is trained over again (a new attempt)
    (Path(result["model_path"]) / "privacy.json").write_text(json.dumps({"dp_sgd": True, "epsilon": 0.01}))
    again, _ = plan_finetune(cfg, data, model)
    assert again.attempt_id != spec.attempt_id


def test_finish_refuses_a_model_whose_privacy_json_is_not_the_plans(tiny_config):
    cfg = tiny_config
    data, model = _inputs(cfg)
    spec, _ = plan_finetune(cfg, data, model)
    out = Path(spec.output_dir) / "model"
    shutil.copytree(model["path"], out)
    claim = {
        "dp_sgd": True,
        "attempt_id": spec.attempt_id,
        "noise_multiplier": spec.noise_multiplier / 4,
        "history": [[spec.noise_multiplier, spec.sample_rate, spec.steps]],
    }
    (out / "privacy.json").write_text(json.dumps(claim))
    with pytest.raises(PrivacyError, match="does not match the reserved attempt"):
        finish_ledger(cfg, spec, claim, str(out))
    assert (
        open_ledger().entry(spec.attempt_id).status == "reserved"
        and not open_ledger().entry(spec.attempt_id).model_digest
    )


def test_another_datasets_spec_and_checkpoint_copied_in_is_a_new_attempt(tiny_config, tiny_jsonl, tmp_path):
    """Attempt A's spec.json and (ledger-recorded) checkpoint copied into dataset B's run dir must not continue A:
    B's records must be charged."""
    cfg = tiny_config
    data_a, model = _inputs(cfg)
    spec_a, _ = plan_finetune(cfg, data_a, model)
    ck = Path(spec_a.output_dir) / "checkpoints" / "step2"
    ck.mkdir(parents=True)
    (ck / "state.pt").write_bytes(b"A's state")
    open_ledger().checkpoint(spec_a.attempt_id, 2, dir_digest(ck))
    other = tmp_path / "b.jsonl"
    other.write_text(
        "".join(
            json.dumps({"id": f"b{i}", "text": f"Completely different record {i} on tides."}) + "\n" for i in range(200)
        )
    )
    data_b, _ = _inputs(cfg, other)
    probe, _ = plan_finetune(cfg, data_b, model)  # where B's run dir is
    out_b = Path(probe.output_dir)
    shutil.rmtree(out_b)
    shutil.copytree(spec_a.output_dir, out_b)
    spec_b, _ = plan_finetune(cfg, data_b, model)
    assert spec_b.attempt_id not in (spec_a.attempt_id,)
    assert open_ledger().records(data_b["fingerprint"])  # B's records are charged


# ---------------------------------------------------------------------------------------- guarantee in the ledger


def test_not_private_is_a_ledger_fact_that_edited_tags_cannot_undo(tiny_config):
    from llmops.governance.evidence import check_ledger

    cfg = tiny_config
    cfg.privacy.reproducible_insecure = True
    cfg.privacy.noise_seed = 5
    data, model = _inputs(cfg)
    spec, eps = plan_finetune(cfg, data, model)
    ledger = open_ledger()
    entry = ledger.entry(spec.attempt_id)
    assert any("reproducible_insecure" in p for p in entry.problems)
    ledger.finish(spec.attempt_id, [[spec.noise_multiplier, spec.sample_rate, spec.steps]], model_digest="d" * 64)
    forged = {
        "llmops.dp.attempt_id": spec.attempt_id,
        "llmops.dp.private": "True",
        "llmops.dp.reproducible_insecure": "False",
        "llmops.dp.epsilon": f"{ledger.entry(spec.attempt_id).epsilon:.6g}",
    }
    problems = check_ledger(forged, ledger.entry(spec.attempt_id), eps, 10.0)
    assert any("planned as not private" in p for p in problems)


def test_inside_privacy_json_is_rechecked_after_the_digest(tiny_config, tmp_path):
    from llmops.governance.evidence import inside_privacy_problem

    cfg = tiny_config
    data, model = _inputs(cfg)
    spec, _ = plan_finetune(cfg, data, model)
    entry = open_ledger().entry(spec.attempt_id)
    d = tmp_path / "m"
    d.mkdir()
    (d / "privacy.json").write_text(
        json.dumps(
            {
                "dp_sgd": True,
                "attempt_id": "someone-else",
                "epsilon": 1.0,
                "noise_multiplier": 1.0,
                "reproducible_insecure": True,
            }
        )
    )
    problem = inside_privacy_problem(entry, d)
    assert problem and "someone-else" in problem and "reproducible_insecure" in problem


# ----------------------------------------------------------------------------------------------------- delta


def test_the_budget_is_converted_at_the_governance_delta_not_the_runs(tmp_path):
    """A prior spend read at a huge run delta looks small; every charge must be converted at the budget's delta."""
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    run, n = [[0.8, 0.05, 300]], 1000
    twice_budget, twice_loose = epsilon_of(run * 2, 1e-5, "prv"), epsilon_of(run * 2, 0.99 / n, "prv")
    budget = (twice_budget + twice_loose) / 2  # an identical second run fits only if read at the loose delta
    assert twice_loose < budget < twice_budget
    ledger.reserve("a", "fp", run, 1e-5, "prv", budget=budget, records=["r1"], budget_delta=1e-5)
    with pytest.raises(PrivacyError, match="delta 1e-05"):
        ledger.reserve("b", "fp2", run, 0.99 / n, "prv", budget=budget, records=["r1"], budget_delta=1e-5)
    at_budget = epsilon_of(run, 1e-5, "prv")
    assert ledger.summary(budget_delta=1e-5)[0]["epsilon"] == pytest.approx(at_budget)


def test_plan_uses_the_governance_delta_and_refuses_one_not_below_1_over_n(tiny_config, tmp_path):
    from llmops.governance.policy import load_governance

    data, model = _inputs(tiny_config)
    spec, _ = plan_finetune(tiny_config, data, model)
    assert spec.delta == load_governance().privacy.budget_delta
    g = load_governance()
    g.privacy.budget_delta = 0.009  # an admin's mistake: 1/n of the tiny data is smaller
    g.save()
    with pytest.raises(LLMOpsError, match="budget's delta"):
        plan_finetune(tiny_config, data, model)


# ------------------------------------------------------------------------------------------------ odds and ends


def test_the_ledger_file_is_private(tmp_path):
    path = tmp_path / "gov" / "ledger.sqlite"
    PrivacyLedger(path)
    assert path.stat().st_mode & 0o777 == 0o600
    path.chmod(0o644)
    PrivacyLedger(path).reserve("a", "fp", [[1.0, 0.1, 3]], 1e-5, "prv", budget=10.0)
    assert path.stat().st_mode & 0o777 == 0o600


def test_zero3_with_dp_is_refused_before_the_ledger_reserves_anything(tiny_config):
    cfg = tiny_config
    cfg.training.deepspeed_config = ROOT / "infra" / "deepspeed" / "zero3.json"
    data, model = _inputs(cfg)
    with pytest.raises(LLMOpsError, match="ZeRO stage 3"):
        plan_finetune(cfg, data, model)
    ledger_path = Path(open_ledger().path)
    assert PrivacyLedger(ledger_path).entries(data["fingerprint"]) == []


# ---------------------------------------------------------------------------------------- near-duplicate records


def _real_records(k=40, min_words=20):
    rows = [json.loads(x)["text"] for x in (ROOT / "data/sample/shakespeare.jsonl").read_text().splitlines()]
    return [t for t in rows if len(t.split()) >= min_words][:k]


def _variants(t):
    words = t.split()
    homo = t.replace("a", "\u0430").replace("o", "\u043e")  # Cyrillic a, o
    return [
        homo,
        t.upper(),
        t.replace(",", "").replace(".", "!"),
        " ".join(words[:5] + ["indeed"] + words[6:]),
        " ".join(words[:3] + ["pray"] + words[3:]),
        t.lower(),
        t + " Exeunt.",
        "\u200b".join(t.split(" ", 3)),
    ]


def test_variants_of_one_text_are_one_training_record(tmp_path):
    """k homoglyph/case/punctuation/one-word variants of one text used to be k records (epsilon for k copies)."""
    texts = _real_records()
    target = texts[0]
    rows = texts + _variants(target)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(rows)))
    data = prepare_data(f, tmp_path / "state", 0.1)
    kept = [json.loads(x)["text"] for p in (data.train_path, data.eval_path) for x in Path(p).read_text().splitlines()]
    assert sum(1 for t in kept if t == target or t in _variants(target)) == 1
    assert data.n_duplicates_removed >= len(_variants(target))


def _reserve(ledger, aid, texts, budget, run=((1.0, 0.05, 200),)):
    from llmops.text.identity import text_hash
    from llmops.text.neardup import record_keys

    keys = {text_hash(t): record_keys(t) for t in texts}
    return ledger.reserve(
        aid,
        f"fp-{aid}",
        [list(h) for h in run],
        1e-5,
        "prv",
        budget=budget,
        records=sorted(keys),
        keys=keys,
        budget_delta=1e-5,
    )


def test_a_variant_part_or_concatenation_of_a_spent_record_pays_its_history(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    texts = _real_records()
    one = epsilon_of([[1.0, 0.05, 200]], 1e-5, "prv")
    budget = one * 1.2  # room for one attempt per record, not two (two compose to 1.4x)
    _reserve(ledger, "first", texts, budget)
    t, u = texts[3], texts[4]
    words = t.split()
    fresh = [f"An unrelated line number {i} about rivers, bread and the price of {i} candles." for i in range(30)]
    for n, attack in enumerate(
        [
            t.lower(),
            " ".join(words[: len(words) // 2]),
            t + " " + u,
            _variants(t)[0],
            " ".join(words[: int(len(words) * 0.7)]),
        ]
    ):
        with pytest.raises(PrivacyError, match="records shared with earlier runs"):
            _reserve(ledger, f"attack{n}", fresh + [attack], budget)
    assert _reserve(ledger, "fresh", fresh, budget) == pytest.approx(one)  # unrelated text: its own budget


def test_two_halves_of_a_trained_record_in_one_dataset_are_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    texts = _real_records()
    _reserve(ledger, "first", texts, 100.0)
    words = texts[5].split()
    halves = [" ".join(words[: len(words) // 2]), " ".join(words[len(words) // 2 :])]
    with pytest.raises(PrivacyError, match="near-copies"):
        _reserve(ledger, "split", halves + ["Something else entirely, said twice over by nobody at all."], 100.0)


def test_distillation_and_public_eval_checks_see_lowercased_and_truncated_private_records(tiny_config, tmp_path):
    from tasks.privacy import count_private

    data, model = _inputs(tiny_config)
    plan_finetune(tiny_config, data, model)  # the ledger now holds the training records (and their keys)
    train_texts = [json.loads(x)["text"] for x in Path(data["train_path"]).read_text().splitlines()]
    long = [t for t in train_texts if len(t.split()) >= 12][:2]
    disguised = [long[0].lower(), " ".join(long[1].split()[: int(len(long[1].split()) * 0.7)])]
    public = [
        "Fair is foul, and foul is fair: hover through the fog and filthy air, said the witches at dusk.",
        "Completely new prose about trains and timetables that no play of Shakespeare ever contained.",
    ]
    assert count_private(disguised + public, [data["train_path"]]) == 2  # the run's own splits
    assert count_private(disguised + public) == 2  # the ledger alone (another run's records)


# ------------------------------------------------------------------------ second blind attack (plan binding)


def test_a_fifo_in_place_of_the_training_file_is_refused(tiny_config, tmp_path):
    """The plan check and the trainer read the file separately: a FIFO handed each reader other bytes."""
    import os

    cfg = tiny_config
    data, model = _inputs(cfg)
    spec, _ = plan_finetune(cfg, data, model)
    fifo = tmp_path / "train.fifo"
    os.mkfifo(fifo)
    with pytest.raises(PrivacyError, match="not a regular file"):
        train(replace(spec, train_path=str(fifo)))


def test_the_base_model_and_curve_text_are_part_of_the_plan(tiny_config, tmp_path):
    cfg = tiny_config
    data, model = _inputs(cfg)
    spec, _ = plan_finetune(cfg, data, model)
    other = tmp_path / "other-base"
    shutil.copytree(model["path"], other)
    (other / "config.json").write_text((other / "config.json").read_text().replace("}", ', "x": 1}', 1))
    with pytest.raises(PrivacyError, match="base_digest"):
        train(replace(spec, model_path=str(other)))  # spec.json pointing at another base (e.g. a non-private model)
    if spec.curve_points:
        with pytest.raises(PrivacyError, match="curve"):
            train(replace(spec, eval_path=spec.train_path, curve_records=1))  # the curve scored on training records


def test_the_output_of_a_non_private_run_cannot_be_a_private_runs_base(tiny_config):
    cfg = tiny_config
    data, model = _inputs(cfg)
    open_ledger().record_unaccounted(model["digest"], "privacy.enabled=false run r")
    with pytest.raises(PrivacyError, match="did not account"):
        plan_finetune(cfg, data, model)


def test_one_reservation_trains_once(tiny_config):
    """Launching the rank again on one reserved attempt trained several models on one charge (keep the best)."""
    cfg = tiny_config
    data, model = _inputs(cfg)
    spec, _ = plan_finetune(cfg, data, model)
    train(spec)
    with pytest.raises(PrivacyError, match="already trained from step 0"):
        train(spec)


def test_a_forged_source_map_cannot_hide_the_trained_records(tmp_path):
    from llmops.text.identity import text_hash
    from tasks.finetune import training_record_hashes, training_record_keys

    train_file = tmp_path / "train.jsonl"
    train_file.write_text(json.dumps({"id": "1", "text": "a record that was trained"}) + "\n")
    (tmp_path / "map.json").write_text(json.dumps({text_hash("a record that was trained"): []}))
    data = {"train_path": str(train_file), "source_map": str(tmp_path / "map.json")}
    assert training_record_hashes(data) == [text_hash("a record that was trained")]
    assert list(training_record_keys(data)) == [text_hash("a record that was trained")]


def test_a_padded_part_of_a_spent_record_pays_its_history(tmp_path):
    """Split-and-pad: ~42% of a record followed by unrelated text is a small share of both; a shared verbatim run of
    >= 10 words relates them whatever the ratio."""
    ledger = PrivacyLedger(tmp_path / "l.sqlite")
    a = (
        "Patient Jane Roe, born 1961-04-02, was admitted on 3 March with chest pain radiating to the left arm; "
        "troponin was elevated, an ECG showed ST elevation in the inferior leads, and she was taken for urgent "
        "angiography where a right coronary occlusion was stented without complication before discharge home."
    )
    one = epsilon_of([[1.0, 0.05, 200]], 1e-5, "prv")
    _reserve(ledger, "first", [a], one * 1.2)
    words = a.split()
    filler = (
        "the harbour was quiet that morning and the gulls circled above the fishing boats while a cold wind "
        "came down from the hills across the grey water toward the old stone pier where nobody waited"
    ).split()
    parts = [" ".join(words[i : i + len(words) * 42 // 100] + filler[:40]) for i in (0, 12, 24)]
    for n, part in enumerate(parts):
        with pytest.raises(PrivacyError, match="records shared with earlier runs"):
            _reserve(ledger, f"pad{n}", [part], one * 1.2)
