"""Response cache for repeated queries.

Only deterministic requests are cached (temperature 0, or a fixed seed: the same inputs then give the same tokens).
The key is sha256 over (model digest, normalised prompt or messages, generation parameters), so
- a new model version (another digest) never sees the old version's answers;
- keys are hashes: Redis or a memory dump never holds a prompt in clear as a key (values hold answers).
Normalisation keeps what the model sees: Unicode NFC, CRLF -> LF, surrounding whitespace stripped; nothing else
(collapsing inner spaces would merge prompts that tokenize differently).

Backends: `MemoryCache` (LRU + TTL, in the gateway's process; the embedded default) and `RedisCache` (shared by all
gateway replicas; TTL per key, size bounded by the server's maxmemory + allkeys-lru). Both are async.
Near-duplicate ("semantic") reuse is opt-in (`cache.semantic`): a hit needs the same model and params and a prompt
whose character-trigram cosine similarity is >= the threshold; bench/bench_serving.py measures its false-hit rate.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import unicodedata
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Protocol

KEY_PREFIX = "llmops:cache:"
PARAMS = ("max_tokens", "temperature", "top_p", "seed", "stop")


def normalise(text: str) -> str:
    return unicodedata.normalize("NFC", text).replace("\r\n", "\n").strip()


def deterministic(params: dict) -> bool:
    return float(params.get("temperature") or 0.0) == 0.0 or params.get("seed") is not None


def request_text(kind: str, body: dict) -> str:
    """The normalised prompt (completions) or messages (chat) as one canonical string."""
    if kind == "chat":
        return json.dumps([[m["role"], normalise(m["content"])] for m in body["messages"]], ensure_ascii=False)
    return normalise(body["prompt"])


def params_of(body: dict) -> dict:
    out = {k: body.get(k) for k in PARAMS}
    if float(out.get("temperature") or 0.0) == 0.0:  # greedy: seed and top_p do not change the answer
        out.update(temperature=0.0, seed=None, top_p=None)
    return out


def cache_key(model_digest: str, kind: str, text: str, params: dict) -> str:
    canon = json.dumps(
        {"model": model_digest, "kind": kind, "text": text, "params": params}, sort_keys=True, ensure_ascii=False
    )
    return hashlib.sha256(canon.encode()).hexdigest()


class ResponseCache(Protocol):
    async def get(self, key: str) -> dict | None: ...

    async def put(self, key: str, value: dict) -> None: ...


class MemoryCache:
    """LRU with a TTL, bounded by entries (and each entry by bytes)."""

    def __init__(self, ttl_s: float, max_entries: int, max_entry_bytes: int, clock=time.monotonic):
        self.ttl_s, self.max_entries, self.max_entry_bytes, self.clock = ttl_s, max_entries, max_entry_bytes, clock
        self._d: OrderedDict[str, tuple[float, dict]] = OrderedDict()

    async def get(self, key: str) -> dict | None:
        item = self._d.get(key)
        if item is None:
            return None
        if self.clock() - item[0] > self.ttl_s:
            del self._d[key]
            return None
        self._d.move_to_end(key)
        return item[1]

    async def put(self, key: str, value: dict) -> None:
        if len(json.dumps(value)) > self.max_entry_bytes:
            return
        self._d[key] = (self.clock(), value)
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


class RedisCache:
    """Redis (Debian's redis-server in team mode). Errors reaching Redis are misses, never failed requests."""

    def __init__(self, url: str, ttl_s: int, max_entry_bytes: int, password_file: str | None = None):
        import redis.asyncio as aioredis

        self.url, self.ttl_s, self.max_entry_bytes = url, ttl_s, max_entry_bytes
        # read here, in the gateway's process: the password never travels in settings (Ray's config, Prefect)
        password = Path(password_file).read_text().strip() if password_file else None
        self._r = aioredis.from_url(url, password=password, socket_timeout=2, socket_connect_timeout=2)
        self.errors = 0

    async def reachable(self) -> bool:
        try:
            return bool(await self._r.ping())
        except Exception:  # noqa: BLE001 - down, or a wrong password: reported by `llmops serve status`
            return False

    async def get(self, key: str) -> dict | None:
        try:
            raw = await self._r.get(KEY_PREFIX + key)
        except Exception:  # noqa: BLE001 - a cache outage must not fail requests; counted
            self.errors += 1
            return None
        return json.loads(raw) if raw else None

    async def put(self, key: str, value: dict) -> None:
        body = json.dumps(value)
        if len(body) > self.max_entry_bytes:
            return
        try:
            await self._r.set(KEY_PREFIX + key, body, ex=self.ttl_s)
        except Exception:  # noqa: BLE001
            self.errors += 1


def trigrams(text: str) -> Counter:
    t = f"  {text.lower()}  "
    return Counter(t[i : i + 3] for i in range(len(t) - 2))


def cosine(a: Counter, b: Counter) -> float:
    dot = sum(v * b.get(k, 0) for k, v in a.items())
    na, nb = math.sqrt(sum(v * v for v in a.values())), math.sqrt(sum(v * v for v in b.values()))
    return dot / (na * nb) if na and nb else 0.0


class SemanticIndex:
    """Near-duplicate lookup within one (model, kind, params) group: exact key of the most similar earlier prompt.
    A linear scan over at most `max_entries` prompts per group (kept in the gateway's memory, LRU)."""

    def __init__(self, threshold: float, max_entries: int = 2000):
        self.threshold, self.max_entries = threshold, max_entries
        self._groups: dict[str, OrderedDict[str, tuple[Counter, str]]] = {}

    def lookup(self, group: str, text: str) -> str | None:
        grams, best, best_key = trigrams(text), 0.0, None
        for _, (g, key) in self._groups.get(group, {}).items():
            s = cosine(grams, g)
            if s > best:
                best, best_key = s, key
        return best_key if best >= self.threshold else None

    def add(self, group: str, text: str, key: str) -> None:
        g = self._groups.setdefault(group, OrderedDict())
        g[text] = (trigrams(text), key)
        g.move_to_end(text)
        while len(g) > self.max_entries:
            g.popitem(last=False)


def make_cache(settings) -> ResponseCache | None:
    """From `CacheSettings` (None = caching off; an unresolved backend is the in-process cache, see
    `settings.resolve_cache`)."""
    if settings.backend == "off":
        return None
    if settings.backend == "redis":
        return RedisCache(settings.redis_url, settings.ttl_s, settings.max_entry_bytes, settings.redis_password_file)
    return MemoryCache(settings.ttl_s, settings.max_entries, settings.max_entry_bytes)
