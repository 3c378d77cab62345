"""The ONNX edge bundle: a KV-cached decoder (onnxruntime-genai's model builder), checked against torch `generate`,
and block-quantized copies (int8, and mixed int4/int8 chosen per layer by measured sensitivity) checked the same way.

Why the builder: it is onnxruntime's own exporter for decoder LLMs (Llama/Mistral/Qwen/Phi/Gemma/SmolLM...): fused
QKV, GroupQueryAttention with `past_key_values` in / `present` out, rotary caches, and a `genai_config.json` that
onnxruntime-genai runs as is. torch.onnx (dynamo) exported our old graph without a cache (every token recomputed the
prefix: 1.4 tokens/s); Optimum's exporter would add a second large dependency for the same graph with slower
unfused attention. Measured on SmolLM2-135M (1 thread): builder fp32 decode 28-31 tokens/s, greedy tokens identical
to torch `generate`, prefill logits within 1.2e-4.

Quantization is ours (numpy, no calibration data, weights only): MatMulNBits blocks along the input dimension, int8
symmetric (RTN + least-squares scale) or int4 asymmetric (range search + least-squares scale), onnxruntime's int8
kernels (accuracy level 4). The tied embedding reads the int8 lm_head bytes through GatherBlockQuantized, so the
biggest matrix is stored once.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tasks.compression.common import CompressionError, count_params, log, read_meta, write_meta

ONNX_FILE = "model.onnx"
ONNX_DATA = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"
RUNNER_FILE = "edge_runner.py"  # a copy of llmops/edge_runner.py: the bundle runs without llmops/torch
BUNDLE_KEEP = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
)
ONNX_RTOL = ONNX_ATOL = 1e-3  # fp32 ONNX vs torch: |onnx - torch| <= atol + rtol*|torch| on every logit
ONNX_INT8_MAX_REL_ERR = 0.25  # quantized ONNX: RMS(onnx - torch) / std(torch logits); quality is gated by perplexity
GREEDY_CHECK_TOKENS = 16  # fp32 bundle: greedy tokens identical to torch generate for this many new tokens
LM_HEAD = "/lm_head/MatMul"


# ------------------------------------------------------------------------------------------------- fp32 export


def export_onnx(model, tok, out: Path, sample_texts: list[str], max_len: int, source: str) -> dict:
    """fp32 KV decoder of `model` in `out`; raises CompressionError if onnxruntime disagrees with torch (logits of
    the prompt, logits of cached one-token steps, greedy tokens)."""
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    with tempfile.TemporaryDirectory(prefix="llmops-edge-") as tmp:
        hf = Path(tmp) / "hf"
        model.save_pretrained(hf, safe_serialization=True)
        tok.save_pretrained(hf)
        run_builder(hf, out, Path(tmp) / "cache", arch)
    finish_bundle(out, model, tok)
    check = verify_kv(out, model, tok, sample_texts, max_len)
    if not check["allclose"]:
        raise CompressionError(
            f"ONNX logits differ from torch (max |diff| {check['max_abs_logit_diff']:.3g} > "
            f"atol {ONNX_ATOL} + rtol {ONNX_RTOL}; cached steps {check['max_abs_step_diff']:.3g})",
            str(out / ONNX_FILE),
            "do not ship this export; report the exporter bug",
        )
    if not check["greedy_identical"]:
        raise CompressionError(
            f"greedy tokens of the ONNX decoder differ from torch generate at token {check['greedy_first_diff']}",
            str(out / ONNX_FILE),
            "do not ship this export; report the exporter bug",
        )
    write_meta(
        out,
        format="onnx",
        technique="onnx",
        source=source,
        int8=False,
        bits="fp32",
        kv_cache=True,
        exporter=f"onnxruntime-genai {_genai_version()} model builder",
        check=check,
        params=count_params(model),
        tolerance={"atol": ONNX_ATOL, "rtol": ONNX_RTOL},
    )
    return check


def run_builder(hf_dir: Path, out: Path, cache: Path, arch: str) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out)]
    cmd += ["-p", "fp32", "-e", "cpu", "-c", str(cache)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    except FileNotFoundError:
        raise CompressionError("python not found for the ONNX builder", sys.executable, "reinstall llmops") from None
    if r.returncode != 0 or not (out / ONNX_FILE).is_file():
        lines = [ln for ln in (r.stderr or r.stdout or "").splitlines() if ln.strip()]
        last = lines[-1][:300] if lines else f"exit code {r.returncode}"
        if "No module named" in last and "onnxruntime_genai" in last:
            raise CompressionError(
                "onnxruntime-genai is not installed",
                "compression.export_onnx",
                "pip install onnxruntime-genai (llmops depends on it)",
            )
        raise CompressionError(
            f"the ONNX KV-decoder builder failed for {arch} ({last})",
            str(out),
            "onnxruntime-genai's builder supports Llama, Mistral, Qwen, Phi, Gemma, SmolLM, Granite, OLMo and more "
            "(not GPT-2); disable compression.export_onnx for this model",
        )
    log.debug("onnxruntime-genai builder: %s", (r.stdout or "")[-2000:])


def finish_bundle(out: Path, model, tok) -> None:
    """What a device needs besides the graph: a tokenizer that neither truncates nor pads, the HF config and
    generation config, the runner, and a genai_config whose search defaults are greedy."""
    from tokenizers import Tokenizer

    import llmops.edge_runner as runner

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        backend = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
        for name in ("tokenizer_config.json", "chat_template.jinja"):
            if (Path(tmp) / name).is_file():
                shutil.copy2(Path(tmp) / name, out / name)
    backend.no_truncation()
    backend.no_padding()
    backend.save(str(out / "tokenizer.json"))
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    shutil.copy2(runner.__file__, out / RUNNER_FILE)
    cfg_path = out / GENAI_CONFIG
    cfg = json.loads(cfg_path.read_text())
    ctx = getattr(model.config, "max_position_embeddings", None) or cfg["model"].get("context_length")
    cfg["search"].update(do_sample=False, max_length=int(ctx))
    cfg_path.write_text(json.dumps(cfg, indent=4))


def _genai_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------------------------------- checks vs torch


def check_prompts(tok, texts: list[str], max_len: int, n: int = 3, prompt_len: int = 32) -> list[list[int]]:
    out = []
    for t in texts[:n] or ["To be, or not to be"]:
        ids = tok(t, add_special_tokens=False)["input_ids"][: min(prompt_len, max_len)]
        if len(ids) >= 2:
            out.append(ids)
    return out or [tok("To be, or not to be", add_special_tokens=False)["input_ids"]]


def verify_kv(bundle: Path, model, tok, texts: list[str], max_len: int, greedy: bool = True) -> dict:
    """onnxruntime vs torch on the same prompts: teacher-forced logits of the prompt (one prefill), logits of the
    last half fed one token at a time through the cache, and (fp32) greedy tokens vs torch `generate`."""
    import numpy as np
    import torch

    from llmops.edge_runner import EdgeModel

    em = EdgeModel(bundle, torch.get_num_threads())
    prompts = check_prompts(tok, texts, max_len)
    worst = worst_step = 0.0
    ok = True
    errs, scales, agree, total = [], [], 0, 0
    first_diff = None
    for ids in prompts:
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        got = em.all_logits(ids)
        d = np.abs(got - ref)
        worst = max(worst, float(d.max()))
        ok &= bool((d <= ONNX_ATOL + ONNX_RTOL * np.abs(ref)).all())
        errs.append(float(((got - ref) ** 2).mean()))
        scales.append(float(ref.std()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        half = len(ids) // 2
        logits, state = em.prefill(ids[:half])
        for pos in range(half, len(ids)):
            logits, state = em.step(ids[pos], state)
            ds = np.abs(logits - ref[pos])
            worst_step = max(worst_step, float(ds.max()))
            ok &= bool((ds <= ONNX_ATOL + ONNX_RTOL * np.abs(ref[pos])).all())
        if greedy and first_diff is None:
            with torch.no_grad():
                want = model.generate(
                    torch.tensor([ids]),
                    attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=GREEDY_CHECK_TOKENS,
                    min_new_tokens=GREEDY_CHECK_TOKENS,
                    do_sample=False,
                    pad_token_id=tok.eos_token_id,
                )[0, len(ids) :].tolist()
            have = em.greedy(ids, len(want))
            first_diff = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), None)
    rel = float(np.sqrt(np.mean(errs)) / max(np.mean(scales), 1e-12))
    out = {
        "prompts": len(prompts),
        "max_abs_logit_diff": worst,
        "max_abs_step_diff": worst_step,
        "rel_rms_err": rel,
        "allclose": ok,
        "top1_agreement": agree / max(total, 1),
    }
    if greedy:
        out.update(greedy_identical=first_diff is None, greedy_first_diff=first_diff, greedy_tokens=GREEDY_CHECK_TOKENS)
    return out


# ------------------------------------------------------------------------------------------------ quantization


def quantize_blocks(wt, bits: int, block_size: int):
    """Block quantization of `wt` [N, K] (one row per output channel, blocks along K).

    int8: symmetric (implicit zero point 128), scale = least-squares fit of the rounded codes. int4: asymmetric
    (a zero point per block), the block's range searched over shrink factors (llama.cpp's k-quant idea) and the
    scale refitted by least squares; the lowest squared error wins. Returns (codes uint8 [N, nb, bs], scales
    float32 [N, nb], zero points uint8 [N, nb] or None)."""
    import numpy as np

    n, k = wt.shape
    nb = -(-k // block_size)
    x = np.asarray(wt, np.float32)
    if nb * block_size != k:
        x = np.pad(x, ((0, 0), (0, nb * block_size - k)))
    x = x.reshape(n, nb, block_size)
    if bits == 8:
        s = np.abs(x).max(-1, keepdims=True) / 127.0
        s[s == 0] = 1.0
        q = np.clip(np.rint(x / s), -127, 127)
        fit = (x * q).sum(-1, keepdims=True) / np.maximum((q * q).sum(-1, keepdims=True), 1e-20)
        s = np.where(fit > 0, fit, s)
        q = np.clip(np.rint(x / s), -128, 127)
        return (q + 128).astype(np.uint8), s[..., 0].astype(np.float32), None
    if bits != 4:
        raise CompressionError(f"{bits}-bit weights are not supported", "compression", "use 4 or 8")
    qmax = 15
    lo0, hi0 = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    best = None
    for shrink in (1.0, 0.97, 0.94, 0.91, 0.88, 0.85):
        lo, hi = lo0 * shrink, hi0 * shrink
        s = (hi - lo) / qmax
        s[s == 0] = 1.0
        zp = np.clip(np.rint(-lo / s), 0, qmax)
        q = np.clip(np.rint(x / s) + zp, 0, qmax)
        c = q - zp
        fit = (x * c).sum(-1, keepdims=True) / np.maximum((c * c).sum(-1, keepdims=True), 1e-20)
        s = np.where(fit > 0, fit, s)
        q = np.clip(np.rint(x / s) + zp, 0, qmax)
        err = ((x - (q - zp) * s) ** 2).sum(-1, keepdims=True)
        if best is None:
            best = [err, q, s, zp]
        else:
            m = err < best[0]
            best = [np.where(m, a, b) for a, b in zip((err, q, s, zp), best)]
    _, q, s, zp = best
    return q.astype(np.uint8), s[..., 0].astype(np.float32), zp[..., 0].astype(np.uint8)


def dequantize_blocks(q, s, zp, k: int):
    """Inverse of `quantize_blocks`, [N, K] float32 (what onnxruntime multiplies by)."""
    import numpy as np

    z = 128.0 if zp is None else zp[..., None].astype(np.float32)
    return ((q.astype(np.float32) - z) * s[..., None]).reshape(q.shape[0], -1)[:, :k]


def _pack(q, bits: int):
    import numpy as np

    if bits == 8:
        return q
    q = q.reshape(q.shape[0], q.shape[1], -1, 2)
    return (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)


def _pack_zp(zp, bits: int):
    import numpy as np

    if bits == 8:
        return zp.reshape(-1)
    if zp.shape[1] % 2:
        zp = np.pad(zp, ((0, 0), (0, 1)), constant_values=8)
    z = zp.reshape(zp.shape[0], -1, 2)
    return (z[..., 0] | (z[..., 1] << 4)).astype(np.uint8).reshape(-1)


def matmul_nodes(onnx_path: Path) -> dict[str, tuple[int, int]]:
    """Name -> (K, N) of every MatMul whose weight is a constant (what can be quantized), in graph order."""
    import onnx

    g = onnx.load(str(onnx_path), load_external_data=False).graph
    inits = {i.name: tuple(i.dims) for i in g.initializer}
    return {n.name: inits[n.input[1]] for n in g.node if n.op_type == "MatMul" and n.input[1] in inits}


def quantize_onnx(
    src: Path,
    out: Path,
    model,
    tok,
    sample_texts: list[str],
    max_len: int,
    source: str,
    plan: dict[str, int],
    block_size: int = 32,
    accuracy_level: int = 4,
    technique: str = "onnx-int8",
    extra: dict | None = None,
    block_sizes: dict[str, int] | None = None,
    check_drift: bool = True,
) -> dict:
    """A copy of the fp32 bundle `src` whose MatMuls are MatMulNBits with the bits `plan` gives each node (absent =
    fp32), checked against torch. The tied embedding (Transpose(lm_head) -> Gather) becomes GatherBlockQuantized
    over the lm_head's int8 bytes."""
    import onnx
    from onnx import helper, numpy_helper

    block_sizes = block_sizes or {}
    for bs in (block_size, *block_sizes.values()):
        if bs < 16 or bs & (bs - 1):
            raise CompressionError(
                f"ONNX quantization block size must be a power of two >= 16, got {bs}",
                "compression.onnx_int8_block_size",
                "use 32 (accuracy) or 128 (speed)",
            )
    m = onnx.load(str(src / ONNX_FILE))
    g = m.graph
    inits = {i.name: i for i in g.initializer}
    quantized: dict[str, tuple] = {}  # weight initializer -> (codes name, scales, zp, bits, K, N)
    nodes, drop = [], set()
    for n in g.node:
        bits = plan.get(n.name)
        if n.op_type != "MatMul" or not bits or n.input[1] not in inits:
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])  # [K, N]
        k, nn = w.shape
        bs = block_sizes.get(n.name, block_size)
        q, s, zp = quantize_blocks(w.T, bits, bs)
        codes = numpy_helper.from_array(_pack(q, bits), f"{n.input[1]}.q{bits}")
        scales = numpy_helper.from_array(s.reshape(-1), f"{n.input[1]}.scales")
        g.initializer.extend([codes, scales])
        ins = [n.input[0], codes.name, scales.name]
        if zp is not None:
            z = numpy_helper.from_array(_pack_zp(zp, bits), f"{n.input[1]}.zp")
            g.initializer.append(z)
            ins.append(z.name)
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                ins,
                list(n.output),
                name=n.name,
                domain="com.microsoft",
                K=k,
                N=nn,
                bits=bits,
                block_size=bs,
                accuracy_level=accuracy_level,
            )
        )
        quantized[n.input[1]] = (codes.name, s, zp, bits, k, nn, bs)
        drop.add(n.input[1])
    nodes = _tie_embedding(g, nodes, quantized)
    still = {i for n in nodes for i in n.input}
    keep = [i for i in g.initializer if i.name not in drop or i.name in still]
    g.ClearField("node")
    g.node.extend(nodes)
    g.ClearField("initializer")
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(m, str(out / ONNX_FILE), save_as_external_data=True, location=ONNX_DATA, size_threshold=1024)
    (out / ONNX_DATA).chmod(0o644)  # onnx writes it 0600; the bundle is published to readers like the graph
    for f in src.iterdir():
        if f.is_file() and f.name not in (ONNX_FILE, ONNX_DATA, "compression.json"):
            shutil.copy2(f, out / f.name)
    check = verify_kv(out, model, tok, sample_texts, max_len, greedy=False)
    if check_drift and not check["rel_rms_err"] <= ONNX_INT8_MAX_REL_ERR:
        raise CompressionError(
            f"quantized ONNX logits drift from torch (relative RMS error {check['rel_rms_err']:.3f} > "
            f"{ONNX_INT8_MAX_REL_ERR})",
            str(out / ONNX_FILE),
            "use the fp32 or int8 bundle",
        )
    counts = {b: sum(1 for v in plan.values() if v == b) for b in sorted(set(plan.values()))}
    write_meta(
        out,
        format="onnx",
        technique=technique,
        source=source,
        int8=True,
        bits="int8" if set(plan.values()) == {8} else "int4/int8",
        kv_cache=True,
        check=check,
        block_size=block_size,
        block_sizes=block_sizes,
        accuracy_level=accuracy_level,
        nodes_by_bits={f"int{b}": c for b, c in counts.items()},
        plan=plan,
        params=read_meta(src).get("params"),
        tolerance={"max_rel_rms_err": ONNX_INT8_MAX_REL_ERR},
        **(extra or {}),
    )
    return check


