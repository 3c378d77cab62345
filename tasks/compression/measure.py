"""Measurement: every variant reloaded from disk (hf / torchao / onnx) and run next to the original on the same
inputs: size on disk, parameters, held-out perplexity, CPU tokens/s and latency p50/p95, and the comparison table."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.compression.common import count_params, linear_sparsity, linear_weight_bytes, read_meta
from tasks.compression.onnx import ONNX_FILE, kv_logits, onnx_matmul_weight_bytes
from tasks.compression.quantization import load_quantized
from tasks.model import disk_bytes


@dataclass
class Loaded:
    """A variant ready to run: `logits(input_ids, attention_mask)` whatever its format."""

    logits: Callable
    tok: Any
    params: int
    linear_bytes: int | None = None
    sparsity: float | None = None
    decode: Callable | None = None  # decode(ids, n) -> seconds for n greedy tokens after the prompt (KV cache)


def load_variant(path: str | Path) -> Loaded:
    """Reload any variant from disk by its compression.json (hf / torchao / onnx)."""
    import torch

    from tasks.model import load_model, load_tokenizer

    path = Path(path)
    meta = read_meta(path)
    if meta["format"] == "onnx":
        from llmops.edge_runner import EdgeModel

        em = EdgeModel(path, torch.get_num_threads())  # the same thread count as the torch rows

        def onnx_decode(ids, n):
            t0 = time.perf_counter()
            em.greedy(ids, n)
            return time.perf_counter() - t0

        return Loaded(
            lambda ids, am: kv_logits(em, ids, am),
            load_tokenizer(path),
            meta.get("params"),
            onnx_matmul_weight_bytes(path / ONNX_FILE),
            decode=onnx_decode,
        )
    if meta["format"] == "torchao":
        model, tok = load_quantized(path, meta["quantize"])
    else:
        model, tok = load_model(path)
    model.eval()

    def run(ids, am):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=am, use_cache=False).logits

    def torch_decode(ids, n):
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            for _ in range(n - 1):
                nxt = out.logits[:, -1:].argmax(-1)
                out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            return time.perf_counter() - t0

    run.model = model  # for callers that want the module (tests)
    sparsity = linear_sparsity(model)
    return Loaded(
        run,
        tok,
        count_params(model),
        linear_weight_bytes(model),
        None if sparsity is None else round(sparsity, 4),
        decode=torch_decode,
    )


def perplexity(runner: Loaded, texts: list[str], max_len: int, batch_size: int = 8, ref_top=None) -> dict:
    """Held-out loss/perplexity; `top` = each real position's top token (teacher-forced), and with `ref_top` (the
    original's) the agreement with it: near ties flip under any quantization, so this is the gate, not greedy text."""
    import torch

    from tasks.lm import encode, logits_nll

    total, count, tops = 0.0, 0, []
    for i in range(0, len(texts), batch_size):
        b = encode(runner.tok, texts[i : i + batch_size], max_len)
        logits = runner.logits(b["input_ids"], b["attention_mask"])
        nll, n = logits_nll(logits, b["input_ids"], b["attention_mask"])
        total, count = total + nll, count + n
        tops.append(logits.argmax(-1)[b["attention_mask"].bool()])
    loss = total / max(count, 1)
    top = torch.cat(tops) if tops else torch.zeros(0, dtype=torch.long)
    out = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count, "top": top}
    if ref_top is not None:
        out["top1_agreement"] = round(float((top == ref_top).float().mean()) if len(top) else 1.0, 4)
    return out


def timing_input(tok, texts: list[str], max_len: int) -> dict:
    """One batch-1 sequence of exactly max_len real tokens (no padding): the unit all variants are timed on."""
    import torch

    ids = tok("\n\n".join(texts), return_tensors="pt")["input_ids"][:, :max_len]
    while ids.shape[1] < max_len:  # short eval text: repeat it
        ids = torch.cat([ids, ids], 1)[:, :max_len]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def time_variants(runners: dict[str, Loaded], batch: dict, rounds: int, decode_tokens: int = 32) -> dict[str, dict]:
    """Per variant, interleaved round by round so machine noise hits every variant alike: one batch-1 forward of
    the timing sequence (prefill latency) and one greedy decode of `decode_tokens` after its first 32 tokens (the
    KV-cache path generation runs). The speed-up is the median of per-round paired decode ratios to the original."""
    from tqdm.auto import tqdm

    prompt = batch["input_ids"][0, :32].tolist()
    for r in runners.values():  # warm-up: allocator, ORT graph, lazy inits
        for _ in range(2):
            r.logits(batch["input_ids"], batch["attention_mask"])
        if r.decode is not None:
            r.decode(prompt, 4)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    decodes: dict[str, list[float]] = {name: [] for name in runners}
    for _ in tqdm(range(rounds), desc="timing", unit="round", dynamic_ncols=True):
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.logits(batch["input_ids"], batch["attention_mask"])
            samples[name].append(time.perf_counter() - t0)
            if r.decode is not None:
                decodes[name].append(r.decode(prompt, decode_tokens))
    n_tok = batch["input_ids"].numel()
    out = {}
    base = decodes.get("original") or samples.get("original")
    for name, s in samples.items():
        mine = decodes[name] or s
        if base is not None and len(mine) == len(base):  # paired by round: a load spike slows both sides alike
            ratios = sorted(b / x for b, x in zip(base, mine))
            med = statistics.median(ratios)
            q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
            paired = {"speedup_paired": round(med, 3), "speedup_spread": round((q3 - q1) / med, 3) if med else 0.0}
        else:
            paired = {}
        s = sorted(s)
        p50 = statistics.median(s)
        p95 = s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]
        out[name] = {
            "latency_ms_p50": round(1000 * p50, 2),
            "latency_ms_p95": round(1000 * p95, 2),
            "tokens_per_s": round(n_tok / p50, 1),
            **(
                {"decode_tokens_per_s": round(decode_tokens / statistics.median(decodes[name]), 1)}
                if decodes[name]
                else {}
            ),
            **paired,
        }
    return out


