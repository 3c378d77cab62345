"""Run an llmops edge bundle with nothing but onnxruntime, numpy and tokenizers (no torch, no transformers).

    python edge_runner.py BUNDLE "prompt" [--max-new-tokens 128] [--threads 1] [--temperature 0] [--top-p 1]
                          [--seed N] [--stats]
    python -m llmops.edge_runner BUNDLE "prompt"        # the same, where llmops is installed

Every edge bundle carries a copy of this file (`edge_runner.py`), so `python BUNDLE/edge_runner.py BUNDLE "prompt"`
works on a device that has only `pip install onnxruntime tokenizers numpy`. The bundle is also an onnxruntime-genai
model folder (`genai_config.json`): `og.Generator(og.Model(BUNDLE), params)` runs it in C++.

The decoder is onnxruntime-genai's model-builder graph: `input_ids`, `attention_mask` and one `past_key_values.N.*`
pair per layer in; `logits` and `present.N.*` out (GroupQueryAttention, the past grows by the tokens fed). The prompt
is one prefill call; each new token is one call with the cache, so a token costs the same at position 10 or 1000.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

GENAI_CONFIG = "genai_config.json"
TOKENIZER = "tokenizer.json"


class BundleError(Exception):
    """The bundle is missing a file or does not describe a decoder with a KV cache."""


class EdgeModel:
    """One onnxruntime session over a bundle's KV decoder: `prefill`, `step`, `all_logits`, `generate`."""

    def __init__(self, bundle: str | Path, threads: int = 1):
        import onnxruntime as ort

        self.bundle = Path(bundle)
        try:
            cfg = json.loads((self.bundle / GENAI_CONFIG).read_text())
            model = cfg["model"]
            dec = model["decoder"]
            self.layers = int(dec["num_hidden_layers"])
            self.kv_heads = int(dec["num_key_value_heads"])
            self.head_size = int(dec["head_size"])
            self.past_names = dec["inputs"]["past_key_names"], dec["inputs"]["past_value_names"]
            present = dec["outputs"]["present_key_names"], dec["outputs"]["present_value_names"]
            onnx_file = self.bundle / dec["filename"]
        except FileNotFoundError:
            raise BundleError(f"{self.bundle}: no {GENAI_CONFIG}; this is not an llmops edge bundle") from None
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"{self.bundle / GENAI_CONFIG}: not a decoder config ({type(e).__name__}: {e})") from None
        eos = model.get("eos_token_id")
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.context_length = int(model.get("context_length") or 0) or None
        search = cfg.get("search", {})
        self.defaults = {"max_new_tokens": int(search.get("max_new_tokens", 128))}
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(onnx_file), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises several types for one meaning
            raise BundleError(f"{onnx_file}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]})") from None
        names = {i.name for i in self.session.get_inputs()}
        if self.past_names[0] % 0 not in names:
            raise BundleError(f"{onnx_file}: the graph has no '{self.past_names[0] % 0}' input (no KV cache)")
        self.outputs = ["logits"] + [n % i for i in range(self.layers) for n in present]

    def _run(self, ids: list[int], past: list, total: int):
        import numpy as np

        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, total), np.int64)}
        for i in range(self.layers):
            feed[self.past_names[0] % i], feed[self.past_names[1] % i] = past[2 * i], past[2 * i + 1]
        out = self.session.run(self.outputs, feed)
        return out[0][0], out[1:]

    def _empty(self) -> list:
        import numpy as np

        z = np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
        return [z] * (2 * self.layers)

    def prefill(self, ids: list[int]):
        """Logits of the last prompt token and the cache state after the prompt."""
        if not ids:
            raise ValueError("empty prompt: nothing to prefill")
        logits, past = self._run(list(ids), self._empty(), len(ids))
        return logits[-1], (past, len(ids))

    def step(self, token: int, state):
        """Feed one token with the cache: (its next-token logits, the new state)."""
        past, total = state
        logits, past = self._run([int(token)], past, total + 1)
        return logits[-1], (past, total + 1)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """`n` greedy tokens after `ids`, not stopping at end-of-sequence (checks and timings compare fixed lengths)."""
        import numpy as np

        logits, state = self.prefill(ids)
        out: list[int] = []
        for i in range(n):
            out.append(int(np.argmax(logits)))
            if i + 1 < n:
                logits, state = self.step(out[-1], state)
        return out

    def all_logits(self, ids: list[int]):
        """Teacher-forced logits of every position (one prefill, no cache reuse): perplexity and top-1 checks."""
        return self._run(list(ids), self._empty(), len(ids))[0]

    def generate(
        self,
        ids: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        stats: dict | None = None,
    ) -> Iterator[int]:
        """Yield new token ids (greedy at temperature 0) until an end-of-sequence id or `max_new_tokens`."""
        import numpy as np

        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        logits, state = self.prefill(ids)
        t1, n = time.perf_counter(), 0
        if stats is not None:
            stats["ttft_s"] = t1 - t0
        for i in range(max_new_tokens):
            token = pick(logits, temperature, top_p, rng)
            if token in self.eos_ids:
                break
            n += 1
            yield token
            if i + 1 < max_new_tokens:
                logits, state = self.step(token, state)
        if stats is not None:
            dt = time.perf_counter() - t1
            stats.update(new_tokens=n, decode_s=dt, decode_tokens_per_s=(n - 1) / dt if n > 1 and dt > 0 else None)


def pick(logits, temperature: float, top_p: float | None, rng) -> int:
    import numpy as np

    if temperature <= 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p)
        keep = np.cumsum(p[order]) - p[order] < top_p
        q = np.zeros_like(p)
        q[order[keep]] = p[order[keep]]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def load_tokenizer(bundle: str | Path):
    from tokenizers import Tokenizer

    path = Path(bundle) / TOKENIZER
    if not path.is_file():
        raise BundleError(f"{path}: missing; the bundle needs its tokenizer")
    return Tokenizer.from_file(str(path))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="edge_runner", description="Generate text with an llmops edge bundle.")
    ap.add_argument("bundle", help="the bundle directory (model.onnx, genai_config.json, tokenizer.json)")
    ap.add_argument("prompt", help="the prompt text ('-' reads it from stdin)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: the bundle's (128)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads for onnxruntime (default 1)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (temperature > 0)")
    ap.add_argument("--stats", action="store_true", help="print time to first token and decode tokens/s to stderr")
    a = ap.parse_args(argv)
    try:
        model = EdgeModel(a.bundle, a.threads)
        tok = load_tokenizer(a.bundle)
    except BundleError as e:
        print(f"edge_runner: {e}", file=sys.stderr)
        return 2
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        print("edge_runner: the prompt encodes to no tokens; pass some text", file=sys.stderr)
        return 2
    limit = a.max_new_tokens if a.max_new_tokens is not None else model.defaults["max_new_tokens"]
    if model.context_length and len(ids) + limit > model.context_length:
        limit = max(0, model.context_length - len(ids))
    stats: dict = {}
    out: list[int] = []
    shown = ""
    for token in model.generate(ids, limit, a.temperature, a.top_p, a.seed, stats):
        out.append(token)
        text = tok.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    if a.stats:
        tps = stats.get("decode_tokens_per_s")
        print(
            f"prompt {len(ids)} tokens, generated {stats.get('new_tokens', 0)}; time to first token "
            f"{stats.get('ttft_s', 0) * 1000:.0f} ms; decode {tps:.1f} tokens/s"
            if tps
            else f"prompt {len(ids)} tokens, generated {stats.get('new_tokens', 0)}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
