"""torchao int8 of the block Linears: weight-only, or dynamic (activations quantized per token at run time, no
calibration data). Saved as a state dict of torchao tensors (+ config), reloaded by re-applying the same config."""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.compression.common import CompressionError, compressible_linears, linear_weight_bytes, write_meta

QUANT_FILE = "model_int8.pt"
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
        raise CompressionError(
            f"{type(model).__name__} has no nn.Linear layers for torchao to quantize (GPT-2 uses Conv1D)",
            "compression.quantize",
            "use export_onnx with onnx_int8 for this model",
        )
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
    write_meta(
        out,
        format="torchao",
        technique="quantize",
        quantize=mode,
        linear_bytes_fp32=fp32_bytes,
        linear_bytes_int8=int8_bytes,
    )
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
        raise CompressionError(
            f"cannot load {QUANT_FILE} ({str(e).splitlines()[0]})",
            str(path),
            "rebuild the variant (delete the directory and rerun compression)",
        ) from None
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval(), load_tokenizer(path)
