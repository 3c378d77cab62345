"""Serving, measured: Ray Serve at 1 and 2 replicas vs one plain process without Ray, cache hit/miss, rollout time,
memory per replica, and the near-duplicate cache's false-hit rate.

    .venv/bin/python bench/bench_serving.py                      # SmolLM2-135M, torch (~5-8 min here)
    .venv/bin/python bench/bench_serving.py --model tiny         # the tests' tiny model (~2 min)
    .venv/bin/python bench/bench_serving.py --onnx DIR           # + an ONNX edge bundle (model.onnx + tokenizer)

Load (the same for every row): --requests completions, --concurrency at a time, each a distinct prompt with
--max-tokens greedy tokens (distinct prompts: no cache hits in the load). The plain process is a stdlib HTTP server
around the same engine (one request at a time, like a replica): the floor that 2 replicas must beat.
On a shared 2-core machine the numbers are noisy; the table says what was run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLAIN = r"""
import json, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
sys.path.insert(0, sys.argv[3])
from llmops.serving.engine import load_engine
eng, lock = load_engine(sys.argv[1], sys.argv[4], 1), threading.Lock()
class H(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with lock:
            text = "".join(p for p, f in eng.stream(eng.encode(body["prompt"]), body["max_tokens"]) if not f)
        out = json.dumps({"choices": [{"text": text}]}).encode()
        self.send_response(200); self.send_header("content-length", str(len(out))); self.end_headers()
        self.wfile.write(out)
srv = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), H)
print("ready", flush=True)
srv.serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict) -> tuple[float, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        out = json.loads(r.read())
        return time.perf_counter() - t0, dict(r.headers), out


def load(url: str, n: int, conc: int, max_tokens: int, tag: str) -> dict:
    def one(i):
        return post(
            url,
            {
                "model": "bench",
                "prompt": f"{tag} request {i}: Once upon a time",
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )[0]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        lat = sorted(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    return {"rps": n / wall, "p50": lat[len(lat) // 2], "p95": lat[min(n - 1, int(0.95 * n))]}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def plain_row(path: str, engine: str, args) -> dict:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", PLAIN, path, str(port), str(ROOT), engine],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        url = f"http://127.0.0.1:{port}/"
        post(url, {"prompt": "warm up", "max_tokens": 2})
        row = load(url, args.requests, args.concurrency, args.max_tokens, "plain")
        row["mem_mb"] = rss_mb(proc.pid)
        return row
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def ray_rows(path: str, digest: str, engine: str, args) -> list[dict]:
    from llmops.serving import control
    from llmops.serving.settings import ServeSettings

    rows = []
    port = free_port()
    for version, replicas in (("1", 1), ("2", 2)):
        s = ServeSettings(
            http_port=port,
            replicas=replicas,
            num_cpus=1,
            engine=engine,
            limits={"max_tokens": 256, "max_queued": 1000, "timeout_s": 300},
            cache={"backend": "memory"},
            smoke={"prompts": 2},
        )
        rep = control.rollout("bench", version, path, f"{digest}-{version}", s, {})
        url = f"http://127.0.0.1:{port}/v1/completions"
        control.wait_http(f"http://127.0.0.1:{port}/healthz")
        post(url, {"model": "bench", "prompt": "warm up", "max_tokens": 2, "temperature": 0})
        row = load(url, args.requests, args.concurrency, args.max_tokens, f"ray{replicas}")
        from ray import serve

        h = serve.get_deployment_handle("ModelServer", app_name=control.app_name("bench", version))
        pids = {h.info.remote().result()["pid"] for _ in range(8 * replicas)}
        row.update(
            replicas=replicas, rollout_s=rep["seconds"]["total"], mem_mb=statistics.mean(rss_mb(p) for p in pids)
        )
        if replicas == 2:  # cache: the first request of a prompt misses, the same request again hits
            body = {
                "model": "bench",
                "prompt": "The cache bench prompt",
                "max_tokens": args.max_tokens,
                "temperature": 0,
            }
            miss, headers, _ = post(url, body)
            assert headers["x-llmops-cache"] == "miss"
            hits = []
            for _ in range(20):
                dt, headers, _ = post(url, body)
                assert headers["x-llmops-cache"] == "hit"
                hits.append(dt)
            row.update(miss_s=miss, hit_s=statistics.median(hits))
        rows.append(row)
    return rows


def semantic_false_hits(threshold: float) -> dict:
    """Near-duplicate cache on real lines: reworded copies (case, spacing, punctuation) should hit; one changed word
    (another question) must not. Measured on the shipped Shakespeare sample."""
    from llmops.serving.cache import SemanticIndex

    lines = [json.loads(x)["text"].strip() for x in (ROOT / "data/sample/shakespeare.jsonl").read_text().splitlines()]
    lines = [x for x in lines if 30 <= len(x) <= 200][:300]
    idx = SemanticIndex(threshold, max_entries=10_000)
    for i, x in enumerate(lines):
        idx.add("g", x, str(i))
    same = sum(idx.lookup("g", "  " + x.upper().replace(",", "") + " ") == str(i) for i, x in enumerate(lines))
    changed, false = 0, 0
    for x in lines:
        words = x.split()
        if len(words) < 3:
            continue
        j = len(words) // 2
        variant = " ".join(words[:j] + ["not" if words[j] != "not" else "never"] + words[j + 1 :])
        changed += 1
        false += idx.lookup("g", variant) is not None
    return {"n": len(lines), "true_hit_rate": same / len(lines), "false_hit_rate": false / max(changed, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--onnx", help="an ONNX edge bundle directory to measure as well")
    ap.add_argument("--skip-torch", action="store_true", help="only the ONNX bundle")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    from llmops.serving import control

    control.use_loopback_ray()  # before Ray is imported: every listener on 127.0.0.1
    import ray

    from llmops.files import dir_digest
    from tasks.model import resolve_model

    state = Path(os.environ.get("LLMOPS_HOME", ROOT / ".llmops")) / "bench-serving"
    ref = resolve_model(args.model, state, tiny=dict(arch="llama", layers=2, hidden=64, heads=4, seed=0), max_len=512)
    variants = [] if args.skip_torch else [("torch", ref.path, "transformers", ref.digest)]
    if args.onnx:
        variants.append(("onnx-int8", args.onnx, "onnx", dir_digest(Path(args.onnx))))
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    # 4 logical CPUs on 2 cores: blue/green needs the old and the new version side by side
    ray.init(**control.local_ray(temp, num_cpus=4)["init_kwargs"], logging_level=logging.WARNING, log_to_driver=False)
    print(
        f"model {args.model} ({ref.path}); load: {args.requests} requests, {args.concurrency} concurrent, "
        f"{args.max_tokens} greedy tokens each, distinct prompts; {os.cpu_count()} cores (shared)\n"
    )
    print("| engine | server | req/s | p50 s | p95 s | rollout s | mem/replica MB |")
    print("|---|---|---|---|---|---|---|")
    cache_line = ""
    try:
        from ray import serve

        for name, path, engine, digest in variants:
            p = plain_row(path, engine, args)
            print(
                f"| {name} | plain process | {p['rps']:.2f} | {p['p50']:.2f} | {p['p95']:.2f} | — | "
                f"{p['mem_mb']:.0f} |",
                flush=True,
            )
            for r in ray_rows(path, f"{name}-{digest}", engine, args):
                print(
                    f"| {name} | Ray Serve x{r['replicas']} | {r['rps']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | "
                    f"{r['rollout_s']:.1f} | {r['mem_mb']:.0f} |",
                    flush=True,
                )
                if "hit_s" in r:
                    cache_line += (
                        f"\ncache ({name}): miss {1000 * r['miss_s']:.1f} ms, hit {1000 * r['hit_s']:.2f} "
                        f"ms (median of 20), hit/miss = {r['hit_s'] / r['miss_s']:.4f} (goal <= 0.05)"
                    )
            for app in [a for a in serve.status().applications if a.startswith("llmops-")]:
                serve.delete(app)  # the next engine starts from an empty cluster
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
    print(cache_line)
    sem = semantic_false_hits(0.95)
    print(
        f"\nnear-duplicate cache (threshold 0.95, {sem['n']} sample lines): reworded copies hit "
        f"{100 * sem['true_hit_rate']:.1f}%, one-word changes (false hits) {100 * sem['false_hit_rate']:.1f}%"
    )


if __name__ == "__main__":
    main()
