"""Evaluation and the release gate.

`evaluate_model` scores a model dir on the held-out split (token-weighted loss/perplexity), generates from fixed
prompts (greedy, so reruns are comparable), and measures size and generation latency.
`should_promote` is a pure decision: candidate vs the model under alias `production`, under a `GatePolicy`.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

from tasks.data import read_texts


def heldout_loss(
    model_path: str,
    eval_path: str,
    max_records: int = 64,
    max_len: int = 128,
    batch_size: int = 8,
    dtype: str = "float32",
    model=None,
    tok=None,
) -> dict:
    import torch

    from tasks.lm import encode, token_nll
    from tasks.model import load_model

    if model is None:
        model, tok = load_model(model_path, dtype)
    model.eval()
    texts = read_texts(Path(eval_path))[:max_records]
    total, count = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = encode(tok, texts[i : i + batch_size], max_len)
            nll, n = token_nll(model, **batch)
            total, count = total + nll, count + n
    loss = total / max(count, 1)
    return {
        "eval_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "eval_tokens": count,
        "eval_records": len(texts),
        "eval_seconds": round(time.perf_counter() - start, 2),
    }


def generate(model, tok, prompts: list[str], max_new_tokens: int) -> tuple[list[dict], list[float]]:
    """Greedy generations and per-token latency (seconds) for each prompt."""
    import torch

    outs, per_token = [], []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")
        t0 = time.perf_counter()
        with torch.no_grad():
            gen = model.generate(
                **ids,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        new = gen[0, ids["input_ids"].shape[1] :]
        per_token.append((time.perf_counter() - t0) / max(len(new), 1))
        outs.append({"prompt": prompt, "completion": tok.decode(new, skip_special_tokens=True)})
    return outs, per_token


def public_eval_split(path: str | Path, out_dir: str | Path, private_paths: list[str]) -> str:
    """`evaluation.public_eval_path` as a held-out file the evaluators read, refused if any record of it (by
    normalised identity) is one of `private_paths`' records or in the privacy ledger: a "public" eval set that
    holds private records would release metrics computed on them outside the mechanism."""
    from llmops.errors import PrivacyError
    from tasks.data import load_dataset, write_jsonl
    from tasks.privacy import count_private

    ds = load_dataset(Path(path))
    if overlap := count_private([r.text for r in ds.records], private_paths):
        raise PrivacyError(
            f"{overlap} record(s) of the public evaluation data are private training/held-out records",
            f"evaluation.public_eval_path={path}",
            "use text that was never part of any training set (or unset public_eval_path)",
        )
    return str(write_jsonl(ds.records, Path(out_dir) / f"public-eval-{ds.fingerprint[:16]}.jsonl"))


class EvalResult(TypedDict, total=False):
    """What `evaluate_model` measures of one model on one held-out split (`evaluate-production` adds `version`)."""

    eval_loss: float  # mean token cross-entropy
    perplexity: float
    eval_tokens: int
    eval_records: int
    eval_seconds: float
    size_bytes: int  # on disk
    params: int
    latency_ms_per_token_p50: float | None
    generations: list  # greedy continuations of the configured prompts
    version: str  # the registered version, for the production model only


def evaluate_model(
    model_path: str,
    eval_path: str,
    prompts: list[str],
    max_records: int = 64,
    max_len: int = 128,
    max_new_tokens: int = 32,
    dtype: str = "float32",
) -> EvalResult:
    from tasks.model import disk_bytes, load_model

    model, tok = load_model(model_path, dtype)
    out = heldout_loss(model_path, eval_path, max_records, max_len, model=model, tok=tok)
    generations, latency = generate(model, tok, prompts, max_new_tokens)
    out["size_bytes"] = disk_bytes(model_path)
    out["params"] = sum(p.numel() for p in model.parameters())
    out["latency_ms_per_token_p50"] = 1000 * statistics.median(latency) if latency else None
    out["generations"] = generations
    return out


@dataclass(frozen=True)
class GatePolicy:
    max_loss_increase: float = 0.0  # nats the candidate may lose vs production on the same held-out split
    max_latency_ratio: float | None = None  # e.g. 1.5 = at most 50% slower per token than production
    require_private: bool = True  # a non-private model is never a release candidate


@dataclass(frozen=True)
class Decision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    compared_with: str | None = None

    def summary(self) -> str:
        return ("passed" if self.passed else "failed") + (": " + "; ".join(self.reasons) if self.reasons else "")


def should_promote(
    candidate: dict,
    incumbent: dict | None,
    policy: GatePolicy,
    privacy: dict | None = None,
    incumbent_name: str | None = None,
) -> Decision:
    """Pure: decide whether `candidate` may become the release candidate. Every reason is stated."""
    from llmops.governance.accounting import guarantee_problems

    reasons: list[str] = []
    ok = True
    privacy = privacy or {}
    problems = guarantee_problems(privacy)
    if privacy.get("reproducible_insecure"):  # no policy knob loosens this: its batches and noise are predictable
        ok = False
        reasons.append("reproducible_insecure: seeded batches/noise, never a release candidate")
    elif policy.require_private and problems:
        ok = False
        reasons.append(
            "model was trained without differential privacy"
            if not privacy.get("dp_sgd", privacy.get("private"))
            else "no privacy guarantee: " + "; ".join(problems)
        )
    if not math.isfinite(candidate["eval_loss"]):
        return Decision(False, reasons + ["candidate eval loss is not finite"], incumbent_name)
    if incumbent is None:
        reasons.append("no production model yet: candidate accepted on its own evaluation")
        return Decision(ok, reasons, None)
    delta = candidate["eval_loss"] - incumbent["eval_loss"]
    if delta > policy.max_loss_increase:
        ok = False
        reasons.append(
            f"held-out loss {candidate['eval_loss']:.4f} is {delta:+.4f} nats vs production "
            f"{incumbent['eval_loss']:.4f} (allowed +{policy.max_loss_increase:g})"
        )
    else:
        reasons.append(
            f"held-out loss {candidate['eval_loss']:.4f} vs production {incumbent['eval_loss']:.4f} "
            f"({delta:+.4f} nats, allowed +{policy.max_loss_increase:g})"
        )
    c_lat, i_lat = candidate.get("latency_ms_per_token_p50"), incumbent.get("latency_ms_per_token_p50")
    if policy.max_latency_ratio and c_lat and i_lat and c_lat / i_lat > policy.max_latency_ratio:
        ok = False
        reasons.append(
            f"latency {c_lat:.1f} ms/token is {c_lat / i_lat:.2f}x production (allowed {policy.max_latency_ratio:g}x)"
        )
    return Decision(ok, reasons, incumbent_name)


def decision_dict(d: Decision) -> dict:
    return asdict(d) | {"summary": d.summary()}
