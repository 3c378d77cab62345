"""Compression on tiny random models: each technique's shapes, reload and logits; the gates and the privacy rule.

.venv/bin/pytest tests/unit/test_compression.py        # ~40 s on 2 cores
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ConfigDict

from llmops.config import CompressionConfig
from llmops.errors import PrivacyError
from tasks import compression as c
from tasks.model import load_model, resolve_model
from tests.conftest import ROOT

MAX_LEN = 32
EXACT = dict(atol=1e-5, rtol=1e-5)  # same math, different layout (rebuild, reload, student = teacher)
INT8_ATOL = 0.05  # int8 vs fp32 logits of the tiny model (observed max |diff| ~0.006)
PUBLIC = ROOT / "data" / "public" / "macbeth.txt"


class Cfg(CompressionConfig):
    """CompressionConfig that also accepts unknown knobs (a test may set one the config does not define)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    ref = resolve_model("tiny", state, tiny=dict(arch="llama", layers=2, hidden=64, heads=4, seed=0), max_len=64)
    from tasks.data import prepare_data

    data = prepare_data(ROOT / "data/sample/shakespeare.jsonl", state, 0.2, max_records=200)
    return ref, data


@pytest.fixture
def model_tok(tiny):
    return load_model(tiny[0].path)


def logits(model, tok, texts=("To be, or not to be, that is the question", "Full fathom five")):
    from tasks.lm import encode

    b = encode(tok, list(texts), MAX_LEN)
    with torch.no_grad():
        return model(**b, use_cache=False).logits, b["attention_mask"].bool()


# ----------------------------------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_is_permanent_and_reaches_the_sparsity(model_tok, tmp_path, scope):
    model, tok = model_tok
    achieved = c.prune_magnitude(model, 0.5, scope)
    assert abs(achieved - 0.5) < 0.01
    mods = c.compressible_linears(model)
    if scope == "layer":
        for m in mods.values():
            assert abs(float((m.weight == 0).float().mean()) - 0.5) < 0.01
    assert not any(n.endswith(("weight_orig", "weight_mask")) for n, _ in model.named_parameters())
    assert not any(n.endswith("weight_mask") for n, _ in model.named_buffers())
    c.save_hf(model, tok, tmp_path)
    reloaded, _ = load_model(tmp_path)
    assert abs(c.linear_sparsity(reloaded) - achieved) < 1e-6  # zeros survive save/reload
    # the tied output head is the embedding: never pruned
    assert float((reloaded.get_input_embeddings().weight == 0).float().mean()) < 0.01


def test_mlp_channel_pruning_shrinks_the_model_and_keeps_what_matters(model_tok, tmp_path):
    model, tok = model_tok
    ref, mask = logits(model, tok)
    # zero half of every block's MLP channels: removing exactly those must not change the output
    with torch.no_grad():
        for layer in model.model.layers:
            dead = torch.arange(0, layer.mlp.up_proj.out_features, 2)
            layer.mlp.up_proj.weight[dead] = 0
    ref, _ = logits(model, tok)
    pruned, removed = c.prune_mlp_channels(model, 0.5)
    assert removed == 0.5 and pruned.config.intermediate_size == model.config.intermediate_size // 2
    assert pruned.model.layers[0].mlp.down_proj.weight.shape[1] == model.config.intermediate_size // 2
    assert c.count_params(pruned) < c.count_params(model)
    got, _ = logits(pruned, tok)
    torch.testing.assert_close(got[mask], ref[mask], **EXACT)
    c.save_hf(pruned, tok, tmp_path)  # an ordinary HF dir: tasks.model.load_model reads it
    again, _ = load_model(tmp_path)
    torch.testing.assert_close(logits(again, tok)[0][mask], ref[mask], **EXACT)


# ------------------------------------------------------------------------------------------------ quantization


