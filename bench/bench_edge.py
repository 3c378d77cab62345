"""The edge bundle against what an edge user would otherwise ship, side by side in one run.

    .venv/bin/python bench/bench_edge.py --model MODEL_DIR --eval HELD_OUT.jsonl [--threads 1] [--rounds 3]
        [--llama-python /path/to/python-with-llama_cpp --llama-src llama_cpp_python-0.3.36.tar.gz]

MODEL_DIR is an HF model dir (the demo's fine-tuned SmolLM2: `llmops status` prints the registered version; its
`model` artifact), HELD_OUT the held-out split (the data step's eval.jsonl). Every engine runs in its own worker
process (bench/edge_worker.py) so its peak RSS is its own; decode timings are interleaved round by round (a load
spike hits every engine in the same round) and reported as medians.

Rows: torch fp32 (KV cache), our fp32 / int8 / mixed int4-int8 bundles (tasks/compression/onnx.py, run by the
bundle's own edge_runner.py: onnxruntime + numpy, no torch), onnxruntime-genai's builder int8 / int4 run by its C++
generator (anchor), and llama.cpp Q8_0 / Q4_K_M converted from the same weights (anchor, opt-in: llama-cpp-python
builds from source in ~18 minutes, so it lives in its own venv: `python -m venv /tmp/llama/venv &&
CMAKE_ARGS="-DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF" /tmp/llama/venv/bin/pip install llama-cpp-python==0.3.36`, and
`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36` for the converter script in its sdist).

Columns: decode tokens/s (128 greedy tokens after a 64-token held-out prompt, batch 1), time to first token (the
prompt's prefill + first token), peak RSS of the worker, bytes of the model files, held-out perplexity and
teacher-forced top-1 agreement with torch fp32 on the same tokens; gate = the product's (perplexity <= +2% of fp32,
top-1 >= 0.94).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORKER = ROOT / "bench" / "edge_worker.py"
MAX_PPL = 0.02
MIN_TOP1 = 0.94


class Worker:
    def __init__(self, name: str, kind: str, path: Path, threads: int, python: str | None = None):
        self.name, self.kind, self.path = name, kind, path
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        self.p = subprocess.Popen(
            [python or sys.executable, str(WORKER), kind, str(path), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(Path(path).parent / f"{name}.worker.log", "w"),
            text=True,
            env=env,
        )
        first = self.p.stdout.readline()
        if not first:
            raise RuntimeError(f"{name}: worker died on load (see {Path(path).parent / (name + '.worker.log')})")

    def ask(self, **cmd):
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: worker died")
        return json.loads(line)

    def close(self):
        self.p.stdin.close()
        self.p.wait(timeout=60)


def model_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    weights = (".onnx", ".onnx.data", ".safetensors", ".bin", ".gguf")
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(weights))


def build_ours(model, tok, texts, work: Path, mixed_size: float) -> dict[str, tuple[Path, float]]:
    from llmops.config import CompressionConfig
    from tasks import compression as c

    out = {}
    fp32 = work / "ours-fp32"
    if not (fp32 / c.ONNX_FILE).is_file():
        shutil.rmtree(fp32, ignore_errors=True)
        fp32.mkdir(parents=True)
        t0 = time.time()
        c.export_onnx(model, tok, fp32, texts, 128, "original")
        out["ours fp32"] = (fp32, time.time() - t0)
    else:
        out["ours fp32"] = (fp32, 0.0)
    shapes = c.matmul_nodes(fp32 / c.ONNX_FILE)
    cfg = CompressionConfig(onnx_mixed=True, onnx_mixed_max_size=mixed_size)
    variants = (
        ("ours int8", "int8", 32),
        ("ours int8 (lm_head block 16)", "int8", 16),
        ("ours mixed int4/int8", "mixed", 32),
    )
    for name, kind, head in variants:
        d = work / f"ours-{kind}-h{head}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        t0 = time.time()
        if kind == "int8":
            plan, extra = {n: 8 for n in shapes}, {}
        else:
            plan, extra = c._mixed(model, tok, fp32, shapes, cfg)
        c.quantize_onnx(
            fp32,
            d,
            model,
            tok,
            texts,
            128,
            "original",
            plan,
            cfg.onnx_int8_block_size,
            cfg.onnx_accuracy_level,
            extra=extra,
            block_sizes={c.LM_HEAD: head},
            check_drift=False,
        )
        out[name] = (d, time.time() - t0)
    return out


def build_genai(model_dir: Path, work: Path) -> dict[str, tuple[Path, float]]:
    out = {}
    for prec in ("int8", "int4"):
        d = work / f"genai-{prec}"
        t0 = time.time()
        if not (d / "model.onnx").is_file():
            r = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    str(model_dir),
                    "-o",
                    str(d),
                    "-p",
                    prec,
                    "-e",
                    "cpu",
                    "-c",
                    str(work / "genai-cache"),
                ],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                print(f"onnxruntime-genai builder {prec} failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
        out[f"onnxruntime-genai {prec}"] = (d, time.time() - t0)
    return out


def build_llamacpp(model_dir: Path, work: Path, python: str, src: Path) -> dict[str, tuple[Path, float]]:
    tree = work / "llama-src"
    if not tree.is_dir():
        if src.is_dir():
            tree = src
        else:
            with tarfile.open(src) as t:
                t.extractall(tree, filter="data")
    conv = next(tree.rglob("convert_hf_to_gguf.py"))
    gguf_py = conv.parent / "gguf-py"
    f32 = work / "model-f32.gguf"
    if not f32.is_file():
        env = dict(os.environ, PYTHONPATH=str(gguf_py))
        r = subprocess.run(
            [sys.executable, str(conv), str(model_dir), "--outtype", "f32", "--outfile", str(f32)],
            capture_output=True,
            text=True,
            env=env,
        )
        if r.returncode != 0:
            print(f"GGUF conversion failed: {r.stderr.strip().splitlines()[-3:]}")
            return {}
    out = {}
    for q, ftype in (("Q8_0", 7), ("Q4_K_M", 15)):
        dst = work / f"model-{q}.gguf"
        t0 = time.time()
        if not dst.is_file():
            code = (
                "import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                f"p.ftype = {ftype}; p.nthread = 2; "
                f"sys.exit(llama_cpp.llama_model_quantize({str(f32).encode()!r}, {str(dst).encode()!r}, p))"
            )
            r = subprocess.run([python, "-c", code], capture_output=True, text=True)
            if r.returncode != 0 or not dst.is_file():
                print(f"llama.cpp quantize {q} failed: {r.stderr.strip().splitlines()[-2:]}")
                continue
        out[f"llama.cpp {q}"] = (dst, time.time() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, type=Path, help="HF dir of the fine-tuned model")
    ap.add_argument("--eval", required=True, type=Path, help="held-out records (jsonl with a text field)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=3, help="distinct 64-token prompts (round r uses prompt r)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--records", type=int, default=50, help="held-out records for perplexity / top-1")
    ap.add_argument("--max-len", type=int, default=128, help="tokens per scored record")
    ap.add_argument("--mixed-size", type=float, default=0.20, help="mixed bundle bytes / fp32 bundle bytes")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_edge"))
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--llama-python", help="a python with llama_cpp (opt-in anchor)")
    ap.add_argument("--llama-src", type=Path, help="llama-cpp-python sdist (.tar.gz) or its unpacked tree")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.data import read_texts

    torch.set_num_threads(2)
    a.work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    texts = read_texts(a.eval)
    seqs = [ids for ids in (tok(t, add_special_tokens=False)["input_ids"][: a.max_len] for t in texts) if len(ids) > 1]
    seqs = seqs[: a.records]
    prompts = []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) >= a.prompt_tokens:
            prompts.append(ids[: a.prompt_tokens])
        if len(prompts) == a.prompts:
            break
    if not prompts:
        sys.exit(f"no held-out record in {a.eval} has {a.prompt_tokens} tokens for a prompt")

    built: dict[str, tuple[Path, float]] = {"torch fp32": (a.model, 0.0)}
    print("building our bundles ...", flush=True)
    built |= build_ours(model, tok, texts, a.work, a.mixed_size)
    if not a.no_genai:
        print("building onnxruntime-genai anchors ...", flush=True)
        built |= build_genai(a.model, a.work)
    if a.llama_python and a.llama_src:
        print("converting + quantizing llama.cpp anchors ...", flush=True)
        built |= build_llamacpp(a.model, a.work, a.llama_python, a.llama_src)
    del model

    kinds = {"torch fp32": "torch"}
    workers: dict[str, Worker] = {}
    for name, (path, _) in built.items():
        kind = kinds.get(name) or ("ours" if name.startswith("ours") else "genai" if "genai" in name else "llamacpp")
        py = a.llama_python if kind == "llamacpp" else None
        workers[name] = Worker(name.replace(" ", "_").replace("/", "-"), kind, path, a.threads, py)

    for w in workers.values():  # warm-up: one short generation each
        w.ask(op="gen", ids=prompts[0], n=8)
    runs: dict[str, list] = {n: [] for n in workers}
    for r in range(a.rounds):
        ids = prompts[r % len(prompts)]
        for n, w in workers.items():
            runs[n].append(w.ask(op="gen", ids=ids, n=a.new_tokens))
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    rss = {n: w.ask(op="rss")["peak_rss_mb"] for n, w in workers.items()}  # generation's peak, before scoring
    print(f"scoring {len(seqs)} held-out records per engine ...", flush=True)
    scores = {n: w.ask(op="score", seqs=seqs) for n, w in workers.items()}
    ref_top = scores["torch fp32"]["top"]
    rows = []
    ref_tokens = [x["tokens"] for x in runs["torch fp32"]]
    base_ppl = None
    for n in workers:
        s = scores[n]
        ppl = float(__import__("math").exp(s["nll"] / s["n"]))
        base_ppl = base_ppl or ppl
        agree = sum(a_ == b_ for x, y in zip(s["top"], ref_top) for a_, b_ in zip(x, y))
        total = sum(len(x) for x in ref_top)
        dec = statistics.median((a.new_tokens - 1) / x["decode_s"] for x in runs[n])
        ttft = statistics.median(x["ttft_s"] for x in runs[n]) * 1000
        same = statistics.median(
            next((i for i, (p, q) in enumerate(zip(x["tokens"], y)) if p != q), len(y))
            for x, y in zip(runs[n], ref_tokens)
        )
        top1 = agree / total
        rows.append(
            {
                "engine": n,
                "decode_tps": round(dec, 1),
                "ttft_ms": round(ttft, 1),
                "peak_rss_mb": round(rss[n]),
                "mb": round(model_bytes(Path(built[n][0])) / 1e6, 1),
                "ppl": round(ppl, 2),
                "ppl_delta": ppl / base_ppl - 1,
                "top1": round(top1, 3),
                "greedy_same": same,
                "gate": "reference"
                if n == "torch fp32"
                else ("PASS" if ppl / base_ppl - 1 <= MAX_PPL and top1 >= MIN_TOP1 else "FAIL"),
                "build_s": round(built[n][1], 1),
            }
        )
    for w in workers.values():
        w.close()
    fp32_mb = next(r["mb"] for r in rows if r["engine"] == "ours fp32")
    head = (
        "| engine | decode tok/s | TTFT ms | peak RSS MB | MB | size x fp32 | perplexity | ppl delta | top-1 | "
        "greedy tokens = torch | gate | build s |"
    )
    print(
        f"\n## Edge engines, {a.threads} thread(s), prompt {a.prompt_tokens} tokens, {a.new_tokens} greedy tokens, "
        f"median of {a.rounds} interleaved rounds; perplexity/top-1 on {len(seqs)} held-out records\n"
    )
    print(head)
    print("|" + "---|" * 12)
    for r in rows:
        print(
            f"| {r['engine']} | {r['decode_tps']} | {r['ttft_ms']} | {r['peak_rss_mb']} | {r['mb']} | "
            f"{r['mb'] / fp32_mb:.3f} | {r['ppl']} | {r['ppl_delta']:+.2%} | {r['top1']} | {r['greedy_same']:g}/"
            f"{a.new_tokens} | {r['gate']} | {r['build_s']} |"
        )
    passing = [r for r in rows if r["gate"] == "PASS"]
    anchors = [r for r in passing if not r["engine"].startswith("ours")]
    ours = [r for r in passing if r["engine"].startswith("ours")]
    if anchors and ours:
        best_a, best_o = max(anchors, key=lambda r: r["decode_tps"]), max(ours, key=lambda r: r["decode_tps"])
        print(
            f"\nfastest passing anchor: {best_a['engine']} {best_a['decode_tps']} tok/s; fastest passing bundle of "
            f"ours: {best_o['engine']} {best_o['decode_tps']} tok/s ({best_o['decode_tps'] / best_a['decode_tps']:.2f}x)"
        )
    torch_ttft = rows[0]["ttft_ms"]
    for r in ours:
        print(
            f"{r['engine']}: TTFT {r['ttft_ms']} ms vs torch {torch_ttft} ms; peak RSS {r['peak_rss_mb']} MB; "
            f"{r['mb'] / fp32_mb:.3f} of fp32 bytes"
        )
    (a.work / "bench_edge.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
