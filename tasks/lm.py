"""Causal-LM helpers shared by training and evaluation: tokenising to fixed blocks and per-sample loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def encode(tok, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    """Right-padded, truncated token blocks; padding is masked out of the loss by `attention_mask`."""
    enc = tok(
        [t + (tok.eos_token or "") for t in texts],
        max_length=max_len,
        truncation=True,
        padding="max_length",
        return_tensors="pt",
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def per_sample_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL per sequence, shape (B,). DP needs per-sample losses (ghost clipping reduces these)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = input_ids[:, 1:]
    mask = attention_mask[:, 1:].to(logits.dtype)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), reduction="none")
    nll = nll.view(targets.shape) * mask
    return nll.sum(1) / mask.sum(1).clamp(min=1)


def token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """(summed NLL, number of predicted tokens) for token-weighted perplexity."""
    return logits_nll(model(input_ids=input_ids, attention_mask=attention_mask).logits, input_ids, attention_mask)


def logits_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """`token_nll` from logits already computed (by any runtime: torch, torchao, onnxruntime)."""
    mask = attention_mask[:, 1:].bool()
    nll = F.cross_entropy(logits[:, :-1][mask].float(), input_ids[:, 1:][mask], reduction="sum")
    return float(nll.detach()), int(mask.sum())
