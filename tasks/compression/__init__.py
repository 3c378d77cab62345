"""Compression, measured: pruning, int8 quantization, distillation and ONNX edge export of the fine-tuned model.

    .venv/bin/python bench/bench_compression.py       # the comparison table on SmolLM2-135M (CPU)

`compress` reads an HF-format model dir and writes one directory per variant under `out_dir` (each built in a
hidden tmp dir and renamed, so a failure never leaves a half variant). Every variant is then *reloaded from disk*
and run next to the original on the same inputs: size on disk, parameters, held-out perplexity, CPU tokens/s and
latency p50/p95. Quality gates (max perplexity increase, min speed-up) decide which variants may be passed on; a
failing one says why. The best passing variant is `selected`.

Variants (each selectable in `compression.*`):
  pruned-<method>   magnitude_global / magnitude_layer: unstructured L1, made permanent (zeros stay dense, so no
                    speed-up without a sparse kernel); mlp_channels: structured, drops whole MLP channels so the
                    matmuls shrink. Weight magnitudes only: post-processing, no data read.
  int8-weight-only  torchao `quantize_(Int8WeightOnlyConfig())`; int8-dynamic: `Int8DynamicActivationInt8WeightConfig`
                    (activations quantized per token at run time: no calibration data). Saved as a state dict of
                    torchao tensors (+ config) and reloaded by re-applying the same config (`load_variant`).
  distilled         fewer layers, initialised from evenly spaced teacher layers, trained on the teacher's logits
                    (temperature-scaled KL + CE) on `compression.distill_data`, which must be public.
  onnx / onnx-int8  torch.onnx (dynamo) export of an fp32 variant, checked against torch with onnxruntime. The int8
                    copy is, by default, onnxruntime's block-wise int8 (`MatMulNBits`, 8 bits, symmetric, one fp32
                    scale per `onnx_int8_block_size` input channels, accuracy level 4 = int8 compute with activations
                    quantized per block at run time). `onnx_int8_method: dynamic` is the older per-tensor
                    `quantize_dynamic`; on SmolLM2 its activation outliers cost ~+75% perplexity, so it is gated out.

Privacy: pruning, weight-only int8 and dynamic int8 are post-processing of the DP model and cost no epsilon; none of
the techniques here uses calibration data. Distillation reads text, so it is refused (PrivacyError) when any record of
that text (by normalised identity) is a private training/held-out record or in the privacy ledger — distill on public
text instead.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import statistics
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llmops.errors import LLMOpsError
from llmops.files import write_text_atomic
from tasks.model import WEIGHT_SUFFIXES, disk_bytes

META = "compression.json"  # in every variant dir: what it is and how to reload it
QUANT_FILE = "model_int8.pt"
ONNX_FILE = "model.onnx"
ONNX_RTOL = ONNX_ATOL = 1e-3  # fp32 ONNX vs torch: |onnx - torch| <= atol + rtol*|torch| on every unpadded logit
ONNX_INT8_MAX_REL_ERR = 0.25  # int8 ONNX: RMS(onnx - torch) / std(torch logits); quality is gated by perplexity

ONNX_SOURCE_KIND = {"pruned": "prune", "distilled": "distill"}  # compression.onnx_source -> the variant it exports
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
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, kinds) and not (tied and mod is head)}


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
    raise CompressionError(f"unsupported architecture {type(model).__name__}: no decoder layer list found",
                           "compression", "use a Llama- or GPT-2-style causal LM, or disable this technique")


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


# ------------------------------------------------------------------------------------------------------ pruning


def prune_magnitude(model, sparsity: float, scope: str = "global") -> float:
    """Zero the smallest-|w| fraction of the block Linear weights (one global threshold, or per layer); permanent."""
    import torch
    from torch.nn.utils import prune

    mods = list(compressible_linears(model).values())
    if scope == "global":
        prune.global_unstructured([(m, "weight") for m in mods], pruning_method=prune.L1Unstructured,
                                  amount=sparsity)
    else:
        for m in mods:
            prune.l1_unstructured(m, "weight", amount=sparsity)
    for m in mods:
        prune.remove(m, "weight")  # fold the mask into the weight: no weight_orig/mask left behind
    with torch.no_grad():
        return linear_sparsity(model)


def _mlp_kind(layer) -> str:
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "gated"
    if mlp is not None and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
        return "gpt2"
    raise CompressionError(f"MLP of {type(layer).__name__} is neither Llama-style nor GPT-2-style",
                           "compression.prune_method", "use magnitude_global or magnitude_layer for this model")


def prune_mlp_channels(model, sparsity: float):
    """Structured: keep the top (1-sparsity) MLP channels per block by weight norm; returns a *smaller* model.

    Channel j's importance = |w_in_j| * |w_out_j| (gate*up*down norms for gated MLPs). Every block keeps the same
    count (HF configs hold one intermediate size), rounded down to a multiple of 8 for the matmul kernels.
    """
    import copy

    import torch

    prefix, layers = decoder_layers(model)
    kind = _mlp_kind(layers[0])
    cfg = copy.deepcopy(model.config)
    inter = layers[0].mlp.up_proj.out_features if kind == "gated" else layers[0].mlp.c_fc.weight.shape[1]
    keep = max(1, round(inter * (1 - sparsity)))
    keep = keep - keep % 8 if keep >= 8 else keep
    sd = model.state_dict()
    with torch.no_grad():
        for i, layer in enumerate(layers):
            p = f"{prefix}.{i}.mlp."
            mlp = layer.mlp
            if kind == "gated":
                score = mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
                idx = score.topk(keep).indices.sort().values
                for n in ("gate_proj", "up_proj"):
                    sd[p + n + ".weight"] = sd[p + n + ".weight"][idx].clone()
                    if p + n + ".bias" in sd:
                        sd[p + n + ".bias"] = sd[p + n + ".bias"][idx].clone()
                sd[p + "down_proj.weight"] = sd[p + "down_proj.weight"][:, idx].clone()
            else:  # GPT-2 Conv1D stores weights as (in, out)
                score = mlp.c_fc.weight.norm(dim=0) * mlp.c_proj.weight.norm(dim=1)
                idx = score.topk(keep).indices.sort().values
                sd[p + "c_fc.weight"] = sd[p + "c_fc.weight"][:, idx].clone()
                sd[p + "c_fc.bias"] = sd[p + "c_fc.bias"][idx].clone()
                sd[p + "c_proj.weight"] = sd[p + "c_proj.weight"][idx].clone()
    if kind == "gated":
        cfg.intermediate_size = keep
    else:
        cfg.n_inner = keep
    return rebuild(cfg, sd), 1 - keep / inter


def build_pruned(model, tok, out: Path, sparsity: float, method: str) -> dict:
    import copy

    if method == "mlp_channels":
        pruned, achieved = prune_mlp_channels(model, sparsity)
        note = f"MLP channels kept {1 - achieved:.0%} per block (smaller matmuls)"
    else:
        pruned = copy.deepcopy(model)
        achieved = prune_magnitude(pruned, sparsity, "global" if method == "magnitude_global" else "layer")
        note = f"{achieved:.1%} of block Linear weights are zero (dense storage)"
    key = "mlp_channels_removed" if method == "mlp_channels" else "weight_sparsity"
    save_hf(pruned, tok, out, technique="prune", method=method, requested_sparsity=sparsity, **{key: round(achieved, 4)})
    return {key: round(achieved, 4), "note": note}


# ------------------------------------------------------------------------------------------------- quantization

QUANT_MODES = ("int8_weight_only", "int8_dynamic")


def _quiet_torchao() -> None:
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it warns about CUDA-only kernels on every import
    logging.getLogger("torchao.kernel.intmm").setLevel(logging.ERROR)


def _torchao_config(mode: str):
    _quiet_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    if mode == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if mode == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    raise CompressionError(f"unknown quantization '{mode}'", "compression.quantize", f"use one of {QUANT_MODES}")


def quantize_int8(model, mode: str) -> list[str]:
    """torchao int8 in place on the block Linears (a tied output head stays fp32: it is the embedding)."""
    _quiet_torchao()
    from torchao.quantization import quantize_

    names = set(compressible_linears(model, conv1d=False))
    if not names:
        raise CompressionError(f"{type(model).__name__} has no nn.Linear layers for torchao to quantize (GPT-2 uses "
                               "Conv1D)", "compression.quantize", "use export_onnx with onnx_int8 for this model")
    quantize_(model, _torchao_config(mode), filter_fn=lambda mod, fqn: fqn in names)
    return sorted(names)


def build_quantized(model, tok, out: Path, mode: str) -> dict:
    import copy

    import torch

    q = copy.deepcopy(model)
    fp32_bytes = linear_weight_bytes(q)
    quantize_int8(q, mode)
    int8_bytes = linear_weight_bytes(q)
    torch.save(q.state_dict(), out / QUANT_FILE)
    q.config.save_pretrained(out)
    tok.save_pretrained(out)
    write_meta(out, format="torchao", technique="quantize", quantize=mode, linear_bytes_fp32=fp32_bytes,
               linear_bytes_int8=int8_bytes)
    return {"linear_bytes_ratio": round(int8_bytes / fp32_bytes, 4)}


def load_quantized(path: Path, mode: str):
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.model import load_tokenizer

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    quantize_int8(model, mode)  # same skeleton as when saved, then the saved int8 tensors are assigned into it
    try:
        state = torch.load(path / QUANT_FILE, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CompressionError(f"cannot load {QUANT_FILE} ({str(e).splitlines()[0]})", str(path),
                               "rebuild the variant (delete the directory and rerun compression)") from None
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval(), load_tokenizer(path)


# ------------------------------------------------------------------------------------------------- distillation


def check_public(data_path: str | Path | None, private_paths: list[str] | None) -> str:
    """Fingerprint of the distillation text; PrivacyError if any of its records is private.

    Record-level, by normalised identity: against this run's train/held-out splits (`private_paths`) and every
    record the deployment's privacy ledger has charged. Whole-dataset fingerprints would accept the private set
    plus one extra line, or a re-ordered, re-spaced copy of it.
    """
    from tasks.data import load_dataset
    from tasks.privacy import PrivacyError, count_private

    if data_path is None:
        raise PrivacyError("distillation needs text and none was declared public", "compression.distill_data",
                           "set compression.distill_data to public text (e.g. data/public/macbeth.txt)")
    ds = load_dataset(Path(data_path))
    if overlap := count_private([r.text for r in ds.records], private_paths or []):
        raise PrivacyError(
            f"{overlap} of {len(ds.records)} distillation record(s) are in the private training set or the privacy "
            "ledger; reading them again would spend privacy budget the ledger has not granted",
            "compression.distill_data",
            "point compression.distill_data at public text (e.g. data/public/macbeth.txt), or disable distillation")
    if not private_paths:
        log.warning("no private splits given: %s checked against the privacy ledger only", data_path)
    return ds.fingerprint


def student_layer_ids(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher blocks, always keeping the first and the last."""
    if not 1 <= n_student <= n_teacher:
        raise CompressionError(f"student_layers={n_student} must be between 1 and the teacher's {n_teacher}",
                               "compression.student_layers", "pick a smaller student depth")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def make_student(teacher, n_layers: int):
    import copy

    prefix, layers = decoder_layers(teacher)
    ids = student_layer_ids(len(layers), n_layers)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = n_layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in ids]
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    sd = {}
    for k, v in teacher.state_dict().items():
        m = pat.match(k)
        if m is None:
            sd[k] = v.clone()
        elif int(m.group(1)) in ids:
            sd[pat.sub(f"{prefix}.{ids.index(int(m.group(1)))}.", k)] = v.clone()
    return rebuild(cfg, sd), ids


