"""Serving settings: one pydantic model, used by `llmops serve` and by a governance target of kind `serve`.

Light on purpose (pydantic only): governance imports it, and `llmops --help` must stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheSettings(_Strict):
    backend: Literal["memory", "redis", "off"] | None = Field(
        None,
        description="memory = in-process LRU per gateway replica; redis = shared by every gateway replica; off "
        "= no cache; unset = team mode's Redis when `llmops services start --team` runs for the "
        "state dir, else memory (resolve_cache)",
    )
    redis_url: str | None = Field(
        None,
        description="redis://127.0.0.1:6379/0 for backend redis (no password in here: "
        "it would travel in Ray's application config; see "
        "redis_password_file)",
    )
    redis_password_file: str | None = Field(
        None,
        description="A file (mode 600) holding the Redis password alone; "
        "the gateway reads it (team mode: <state>/team/redis/"
        "password)",
    )
    ttl_s: int = Field(3600, ge=1, description="An answer is reused for at most this long")
    max_entries: int = Field(10_000, ge=1, description="In-process bound (LRU); Redis is bounded by its maxmemory")
    max_entry_bytes: int = Field(64_000, ge=256, description="Longer answers are not cached")
    semantic: bool = Field(
        False,
        description="Also reuse answers of near-duplicate prompts (character-trigram cosine "
        ">= semantic_threshold, same params); off by default: it can be wrong",
    )
    semantic_threshold: float = Field(0.95, gt=0.0, le=1.0, description="Similarity needed for a near-duplicate hit")

    @model_validator(mode="after")
    def _redis_needs_url(self) -> CacheSettings:
        if self.backend == "redis" and not self.redis_url:
            raise ValueError("cache.backend redis needs cache.redis_url (e.g. redis://127.0.0.1:6379/0)")
        if self.redis_url and urlparse(self.redis_url).password:
            raise ValueError(
                "cache.redis_url carries a password, which would be stored in Ray's application config: "
                "put the password alone in a file of mode 600 and name it in cache.redis_password_file"
            )
        return self


class LimitSettings(_Strict):
    max_tokens: int = Field(256, ge=1, description="Largest max_tokens a request may ask for (400 above)")
    default_max_tokens: int = Field(64, ge=1, description="When a request gives no max_tokens")
    max_prompt_tokens: int = Field(1024, ge=1, description="Longer prompts are refused with 400, never truncated")
    max_prompt_chars: int = Field(32_000, ge=1, description="Checked before tokenizing (a cheap first bound)")
    timeout_s: float = Field(30.0, gt=0, description="A request still running after this gets 408")
    max_ongoing_per_replica: int = Field(4, ge=1, description="Requests a model replica holds at once")
    max_queued: int = Field(32, ge=1, description="Requests waiting for a replica; more get 429 (retry later)")

    @model_validator(mode="after")
    def _default_within_max(self) -> LimitSettings:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} exceeds max_tokens {self.max_tokens}")
        return self


class SmokeSettings(_Strict):
    prompts: int = Field(4, ge=1, description="Completions the new version must answer before traffic moves to it")
    max_latency_ms_per_token: float | None = Field(
        None, gt=0, description="Absolute bound; None = latency_factor x the evaluated eval.latency_ms_per_token_p50"
    )
    latency_factor: float = Field(
        10.0, gt=0, description="Serving may be this much slower than the evaluated figure (HTTP, routing, no batching)"
    )
    loss_tolerance: float = Field(
        0.25, ge=0, description="Loss on the smoke texts may exceed the evaluated eval.eval_loss by this fraction"
    )


class ServeSettings(_Strict):
    """How a model is served. In a governance target (`kind: serve`) the admin owns these, never a run config."""

    http_port: int = Field(8000, ge=1, le=65535, description="Ray Serve's HTTP proxy port (on 127.0.0.1)")
    ray_address: str | None = Field(
        None,
        description="An existing Ray cluster (ray://... or host:port); None = a "
        "local one started by llmops on 127.0.0.1",
    )
    engine: str = Field(
        "auto",
        pattern="^(auto|transformers|onnx|vllm)$",
        description="auto = vllm on CUDA if installed, else transformers (onnx for an edge bundle)",
    )
    replicas: int = Field(1, ge=1, description="Model replicas (Ray Serve's router spreads requests)")
    min_replicas: int | None = Field(None, ge=0, description="Set with max_replicas to autoscale instead")
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0, description="Autoscaling aims at this many per replica")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per model replica (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (vLLM)")
    deploy_timeout_s: float = Field(
        300.0, gt=0, description="A new version not healthy by then is removed (the old one keeps serving)"
    )
    limits: LimitSettings = Field(default_factory=LimitSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    smoke: SmokeSettings = Field(default_factory=SmokeSettings)

    @model_validator(mode="after")
    def _autoscaling_bounds(self) -> ServeSettings:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set both min_replicas and max_replicas (autoscaling) or neither")
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self

    def deployment_options(self) -> dict:
        """Ray Serve deployment options of a model replica (`@serve.deployment(**...)`)."""
        opts = dict(
            max_ongoing_requests=self.limits.max_ongoing_per_replica,
            max_queued_requests=self.limits.max_queued,
            graceful_shutdown_timeout_s=self.limits.timeout_s,
            health_check_period_s=2.0,
            health_check_timeout_s=30.0,
            ray_actor_options={"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        )
        if self.max_replicas is not None:
            opts["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            opts["num_replicas"] = self.replicas
        return opts


def resolve_cache(settings: ServeSettings, state_dir: str | Path) -> ServeSettings:
    """`settings` with the cache backend decided: one named in the settings stays; unset means team mode's Redis
    (URL + password file, never the password) when `llmops services start --team` runs for `state_dir`, else the
    in-process memory cache. A named password file must be readable here (the gateway runs on this host)."""
    from llmops.errors import LLMOpsError
    from llmops.services import team_cache

    cache = settings.cache
    if cache.backend is None:
        cache = cache.model_copy(update=team_cache(state_dir) or {"backend": "memory"})
    if cache.backend == "redis" and cache.redis_password_file:
        pw = Path(cache.redis_password_file)
        try:
            if pw.stat().st_mode & 0o077:
                raise LLMOpsError("the Redis password file is readable by others", str(pw), f"chmod 600 {pw}")
            pw.read_bytes()
        except OSError as e:
            raise LLMOpsError(
                f"cannot read the Redis password file ({e.strerror})",
                str(pw),
                "start team mode (`llmops services start --team`) or fix cache.redis_password_file",
            ) from None
    return settings.model_copy(update={"cache": cache})
