"""Compression benchmark on the real SmolLM2-135M-Instruct: every variant built, reloaded and run on CPU.

    .venv/bin/python bench/bench_compression.py                      # ~15-25 min on 2 busy CPU cores
    .venv/bin/python bench/bench_compression.py --threads 1 --distill-steps 30 --rounds 10

Run 1 (one `compress` call): magnitude pruning (global, --sparsity), torchao int8 weight-only and dynamic, a
distilled half-depth student (on data/public/macbeth.txt, never the private sample), ONNX fp32 + onnxruntime int8.
Run 2: structured MLP-channel pruning at the same sparsity (the config holds one prune method per run).
Perplexity on the held-out split of the shipped Shakespeare sample; latency = batch-1 forward of --max-len tokens.
Prints both tables, then the issue's goals (met / missed) from the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_cfg(**kw):
    from llmops.config import CompressionConfig

    return CompressionConfig(enabled=True, **kw)  # `quantize: both` builds both torchao int8 variants


def goals(res: dict, structured: dict | None) -> list[str]:
    by = {v["name"]: v for v in res["variants"]}
    out = []

    def line(goal, name, value, ok):
        out.append(f"{'MET   ' if ok else 'MISSED'} {goal:<44} {name:<24} {value}")

    for name in ("int8-weight-only", "int8-dynamic", "onnx-int8"):
        v = by.get(name)
        if v and v.get("built", True) and "linear_bytes_ratio" in v:
            line(
                "int8 Linear bytes <= 0.30 of fp32",
                name,
                f"{v['linear_bytes_ratio']:.3f}",
                v["linear_bytes_ratio"] <= 0.30,
            )
    for name in ("int8-weight-only", "int8-dynamic", "onnx-int8"):
        v = by.get(name)
        if v and v.get("built", True):
            line("int8 perplexity delta <= +2%", name, f"{v['ppl_delta']:+.2%}", v["ppl_delta"] <= 0.02)
            line("int8 CPU tokens/s speed-up >= 1.5x", name, f"{v['speedup']:.2f}x", v["speedup"] >= 1.5)
    v = by.get("onnx-int8")
    if v and v.get("built", True):
        line("int8 file size (whole model) vs fp32", "onnx-int8", f"{v['size_ratio']:.3f}", True)
    for v in [x for x in res["variants"] if x["name"].startswith("pruned")] + ([structured] if structured else []):
        if v and v.get("built", True):
            out.append(
                f"INFO   pruning {v['name']}: perplexity {v['ppl_delta']:+.2%}, speed-up {v['speedup']:.2f}x, "
                f"sparsity {v.get('sparsity')}, params {v['params']:,}"
            )
    v = by.get("distilled")
    if v and v.get("built", True):
        out.append(
            f"INFO   distilled student: {v.get('student_layers')}/{v.get('teacher_layers')} layers, "
            f"{v['size_mb']} MB ({v['size_ratio']:.2f}x), params {v['params']:,}, perplexity "
            f"{v['perplexity']:.2f} ({v['ppl_delta']:+.1%}), speed-up {v['speedup']:.2f}x"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch + onnxruntime (default: torch's)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--distill-steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--eval-records", type=int, default=64)
    ap.add_argument("--out", default=None, help="where variants go (default: a temp dir, removed)")
    ap.add_argument("--onnx-block-size", type=int, default=32)
    ap.add_argument("--skip", nargs="*", default=[], choices=["distill", "onnx", "structured"])
    args = ap.parse_args()
    if args.threads:  # for the whole run (distillation too): oversubscribed OpenMP threads on a busy box crawl
        import torch

        torch.set_num_threads(args.threads)

    from tasks.compression import compress
    from tasks.data import prepare_data
    from tasks.model import resolve_model

    state = Path(os.environ.get("LLMOPS_HOME", ROOT / ".llmops"))
    model = resolve_model("smollm2", state)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench-compression-"))
    data = prepare_data(ROOT / "data/sample/shakespeare.jsonl", work / "state", 0.1)
    common = dict(
        max_perplexity_increase=0.02,
        min_speedup=1.5,
        bench_rounds=args.rounds,
        max_eval_records=args.eval_records,
        bench_threads=args.threads,
    )
    cfg = make_cfg(
        prune_sparsity=args.sparsity,
        prune_method="magnitude_global",
        quantize="both",
        distill="distill" not in args.skip,
        distill_data=ROOT / "data/public/macbeth.txt",
        distill_steps=args.distill_steps,
        distill_batch_size=4,
        distill_learning_rate=1e-4,
        export_onnx="onnx" not in args.skip,
        onnx_int8_block_size=args.onnx_block_size,
        **common,
    )
    t0 = time.time()
    res = compress(model.path, str(work / "run1"), cfg, data.eval_path, args.max_len, data.fingerprint)
    print(f"\n## Run 1 ({time.time() - t0:.0f} s)\n\n{res['table_md']}", flush=True)
    structured = None
    if "structured" not in args.skip:
        t0 = time.time()
        res2 = compress(
            model.path,
            str(work / "run2"),
            make_cfg(prune_sparsity=args.sparsity, prune_method="mlp_channels", **common),
            data.eval_path,
            args.max_len,
            data.fingerprint,
        )
        structured = res2["variants"][0]
        print(f"\n## Run 2: structured pruning ({time.time() - t0:.0f} s)\n\n{res2['table_md']}", flush=True)
    print("\n## Goals (issue 5)\n")
    print("\n".join(goals(res, structured)))
    (work / "bench.json").write_text(json.dumps({"run1": res, "run2": structured}, indent=2, default=str))
    print(f"\nfull results: {work / 'bench.json'}")


if __name__ == "__main__":
    main()