def distill_loss(s_logits, t_logits, input_ids, attention_mask, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels), over unpadded next-token positions."""
    import torch.nn.functional as F

    mask = attention_mask[:, 1:].bool()
    s, t = s_logits[:, :-1][mask].float(), t_logits[:, :-1][mask].float()
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature**2
    ce = F.cross_entropy(s, input_ids[:, 1:][mask])
    return alpha * kl + (1 - alpha) * ce, kl.item(), ce.item()


def build_distilled(teacher, tok, out: Path, data_path: Path, max_len: int, cfg) -> dict:
    import random

    import torch
    from tqdm.auto import tqdm

    from tasks.data import load_dataset
    from tasks.lm import encode

    n_teacher = len(decoder_layers(teacher)[1])
    n_student = cfg.student_layers or max(1, n_teacher // 2)
    steps, bs = cfg.distill_steps, cfg.distill_batch_size
    temp, alpha = cfg.distill_temperature, cfg.distill_alpha
    torch.manual_seed(cfg.distill_seed)
    student, ids = make_student(teacher, n_student)
    texts = [r.text for r in load_dataset(data_path).records]
    rng = random.Random(cfg.distill_seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.distill_learning_rate, weight_decay=0.0)
    teacher.eval()
    student.train()
    order: list[str] = []
    last = {}
    for step in tqdm(range(steps), desc="distill", unit="step", dynamic_ncols=True):
        if len(order) < bs:
            order += rng.sample(texts, len(texts))
        batch, order = encode(tok, order[:bs], max_len), order[bs:]
        with torch.no_grad():
            t_logits = teacher(**batch).logits
        loss, kl, ce = distill_loss(student(**batch).logits, t_logits, batch["input_ids"], batch["attention_mask"],
                                    temp, alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        last = {"step": step + 1, "loss": round(loss.item(), 4), "kl": round(kl, 4), "ce": round(ce, 4)}
    student.eval()
    save_hf(student, tok, out, technique="distill", teacher_layers=n_teacher, student_layers=n_student,
            layer_ids=ids, distill_data=str(data_path), steps=steps, final=last)
    return {"student_layers": n_student, "teacher_layers": n_teacher, "distill_final": last}


# --------------------------------------------------------------------------------------------------- ONNX export


def logits_module(model):
    """An HF causal LM as a module (input_ids, attention_mask) -> logits, without a KV cache: what we export."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return LogitsOnly(model).eval()