@pytest.mark.parametrize("mode", c.QUANT_MODES)
def test_int8_quantization_saves_reloads_and_stays_close(model_tok, tmp_path, mode):
    model, tok = model_tok
    ref, mask = logits(model, tok)
    info = c.build_quantized(model, tok, tmp_path, mode)
    assert info["linear_bytes_ratio"] <= 0.30  # int8 data + per-row scales vs fp32
    assert (tmp_path / c.QUANT_FILE).is_file() and c.read_meta(tmp_path)["quantize"] == mode
    loaded = c.load_variant(tmp_path)
    qmodel = loaded.logits.model
    assert type(qmodel.model.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert qmodel.get_output_embeddings().weight is qmodel.get_input_embeddings().weight  # still tied, fp32
    got = loaded.logits(*_ids(tok))
    in_memory = model  # quantize a fresh copy in memory: the reload must be bit-identical to it
    c.quantize_int8(in_memory, mode)
    torch.testing.assert_close(got, logits(in_memory, tok)[0], atol=0, rtol=0)
    assert (got[mask] - ref[mask]).abs().max() < INT8_ATOL


def _ids(tok):
    from tasks.lm import encode

    b = encode(tok, ["To be, or not to be, that is the question", "Full fathom five"], MAX_LEN)
    return b["input_ids"], b["attention_mask"]


def test_corrupt_int8_file_is_a_clear_error(model_tok, tmp_path):
    model, tok = model_tok
    c.build_quantized(model, tok, tmp_path, "int8_weight_only")
    (tmp_path / c.QUANT_FILE).write_bytes(b"junk")
    with pytest.raises(c.CompressionError, match="cannot load model_int8.pt"):
        c.load_variant(tmp_path)


# ------------------------------------------------------------------------------------------------ distillation


def test_student_is_initialised_from_teacher_layers(model_tok):
    teacher, tok = model_tok
    same, ids = c.make_student(teacher, 2)  # as deep as the teacher: must be the teacher
    assert ids == [0, 1]
    torch.testing.assert_close(logits(same, tok)[0], logits(teacher, tok)[0], **EXACT)
    small, ids = c.make_student(teacher, 1)
    assert ids == [1] and small.config.num_hidden_layers == 1 and len(small.model.layers) == 1
    torch.testing.assert_close(small.model.layers[0].mlp.up_proj.weight, teacher.model.layers[1].mlp.up_proj.weight)
    assert c.student_layer_ids(30, 15)[0] == 0 and c.student_layer_ids(30, 15)[-1] == 29
    with pytest.raises(c.CompressionError, match="student_layers"):
        c.student_layer_ids(2, 3)


def test_distillation_loss_is_zero_for_identical_logits_and_student_learns(model_tok, tmp_path):
    teacher, tok = model_tok
    t, _ = logits(teacher, tok)
    ids, am = _ids(tok)
    loss, kl, _ = c.distill_loss(t, t, ids, am, temperature=2.0, alpha=1.0)
    assert abs(kl) < 1e-5 and abs(float(loss)) < 1e-5
    cfg = Cfg(distill_steps=8, distill_batch_size=4, distill_learning_rate=3e-3, student_layers=1)
    info = c.build_distilled(teacher, tok, tmp_path, PUBLIC, MAX_LEN, cfg)
    assert info["student_layers"] == 1 and info["distill_final"]["step"] == 8
    student, _ = load_model(tmp_path)
    assert student.config.num_hidden_layers == 1
    assert logits(student, tok)[0].shape == t.shape


def test_distilling_on_the_private_set_is_refused_before_any_work(tiny, tmp_path):
    ref, data = tiny
    private = [data.train_path, data.eval_path]
    shakespeare = ROOT / "data/sample/shakespeare.jsonl"
    with pytest.raises(PrivacyError, match="private training set.*public text"):
        c.check_public(shakespeare, private)
    assert c.check_public(PUBLIC, private) == _fp(PUBLIC)  # public text passes
    cfg = Cfg(enabled=True, distill=True, distill_data=shakespeare, quantize="int8_dynamic")
    out = tmp_path / "out"
    with pytest.raises(PrivacyError):
        c.compress(ref.path, str(out), cfg, data.eval_path, MAX_LEN, private)
    assert not out.exists()  # refused up front: nothing was built, not even the int8 variant


def _fp(path):
    from tasks.data import load_dataset

    return load_dataset(path).fingerprint


# ----------------------------------------------------------------------------------------------------- ONNX


TEXTS = ["To be, or not to be, that is the question", "Full fathom five thy father lies; of his bones are coral made"]


@pytest.fixture(scope="module")
def bundles(tiny, tmp_path_factory):
    """The fp32 KV decoder of the tiny Llama and its int8 copy, built once for the ONNX tests."""
    model, tok = load_model(tiny[0].path)
    root = tmp_path_factory.mktemp("edge")
    fp32, int8 = root / "onnx", root / "onnx-int8"
    fp32.mkdir()
    int8.mkdir()
    check = c.export_onnx(model, tok, fp32, TEXTS, MAX_LEN, "original")
    plan = {n: 8 for n in c.matmul_nodes(fp32 / c.ONNX_FILE)}
    q = c.quantize_onnx(fp32, int8, model, tok, TEXTS, MAX_LEN, "original", plan, 32, block_sizes={c.LM_HEAD: 16})
    return {"fp32": fp32, "int8": int8, "check": check, "q": q, "model": model, "tok": tok}


def test_kv_decoder_matches_torch_prompt_steps_and_greedy_generate(bundles):
    import numpy as np
    import onnx

    from llmops.edge_runner import EdgeModel

    check = bundles["check"]
    assert check["allclose"] and check["max_abs_logit_diff"] < 1e-3 and check["max_abs_step_diff"] < 1e-3
    assert check["greedy_identical"] and check["greedy_tokens"] == c.GREEDY_CHECK_TOKENS
    g = onnx.load(str(bundles["fp32"] / c.ONNX_FILE), load_external_data=False).graph
    names = {i.name for i in g.input}
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= names
    assert "present.0.key" in {o.name for o in g.output}
    # the cache really is used: one-token steps after an 8-token prompt equal one prefill of the whole text
    model, tok = bundles["model"], bundles["tok"]
    ids = tok(TEXTS[1], add_special_tokens=False)["input_ids"][:32]
    em = EdgeModel(bundles["fp32"])
    full = em.all_logits(ids)
    logits, state = em.prefill(ids[:8])
    steps = [logits]
    for t in ids[8:]:
        logits, state = em.step(t, state)
        steps.append(logits)
    assert state[1] == len(ids) and state[0][0].shape[2] == len(ids)  # the past holds every position
    np.testing.assert_allclose(np.stack(steps), full[7:], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(full, ref, atol=1e-3, rtol=1e-3)


def test_bundle_is_self_contained_and_its_tokenizer_neither_truncates_nor_pads(bundles):
    for d in (bundles["fp32"], bundles["int8"]):
        files = {f.name for f in d.iterdir()}
        assert {c.ONNX_FILE, c.GENAI_CONFIG, "tokenizer.json", "config.json", c.RUNNER_FILE, c.META} <= files
        tj = json.loads((d / "tokenizer.json").read_text())
        assert tj["truncation"] is None and tj["padding"] is None
        genai = json.loads((d / c.GENAI_CONFIG).read_text())
        assert genai["search"]["do_sample"] is False and genai["model"]["decoder"]["num_hidden_layers"] == 2
        assert c.read_meta(d)["kv_cache"] is True
    from tokenizers import Tokenizer

    long = " ".join(["word"] * 400)
    assert len(Tokenizer.from_file(str(bundles["int8"] / "tokenizer.json")).encode(long).ids) >= 400


def test_int8_copy_quantizes_every_matmul_and_stores_the_tied_embedding_once(bundles):
    import onnx

    fp32, int8, q = bundles["fp32"], bundles["int8"], bundles["q"]
    g = onnx.load(str(int8 / c.ONNX_FILE), load_external_data=False).graph
    ops = [n.op_type for n in g.node]
    assert "MatMul" not in ops and ops.count("MatMulNBits") == len(c.matmul_nodes(fp32 / c.ONNX_FILE))
    assert "GatherBlockQuantized" in ops and "Transpose" not in ops  # the embedding reads the lm_head's int8 bytes
    emb = next(n for n in g.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in g.node if n.name == c.LM_HEAD)
    assert emb.input[0] == head.input[1]
    assert {a.name: a.i for a in head.attribute}["block_size"] == 16
    weights = [i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    assert sorted(weights) == ["cos_cache", "sin_cache"]  # no fp32 weight matrix is left
    fp32_bytes = c.onnx_matmul_weight_bytes(fp32 / c.ONNX_FILE)
    head = bundles["model"].get_output_embeddings().weight
    assert fp32_bytes == c.linear_weight_bytes(bundles["model"]) + head.numel() * 4  # + the (tied) lm_head
    ratio = c.onnx_matmul_weight_bytes(int8 / c.ONNX_FILE) / fp32_bytes
    assert 0.25 <= ratio <= 0.25 + 1 / 16 + 0.01, ratio
    assert q["rel_rms_err"] < 0.05 and q["top1_agreement"] >= 0.9, q
    meta = c.read_meta(int8)
    assert meta["bits"] == "int8" and meta["nodes_by_bits"] == {"int8": len(meta["plan"])}
    run = c.load_variant(int8)
    ids, am = _ids(bundles["tok"])
    assert run.logits(ids, am).shape == (2, MAX_LEN, len(bundles["tok"]))


def test_block_quantization_beats_plain_rounding_and_is_idempotent():
    import numpy as np

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 96)).astype(np.float32) * np.linspace(0.1, 3, 96, dtype=np.float32)
    blocks = w.reshape(8, 3, 32)
    for bits in (8, 4):
        q, s, zp = c.quantize_blocks(w, bits, 32)
        assert q.shape == (8, 3, 32) and s.shape == (8, 3) and (zp is None) == (bits == 8)
        assert q.max() <= (255 if bits == 8 else 15)
        err = ((c.dequantize_blocks(q, s, zp, 96) - w) ** 2).sum()
        if bits == 8:  # plain symmetric round-to-nearest, scale = absmax / 127
            rs = np.abs(blocks).max(-1, keepdims=True) / 127
            plain = np.rint(blocks / rs) * rs
        else:  # plain asymmetric min/max
            lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
            rs = (hi - lo) / 15
            z = np.rint(-lo / rs)
            plain = (np.clip(np.rint(blocks / rs) + z, 0, 15) - z) * rs
        assert err <= ((plain.reshape(8, 96) - w) ** 2).sum() + 1e-9
    grid = on_int4_grid(w)  # weights already on a full-range int4 grid come back exactly
    assert np.abs(c.dequantize_blocks(*c.quantize_blocks(grid, 4, 32), 96) - grid).max() < 1e-5


def on_int4_grid(w):
    """`w` [N, K] snapped to an int4 grid that uses the full code range 0..15 in every 32-block."""
    import numpy as np

    n, k = w.shape
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(n, k // 32, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    scale = np.abs(w).reshape(n, k // 32, 32).max(-1, keepdims=True) / 8
    return ((codes - 8) * scale).reshape(n, k).astype(np.float32)


def test_standalone_runner_generates_without_torch_or_transformers(bundles):
    """The device has onnxruntime, numpy and tokenizers only: torch and transformers are made unimportable."""
    import subprocess
    import sys

    d = bundles["fp32"]
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
        f"sys.argv = ['edge_runner', {str(d)!r}, {TEXTS[0]!r}, '--max-new-tokens', '12', '--stats']; "
        f"runpy.run_path({str(d / c.RUNNER_FILE)!r}, run_name='__main__')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=d)
    assert r.returncode == 0, r.stderr
    model, tok = bundles["model"], bundles["tok"]
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    want = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert r.stdout.rstrip("\n") == want
    assert "time to first token" in r.stderr or "generated" in r.stderr
    bad = subprocess.run([sys.executable, str(d / c.RUNNER_FILE), str(d.parent), "hi"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not an llmops edge bundle" in bad.stderr


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    ref = resolve_model("tiny", tmp_path, tiny=dict(arch="gpt2", layers=1, hidden=32, heads=2, seed=0), max_len=32)
    model, tok = load_model(ref.path)
    (tmp_path / "o").mkdir()
    with pytest.raises(c.CompressionError, match="builder failed for GPT2LMHeadModel") as e:
        c.export_onnx(model, tok, tmp_path / "o", TEXTS, MAX_LEN, "original")
    assert "disable compression.export_onnx" in str(e.value)


def test_mixed_plan_keeps_the_head_int8_and_spends_the_budget_on_the_most_sensitive_bytes():
    shapes = {c.LM_HEAD: (64, 1000), "a": (64, 64), "b": (64, 64), "c": (256, 64)}
    per = {b: {n: c.block_bytes(*shapes[n], b, 32) for n in shapes} for b in (4, 8)}
    floor = per[8][c.LM_HEAD] + per[4]["a"] + per[4]["b"] + per[4]["c"]
    cost = {"a": 1.0, "b": 5.0, "c": 8.0}  # c is the most sensitive, but per extra byte b beats it
    plan, info = c.mixed_plan(shapes, cost, floor + (per[8]["b"] - per[4]["b"]), 32)
    assert plan == {c.LM_HEAD: 8, "a": 4, "b": 8, "c": 4} and info["int8_nodes"] == ["b"]
    assert info["weight_bytes"] <= info["budget_bytes"]
    plan, _ = c.mixed_plan(shapes, cost, floor, 32)
    assert plan == {c.LM_HEAD: 8, "a": 4, "b": 4, "c": 4}  # no room: everything else int4
    plan, _ = c.mixed_plan(shapes, cost, 10**9, 32)
    assert set(plan.values()) == {8}


def test_sensitivity_is_measured_zero_for_weights_already_on_the_int4_grid(model_tok):
    model, tok = model_tok
    nodes = ["/model/layers.0/mlp/up_proj/MatMul", "/model/layers.1/mlp/up_proj/MatMul"]
    lin = c.torch_linears(model, nodes[0])[0]
    lin.weight.data = torch.from_numpy(on_int4_grid(lin.weight.data.numpy()))
    calib = c.calibration_ids(model, tok, None, n_seq=2, seq_len=16)
    assert calib.shape == (2, 16)
    cost = c.sensitivity(model, nodes, calib, 32)
    assert cost[nodes[0]] < 1e-10 < cost[nodes[1]]
    qkv = c.torch_linears(model, "/model/layers.0/attn/qkv_proj/MatMul")
    assert [m.out_features for m in qkv] == [64, 64, 64]


def test_onnx_block_size_is_checked(tmp_path):
    with pytest.raises(ValueError, match="onnx_int8_block_size must be a power of two"):
        CompressionConfig(export_onnx=True, onnx_int8_block_size=48)
    with pytest.raises(c.CompressionError, match="power of two"):
        c.quantize_onnx(tmp_path, tmp_path, None, None, [], MAX_LEN, "original", {}, 24)


# -------------------------------------------------------------------------------------------- gates + pipeline


def test_gate_rejects_quality_loss_and_missing_speedup():
    base = {"perplexity": 20.0}
    ok, why = c.gate({"perplexity": 20.3, "speedup": 1.6}, base, 0.02, 1.5)
    assert ok and "+1.5%" in why
    ok, why = c.gate({"perplexity": 21.0, "speedup": 2.0}, base, 0.02, 1.5)
    assert not ok and "perplexity 21.000 is +5.0%" in why
    ok, why = c.gate({"perplexity": 20.0, "speedup": 1.2}, base, 0.02, 1.5)
    assert not ok and "speed-up 1.20x is below the required 1.5x" in why
    ok, _ = c.gate({"perplexity": float("nan"), "speedup": 3.0}, base, 0.02, 1.5)
    assert not ok


def _v(name, speedup, mb, fmt="onnx", passed=True):
    return {"name": name, "passed": passed, "speedup": speedup, "size_bytes": int(mb * 1e6), "format": fmt}


def test_edge_pick_takes_the_smaller_int8_within_5_percent_of_the_fastest():
    # the issue: fp32 ONNX 542 MB at 1.549x vs int8 237 MB at 1.514x (2.3% slower) -> int8
    vs = [_v("onnx", 1.549, 542.1), _v("onnx-int8", 1.514, 237.4), _v("int8-weight-only", 1.2, 200, "torchao")]
    edge = c.choose(vs, 0.05, ("onnx",))
    assert edge.variant["name"] == "onnx-int8"
    assert edge.reason == "onnx-int8: 237 MB, 1.514× (within 5% of the best 1.549×, onnx at 542 MB; smallest of 2)"
    # the torch-or-ONNX selection follows the same rule: int8-weight-only is smaller but 22% slower than the best
    assert c.choose(vs, 0.05).variant["name"] == "onnx-int8"
    assert c.choose(vs, 0.0).variant["name"] == "onnx"  # no tolerance: the fastest, as before the issue
    assert c.choose(vs, 0.25).variant["name"] == "int8-weight-only"


def test_pick_rules_at_the_edges():
    fast_big, slow_small = _v("big", 2.0, 500), _v("small", 1.89, 100)  # 5.5% slower: outside 5%
    pick = c.choose([fast_big, slow_small], 0.05)
    assert (
        pick.variant is fast_big
        and pick.reason == "big: 500 MB, 2.000× (fastest; every other passing variant is more than 5% slower)"
    )
    assert c.choose([fast_big, _v("small", 1.9, 100)], 0.05).variant["name"] == "small"  # exactly 5%: within
    # a failing variant never wins, however small and fast
    assert (
        c.choose([_v("bad", 9.0, 1, passed=False), slow_small], 0.05).reason
        == "small: 100 MB, 1.890× (the only passing variant)"
    )
    # ties: same size -> the faster; same size and speed -> the earlier in build order
    assert c.choose([_v("a", 1.50, 10), _v("b", 1.52, 10)], 0.05).variant["name"] == "b"
    pick = c.choose([_v("a", 1.5, 10), _v("b", 1.5, 10)], 0.05)
    assert pick.variant["name"] == "a" and "fastest, and smallest of the 2 within 5% of it" in pick.reason
    # nothing passing, nothing of the format
    vs = [_v("x", 1.6, 10, "hf", passed=False), _v("y", 1.7, 5, "torchao", passed=False)]
    assert c.choose(vs, 0.05) == c.Pick(None, "none: no variant passed the gates (2 tried)")
    assert c.choose(vs, 0.05, ("onnx",)) == c.Pick(None, "none: no onnx variant was built")
    assert c.choose([], 0.05).variant is None


def test_atomic_dir_never_leaves_a_half_variant(tmp_path):
    final = tmp_path / "v"
    with pytest.raises(RuntimeError):
        with c.atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with c.atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with c.atomic_dir(final) as tmp:
            raise RuntimeError("a failed rebuild keeps the old variant")
    assert [p.name for p in tmp_path.iterdir()] == ["v"] and (final / "a").read_text() == "1"


def test_compress_measures_every_variant_and_gates_them(tiny, tmp_path):
    ref, data = tiny
    cfg = Cfg(
        enabled=True,
        prune_sparsity=0.5,
        prune_method="mlp_channels",
        quantize="int8_weight_only",
        distill=True,
        distill_data=PUBLIC,
        export_onnx=True,
        max_perplexity_increase=0.05,
        min_speedup=1000.0,  # unreachable: every variant must be rejected, and say why
        distill_steps=2,
        distill_batch_size=2,
        bench_rounds=3,
        max_eval_records=8,
        bench_threads=1,
    )
    out = tmp_path / "compressed"
    res = c.compress(ref.path, str(out), cfg, data.eval_path, MAX_LEN, [data.train_path, data.eval_path])
    names = [v["name"] for v in res["variants"]]
    assert names == ["pruned-mlp-channels", "int8-weight-only", "distilled", "onnx", "onnx-int8"]
    assert res["selected"] is None and res["edge"] is None
    assert res["selected_reason"] == "none: no variant passed the gates (5 tried)"
    assert res["edge_reason"] == "none: no onnx variant passed the gates (2 tried)"
    assert "\n- **Edge bundle**: none: no onnx variant passed" in res["table_md"]
    for v in res["variants"]:
        assert v["passed"] is False and "below the required 1000x" in v["reason"], v
        assert v["tokens_per_s"] > 0 and v["latency_ms_p95"] >= v["latency_ms_p50"] > 0
        assert Path(v["path"]).is_dir() and len(v["digest"]) == 64
        assert v["name"] in res["table_md"]
    by = {v["name"]: v for v in res["variants"]}
    assert by["onnx"]["perplexity"] == pytest.approx(res["baseline"]["perplexity"], rel=1e-4)
    assert by["int8-weight-only"]["linear_bytes_ratio"] <= 0.30
    assert by["pruned-mlp-channels"]["params"] < res["baseline"]["params"]
    assert by["distilled"]["params"] < res["baseline"]["params"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["report.json", "table.md"])  # no tmp left
    assert json.loads((out / "report.json").read_text())["selected"] is None
    # the same measurements under achievable gates: something passes, is picked, and the pick says why
    again = c.decide(
        {"baseline": res["baseline"], "variants": res["variants"], "note": ""},
        cfg.model_copy(update={"min_speedup": 0.01, "max_perplexity_increase": 10.0}),
    )
    assert again["selected"] in names and again["selected_reason"].startswith(again["selected"] + ": ")
    assert again["edge_name"] in ("onnx", "onnx-int8") and again["edge"] == by[again["edge_name"]]["path"]
    assert f"\n- **Selected**: {again['selected_reason']}\n" in again["table_md"]


def test_nothing_enabled_builds_nothing(tiny, tmp_path):
    ref, data = tiny
    res = c.compress(ref.path, str(tmp_path / "o"), Cfg(enabled=True), data.eval_path, MAX_LEN, None)
    assert res["variants"] == [] and res["selected"] is None and not (tmp_path / "o").exists()


def test_onnx_source_must_be_built(tiny, tmp_path):
    ref, data = tiny
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="onnx_source 'distilled' needs compression.distill"):
        Cfg(enabled=True, export_onnx=True, onnx_source="distilled")  # refused where the config is built
    cfg = Cfg.model_construct(
        **(Cfg().model_dump() | {"enabled": True, "export_onnx": True, "onnx_source": "distilled"})
    )
    with pytest.raises(c.CompressionError, match="onnx_source"):  # and again at run time if bypassed
        c.compress(ref.path, str(tmp_path / "o"), cfg, data.eval_path, MAX_LEN, None)


@pytest.mark.slow
def test_real_smollm2_blockwise_int8_onnx_keeps_quality(tmp_path):
    """The edge bundle of the real 135M model: block-wise int8 ONNX stays within +2% perplexity at <= 0.30 of the
    Linear bytes (speed is machine-dependent and not gated here; see bench/bench_compression.py)."""
    from tasks.data import prepare_data

    model = resolve_model("smollm2", tmp_path / "state")
    data = prepare_data(ROOT / "data/sample/shakespeare.jsonl", tmp_path / "state", 0.1)
    cfg = Cfg(
        enabled=True,
        export_onnx=True,
        onnx_int8=True,
        max_perplexity_increase=0.02,
        min_speedup=0.1,
        bench_rounds=3,
        max_eval_records=16,
    )
    res = c.compress(model.path, str(tmp_path / "out"), cfg, data.eval_path, 64, [data.train_path, data.eval_path])
    by = {v["name"]: v for v in res["variants"]}
    q = by["onnx-int8"]
    assert q["passed"], q["reason"]
    assert q["ppl_delta"] <= 0.02 and q["linear_bytes_ratio"] <= 0.30
    assert abs(by["onnx"]["ppl_delta"]) < 1e-3
    assert res["edge"] is not None


def test_edge_is_chosen_on_size_first_and_noise_widens_the_tie_band():
    """The issue: int8 measured > 5% slower in one noisy timing and the 543 MB fp32 ONNX shipped to the edge."""
    vs = [_v("onnx", 1.60, 542.1), _v("onnx-int8", 1.45, 237.4), _v("int8-weight-only", 1.2, 200, "torchao")]
    edge = c.choose_edge(vs)
    assert edge.variant["name"] == "onnx-int8" and "size first" in edge.reason
    assert c.choose_edge([_v("onnx", 1.6, 542.1), _v("onnx-int8", 0.9, 237.4, passed=False)]).variant["name"] == "onnx"
    assert c.choose_edge([_v("x", 1.0, 1, "hf")]).variant is None
    # selection: 9% apart is outside a 5% band, but inside a band widened to a measured 12% spread
    noisy = [dict(v, speedup_spread=0.12) for v in vs]
    assert c.choose(vs, c.noise_band(vs, 0.05)).variant["name"] == "onnx"
    assert c.noise_band(noisy, 0.05) == pytest.approx(0.12)
    assert c.choose(noisy, c.noise_band(noisy, 0.05)).variant["name"] == "onnx-int8"
    assert c.noise_band([dict(v, speedup_spread=3.0) for v in vs], 0.05) == 0.25  # capped


def test_serving_onnx_engine_streams_what_torch_streams_through_the_cache(bundles, tiny):
    """`llmops serve --engine onnx` uses the KV decoder: same greedy text and held-out loss as the torch engine."""
    from llmops.serving.engine import OnnxEngine, TorchEngine, load_engine, pick_engine

    onnx_eng, torch_eng = OnnxEngine(bundles["fp32"]), TorchEngine(Path(tiny[0].path))
    assert pick_engine(bundles["fp32"], "auto") == "onnx" and isinstance(load_engine(bundles["fp32"]), OnnxEngine)
    ids = onnx_eng.encode(TEXTS[0])
    a, b = list(onnx_eng.stream(ids, 16)), list(torch_eng.stream(ids, 16))
    assert a == b and a[-1][1] in ("stop", "length")
    assert onnx_eng.loss(TEXTS) == pytest.approx(torch_eng.loss(TEXTS), rel=1e-4)
    seeded = [list(onnx_eng.stream(ids, 8, temperature=0.8, top_p=0.9, seed=3)) for _ in range(2)]
    assert seeded[0] == seeded[1]  # a fixed seed is deterministic (the response cache relies on it)
    assert onnx_eng.max_positions == 64


def test_mixed_bundle_is_built_gated_and_its_sensitivity_text_must_be_public(tiny, tmp_path):
    ref, data = tiny
    cfg = Cfg(enabled=True, export_onnx=True, onnx_int8=False, onnx_mixed=True, onnx_sensitivity_data=data.train_path)
    with pytest.raises(PrivacyError):  # the bit choice would read private records: refused before any work
        c.compress(ref.path, str(tmp_path / "x"), cfg, data.eval_path, MAX_LEN, [data.train_path, data.eval_path])
    assert not (tmp_path / "x").exists()
    cfg = Cfg(
        enabled=True,
        export_onnx=True,
        onnx_int8=False,
        onnx_mixed=True,
        onnx_mixed_max_size=0.3,
        max_perplexity_increase=10.0,
        min_speedup=0.01,
        min_top1_agreement=0.0,
        bench_rounds=3,
        max_eval_records=4,
        bench_threads=1,
    )
    res = c.compress(ref.path, str(tmp_path / "o"), cfg, data.eval_path, MAX_LEN, [data.train_path, data.eval_path])
    mixed = {v["name"]: v for v in res["variants"]}["onnx-mixed"]
    assert mixed["passed"], mixed["reason"]
    meta = c.read_meta(Path(mixed["path"]))
    assert meta["bits"] == "int4/int8" and meta["plan"][c.LM_HEAD] == 8 and meta["nodes_by_bits"]["int4"] >= 1
    assert meta["sensitivity_on"].startswith("text sampled from the model")
    assert meta["weight_bytes"] <= meta["budget_bytes"]
    assert 0 <= mixed["top1_agreement"] <= 1 and mixed["decode_tokens_per_s"] > 0
    assert res["edge_name"] == "onnx-mixed"  # the smallest passing ONNX variant


def test_onnxruntime_genai_runs_the_int8_bundle_greedy_like_our_runner(bundles):
    """The bundle is an onnxruntime-genai model folder too: its C++ loop gives the same greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")

    from llmops.edge_runner import EdgeModel

    d = bundles["int8"]
    ids = bundles["tok"](TEXTS[1], add_special_tokens=False)["input_ids"][:12]
    m = og.Model(str(d))
    p = og.GeneratorParams(m)
    p.set_search_options(max_length=len(ids) + 10, min_length=len(ids) + 10)
    g = og.Generator(m, p)
    g.append_tokens(ids)
    while not g.is_done():
        g.generate_next_token()
    theirs = [int(t) for t in g.get_sequence(0)][len(ids) :]
    assert theirs == EdgeModel(d).greedy(ids, 10)
