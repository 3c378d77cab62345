"""What every compression technique shares: the variant directory (atomic build, `compression.json`), the model
anatomy (which Linears are compressible, decoder layers, rebuild from a state dict) and size/sparsity counts."""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmops.errors import LLMOpsError

META = "compression.json"  # in every variant dir: what it is and how to reload it
log = logging.getLogger("llmops.compression")


class CompressionError(LLMOpsError):
    """A compression step cannot run as configured."""


# ------------------------------------------------------------------------------------------------ small helpers


@contextmanager
def atomic_dir(final: Path):
    """Yield a fresh tmp dir next to `final`; on success it replaces `final` by rename, on error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        old = final.parent / f".{final.name}.old-{tag}"
        if final.exists():
            final.rename(old)  # readers see the old variant or the new one, never a mix
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_meta(path: Path, **meta) -> None:
    (path / META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(path: str | Path) -> dict:
    p = Path(path) / META
    return json.loads(p.read_text()) if p.is_file() else {"format": "hf", "technique": "none"}


def tensor_bytes(t) -> int:
    """Storage bytes of a tensor, looking inside torchao tensor subclasses (int8 data + scales)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _output_head_is_tied(model) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and emb is not None and out.weight is emb.weight


def compressible_linears(model, conv1d: bool = True) -> dict[str, Any]:
    """Linear layers (+ GPT-2 Conv1D unless conv1d=False) outside a tied output head (that is the embedding)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    kinds = (torch.nn.Linear, Conv1D) if conv1d else (torch.nn.Linear,)
    tied = _output_head_is_tied(model)
    head = model.get_output_embeddings()
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, kinds) and not (tied and mod is head)}


def linear_weight_bytes(model) -> int:
    return sum(tensor_bytes(m.weight) for m in compressible_linears(model).values())


def count_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():  # tied weights counted once
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def linear_sparsity(model) -> float | None:
    zeros = total = 0
    for m in compressible_linears(model).values():
        w = m.weight
        if hasattr(w, "__tensor_flatten__"):
            return None  # quantized: zeros are not the point
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def decoder_layers(model) -> tuple[str, Any]:
    """(state-dict prefix, ModuleList) of the transformer blocks: Llama-style `model.layers` or GPT-2 `transformer.h`."""
    for prefix in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in prefix.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return prefix, obj
    raise CompressionError(
        f"unsupported architecture {type(model).__name__}: no decoder layer list found",
        "compression",
        "use a Llama- or GPT-2-style causal LM, or disable this technique",
    )


def rebuild(config, state_dict: dict):
    """A model of `config` carrying `state_dict` (shapes must match): how pruned/distilled models get smaller."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # parameters on meta, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def save_hf(model, tok, out: Path, **meta) -> None:
    model.save_pretrained(out)
    tok.save_pretrained(out)
    write_meta(out, format="hf", **meta)