def ort_session(path: Path):
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()  # same cores as the torch rows: a fair comparison
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_logits(session, input_ids, attention_mask):
    import torch

    out = session.run(["logits"], {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})[0]
    return torch.from_numpy(out)


def compare_logits(onnx_out, torch_out, attention_mask) -> dict:
    import torch

    mask = attention_mask.bool()
    o, t = onnx_out[mask].float(), torch_out[mask].float()
    diff = (o - t).abs()
    return {"max_abs_logit_diff": float(diff.max()),
            "rel_rms_err": float(diff.pow(2).mean().sqrt() / t.std().clamp(min=1e-12)),
            "allclose": bool((diff <= ONNX_ATOL + ONNX_RTOL * t.abs()).all()),
            "top1_agreement": float((o.argmax(-1) == t.argmax(-1)).float().mean())}


def export_onnx(model, tok, out: Path, sample_texts: list[str], max_len: int, source: str) -> dict:
    """fp32 ONNX of `model`; raises CompressionError if onnxruntime's logits differ from torch's beyond tolerance."""
    import torch

    wrapped = logits_module(model)
    batch = encode_for_check(tok, sample_texts, max_len)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000  # protobuf 2 GB cap
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    try:
        torch.onnx.export(wrapped, (batch["input_ids"], batch["attention_mask"]), str(out / ONNX_FILE), dynamo=True,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_shapes={"input_ids": dims, "attention_mask": dims}, external_data=big,
                          optimize=True, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter fails in many ways; the user needs the first line
        raise CompressionError(f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})",
                               str(out), "disable compression.export_onnx or use a Llama/GPT-2 model") from None
    check = verify_onnx(out / ONNX_FILE, wrapped, batch)
    if not check["allclose"]:
        raise CompressionError(f"ONNX logits differ from torch (max |diff| {check['max_abs_logit_diff']:.3g} > "
                               f"atol {ONNX_ATOL} + rtol {ONNX_RTOL})", str(out / ONNX_FILE),
                               "do not ship this export; report the exporter bug")
    tok.save_pretrained(out)
    model.config.save_pretrained(out)
    write_meta(out, format="onnx", technique="onnx", source=source, int8=False, check=check, params=count_params(model),
               tolerance={"atol": ONNX_ATOL, "rtol": ONNX_RTOL})
    return check


