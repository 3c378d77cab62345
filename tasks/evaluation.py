"""Held-out evaluation: token-weighted loss and perplexity on the eval split.

Later steps (gate vs production, generations, latency) build on `heldout_loss`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from prefect import task

from tasks.data import read_texts


def heldout_loss(model_path: str, eval_path: str, max_records: int = 64, max_len: int = 128,
                 batch_size: int = 8, dtype: str = "float32") -> dict:
    import torch

    from tasks.lm import encode, token_nll
    from tasks.model import load_model

    model, tok = load_model(model_path, dtype)
    model.eval()
    texts = read_texts(Path(eval_path))[:max_records]
    total, count = 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            batch = encode(tok, texts[i:i + batch_size], max_len)
            nll, n = token_nll(model, **batch)
            total, count = total + nll, count + n
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count,
            "eval_records": len(texts), "eval_seconds": round(time.perf_counter() - start, 2)}


@task(name="evaluate-heldout", persist_result=False)
def evaluate_task(model_path: str, eval_path: str, max_records: int, max_len: int, dtype: str) -> dict:
    return heldout_loss(model_path, eval_path, max_records, max_len, dtype=dtype)
