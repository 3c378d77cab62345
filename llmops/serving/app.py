"""The Ray Serve application: model replicas + an OpenAI-compatible gateway.

    ModelServer  one deployment per served model *version* (its own Serve application, no HTTP route): loads the
                 engine once, generates one request at a time (CPU cores are the bottleneck), replicas = load balancing
    Gateway      the HTTP ingress at "/": /v1/completions, /v1/chat/completions (SSE streaming), /v1/models,
                 /healthz, /metrics. Validates limits, answers from the response cache, routes to the *active*
                 version's ModelServer. Which version is active is the gateway's `user_config`: switching traffic
                 (blue/green) is a lightweight reconfigure, the gateway is not restarted.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: bad input 400, unknown model 404,
timeout 408, queue full 429 (retry later), no live replica 503 (retryable). A replica killed mid-request is retried
on another replica before any byte reached the client, so the client sees the answer or, at worst, a 503.
"""

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from ray import serve

from llmops.serving.cache import SemanticIndex, cache_key, deterministic, make_cache, params_of, request_text
from llmops.serving.settings import ServeSettings

RETRIES = 3  # attempts on another replica when one dies under a request (nothing was sent to the client yet)
SMOKE_TEXTS = [  # public text for the smoke test's loss check (never the training data)
    "The quick brown fox jumps over the lazy dog.",
    "To be, or not to be, that is the question.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold.",
]


class RequestError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type_: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------- replicas