def quantize_onnx(src: Path, out: Path, wrapped_torch, tok, sample_texts: list[str], max_len: int,
                  source: str, method: str = "blockwise", block_size: int = 32) -> dict:
    """int8 copy of an fp32 ONNX export; no calibration data is read (weights only + run-time activation scales).

    blockwise: `MatMulNBits` with 8-bit symmetric weights, one scale per `block_size` input channels, accuracy level
    4 (onnxruntime quantizes activations per block and multiplies in int8). dynamic: `quantize_dynamic`, per-channel
    int8 weights and one activation scale per tensor (fast, but outlier activations hurt LLMs).
    """
    if method == "blockwise":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                     MatMulNBitsQuantizer)

        if block_size < 16 or block_size & (block_size - 1):
            raise CompressionError(f"onnx_int8_block_size must be a power of two >= 16, got {block_size}",
                                   "compression.onnx_int8_block_size", "use 32 (accuracy) or 128 (speed)")
        algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8)
        q = MatMulNBitsQuantizer(onnx.load(str(src / ONNX_FILE)), bits=8, block_size=block_size, is_symmetric=True,
                                 accuracy_level=4, algo_config=algo)
        q.process()
        q.model.save_model_to_file(str(out / ONNX_FILE), use_external_data_format=False)
    elif method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src / ONNX_FILE), str(out / ONNX_FILE), weight_type=QuantType.QInt8, per_channel=True)
    else:
        raise CompressionError(f"unknown onnx_int8_method '{method}'", "compression.onnx_int8_method",
                               "use 'blockwise' or 'dynamic'")
    check = verify_onnx(out / ONNX_FILE, wrapped_torch, encode_for_check(tok, sample_texts, max_len))
    if not check["rel_rms_err"] <= ONNX_INT8_MAX_REL_ERR:
        raise CompressionError(f"int8 ONNX logits drift from torch (relative RMS error {check['rel_rms_err']:.3f} > "
                               f"{ONNX_INT8_MAX_REL_ERR})", str(out / ONNX_FILE), "use the fp32 ONNX export")
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != META:
            shutil.copy2(f, out / f.name)  # tokenizer + config
    write_meta(out, format="onnx", technique="onnx", source=source, int8=True, check=check,
               int8_method=method, block_size=block_size if method == "blockwise" else None,
               params=read_meta(src).get("params"),
               tolerance={"max_rel_rms_err": ONNX_INT8_MAX_REL_ERR})
    return check