def _tie_embedding(g, nodes: list, quantized: dict) -> list:
    """Transpose(W) -> Gather(ids) over a quantized lm_head weight W becomes GatherBlockQuantized(codes, ids) ->
    Reshape: the embedding rows are the lm_head's output channels, blocks along the hidden size."""
    import numpy as np
    from onnx import helper, numpy_helper

    transposed = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Transpose" and n.input[0] in quantized}
    out = []
    for n in nodes:
        if n.op_type == "Transpose" and n.output[0] in transposed:
            continue
        if n.op_type == "Gather" and n.input[0] in transposed:
            codes, s, zp, bits, k, nn, block_size = quantized[transposed[n.input[0]]]
            if bits != 8:
                raise CompressionError(
                    "a tied embedding needs an int8 lm_head", LM_HEAD, "keep the lm_head at 8 bits in the plan"
                )
            sc = numpy_helper.from_array(s.reshape(nn, -1, 1), f"{n.name}.scales")
            zz = numpy_helper.from_array(np.full((nn, s.shape[1], 1), 128, np.uint8), f"{n.name}.zp")
            shape = numpy_helper.from_array(np.array([0, 0, k], np.int64), f"{n.name}.shape")
            g.initializer.extend([sc, zz, shape])
            mid = f"{n.name}/blocks"
            out.append(
                helper.make_node(
                    "GatherBlockQuantized",
                    [codes, n.input[1], sc.name, zz.name],
                    [mid],
                    name=n.name,
                    domain="com.microsoft",
                    bits=8,
                    block_size=block_size,
                    gather_axis=0,
                    quantize_axis=2,
                )
            )
            out.append(helper.make_node("Reshape", [mid, shape.name], list(n.output), name=f"{n.name}/Reshape"))
            continue
        out.append(n)
    return out