def measure(model_path: str, variants: list[dict], texts: list[str], max_len: int, cfg) -> dict:
    """Run the original and every built variant (reloaded from disk) on the same text.

    Updates each built entry of `variants` in place with its measurements and returns {"baseline", "variants",
    "note"}; gating and the pick are the pipeline's (`tasks.compression.decide`)."""
    import torch

    threads = cfg.bench_threads
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))  # ORT sessions created below take the same count
    try:
        return _measure(model_path, variants, texts, max_len, cfg)
    finally:
        torch.set_num_threads(before)


def _measure(model_path: str, variants: list[dict], texts: list[str], max_len: int, cfg) -> dict:
    from tqdm.auto import tqdm

    base_entry = {"name": "original", "path": str(model_path), "technique": "none", "format": "hf"}
    todo = [base_entry, *[v for v in variants if v.get("built", True)]]
    runners: dict[str, Loaded] = {}
    ref_top = None
    for v in tqdm(todo, desc="reload + perplexity", unit="variant", dynamic_ncols=True):
        runners[v["name"]] = r = load_variant(v["path"])
        v.setdefault("format", read_meta(v["path"])["format"])
        scored = perplexity(r, texts, max_len, ref_top=ref_top)
        top = scored.pop("top")
        ref_top = top if ref_top is None else ref_top  # the original is scored first
        v.update(scored, params=r.params, size_bytes=disk_bytes(v["path"]), sparsity=r.sparsity)
        if r.linear_bytes is not None:
            v["linear_bytes"] = r.linear_bytes
    batch = timing_input(runners["original"].tok, texts, max_len)
    timing = time_variants(runners, batch, cfg.bench_rounds, cfg.bench_decode_tokens)
    base = base_entry
    base.update(
        timing["original"],
        speedup=1.0,
        size_ratio=1.0,
        ppl_delta=0.0,
        top1_agreement=1.0,
        linear_bytes_ratio=1.0,
        size_mb=round(base["size_bytes"] / 1e6, 1),
    )
    for v in variants:
        if not v.get("built", True):
            continue
        v.update(timing[v["name"]])
        # the median of per-round paired ratios (same round, same load), not a ratio of two medians
        v["speedup"] = v.get("speedup_paired") or round(
            v.get("decode_tokens_per_s", v["tokens_per_s"]) / base.get("decode_tokens_per_s", base["tokens_per_s"]), 3
        )
        v["size_mb"] = round(v["size_bytes"] / 1e6, 1)
        v["size_ratio"] = round(v["size_bytes"] / base["size_bytes"], 3)
        v["ppl_delta"] = v["perplexity"] / base["perplexity"] - 1
        if "linear_bytes" in v:
            v["linear_bytes_ratio"] = round(v["linear_bytes"] / base["linear_bytes"], 4)
    note = (
        f"Measured by running each variant reloaded from disk: perplexity on {len(texts)} held-out records "
        f"(max_len {max_len}); top-1 = teacher-forced agreement with the original's top token on that text; "
        f"decode tokens/s = {cfg.bench_decode_tokens} greedy tokens after a 32-token prompt with the KV cache "
        f"(median; speed-up = median of paired per-round decode ratios to the original); latency = one forward "
        f"(prefill) of a batch-1, {max_len}-token sequence; {cfg.bench_rounds} interleaved rounds, "
        f"{torch_threads()} CPU thread(s); prefill tokens/s = {max_len} / p50."
    )
    return {"baseline": base, "variants": variants, "note": note}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


COLUMNS = [
    ("variant", "name"),
    ("format", "format"),
    ("size MB", "size_mb"),
    ("size x", "size_ratio"),
    ("params", "params"),
    ("sparsity", "sparsity"),
    ("Linear bytes x", "linear_bytes_ratio"),
    ("perplexity", "perplexity"),
    ("ppl delta", "ppl_delta"),
    ("top-1", "top1_agreement"),
    ("decode tok/s", "decode_tokens_per_s"),
    ("speed-up", "speedup"),
    ("prefill tok/s", "tokens_per_s"),
    ("p50 ms", "latency_ms_p50"),
    ("p95 ms", "latency_ms_p95"),
    ("gate", "gate"),
]


def table_rows(baseline: dict, variants: list[dict]) -> list[dict]:
    rows = []
    for v in [baseline, *variants]:
        row = {}
        for head, key in COLUMNS:
            val = v.get(key)
            if key == "gate":
                val = "reference" if v is baseline else ("PASS" if v["passed"] else "FAIL")
            elif key == "ppl_delta" and val is not None:
                val = f"{val:+.2%}"
            elif key == "sparsity" and val is not None:
                val = f"{val:.1%}"
            elif isinstance(val, float):
                val = round(val, 3)
            row[head] = "-" if val is None else val
        rows.append(row)
    return rows


def table_markdown(rows: list[dict], variants: list[dict], note: str = "", picks: list[str] = ()) -> str:
    heads = [h for h, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(str(r[h]) for h in heads) + " |" for r in rows]
    lines += ["", *(f"- **{v['name']}**: {'passed' if v['passed'] else 'FAILED'}: {v['reason']}" for v in variants)]
    lines += ["", *picks] if picks else []
    return "\n".join(lines + ([f"\n{note}"] if note else [])) + "\n"