def onnx_matmul_weight_bytes(onnx_path: Path) -> int:
    """Bytes of the constant weights (+ scales / zero points) that feed the graph's matrix multiplies: the ONNX
    counterpart of `linear_weight_bytes` (a tied output head reads the embedding, which is not counted by either)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    used = {name for n in graph.node if n.op_type in ("MatMul", "Gemm", "MatMulInteger", "MatMulNBits")
            for name in n.input[1:] if name in inits}
    total = 0
    for name in used:
        t = inits[name]
        if t.data_location == onnx.TensorProto.EXTERNAL:
            n = int(np.prod(t.dims)) if t.dims else 1
            total += n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        else:
            total += numpy_helper.to_array(t).nbytes
    return total


def encode_for_check(tok, texts: list[str], max_len: int) -> dict:
    from tasks.lm import encode

    return encode(tok, texts[:4] or ["To be, or not to be"], max_len)


def verify_onnx(onnx_path: Path, wrapped_torch, batch: dict) -> dict:
    import torch

    with torch.no_grad():
        ref = wrapped_torch(batch["input_ids"], batch["attention_mask"])
    got = ort_logits(ort_session(onnx_path), batch["input_ids"], batch["attention_mask"])
    return compare_logits(got, ref, batch["attention_mask"])


# --------------------------------------------------------------------------------------------- load + measure


@dataclass
class Loaded:
    """A variant ready to run: `logits(input_ids, attention_mask)` whatever its format."""

    logits: Callable
    tok: Any
    params: int
    linear_bytes: int | None = None
    sparsity: float | None = None


def load_variant(path: str | Path) -> Loaded:
    """Reload any variant from disk by its compression.json (hf / torchao / onnx)."""
    import torch

    from tasks.model import load_model, load_tokenizer

    path = Path(path)
    meta = read_meta(path)
    if meta["format"] == "onnx":
        session = ort_session(path / ONNX_FILE)
        return Loaded(lambda ids, am: ort_logits(session, ids, am), load_tokenizer(path), meta.get("params"),
                      onnx_matmul_weight_bytes(path / ONNX_FILE))
    if meta["format"] == "torchao":
        model, tok = load_quantized(path, meta["quantize"])
    else:
        model, tok = load_model(path)
    model.eval()

    def run(ids, am):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=am, use_cache=False).logits

    run.model = model  # for callers that want the module (tests)
    sparsity = linear_sparsity(model)
    return Loaded(run, tok, count_params(model), linear_weight_bytes(model),
                  None if sparsity is None else round(sparsity, 4))


def perplexity(runner: Loaded, texts: list[str], max_len: int, batch_size: int = 8) -> dict:
    from tasks.lm import encode, logits_nll

    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        b = encode(runner.tok, texts[i:i + batch_size], max_len)
        nll, n = logits_nll(runner.logits(b["input_ids"], b["attention_mask"]), b["input_ids"], b["attention_mask"])
        total, count = total + nll, count + n
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def timing_input(tok, texts: list[str], max_len: int) -> dict:
    """One batch-1 sequence of exactly max_len real tokens (no padding): the unit all variants are timed on."""
    import torch

    ids = tok("\n\n".join(texts), return_tensors="pt")["input_ids"][:, :max_len]
    while ids.shape[1] < max_len:  # short eval text: repeat it
        ids = torch.cat([ids, ids], 1)[:, :max_len]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def time_variants(runners: dict[str, Loaded], batch: dict, rounds: int) -> dict[str, dict]:
    """Forward latency per variant, interleaved round by round so machine noise hits every variant alike."""
    from tqdm.auto import tqdm

    for r in runners.values():  # warm-up: allocator, ORT graph, lazy inits
        for _ in range(2):
            r.logits(batch["input_ids"], batch["attention_mask"])
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in tqdm(range(rounds), desc="timing", unit="round", dynamic_ncols=True):
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.logits(batch["input_ids"], batch["attention_mask"])
            samples[name].append(time.perf_counter() - t0)
    n_tok = batch["input_ids"].numel()
    out = {}
    for name, s in samples.items():
        s = sorted(s)
        p50 = statistics.median(s)
        p95 = s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]
        out[name] = {"latency_ms_p50": round(1000 * p50, 2), "latency_ms_p95": round(1000 * p95, 2),
                     "tokens_per_s": round(n_tok / p50, 1)}
    return out


# ----------------------------------------------------------------------------------------------- gates + table


def gate(metrics: dict, baseline: dict, max_perplexity_increase: float, min_speedup: float) -> tuple[bool, str]:
    """Pure: does a measured variant pass? Every check is stated, passing or not."""
    reasons, ok = [], True
    ppl, base = metrics["perplexity"], baseline["perplexity"]
    rel = ppl / base - 1
    if not math.isfinite(ppl) or rel > max_perplexity_increase:
        ok = False
        reasons.append(f"perplexity {ppl:.3f} is {rel:+.1%} vs original {base:.3f} "
                       f"(allowed +{max_perplexity_increase:.1%})")
    else:
        reasons.append(f"perplexity {rel:+.1%} (allowed +{max_perplexity_increase:.1%})")
    speedup = metrics["speedup"]
    if speedup < min_speedup:
        ok = False
        reasons.append(f"speed-up {speedup:.2f}x is below the required {min_speedup:g}x")
    else:
        reasons.append(f"speed-up {speedup:.2f}x (required {min_speedup:g}x)")
    return ok, "; ".join(reasons)


def pick_best(variants: list[dict], formats: tuple[str, ...] | None = None) -> dict | None:
    """Fastest passing variant (smaller on disk breaks ties)."""
    ok = [v for v in variants if v["passed"] and (formats is None or v.get("format") in formats)]
    return max(ok, key=lambda v: (v["speedup"], -v["size_bytes"]), default=None)


COLUMNS = [("variant", "name"), ("format", "format"), ("size MB", "size_mb"), ("size x", "size_ratio"),
           ("params", "params"), ("sparsity", "sparsity"), ("Linear bytes x", "linear_bytes_ratio"),
           ("perplexity", "perplexity"), ("ppl delta", "ppl_delta"), ("tokens/s", "tokens_per_s"),
           ("speed-up", "speedup"), ("p50 ms", "latency_ms_p50"), ("p95 ms", "latency_ms_p95"), ("gate", "gate")]


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


def table_markdown(rows: list[dict], variants: list[dict], note: str = "") -> str:
    heads = [h for h, _ in COLUMNS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    lines += ["| " + " | ".join(str(r[h]) for h in heads) + " |" for r in rows]
    lines += ["", *(f"- **{v['name']}**: {'passed' if v['passed'] else 'FAILED'}: {v['reason']}" for v in variants)]
    return "\n".join(lines + ([f"\n{note}"] if note else [])) + "\n"


# ---------------------------------------------------------------------------------------------------- pipeline


def plan(cfg) -> list[tuple[str, dict]]:
    """(variant name, build spec) in build order, from the config. Pure."""
    out: list[tuple[str, dict]] = []
    if cfg.prune_sparsity > 0:
        out.append((f"pruned-{cfg.prune_method.replace('_', '-')}", {"kind": "prune"}))
    modes = QUANT_MODES if cfg.quantize in ("both", "all") else () if cfg.quantize == "none" else (cfg.quantize,)
    out += [(f"{m.replace('_', '-')}", {"kind": "quantize", "mode": m}) for m in modes]
    if cfg.distill:
        out.append(("distilled", {"kind": "distill"}))
    if cfg.export_onnx:
        out.append(("onnx", {"kind": "onnx"}))
        if cfg.onnx_int8:
            out.append(("onnx-int8", {"kind": "onnx_int8"}))
    return out


def _check_config(cfg, steps: list[tuple[str, dict]]) -> None:
    src = cfg.onnx_source
    kinds = {spec["kind"] for _, spec in steps}
    need = ONNX_SOURCE_KIND.get(src)
    if cfg.export_onnx and src != "original" and need not in kinds:
        raise CompressionError(f"onnx_source is '{src}' but that variant is not built", "compression.onnx_source",
                               f"enable {need} or export the original")


def compress(model_path: str, out_dir: str, cfg, eval_path: str, max_len: int,
             private_paths: list[str] | None) -> dict:
    """Build, reload, measure and gate every configured variant of `model_path`; see the module docstring."""
    from tasks.data import read_texts
    from tasks.model import dir_digest, load_model

    steps = plan(cfg)
    out = Path(out_dir)
    if not cfg.enabled or not steps:
        why = "compression is disabled" if not cfg.enabled else "no technique is enabled"
        return {"variants": [], "baseline": None, "table_md": f"{why}\n", "selected": None, "edge": None,
                "note": why}
    _check_config(cfg, steps)
    distill_fp = None
    if cfg.distill:  # refuse before any work: the privacy rule is not a late surprise
        distill_fp = check_public(cfg.distill_data, private_paths)
    texts = read_texts(Path(eval_path))[: cfg.max_eval_records]
    if not texts:
        raise CompressionError("no held-out records", eval_path, "pass the held-out split written by the data step")
    model, tok = load_model(model_path)
    model.eval()
    variants: list[dict] = []
    built: dict[str, Path] = {}
    for name, spec in steps:
        path = out / name
        entry: dict[str, Any] = {"name": name, "path": str(path), "technique": spec["kind"]}
        try:
            with atomic_dir(path) as tmp:
                entry.update(_build(spec, model, tok, tmp, cfg, built, texts, max_len, distill_fp))
            built[spec["kind"]] = path
        except LLMOpsError as e:
            if isinstance(e, _privacy_error()):
                raise
            entry.update(passed=False, reason=f"not built: {e}", built=False)
        except Exception as e:  # noqa: BLE001 - a broken technique must not hide the others; the reason is kept
            log.exception("building %s failed", name)
            entry.update(passed=False, reason=f"not built: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                         built=False)
        variants.append(entry)
    del model
    result = measure(model_path, variants, texts, max_len, cfg)
    for v in result["variants"]:
        if v.get("built", True):
            v["digest"] = dir_digest(Path(v["path"]))
    _write_report(out, result)
    return result


def _privacy_error():
    from tasks.privacy import PrivacyError

    return PrivacyError


def _build(spec: dict, model, tok, tmp: Path, cfg, built: dict, texts: list[str], max_len: int,
           distill_fp: str | None) -> dict:
    kind = spec["kind"]
    if kind == "prune":
        return build_pruned(model, tok, tmp, cfg.prune_sparsity, cfg.prune_method)
    if kind == "quantize":
        return build_quantized(model, tok, tmp, spec["mode"])
    if kind == "distill":
        info = build_distilled(model, tok, tmp, Path(cfg.distill_data), max_len, cfg)
        return info | {"distill_data_fingerprint": distill_fp}
    src_name = cfg.onnx_source
    if kind == "onnx":
        src = _onnx_source_model(src_name, model, built)
        return {"onnx_check": export_onnx(src, tok, tmp, texts, max_len, src_name), "onnx_source": src_name}
    if kind == "onnx_int8":
        if "onnx" not in built:
            raise CompressionError("the fp32 ONNX export failed, so there is nothing to quantize", str(tmp),
                                   "see the onnx variant's reason")
        src = _onnx_source_model(src_name, model, built)
        check = quantize_onnx(built["onnx"], tmp, logits_module(src), tok, texts, max_len, src_name,
                              cfg.onnx_int8_method, cfg.onnx_int8_block_size)
        return {"onnx_check": check, "onnx_source": src_name}
    raise CompressionError(f"unknown variant kind '{kind}'", "compression", "this is a bug")


def _onnx_source_model(src_name: str, model, built: dict[str, Path]):
    """The fp32 torch model `onnx_source` names: the fine-tuned original, or the pruned/distilled variant on disk."""
    if src_name == "original":
        return model
    from tasks.model import load_model

    return load_model(built[ONNX_SOURCE_KIND[src_name]])[0].eval()


def measure(model_path: str, variants: list[dict], texts: list[str], max_len: int, cfg) -> dict:
    """Run the original and every built variant (reloaded from disk) on the same text; gate; pick the best."""
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
    for v in tqdm(todo, desc="reload + perplexity", unit="variant", dynamic_ncols=True):
        runners[v["name"]] = r = load_variant(v["path"])
        v.setdefault("format", read_meta(v["path"])["format"])
        v.update(perplexity(r, texts, max_len), params=r.params, size_bytes=disk_bytes(v["path"]),
                 sparsity=r.sparsity)
        if r.linear_bytes is not None:
            v["linear_bytes"] = r.linear_bytes
    batch = timing_input(runners["original"].tok, texts, max_len)
    timing = time_variants(runners, batch, cfg.bench_rounds)
    base = base_entry
    base.update(timing["original"], speedup=1.0, size_ratio=1.0, ppl_delta=0.0, linear_bytes_ratio=1.0,
                size_mb=round(base["size_bytes"] / 1e6, 1))
    for v in variants:
        if not v.get("built", True):
            continue
        v.update(timing[v["name"]])
        v["speedup"] = round(v["tokens_per_s"] / base["tokens_per_s"], 3)
        v["size_mb"] = round(v["size_bytes"] / 1e6, 1)
        v["size_ratio"] = round(v["size_bytes"] / base["size_bytes"], 3)
        v["ppl_delta"] = v["perplexity"] / base["perplexity"] - 1
        if "linear_bytes" in v:
            v["linear_bytes_ratio"] = round(v["linear_bytes"] / base["linear_bytes"], 4)
        v["passed"], v["reason"] = gate(v, base, cfg.max_perplexity_increase, cfg.min_speedup)
    rows = table_rows(base, variants)
    note = (f"Measured by running each variant reloaded from disk: perplexity on {len(texts)} held-out records "
            f"(max_len {max_len}); latency = one forward of a batch-1, {max_len}-token sequence, "
            f"{cfg.bench_rounds} interleaved rounds, {torch_threads()} CPU thread(s); "
            f"tokens/s = {max_len} / p50.")
    selected = pick_best(variants)
    edge = pick_best(variants, ("onnx",))
    return {"baseline": base, "variants": variants, "rows": rows, "table_md": table_markdown(rows, variants, note),
            "selected": selected["name"] if selected else None,
            "selected_path": selected["path"] if selected else None,
            "edge": edge["path"] if edge else None}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _write_report(out: Path, result: dict) -> None:
    for name, text in (("report.json", json.dumps(result, indent=2, default=str)), ("table.md", result["table_md"])):
        write_text_atomic(out / name, text)


# ----------------------------------------------------------------------------------------------- Prefect task


def _compress_files(inputs) -> list:
    cfg = inputs["cfg"]
    return [inputs["model_path"], inputs["eval_path"], getattr(cfg, "distill_data", None) if cfg.distill else None]


def _task():
    from prefect import task

    from llmops.caching import files_key

    @task(name="compress", cache_policy=files_key(_compress_files), persist_result=True)
    def compress_task(model_path: str, out_dir: str, cfg, eval_path: str, max_len: int,
                      private_paths: list[str] | None) -> dict:
        from prefect.artifacts import create_table_artifact

        result = compress(model_path, out_dir, cfg, eval_path, max_len, private_paths)
        if result["variants"]:
            create_table_artifact(table=result["rows"], key="compression",
                                  description=f"Compression variants vs original (selected: {result['selected']})")
        return result

    return compress_task


compress_task = _task()