# ---------------------------------------------------------------------------------------------- mixed int4/int8


_NODE = re.compile(r"^/model/layers\.(\d+)/(attn|mlp)/(\w+)/MatMul$")
_TORCH = {"qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o_proj": ("self_attn.o_proj",)}


def torch_linears(model, node: str) -> list:
    """The torch Linear modules an ONNX MatMul node computes (the builder fuses q/k/v into one qkv_proj)."""
    if node == LM_HEAD:
        return [model.get_output_embeddings()]
    m = _NODE.match(node)
    if not m:
        raise CompressionError(f"no torch module known for ONNX node {node}", node, "use the int8 bundle")
    layer, kind, proj = int(m.group(1)), m.group(2), m.group(3)
    names = _TORCH.get(proj, (f"{kind}.{proj}",))
    block = model.model.layers[layer]
    try:
        return [block.get_submodule(n) for n in names]
    except AttributeError:
        raise CompressionError(f"no torch module for {node} ({names})", node, "use the int8 bundle") from None


def sensitivity(model, nodes: list[str], calib_ids, block_size: int) -> dict[str, float]:
    """Measured cost of putting each node at int4: the relative output error ||(W - Q4(W)) x||^2 / ||W x||^2 over
    the activations x that reach it on `calib_ids` (one forward pass; Q4 is the exact grid `quantize_onnx` writes).
    This is the layer-wise objective GPTQ/AWQ minimise; the bundle's quality is then gated on perplexity."""
    import torch

    mods = {name: torch_linears(model, name) for name in nodes}
    inputs: dict[str, object] = {}  # node -> the activations that reach it, [tokens, K]
    hooks = []

    def hook(name):
        def f(mod, args, _out):
            inputs[name] = args[0].detach().float().reshape(-1, args[0].shape[-1])

        return f

    for name, ms in mods.items():
        hooks.append(ms[0].register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(input_ids=calib_ids)
    finally:
        for h in hooks:
            h.remove()
    out = {}
    with torch.no_grad():
        for name, ms in mods.items():
            w = torch.cat([m.weight.data for m in ms], 0).float()  # [N, K]
            q, s, zp = quantize_blocks(w.numpy(), 4, block_size)
            dw = w - torch.from_numpy(dequantize_blocks(q, s, zp, w.shape[1]))
            x = inputs[name]
            out[name] = float((x @ dw.T).pow(2).sum() / (x @ w.T).pow(2).sum().clamp(min=1e-30))
    return out


def block_bytes(k: int, n: int, bits: int, block_size: int) -> int:
    nb = -(-k // block_size)
    zp = 0 if bits == 8 else -(-nb // 2)
    return n * (nb * block_size * bits // 8 + nb * 4 + zp)


def mixed_plan(
    shapes: dict[str, tuple[int, int]], cost: dict[str, float], budget_bytes: int, block_size: int
) -> tuple[dict[str, int], dict]:
    """Pure: every node int4 except the lm_head (int8: it is also the tied embedding); then, most sensitive per
    extra byte first, nodes go to int8 while the quantized weights stay within `budget_bytes`."""
    plan = {name: 4 for name in shapes}
    if LM_HEAD in plan:
        plan[LM_HEAD] = 8
    size = sum(block_bytes(*shapes[n], plan[n], block_size) for n in plan)
    order = sorted(
        (n for n in plan if plan[n] == 4),
        key=lambda n: (
            -cost.get(n, 0.0) / max(block_bytes(*shapes[n], 8, block_size) - block_bytes(*shapes[n], 4, block_size), 1)
        ),
    )
    promoted = []
    for n in order:
        extra = block_bytes(*shapes[n], 8, block_size) - block_bytes(*shapes[n], 4, block_size)
        if size + extra > budget_bytes:
            continue
        plan[n], size = 8, size + extra
        promoted.append(n)
    return plan, {"weight_bytes": size, "budget_bytes": budget_bytes, "int8_nodes": promoted}


def calibration_ids(model, tok, public_texts: list[str] | None, n_seq: int = 2, seq_len: int = 128, seed: int = 0):
    """Token ids to measure sensitivity on: public text when given, else text the model samples itself (post-
    processing of the released model: no training or held-out record is read)."""
    import torch

    if public_texts:
        ids = tok("\n\n".join(public_texts), add_special_tokens=False)["input_ids"]
        need = n_seq * seq_len
        while len(ids) < need:
            ids = ids + ids
        return torch.tensor(ids[:need]).view(n_seq, seq_len)
    g = torch.Generator().manual_seed(seed)
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    with torch.no_grad():
        out = model.generate(
            torch.full((n_seq, 1), start, dtype=torch.long),
            attention_mask=torch.ones(n_seq, 1, dtype=torch.long),
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=seq_len - 1,
            min_new_tokens=seq_len - 1,
            pad_token_id=tok.eos_token_id,
        )
    return out[:, :seq_len]


def onnx_matmul_weight_bytes(onnx_path: Path) -> int:
    """Bytes of the constant weights (+ scales / zero points) that feed the graph's matrix multiplies: the ONNX
    counterpart of `linear_weight_bytes`, plus the lm_head (the builder's graph has it as a MatMul; the tied
    embedding reads the same bytes)."""
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


def kv_logits(em, input_ids, attention_mask):
    """Teacher-forced logits of a right-padded batch through the KV decoder, one row at a time (each row's own
    length; padded positions are zeros, masked out by the caller)."""
    import numpy as np
    import torch

    b, t = input_ids.shape
    out = None
    for i in range(b):
        n = int(attention_mask[i].sum())
        if n == 0:
            continue
        lo = em.all_logits(input_ids[i, :n].tolist())
        if out is None:
            out = np.zeros((b, t, lo.shape[-1]), np.float32)
        out[i, :n] = lo
    return torch.from_numpy(out if out is not None else np.zeros((b, t, 1), np.float32))
