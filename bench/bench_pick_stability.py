"""Does the shipped pick (selected variant, edge bundle) flip on timing noise? The demo's compression of the real
SmolLM2-135M-Instruct (ONNX fp32 + block-wise int8, the demo config), built once, then measured and decided
--repeats times, optionally with a CPU burner on every core. Prints one row per repetition and how often each
pick changed, for the old rule (5% tolerance, ratio of medians, edge by the same rule) and the shipped one
(paired per-round speed-ups, tie band widened to the measured noise, edge on size first).

    .venv/bin/python bench/bench_pick_stability.py --repeats 5            # ~10 min on 2 cores
    .venv/bin/python bench/bench_pick_stability.py --repeats 5 --burn     # the same under load
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _burn(until: float) -> None:
    x = 0
    while time.time() < until:
        x = (x * 31 + 7) % 1_000_003


def old_rule(variants: list[dict], tol: float) -> tuple[str | None, str | None]:
    """The rule before issue 26: speed-up = ratio of medians, 5% band, the edge by the same rule."""
    from tasks.compression import choose

    old = [dict(v, speedup=v.get("speedup_ratio_of_medians", v["speedup"])) for v in variants]
    sel, edge = choose(old, tol), choose(old, tol, ("onnx",))
    return (sel.variant or {}).get("name"), (edge.variant or {}).get("name")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--burn", action="store_true", help="a CPU burner on every core while measuring")
    ap.add_argument("--max-len", type=int, default=128)
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from llmops.config import load_config
    from tasks.compression import compress, decide
    from tasks.compression.measure import measure
    from tasks.data import prepare_data
    from tasks.model import resolve_model

    cfg = load_config(ROOT / "configs/demo.yaml").compression
    work = Path(tempfile.mkdtemp(prefix="pick-stability-"))
    model = resolve_model("smollm2", work / "state")
    data = prepare_data(ROOT / "data/sample/shakespeare.jsonl", work / "state", 0.1)
    t0 = time.time()
    first = compress(model.path, str(work / "c"), cfg, data.eval_path, args.max_len, [data.train_path])
    print(
        f"built {len(first['variants'])} variants in {time.time() - t0:.0f} s: "
        f"{', '.join(v['name'] for v in first['variants'])}"
    )
    from tasks.data import read_texts

    texts = read_texts(Path(data.eval_path))[: cfg.max_eval_records]
    burners = []
    if args.burn:
        burners = [
            multiprocessing.Process(target=_burn, args=(time.time() + 3600,), daemon=True)
            for _ in range(os.cpu_count() or 2)
        ]
        for b in burners:
            b.start()
    rows = []
    try:
        for r in range(args.repeats):
            variants = [
                {k: v[k] for k in ("name", "path", "technique", "format") if k in v}
                for v in first["variants"]
                if v.get("built", True)
            ]
            measured = measure(model.path, variants, texts, args.max_len, cfg)
            base = measured["baseline"]
            for v in measured["variants"]:
                v["speedup_ratio_of_medians"] = round(v["tokens_per_s"] / base["tokens_per_s"], 3)
            res = decide(measured, cfg)
            by = {v["name"]: v for v in res["variants"]}
            old_sel, old_edge = old_rule(res["variants"], cfg.pick_speed_tolerance)
            rows.append(
                {
                    "selected": res["selected"],
                    "edge": res["edge_name"],
                    "old_selected": old_sel,
                    "old_edge": old_edge,
                    **{f"{n} speed-up": by[n]["speedup"] for n in ("onnx", "onnx-int8") if n in by},
                    **{f"{n} spread": by[n].get("speedup_spread") for n in ("onnx", "onnx-int8") if n in by},
                }
            )
            print(f"repeat {r + 1}: {rows[-1]}", flush=True)
    finally:
        for b in burners:
            b.terminate()
    print(
        f"\n{'repeat':>6} | {'selected':<14} {'edge':<12} | {'old selected':<14} {'old edge':<12} | "
        "onnx×  int8×  spread(onnx, int8)"
    )
    for i, r in enumerate(rows, 1):
        print(
            f"{i:>6} | {str(r['selected']):<14} {str(r['edge']):<12} | {str(r['old_selected']):<14} "
            f"{str(r['old_edge']):<12} | {r.get('onnx speed-up', '-'):>5} {r.get('onnx-int8 speed-up', '-'):>5}  "
            f"{r.get('onnx spread')}, {r.get('onnx-int8 spread')}"
        )
    for key in ("selected", "edge", "old_selected", "old_edge"):
        c = Counter(r[key] for r in rows)
        print(f"{key:<13} {dict(c)}  changes vs the most common: {len(rows) - c.most_common(1)[0][1]}/{len(rows)}")


if __name__ == "__main__":
    main()
