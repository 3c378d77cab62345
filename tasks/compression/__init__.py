"""Compression, measured: pruning, int8 quantization, distillation and ONNX edge export of the fine-tuned model.

    .venv/bin/python bench/bench_compression.py       # the comparison table on SmolLM2-135M (CPU)

`compress` reads an HF-format model dir and writes one directory per variant under `out_dir` (each built in a
hidden tmp dir and renamed, so a failure never leaves a half variant). Every variant is then *reloaded from disk*
and run next to the original on the same inputs: size on disk, parameters, held-out perplexity, CPU tokens/s and
latency p50/p95. Quality gates (max perplexity increase, min speed-up) decide which variants may be passed on; a
failing one says why. Speed-ups are medians of per-round paired ratios (rounds interleaved, so a load spike slows
both sides of a ratio). Among the passing variants within the tie band of the best speed (`pick_speed_tolerance`,
10%, widened to the measured noise: the largest relative IQR of the paired ratios), the smallest on disk is
`selected`; the `edge` bundle is chosen on size first: the smallest passing ONNX variant. Each pick comes with its
reason (`selected_reason`, `edge_reason`), and the rule is printed under the table in the model card.

Variants (each selectable in `compression.*`):
  pruned-<method>   magnitude_global / magnitude_layer: unstructured L1, made permanent (zeros stay dense, so no
                    speed-up without a sparse kernel); mlp_channels: structured, drops whole MLP channels so the
                    matmuls shrink. Weight magnitudes only: post-processing, no data read.
  int8-weight-only  torchao `quantize_(Int8WeightOnlyConfig())`; int8-dynamic: `Int8DynamicActivationInt8WeightConfig`
                    (activations quantized per token at run time: no calibration data). Saved as a state dict of
                    torchao tensors (+ config) and reloaded by re-applying the same config (`load_variant`).
  distilled         fewer layers, initialised from evenly spaced teacher layers, trained on the teacher's logits
                    (temperature-scaled KL + CE) on `compression.distill_data`, which must be public.
  onnx / onnx-int8  the edge bundle: a KV-cached decoder built by onnxruntime-genai's model builder (GQA with
                    past_key_values), checked against torch (prompt logits, cached one-token steps, greedy tokens of
                    `generate`), and our block-wise MatMulNBits copy: int8 weights, one scale per
                    `onnx_int8_block_size` (32) input channels, the lm_head at `onnx_lm_head_block_size` (32) and read
                    by the tied embedding through GatherBlockQuantized, accuracy level 4 (int8 activations per block).
  onnx-mixed        (opt-in) int4 body, int8 lm_head, and the nodes with the largest measured int4 error per byte
                    promoted to int8 within `onnx_mixed_max_size` of the fp32 bundle (sensitivity on public text or on
                    text the model samples itself: no record is read).
  Every bundle ships tokenizer.json (no truncation, no padding), config, genai_config.json and edge_runner.py.
  Gates: held-out perplexity (`max_perplexity_increase`), teacher-forced top-1 agreement with the original
  (`min_top1_agreement`), and the decode speed-up with the KV cache (`min_speedup`).

Privacy: pruning, weight-only int8 and dynamic int8 are post-processing of the DP model and cost no epsilon; none of
the techniques here uses calibration data. Distillation reads text, so it is refused (PrivacyError) when any record of
that text (by normalised identity) is a private training/held-out record or in the privacy ledger — distill on public
text instead.

Modules (this package re-exports their public names, so `from tasks.compression import X` keeps working):
  common.py        variant dirs (atomic build, compression.json), model anatomy, size counts
  pruning.py       magnitude and MLP-channel pruning
  quantization.py  torchao int8
  distillation.py  student, KL+CE training, the public-text check
  onnx.py          KV-decoder export, block quantization (int8, mixed int4/int8), checks against torch
  measure.py       reload, perplexity, timing, the table
  __init__.py      the pipeline: plan, build, measure, gate, pick (`compress`, `compress_task`)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from llmops.errors import LLMOpsError
from llmops.files import write_text_atomic
from tasks.compression.common import (
    META,
    CompressionError,
    atomic_dir,
    compressible_linears,
    count_params,
    decoder_layers,
    linear_sparsity,
    linear_weight_bytes,
    log,
    read_meta,
    rebuild,
    save_hf,
    tensor_bytes,
    write_meta,
)
from tasks.compression.distillation import build_distilled, check_public, distill_loss, make_student, student_layer_ids
from tasks.compression.measure import (
    COLUMNS,
    Loaded,
    load_variant,
    measure,
    perplexity,
    table_markdown,
    table_rows,
    time_variants,
    timing_input,
    torch_threads,
)
from tasks.compression.onnx import (
    GENAI_CONFIG,
    GREEDY_CHECK_TOKENS,
    LM_HEAD,
    ONNX_ATOL,
    ONNX_FILE,
    ONNX_INT8_MAX_REL_ERR,
    ONNX_RTOL,
    RUNNER_FILE,
    block_bytes,
    calibration_ids,
    dequantize_blocks,
    export_onnx,
    kv_logits,
    matmul_nodes,
    mixed_plan,
    onnx_matmul_weight_bytes,
    quantize_blocks,
    quantize_onnx,
    sensitivity,
    torch_linears,
    verify_kv,
)
from tasks.compression.pruning import build_pruned, prune_magnitude, prune_mlp_channels
from tasks.compression.quantization import QUANT_FILE, QUANT_MODES, build_quantized, load_quantized, quantize_int8
from tasks.model import WEIGHT_SUFFIXES, disk_bytes

ONNX_SOURCE_KIND = {"pruned": "prune", "distilled": "distill"}  # compression.onnx_source -> the variant it exports

__all__ = [
    "COLUMNS",
    "GENAI_CONFIG",
    "LM_HEAD",
    "RUNNER_FILE",
    "block_bytes",
    "calibration_ids",
    "dequantize_blocks",
    "kv_logits",
    "matmul_nodes",
    "mixed_plan",
    "quantize_blocks",
    "sensitivity",
    "torch_linears",
    "GREEDY_CHECK_TOKENS",
    "verify_kv",
    "META",
    "ONNX_ATOL",
    "ONNX_FILE",
    "ONNX_INT8_MAX_REL_ERR",
    "ONNX_RTOL",
    "ONNX_SOURCE_KIND",
    "QUANT_FILE",
    "QUANT_MODES",
    "WEIGHT_SUFFIXES",
    "CompressionError",
    "Loaded",
    "atomic_dir",
    "build_distilled",
    "build_pruned",
    "build_quantized",
    "check_public",
    "compress",
    "compress_task",
    "choose",
    "compressible_linears",
    "count_params",
    "decide",
    "decoder_layers",
    "disk_bytes",
    "distill_loss",
    "export_onnx",
    "gate",
    "linear_sparsity",
    "linear_weight_bytes",
    "load_quantized",
    "load_variant",
    "make_student",
    "measure",
    "onnx_matmul_weight_bytes",
    "perplexity",
    "Pick",
    "plan",
    "prune_magnitude",
    "prune_mlp_channels",
    "quantize_int8",
    "quantize_onnx",
    "read_meta",
    "rebuild",
    "save_hf",
    "student_layer_ids",
    "table_markdown",
    "table_rows",
    "tensor_bytes",
    "time_variants",
    "timing_input",
    "torch_threads",
    "write_meta",
]


# ------------------------------------------------------------------------------------------ gates + selection


def gate(
    metrics: dict, baseline: dict, max_perplexity_increase: float, min_speedup: float, min_top1: float = 0.0
) -> tuple[bool, str]:
    """Pure: does a measured variant pass? Every check is stated, passing or not."""
    reasons, ok = [], True
    ppl, base = metrics["perplexity"], baseline["perplexity"]
    rel = ppl / base - 1
    if not math.isfinite(ppl) or rel > max_perplexity_increase:
        ok = False
        reasons.append(
            f"perplexity {ppl:.3f} is {rel:+.1%} vs original {base:.3f} (allowed +{max_perplexity_increase:.1%})"
        )
    else:
        reasons.append(f"perplexity {rel:+.1%} (allowed +{max_perplexity_increase:.1%})")
    top1 = metrics.get("top1_agreement")
    if min_top1 > 0 and top1 is not None:
        if top1 < min_top1:
            ok = False
            reasons.append(f"top-1 agreement {top1:.3f} is below the required {min_top1:g}")
        else:
            reasons.append(f"top-1 agreement {top1:.3f} (required {min_top1:g})")
    speedup = metrics["speedup"]
    if speedup < min_speedup:
        ok = False
        reasons.append(f"decode speed-up {speedup:.2f}x is below the required {min_speedup:g}x")
    else:
        reasons.append(f"decode speed-up {speedup:.2f}x (required {min_speedup:g}x)")
    return ok, "; ".join(reasons)


@dataclass(frozen=True)
class Pick:
    """A picked variant (None when nothing passed) and why, in words the summary and the model card can quote."""

    variant: dict | None
    reason: str


def noise_band(variants: list[dict], speed_tolerance: float) -> float:
    """The tie band for speed: the configured tolerance, widened to the measured noise (the largest relative IQR of
    the paired per-round speed-ups among the passing variants, capped at 25%). Two speeds closer than the noise are
    the same speed; size decides."""
    spreads = [float(v.get("speedup_spread") or 0.0) for v in variants if v.get("passed")]
    return max(speed_tolerance, min(max(spreads, default=0.0), 0.25))


def choose_edge(variants: list[dict]) -> Pick:
    """Pure: the edge bundle is picked on size first: the smallest passing ONNX variant (speed only has to pass the
    gate, `min_speedup`). A device that downloads and stores the bundle pays for every byte; a few percent of
    timing noise must never ship a bundle twice the size."""
    ok = [v for v in variants if v.get("format") == "onnx" and v.get("passed")]
    if not ok:
        built = [v for v in variants if v.get("format") == "onnx"]
        return Pick(
            None,
            f"none: no onnx variant passed the gates ({len(built)} tried)"
            if built
            else "none: no onnx variant was built",
        )
    win = min(ok, key=lambda v: (v["size_bytes"], -v["speedup"]))
    why = (
        "the only passing onnx variant"
        if len(ok) == 1
        else f"size first: smallest of {len(ok)} passing onnx variants; speed only has to pass the gate"
    )
    return Pick(win, f"{win['name']}: {_mb(win['size_bytes'])}, {win['speedup']:.3f}× ({why})")


def choose(variants: list[dict], speed_tolerance: float, formats: tuple[str, ...] | None = None) -> Pick:
    """Pure: the smallest passing variant among those within `speed_tolerance` of the best speed-up.

    Passing = built (for ONNX: the onnxruntime check held) and through the gates. Timings on a shared CPU move by a
    few percent from run to run; that must not decide between 237 MB and 542 MB. Ties: smaller on disk, then faster,
    then the earlier in build order.
    """
    kind = f"{'/'.join(formats)} variant" if formats else "variant"
    pool = [v for v in variants if formats is None or v.get("format") in formats]
    ok = [v for v in pool if v.get("passed")]
    if not ok:
        return Pick(
            None, f"none: no {kind} passed the gates ({len(pool)} tried)" if pool else f"none: no {kind} was built"
        )
    best = max(ok, key=lambda v: v["speedup"])
    tol = f"{speed_tolerance * 100:g}%"
    near = [v for v in ok if v["speedup"] >= best["speedup"] * (1 - speed_tolerance) - 1e-9]
    win = min(near, key=lambda v: (v["size_bytes"], -v["speedup"]))
    if len(ok) == 1:
        why = f"the only passing {kind}"
    elif len(near) == 1:
        why = f"fastest; every other passing {kind} is more than {tol} slower"
    elif win["speedup"] >= best["speedup"]:
        why = f"fastest, and smallest of the {len(near)} within {tol} of it"
    else:
        why = (
            f"within {tol} of the best {best['speedup']:.3f}×, {best['name']} at {_mb(best['size_bytes'])}; "
            f"smallest of {len(near)}"
        )
    return Pick(win, f"{win['name']}: {_mb(win['size_bytes'])}, {win['speedup']:.3f}× ({why})")


def _mb(n_bytes: int) -> str:
    mb = n_bytes / 1e6
    return f"{mb:.0f} MB" if mb >= 100 else f"{mb:.3g} MB"


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
        if cfg.onnx_mixed:
            out.append(("onnx-mixed", {"kind": "onnx_mixed"}))
    return out


def _check_config(cfg, steps: list[tuple[str, dict]]) -> None:
    src = cfg.onnx_source
    kinds = {spec["kind"] for _, spec in steps}
    need = ONNX_SOURCE_KIND.get(src)
    if cfg.export_onnx and src != "original" and need not in kinds:
        raise CompressionError(
            f"onnx_source is '{src}' but that variant is not built",
            "compression.onnx_source",
            f"enable {need} or export the original",
        )


class CompressionResult(TypedDict, total=False):
    """What `compress` returns (also written as report.json beside the variants)."""

    baseline: dict | None  # the original model's measurements
    variants: list[dict]  # each built variant: name, path, technique, measurements, passed, reason
    rows: list[dict]  # the table, one row per variant (the Prefect table artifact)
    table_md: str
    selected: str | None  # the variant picked for release (any format), with its reason
    selected_path: str | None
    selected_reason: str
    edge: str | None  # the ONNX edge bundle's directory, with its variant name and reason
    edge_name: str | None
    edge_reason: str
    note: str  # why nothing was built (compression off, or no eligible technique)


def compress(
    model_path: str, out_dir: str, cfg, eval_path: str, max_len: int, private_paths: list[str] | None
) -> CompressionResult:
    """Build, reload, measure and gate every configured variant of `model_path`; see the module docstring."""
    from llmops.files import dir_digest
    from tasks.data import read_texts
    from tasks.model import load_model

    steps = plan(cfg)
    out = Path(out_dir)
    if not cfg.enabled or not steps:
        why = "compression is disabled" if not cfg.enabled else "no technique is enabled"
        return {"variants": [], "baseline": None, "table_md": f"{why}\n", "selected": None, "edge": None, "note": why}
    _check_config(cfg, steps)
    distill_fp = None
    if cfg.distill:  # refuse before any work: the privacy rule is not a late surprise
        distill_fp = check_public(cfg.distill_data, private_paths)
    if cfg.export_onnx and cfg.onnx_mixed and cfg.onnx_sensitivity_data is not None:
        check_public(cfg.onnx_sensitivity_data, private_paths)  # what the bit choice reads must be public too
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
            entry.update(
                passed=False, reason=f"not built: {type(e).__name__}: {str(e).splitlines()[0][:300]}", built=False
            )
        variants.append(entry)
    del model
    result = decide(measure(model_path, variants, texts, max_len, cfg), cfg)
    for v in result["variants"]:
        if v.get("built", True):
            v["digest"] = dir_digest(Path(v["path"]))
    _write_report(out, result)
    return result


def _privacy_error():
    from llmops.errors import PrivacyError

    return PrivacyError


def _build(
    spec: dict, model, tok, tmp: Path, cfg, built: dict, texts: list[str], max_len: int, distill_fp: str | None
) -> dict:
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
    if kind in ("onnx_int8", "onnx_mixed"):
        if "onnx" not in built:
            raise CompressionError(
                "the fp32 ONNX export failed, so there is nothing to quantize",
                str(tmp),
                "see the onnx variant's reason",
            )
        src = _onnx_source_model(src_name, model, built)
        fp32 = built["onnx"]
        shapes = matmul_nodes(fp32 / ONNX_FILE)
        heads = {LM_HEAD: cfg.onnx_lm_head_block_size} if LM_HEAD in shapes else {}
        if kind == "onnx_int8":
            plan_bits, extra = {n: 8 for n in shapes}, {}
        else:
            plan_bits, extra = _mixed(src, tok, fp32, shapes, cfg)
        check = quantize_onnx(
            fp32,
            tmp,
            src,
            tok,
            texts,
            max_len,
            src_name,
            plan_bits,
            cfg.onnx_int8_block_size,
            cfg.onnx_accuracy_level,
            technique=spec["kind"].replace("_", "-"),
            extra=extra,
            block_sizes=heads,
            check_drift=kind == "onnx_int8",
        )
        return {"onnx_check": check, "onnx_source": src_name, **({"mixed": extra} if extra else {})}
    raise CompressionError(f"unknown variant kind '{kind}'", "compression", "this is a bug")


def _mixed(src, tok, fp32: Path, shapes: dict, cfg) -> tuple[dict[str, int], dict]:
    """Bits per node for the mixed bundle: int4 sensitivity measured on public (or self-sampled) text, then the
    most sensitive nodes per byte go to int8 within `onnx_mixed_max_size` of the fp32 bundle."""
    from tasks.data import load_dataset

    public = None
    if cfg.onnx_sensitivity_data is not None:  # read as `check_public` read it: the records it found public
        public = [r.text for r in load_dataset(Path(cfg.onnx_sensitivity_data)).records]
    calib = calibration_ids(src, tok, public)
    cost = sensitivity(src, [n for n in shapes if n != LM_HEAD], calib, cfg.onnx_int8_block_size)  # head: int8
    total = sum(f.stat().st_size for f in fp32.iterdir() if f.name.startswith(ONNX_FILE))
    other = total - onnx_matmul_weight_bytes(fp32 / ONNX_FILE)  # norms, rotary caches: stay fp32
    budget = int(cfg.onnx_mixed_max_size * total) - other
    plan_bits, info = mixed_plan(shapes, cost, budget, cfg.onnx_int8_block_size)
    info.update(
        sensitivity_on="public text" if public else "text sampled from the model (no records read)",
        max_size=cfg.onnx_mixed_max_size,
        cost={n: round(c, 6) for n, c in cost.items()},
    )
    return plan_bits, info


def _onnx_source_model(src_name: str, model, built: dict[str, Path]):
    """The fp32 torch model `onnx_source` names: the fine-tuned original, or the pruned/distilled variant on disk."""
    if src_name == "original":
        return model
    from tasks.model import load_model

    return load_model(built[ONNX_SOURCE_KIND[src_name]])[0].eval()


def decide(measured: dict, cfg) -> CompressionResult:
    """No I/O: gate every measured variant (in place), tabulate, pick `selected` (any format) and `edge` (ONNX)
    by the same rule (`choose`), each with its reason."""
    base, variants = measured["baseline"], measured["variants"]
    for v in variants:
        if v.get("built", True):
            v["passed"], v["reason"] = gate(
                v, base, cfg.max_perplexity_increase, cfg.min_speedup, cfg.min_top1_agreement
            )
    rows = table_rows(base, variants)
    band = noise_band(variants, cfg.pick_speed_tolerance)
    selected = choose(variants, band)
    edge = choose_edge(variants)
    rule = (
        f"- **Rule**: selected = the smallest passing variant within {band * 100:.3g}% of the fastest "
        f"(pick_speed_tolerance {cfg.pick_speed_tolerance * 100:g}%, widened to the measured noise: the largest "
        "relative IQR of paired per-round speed-ups); edge bundle = the smallest passing ONNX variant (size "
        "first). Speed-ups are medians of per-round ratios to the original, rounds interleaved."
    )
    picks = [f"- **Selected**: {selected.reason}", f"- **Edge bundle**: {edge.reason}", rule]
    sel, e = selected.variant, edge.variant
    return {
        "baseline": base,
        "variants": variants,
        "rows": rows,
        "table_md": table_markdown(rows, variants, measured["note"], picks),
        "selected": sel["name"] if sel else None,
        "selected_path": sel["path"] if sel else None,
        "selected_reason": selected.reason,
        "edge": e["path"] if e else None,
        "edge_name": e["name"] if e else None,
        "edge_reason": edge.reason,
    }


def _write_report(out: Path, result: dict) -> None:
    for name, text in (("report.json", json.dumps(result, indent=2, default=str)), ("table.md", result["table_md"])):
        write_text_atomic(out / name, text)


# ----------------------------------------------------------------------------------------------- Prefect task


def _compress_files(inputs) -> list:
    cfg = inputs["cfg"]
    return [inputs["model_path"], inputs["eval_path"], getattr(cfg, "distill_data", None) if cfg.distill else None]
