"""One engine in its own process for bench/bench_edge.py: JSON commands on stdin, JSON answers on stdout.

    python bench/edge_worker.py KIND PATH THREADS     # KIND: torch | ours | genai | llamacpp

Imports only what its engine needs (the `ours` worker never imports torch), so its peak RSS is the engine's.
Commands: {"op": "score", "seqs": [[ids]]} -> {"nll", "n", "top": [[ids]]}   (teacher-forced, one sequence at a time)
          {"op": "gen", "ids": [...], "n": 128} -> {"tokens", "ttft_s", "decode_s"}   (greedy, no early stop)
          {"op": "rss"} -> {"peak_rss_mb"}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def log_softmax_rows(x):
    import numpy as np

    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class Torch:
    def __init__(self, path, threads):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    def logits(self, ids):
        with self.torch.no_grad():
            return self.model(input_ids=self.torch.tensor([ids])).logits[0].float().numpy()

    def gen(self, ids, n):
        """transformers' KV cache, greedy: the loop `generate` runs, without its logits-processor overhead."""
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            t1 = time.perf_counter()
            toks = [tok]
            past = out.past_key_values
            for _ in range(n - 1):
                out = self.model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = int(out.logits[0, -1].argmax())
                toks.append(tok)
            t2 = time.perf_counter()
        return toks, t1 - t0, t2 - t1


class Ours:
    def __init__(self, path, threads):
        sys.path.insert(0, str(Path(path)))
        from edge_runner import EdgeModel  # the copy inside the bundle: what a device runs

        self.m = EdgeModel(path, threads)

    def logits(self, ids):
        return self.m.all_logits(ids)

    def gen(self, ids, n):
        import numpy as np

        t0 = time.perf_counter()
        logits, state = self.m.prefill(ids)
        tok = int(np.argmax(logits))
        t1 = time.perf_counter()
        toks = [tok]
        for _ in range(n - 1):
            logits, state = self.m.step(tok, state)
            tok = int(np.argmax(logits))
            toks.append(tok)
        return toks, t1 - t0, time.perf_counter() - t1


class Genai:
    """onnxruntime-genai's own C++ generation loop over its builder's model; teacher-forced scoring runs the same
    graph through plain onnxruntime (llmops.edge_runner) because the genai API returns only the last logits."""

    def __init__(self, path, threads):
        import onnxruntime_genai as og

        self.og = og
        gc = Path(path) / "genai_config.json"  # same thread count as every other engine (its default is all cores)
        conf = json.loads(gc.read_text())
        conf["model"]["decoder"].setdefault("session_options", {}).update(
            intra_op_num_threads=threads, inter_op_num_threads=1
        )
        gc.write_text(json.dumps(conf, indent=4))
        cfg = og.Config(str(path))
        self.model = og.Model(cfg)
        self.path, self.threads = path, threads
        self._scorer = None

    def logits(self, ids):
        if self._scorer is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from llmops.edge_runner import EdgeModel

            self._scorer = EdgeModel(self.path, self.threads)
        return self._scorer.all_logits(ids)

    def gen(self, ids, n):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + n, do_sample=False, min_length=len(ids) + n)
        g = og.Generator(self.model, params)
        t0 = time.perf_counter()
        g.append_tokens(ids)
        g.generate_next_token()
        t1 = time.perf_counter()
        while not g.is_done():
            g.generate_next_token()
        t2 = time.perf_counter()
        seq = [int(t) for t in g.get_sequence(0)][len(ids) :]
        return seq, t1 - t0, t2 - t1


class LlamaCpp:
    def __init__(self, path, threads):
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_threads=threads,
            n_threads_batch=threads,
            n_ctx=512,
            logits_all=True,
            verbose=False,
        )

    def logits(self, ids):
        import numpy as np

        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def gen(self, ids, n):
        import numpy as np

        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        toks = [tok]
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            toks.append(tok)
        return toks, t1 - t0, time.perf_counter() - t1


KINDS = {"torch": Torch, "ours": Ours, "genai": Genai, "llamacpp": LlamaCpp}


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    kind, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    eng = KINDS[kind](path, threads)
    out = sys.stdout
    sys.stdout = sys.stderr  # engine chatter must not corrupt the protocol
    print(json.dumps({"ready": True, "rss_mb": peak_rss_mb()}), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "score":
            nll, n, tops = 0.0, 0, []
            for ids in cmd["seqs"]:
                lp = log_softmax_rows(eng.logits(ids))
                nll -= float(lp[range(len(ids) - 1), ids[1:]].sum())
                n += len(ids) - 1
                tops.append([int(t) for t in lp.argmax(-1)])
            res = {"nll": nll, "n": n, "top": tops}
        elif cmd["op"] == "gen":
            toks, ttft, dec = eng.gen(cmd["ids"], cmd["n"])
            res = {"tokens": toks, "ttft_s": ttft, "decode_s": dec}
        elif cmd["op"] == "rss":
            res = {"peak_rss_mb": peak_rss_mb()}
        else:
            res = {"error": f"unknown op {cmd['op']}"}
        print(json.dumps(res), file=out, flush=True)


if __name__ == "__main__":
    main()
