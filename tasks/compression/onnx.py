"""ONNX edge export: torch.onnx (dynamo) of an fp32 model checked against torch with onnxruntime, and an int8 copy
(block-wise `MatMulNBits` by default, or per-tensor `quantize_dynamic`) checked the same way; no calibration data."""

from __future__ import annotations

import shutil
from pathlib import Path

from tasks.compression.common import META, CompressionError, count_params, read_meta, write_meta
from tasks.model import WEIGHT_SUFFIXES

ONNX_FILE = "model.onnx"
ONNX_RTOL = ONNX_ATOL = 1e-3  # fp32 ONNX vs torch: |onnx - torch| <= atol + rtol*|torch| on every unpadded logit
ONNX_INT8_MAX_REL_ERR = 0.25  # int8 ONNX: RMS(onnx - torch) / std(torch logits); quality is gated by perplexity


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
    mask = attention_mask.bool()
    o, t = onnx_out[mask].float(), torch_out[mask].float()
    diff = (o - t).abs()
    return {
        "max_abs_logit_diff": float(diff.max()),
        "rel_rms_err": float(diff.pow(2).mean().sqrt() / t.std().clamp(min=1e-12)),
        "allclose": bool((diff <= ONNX_ATOL + ONNX_RTOL * t.abs()).all()),
        "top1_agreement": float((o.argmax(-1) == t.argmax(-1)).float().mean()),
    }


def export_onnx(model, tok, out: Path, sample_texts: list[str], max_len: int, source: str) -> dict:
    """fp32 ONNX of `model`; raises CompressionError if onnxruntime's logits differ from torch's beyond tolerance."""
    import torch

    wrapped = logits_module(model)
    batch = encode_for_check(tok, sample_texts, max_len)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000  # protobuf 2 GB cap
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    try:
        torch.onnx.export(
            wrapped,
            (batch["input_ids"], batch["attention_mask"]),
            str(out / ONNX_FILE),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": dims, "attention_mask": dims},
            external_data=big,
            optimize=True,
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - the exporter fails in many ways; the user needs the first line
        raise CompressionError(
            f"ONNX export failed ({type(e).__name__}: {str(e).splitlines()[0][:300]})",
            str(out),
            "disable compression.export_onnx or use a Llama/GPT-2 model",
        ) from None
    check = verify_onnx(out / ONNX_FILE, wrapped, batch)
    if not check["allclose"]:
        raise CompressionError(
            f"ONNX logits differ from torch (max |diff| {check['max_abs_logit_diff']:.3g} > "
            f"atol {ONNX_ATOL} + rtol {ONNX_RTOL})",
            str(out / ONNX_FILE),
            "do not ship this export; report the exporter bug",
        )
    tok.save_pretrained(out)
    model.config.save_pretrained(out)
    write_meta(
        out,
        format="onnx",
        technique="onnx",
        source=source,
        int8=False,
        check=check,
        params=count_params(model),
        tolerance={"atol": ONNX_ATOL, "rtol": ONNX_RTOL},
    )
    return check


def quantize_onnx(
    src: Path,
    out: Path,
    wrapped_torch,
    tok,
    sample_texts: list[str],
    max_len: int,
    source: str,
    method: str = "blockwise",
    block_size: int = 32,
) -> dict:
    """int8 copy of an fp32 ONNX export; no calibration data is read (weights only + run-time activation scales).

    blockwise: `MatMulNBits` with 8-bit symmetric weights, one scale per `block_size` input channels, accuracy level
    4 (onnxruntime quantizes activations per block and multiplies in int8). dynamic: `quantize_dynamic`, per-channel
    int8 weights and one activation scale per tensor (fast, but outlier activations hurt LLMs).
    """
    if method == "blockwise":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        if block_size < 16 or block_size & (block_size - 1):
            raise CompressionError(
                f"onnx_int8_block_size must be a power of two >= 16, got {block_size}",
                "compression.onnx_int8_block_size",
                "use 32 (accuracy) or 128 (speed)",
            )
        algo = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4, bits=8)
        q = MatMulNBitsQuantizer(
            onnx.load(str(src / ONNX_FILE)),
            bits=8,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=4,
            algo_config=algo,
        )
        q.process()
        q.model.save_model_to_file(str(out / ONNX_FILE), use_external_data_format=False)
    elif method == "dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src / ONNX_FILE), str(out / ONNX_FILE), weight_type=QuantType.QInt8, per_channel=True)
    else:
        raise CompressionError(
            f"unknown onnx_int8_method '{method}'", "compression.onnx_int8_method", "use 'blockwise' or 'dynamic'"
        )
    check = verify_onnx(out / ONNX_FILE, wrapped_torch, encode_for_check(tok, sample_texts, max_len))
    if not check["rel_rms_err"] <= ONNX_INT8_MAX_REL_ERR:
        raise CompressionError(
            f"int8 ONNX logits drift from torch (relative RMS error {check['rel_rms_err']:.3f} > "
            f"{ONNX_INT8_MAX_REL_ERR})",
            str(out / ONNX_FILE),
            "use the fp32 ONNX export",
        )
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != META:
            shutil.copy2(f, out / f.name)  # tokenizer + config
    write_meta(
        out,
        format="onnx",
        technique="onnx",
        source=source,
        int8=True,
        check=check,
        int8_method=method,
        block_size=block_size if method == "blockwise" else None,
        params=read_meta(src).get("params"),
        tolerance={"max_rel_rms_err": ONNX_INT8_MAX_REL_ERR},
    )
    return check


def onnx_matmul_weight_bytes(onnx_path: Path) -> int:
    """Bytes of the constant weights (+ scales / zero points) that feed the graph's matrix multiplies: the ONNX
    counterpart of `linear_weight_bytes` (a tied output head reads the embedding, which is not counted by either)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    used = {
        name
        for n in graph.node
        if n.op_type in ("MatMul", "Gemm", "MatMulInteger", "MatMulNBits")
        for name in n.input[1:]
        if name in inits
    }
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
