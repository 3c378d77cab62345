"""Inference engines behind a model replica: one token loop, three ways to get the next token's logits.

- `TorchEngine`: transformers on CPU or GPU, with a KV cache.
- `OnnxEngine`: the ONNX edge bundle (tasks.compression's KV decoder: one prefill, then one cached step per token)
  with onnxruntime, through llmops/edge_runner.py.
- `VllmEngine`: vLLM on a CUDA box (continuous batching, paged attention); chosen by `engine: vllm` or `auto` when
  CUDA and vllm are present. Not runnable here (no GPU): its test is `gpu`-marked.
Sampling is per request: greedy at temperature 0, else temperature + top-p from a `torch.Generator` seeded with the
request's seed (so a fixed seed is deterministic, which is what lets the cache keep such answers).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

ONNX_FILE = "model.onnx"


class EngineError(Exception):
    """The model cannot be loaded for serving."""


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _pick(logits, temperature: float, top_p: float | None, gen):
    import torch

    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class _TokenLoop:
    """`stream()` and `loss()` over an engine's `_start(ids) -> (logits, state)` / `_step(token, state)`."""

    tokenizer = None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id]

    def stream(
        self,
        ids: list[int],
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
        deadline: float | None = None,
    ) -> Iterator[tuple[str, str | None]]:
        """Yield (new text, None) per token, then ("", finish_reason): stop | length | timeout."""
        import torch

        gen = torch.Generator().manual_seed(
            seed if seed is not None else int.from_bytes(__import__("os").urandom(7), "big")
        )
        out, emitted, stop = [], "", [s for s in (stop or []) if s]
        logits, state = self._start(ids)
        for _ in range(max_tokens):
            token = _pick(logits, temperature, top_p, gen)
            if token == self.tokenizer.eos_token_id:
                yield "", "stop"
                return
            out.append(token)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            hit = min((text.find(s) for s in stop if s in text), default=-1)
            if hit >= 0:
                if text[:hit] != emitted:
                    yield text[len(emitted) : hit], None
                yield "", "stop"
                return
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(emitted) :], None
                emitted = text
            if deadline is not None and time.monotonic() > deadline:
                yield "", "timeout"
                return
            logits, state = self._step(token, state)
        yield "", "length"

    def loss(self, texts: list[str]) -> float:
        """Mean next-token cross-entropy over `texts` (the smoke test compares it with the evaluated loss)."""
        import torch

        total, n = 0.0, 0
        for t in texts:
            ids = self.encode(t)
            if len(ids) < 2:
                continue
            logits = self._all_logits(ids)
            nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]), reduction="sum")
            total, n = total + float(nll), n + len(ids) - 1
        return total / max(n, 1)


class TorchEngine(_TokenLoop):
    def __init__(self, path: Path, num_threads: int = 1, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, num_threads))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModelForCausalLM.from_pretrained(str(path)).to(self.device).eval()
        except Exception as e:  # noqa: BLE001 - many loader exception types, one meaning
            raise EngineError(f"cannot load {path} with transformers: {str(e).splitlines()[0][:200]}") from None
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )

    def _forward(self, ids, past=None):
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=past, use_cache=True)
        return out.logits[0, -1].cpu(), out.past_key_values

    def _start(self, ids):
        return self._forward(ids)

    def _step(self, token, past):
        return self._forward([token], past)

    def _all_logits(self, ids):
        import torch

        with torch.inference_mode():
            return self.model(input_ids=torch.tensor([ids], device=self.device)).logits[0].cpu()


class OnnxEngine(_TokenLoop):
    """The edge bundle's KV decoder (llmops/edge_runner.py's `EdgeModel`): one prefill per request, then one
    cached step per token, on onnxruntime."""

    def __init__(self, path: Path, num_threads: int = 1):
        import json

        from transformers import AutoTokenizer

        from llmops.edge_runner import BundleError, EdgeModel

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = EdgeModel(path, max(1, num_threads))
        except BundleError as e:
            raise EngineError(f"cannot load the ONNX bundle: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise EngineError(f"cannot load the ONNX bundle {path}: {str(e).splitlines()[0][:200]}") from None
        cfg = Path(path) / "config.json"
        conf = json.loads(cfg.read_text()) if cfg.is_file() else {}
        self.max_positions = conf.get("max_position_embeddings") or conf.get("n_positions") or self.model.context_length

    def _all_logits(self, ids):
        import torch

        return torch.from_numpy(self.model.all_logits(list(ids)))

    def _start(self, ids):
        import torch

        logits, state = self.model.prefill(list(ids))
        return torch.from_numpy(logits), state

    def _step(self, token, state):
        import torch

        logits, state = self.model.step(token, state)
        return torch.from_numpy(logits), state


class VllmEngine:
    """vLLM on CUDA: one `LLM` per replica; a request is one `generate` call (the stream yields the whole text)."""

    def __init__(self, path: Path):
        from transformers import AutoTokenizer
        from vllm import LLM

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.llm = LLM(model=str(path), enforce_eager=True)
        self.max_positions = self.llm.llm_engine.model_config.max_model_len

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def stream(self, ids, max_tokens, temperature=0.0, top_p=None, seed=None, stop=None, deadline=None):
        from vllm import SamplingParams

        sp = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p or 1.0, seed=seed, stop=stop or None
        )
        out = self.llm.generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)[0].outputs[0]
        yield out.text, None
        yield "", out.finish_reason or "stop"

    def loss(self, texts: list[str]) -> float:
        from vllm import SamplingParams

        total, n = 0.0, 0
        for t in texts:
            ids = self.encode(t)
            res = self.llm.generate(
                [{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False
            )[0]
            lps = [lp[tok].logprob for lp, tok in zip(res.prompt_logprobs[1:], ids[1:]) if lp and tok in lp]
            total, n = total - sum(lps), n + len(lps)
        return total / max(n, 1)


def pick_engine(path: Path, engine: str) -> str:
    if engine != "auto":
        return engine
    if (Path(path) / ONNX_FILE).is_file():
        return "onnx"
    try:
        import torch

        if torch.cuda.is_available():
            import importlib.util

            if importlib.util.find_spec("vllm") is not None:
                return "vllm"
    except ImportError:
        pass
    return "transformers"


def load_engine(path: str | Path, engine: str = "auto", num_threads: int = 1):
    kind = pick_engine(Path(path), engine)
    if kind == "onnx":
        return OnnxEngine(Path(path), num_threads)
    if kind == "vllm":
        return VllmEngine(Path(path))
    return TorchEngine(Path(path), num_threads)