def replica_grpc_on_node_ip() -> None:
    """Ray 2.60 starts each Serve replica's inter-deployment gRPC server on all interfaces, with no setting for it
    (ray/serve/_private/replica.py `_on_initialized`: `add_port_to_grpc_server(self._server, "[::]:0")`, which runs
    right after the replica's constructor, where this is called). On a loopback node (llmops's local Ray, see
    control.local_ray) it binds that server to the node IP like every other Ray listener; on a cluster node (routable
    IP) nothing changes. Should Ray rename the helper, this does nothing and test_every_ray_listener_is_on_loopback
    (tests/integration/test_serving.py) fails."""
    import ray
    from ray._common.network_utils import build_address, is_localhost
    from ray.serve._private import replica

    node_ip = ray.util.get_node_ip_address()
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or not is_localhost(node_ip) or getattr(original, "llmops_node_ip", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = build_address(node_ip, int(address.rsplit(":", 1)[1]))
        return original(server, address)

    add_port.llmops_node_ip = True
    replica.add_port_to_grpc_server = add_port


@serve.deployment(name="ModelServer")
class ModelServer:
    def __init__(self, model_dir: str, engine: str, num_threads: int, info: dict, limits: dict):
        from llmops.serving.engine import load_engine

        replica_grpc_on_node_ip()
        self.engine = load_engine(model_dir, engine, num_threads)
        self.info_ = {**info, "engine": type(self.engine).__name__}
        self.limits = limits
        self._one = asyncio.Semaphore(1)

    def info(self) -> dict:
        import os

        return {**self.info_, "pid": os.getpid()}

    def _prepare(self, req: dict) -> list[int]:
        from llmops.serving.engine import chat_prompt

        text = chat_prompt(self.engine.tokenizer, req["messages"]) if req["kind"] == "chat" else req["prompt"]
        ids = self.engine.encode(text)
        if len(ids) > self.limits["max_prompt_tokens"]:
            raise RequestError(
                400,
                f"prompt is {len(ids)} tokens; this server accepts at most {self.limits['max_prompt_tokens']}",
                "prompt" if req["kind"] != "chat" else "messages",
                code="context_length_exceeded",
            )
        room = self.engine.max_positions
        if room and len(ids) + req["max_tokens"] > room:
            raise RequestError(
                400,
                f"prompt ({len(ids)} tokens) + max_tokens ({req['max_tokens']}) exceeds the "
                f"model's context of {room} tokens; shorten the prompt or lower max_tokens",
                "max_tokens",
                code="context_length_exceeded",
            )
        return ids

    async def stream(self, req: dict):
        """Yield {"text"} pieces, then {"finish_reason", "prompt_tokens", "completion_tokens"}; or one {"error"}."""
        try:
            ids = self._prepare(req)
        except RequestError as e:
            yield {"error": e.body(), "status": e.status}
            return
        async with self._one:
            if time.time() > req["deadline"]:
                yield {"finish_reason": "timeout", "prompt_tokens": len(ids), "completion_tokens": 0}
                return
            it = self.engine.stream(
                ids,
                req["max_tokens"],
                req["temperature"],
                req["top_p"],
                req["seed"],
                req["stop"],
                deadline=time.monotonic() + (req["deadline"] - time.time()),
            )
            n = 0
            while True:
                piece, finish = await asyncio.to_thread(next, it)
                if finish:
                    yield {"finish_reason": finish, "prompt_tokens": len(ids), "completion_tokens": n}
                    return
                n += 1
                yield {"text": piece}

    async def generate(self, req: dict) -> dict:
        out, text = {}, []
        async for item in self.stream(req):
            if "text" in item:
                text.append(item["text"])
            else:
                out = item
        return {**out, "text": "".join(text)}

    async def score(self, texts: list[str]) -> float:
        async with self._one:
            return await asyncio.to_thread(self.engine.loss, texts)


# ------------------------------------------------------------------------------------------------- gateway


api = FastAPI(title="llmops serving (OpenAI-compatible)", docs_url=None, redoc_url=None, openapi_url=None)


def validate(kind: str, body, limits: dict) -> dict:
    """An OpenAI request body -> the replica's request dict; RequestError(400) names the bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    req = {"kind": kind}
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise RequestError(400, "'messages' must be a non-empty list of {role, content}", "messages")
        for i, m in enumerate(msgs):
            if (
                not isinstance(m, dict)
                or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)
            ):
                raise RequestError(
                    400, f"messages[{i}] needs role system|user|assistant and string content", f"messages[{i}]"
                )
        req["messages"] = [{"role": m["role"], "content": m["content"]} for m in msgs]
        size = sum(len(m["content"]) for m in msgs)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "'prompt' must be a string (one prompt per request)", "prompt")
        req["prompt"], size = prompt, len(prompt)
    if size > limits["max_prompt_chars"]:
        raise RequestError(
            400,
            f"prompt is {size} characters; this server accepts at most {limits['max_prompt_chars']}",
            "prompt" if kind != "chat" else "messages",
            code="context_length_exceeded",
        )
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    mt = limits["default_max_tokens"] if mt is None else mt
    if isinstance(mt, bool) or not isinstance(mt, int) or not 1 <= mt <= limits["max_tokens"]:
        raise RequestError(
            400, f"max_tokens must be an integer from 1 to {limits['max_tokens']} (got {mt!r})", "max_tokens"
        )
    temp = body.get("temperature", 1.0)
    if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not 0.0 <= temp <= 2.0:
        raise RequestError(400, f"temperature must be a number from 0 to 2 (got {temp!r})", "temperature")
    top_p = body.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise RequestError(400, f"top_p must be in (0, 1] (got {top_p!r})", "top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError(400, f"seed must be a non-negative integer (got {seed!r})", "seed")
    if body.get("n", 1) != 1:
        raise RequestError(400, "n must be 1 (send one request per completion)", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop)):
        raise RequestError(400, "stop must be a string or a list of at most 4 strings", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, "stream must be true or false", "stream")
    req.update(max_tokens=mt, temperature=float(temp), top_p=top_p, seed=seed, stop=stop)
    return req


@serve.deployment(name="Gateway", num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Gateway:
    def __init__(self, settings_json: str):
        from prometheus_client import CollectorRegistry, Counter

        replica_grpc_on_node_ip()
        self.settings = ServeSettings.model_validate_json(settings_json)
        self.limits = self.settings.limits.model_dump()
        self.cache = make_cache(self.settings.cache)
        self.semantic = SemanticIndex(self.settings.cache.semantic_threshold) if self.settings.cache.semantic else None
        self.models: dict[str, dict] = {}
        self.handles: dict[str, object] = {}
        self.registry = CollectorRegistry()
        self.c_cache = Counter("llmops_cache", "Response cache lookups", ["model", "result"], registry=self.registry)
        self.c_req = Counter("llmops_requests", "Requests by status", ["model", "status"], registry=self.registry)
        self.c_retry = Counter(
            "llmops_replica_retries", "Requests retried after a replica died", ["model"], registry=self.registry
        )
        from ray.serve.metrics import Counter as RayCounter  # also into Ray's Prometheus export

        self.r_cache = RayCounter(
            "llmops_cache_lookups", description="Response cache lookups", tag_keys=("model", "result")
        )

    def reconfigure(self, config: dict) -> None:
        self.models = dict(config.get("models", {}))
        self.handles = {
            name: serve.get_deployment_handle("ModelServer", app_name=m["app"]) for name, m in self.models.items()
        }

    def config(self) -> dict:
        return {"models": self.models}

    async def cache_info(self) -> dict:
        """Which response cache this gateway uses (for `llmops serve status`); never a password."""
        c = self.settings.cache
        if self.cache is None:
            return {"backend": "off"}
        if not hasattr(self.cache, "reachable"):
            return {"backend": "memory", "entries": len(self.cache), "max_entries": c.max_entries}
        return {
            "backend": "redis",
            "url": c.redis_url,
            "auth": "password file" if c.redis_password_file else "none",
            "reachable": await self.cache.reachable(),
            "errors": self.cache.errors,
        }

    # ------------------------------------------------------------------------------------ helpers
    def _count_cache(self, model: str, result: str) -> None:
        self.c_cache.labels(model, result).inc()
        self.r_cache.inc(tags={"model": model, "result": result})

    def _model(self, body) -> str:
        name = body.get("model") if isinstance(body, dict) else None
        if name in (None, "") and len(self.models) == 1:
            return next(iter(self.models))
        if name not in self.models:
            raise RequestError(
                404, f"model {name!r} is not served here; GET /v1/models lists them", "model", code="model_not_found"
            )
        return name

    async def _call(self, name: str, req: dict) -> dict:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(RETRIES):
            try:
                return await self.handles[name].generate.remote(req)
            except BackPressureError:
                raise RequestError(
                    429,
                    "all replicas are busy and the queue is full; retry shortly",
                    None,
                    "rate_limit_error",
                    "queue_full",
                ) from None
            except RayActorError:
                self.c_retry.labels(name).inc()
                await asyncio.sleep(0.2 * (attempt + 1))
        raise RequestError(
            503,
            "no live model replica answered; retry (replicas are being replaced)",
            None,
            "service_unavailable",
            "replica_unavailable",
        )

    async def _cached(self, name: str, kind: str, body: dict, req: dict) -> tuple[str | None, dict | None, str]:
        """(key, cached answer, 'hit'|'semantic-hit'|'miss'|'bypass')."""
        if self.cache is None or not deterministic(req):
            return None, None, "bypass"
        m, params, text = self.models[name], params_of(req), request_text(kind, req)
        key = cache_key(m["digest"], kind, text, params)
        if (hit := await self.cache.get(key)) is not None:
            return key, hit, "hit"
        if self.semantic is not None:
            group = cache_key(m["digest"], kind, "", params)
            near = self.semantic.lookup(group, text)
            if near and (hit := await self.cache.get(near)) is not None:
                return key, hit, "semantic-hit"
        return key, None, "miss"

    async def _remember(self, name: str, kind: str, req: dict, key: str | None, out: dict) -> None:
        if key is None or out.get("finish_reason") not in ("stop", "length"):
            return
        await self.cache.put(key, {k: out[k] for k in ("text", "finish_reason", "prompt_tokens", "completion_tokens")})
        if self.semantic is not None:
            self.semantic.add(
                cache_key(self.models[name]["digest"], kind, "", params_of(req)), request_text(kind, req), key
            )

    # ------------------------------------------------------------------------------------ routes
    @api.get("/healthz")
    def healthz(self):
        return {"status": "ok" if self.models else "no model", "models": sorted(self.models)}

    @api.get("/v1/models")
    def list_models(self):
        return {
            "object": "list",
            "data": [
                {
                    "id": n,
                    "object": "model",
                    "created": m.get("created", 0),
                    "owned_by": "llmops",
                    "version": m["version"],
                    "digest": m["digest"],
                }
                for n, m in self.models.items()
            ],
        }

    @api.get("/metrics")
    def metrics(self):
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, "completion")

    @api.post("/v1/chat/completions")
    async def chat(self, request: Request):
        return await self._handle(request, "chat")

    async def _handle(self, request, kind: str):
        from fastapi.responses import JSONResponse

        name = "?"
        try:
            try:
                body = json.loads(await request.body())
            except ValueError:
                raise RequestError(400, "the request body is not valid JSON") from None
            name = self._model(body)
            req = validate(kind, body, self.limits)
            req["deadline"] = time.time() + self.limits["timeout_s"]
            key, hit, result = await self._cached(name, kind, body, req)
            if result != "bypass":
                self._count_cache(name, result if result != "semantic-hit" else "semantic_hit")
            if body.get("stream"):
                return self._stream(name, kind, req, key, hit, result)
            out = hit or await asyncio.wait_for(self._call(name, req), self.limits["timeout_s"] + 10)
            if "error" in out:
                err = out["error"]["error"]
                raise RequestError(out["status"], err["message"], err["param"], err["type"], err["code"])
            if out["finish_reason"] == "timeout":
                raise RequestError(
                    408,
                    f"generation took longer than {self.limits['timeout_s']}s; lower max_tokens or retry",
                    None,
                    "timeout",
                    "request_timeout",
                )
            if hit is None:
                await self._remember(name, kind, req, key, out)
            self.c_req.labels(name, "200").inc()
            return JSONResponse(
                self._body(name, kind, out),
                headers={"x-llmops-cache": result, "x-llmops-version": self.models[name]["version"]},
            )
        except TimeoutError:
            e = RequestError(408, f"no answer within {self.limits['timeout_s']}s", None, "timeout", "request_timeout")
        except RequestError as err:
            e = err
        self.c_req.labels(name, str(e.status)).inc()
        headers = {"retry-after": "1"} if e.status in (429, 503) else {}
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def _body(self, name: str, kind: str, out: dict) -> dict:
        usage = {
            "prompt_tokens": out["prompt_tokens"],
            "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"],
        }
        head = {
            "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": name,
            "usage": usage,
        }
        if kind == "chat":
            return {
                **head,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": out["text"]},
                        "finish_reason": out["finish_reason"],
                    }
                ],
            }
        return {
            **head,
            "object": "text_completion",
            "choices": [{"index": 0, "text": out["text"], "logprobs": None, "finish_reason": out["finish_reason"]}],
        }

    def _stream(self, name: str, kind: str, req: dict, key, hit, result: str):
        from fastapi.responses import StreamingResponse

        cid, created = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

        def chunk(piece: str | None, finish: str | None) -> str:
            if kind == "chat":
                delta = {} if piece is None else {"role": "assistant", "content": piece}
                c = {"index": 0, "delta": delta, "finish_reason": finish}
                obj = "chat.completion.chunk"
            else:
                c, obj = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}, "text_completion"
            return (
                f"data: {json.dumps({'id': cid, 'object': obj, 'created': created, 'model': name, 'choices': [c]})}\n\n"
            )

        async def events():
            if hit is not None:
                yield chunk(hit["text"], None) + chunk(None, hit["finish_reason"]) + "data: [DONE]\n\n"
                return
            text, final = [], None
            try:
                async for item in self._stream_from_replica(name, req):
                    if "error" in item:
                        yield f"data: {json.dumps(item['error'])}\n\n"
                        return
                    if "text" in item:
                        text.append(item["text"])
                        yield chunk(item["text"], None)
                    else:
                        final = item
            except RequestError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            if final["finish_reason"] == "timeout":
                yield f"data: {json.dumps(RequestError(408, 'generation timed out', None, 'timeout').body())}\n\n"
                return
            await self._remember(name, kind, req, key, {**final, "text": "".join(text)})
            self.c_req.labels(name, "200").inc()
            yield chunk(None, final["finish_reason"]) + "data: [DONE]\n\n"

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"x-llmops-cache": result, "x-llmops-version": self.models[name]["version"]},
        )

    async def _stream_from_replica(self, name: str, req: dict):
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(RETRIES):
            sent = False
            try:
                async for item in self.handles[name].options(stream=True).stream.remote(req):
                    sent = True
                    yield item
                return
            except BackPressureError:
                raise RequestError(
                    429,
                    "all replicas are busy and the queue is full; retry shortly",
                    None,
                    "rate_limit_error",
                    "queue_full",
                ) from None
            except RayActorError:
                if sent:  # part of the answer is out: the client must retry the whole request
                    raise RequestError(
                        503,
                        "the replica died mid-stream; retry the request",
                        None,
                        "service_unavailable",
                        "replica_died",
                    ) from None
                self.c_retry.labels(name).inc()
                await asyncio.sleep(0.2 * (attempt + 1))
        raise RequestError(
            503, "no live model replica answered; retry", None, "service_unavailable", "replica_unavailable"
        )
