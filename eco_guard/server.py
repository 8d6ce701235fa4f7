"""OpenAI-compatible HTTP face of the guard (FastAPI + uvicorn), with Prometheus metrics.

Every chat and text completion goes through :meth:`Guard.plan`: the route is decided before the first
token, so a flagged request streams only corrupted generation. A text ``prompt`` on ``/v1/completions`` is
the user's message (classified, and rendered through the chat template like a one-message chat).

With ``enable_prompt_embeds`` on, ``/v1/completions`` also takes what vLLM takes from a caller that rendered
the prompt itself: ``prompt_embeds`` (base64 of a ``torch.save``d dense ``(seq_len, hidden)`` tensor) and
token-id prompts. No template is applied and nothing is classified (there may be no text at all): that is a
guard's remote backend talking to its generation server, so keep it off wherever untrusted callers can reach.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /healthz``,
``GET /metrics``. Every failure is a JSON error in OpenAI's shape ``{"error": {message, type, param, code}}``.
Replies carry no decision unless ``expose_decision`` is on. ``/metrics`` counts routes per topic, so a caller
who can read it before and after a request learns whether that request was flagged: with ``api_key_env`` set it
needs the token like ``/v1/*``; without auth, keep the port away from callers (only ``/healthz`` is always open).

Example:
    >>> settings = ServerSettings(max_tokens_cap=256)    # the config's ``server:`` block (eco_guard.config)
    >>> settings.expose_decision, settings.max_tokens_cap
    (False, 256)
    >>> app = create_app(Guard.from_config(), settings)          # doctest: +SKIP
    >>> serve(Guard.from_config(), settings)                     # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import io
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from eco_guard.backends.base import PreparedPrompt, StreamEvent
from eco_guard.config import ServerSettings
from eco_guard.errors import InputError

if TYPE_CHECKING:
    import torch

    from eco_guard.guard import Answer, Guard

__all__ = ["ServerSettings", "create_app", "serve"]

log = logging.getLogger(__name__)

_EMBED_DTYPES: Final = ("float32", "float16", "bfloat16")
_REFUSED_PENALTIES: Final = ("presence_penalty", "frequency_penalty", "repetition_penalty")
_MAX_STOP: Final = 4
_LATENCY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_TTFT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)
_ROUTES: Final = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/metrics")


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """A failure reported to the caller as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @property
    def kind(self) -> str:
        return self.code or self.type


def _json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ---------------------------------------------------------------- request bodies


class _Sampling(BaseModel):
    """Fields both completion endpoints share; unknown fields are ignored, as OpenAI's server does."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    ignore_eos: bool = False  # vLLM's field: decode past end-of-sequence, always max_tokens


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | None = None
    prompt_embeds: str | list[str] | None = None
    echo: bool = False
    return_token_ids: bool = False  # vLLM's field: the completion's token ids in each choice


def _text_content(i: int, m: ChatMessage) -> str:
    if m.content is None:
        if m.role == "assistant":
            return ""
        raise ApiError(400, f"messages[{i}] has no content", param=f"messages.{i}.content")
    if isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}]: only text content parts are supported, got {part.get('type')!r}",
                           param=f"messages.{i}.content")
        parts.append(part["text"])
    return "".join(parts)


def _messages(body: ChatRequest) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": _text_content(i, m)}
            for i, m in enumerate(body.messages)]


def _overrides(body: _Sampling, settings: ServerSettings, default_max: int) -> dict[str, Any]:
    """The request's sampling fields as guard generation settings, refusing what the engine cannot do."""
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if getattr(body, "tools", None):
        raise ApiError(400, "tools are not supported", param="tools")
    extra = body.model_extra or {}
    for name in _REFUSED_PENALTIES:  # with prompt embeddings they crash vLLM (vllm#57719); never pass them on
        value = getattr(body, name, None) if name in type(body).model_fields else extra.get(name)
        if value not in (None, 0, 0.0, 1.0 if name == "repetition_penalty" else 0):
            raise ApiError(400, f"{name} is not supported", param=name)
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is not None and asked > settings.max_tokens_cap:
        raise ApiError(400, f"max_tokens is {asked}; this server allows at most {settings.max_tokens_cap}",
                       param="max_tokens")
    out: dict[str, Any] = {"max_new_tokens": asked or min(default_max, settings.max_tokens_cap)}
    if body.temperature is not None:
        out["do_sample"] = body.temperature > 0
        if body.temperature > 0:
            out["temperature"] = body.temperature
    if body.top_p is not None:
        out["top_p"] = body.top_p
    if body.seed is not None:
        out["seed"] = body.seed
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stop) > _MAX_STOP:
        raise ApiError(400, f"at most {_MAX_STOP} stop sequences are allowed, got {len(stop)}", param="stop")
    if stop:
        out["stop"] = stop
    if body.ignore_eos:
        out["ignore_eos"] = True
    return out


def load_prompt_embeds(data: str, hidden_size: int, max_rows: int) -> torch.Tensor:
    """A caller's ``prompt_embeds``, checked: a dense 2-D float tensor ``(rows, hidden_size)``, finite.

    Loaded with ``weights_only=True`` under sparse-invariant checks, and refused before any use unless it
    is strided (no sparse or quantised layouts: a tiny sparse tensor can densify to terabytes).

    Raises:
        ApiError: 400 naming what is wrong.
    """
    import torch

    def bad(why: str) -> ApiError:
        return ApiError(400, f"prompt_embeds {why}", param="prompt_embeds", code="invalid_prompt_embeds")

    limit = max_rows * hidden_size * 4 + 64 * 1024
    if len(data) > limit * 4 // 3 + 4:
        raise bad(f"is {len(data)} base64 characters; at most {max_rows} rows of {hidden_size} floats are allowed")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad("is not valid base64") from None
    try:
        with torch.sparse.check_sparse_tensor_invariants():
            tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the caller's bad data
        raise bad(f"could not be loaded as a torch.save'd tensor ({type(exc).__name__})") from None
    if not isinstance(tensor, torch.Tensor):
        raise bad(f"must be a tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise bad(f"must be a dense tensor, got layout {tensor.layout}")
    if str(tensor.dtype).removeprefix("torch.") not in _EMBED_DTYPES:
        raise bad(f"must be one of {', '.join(_EMBED_DTYPES)}, got {tensor.dtype}")
    if tensor.dim() != 2 or tensor.shape[1] != hidden_size:
        raise bad(f"must have shape (seq_len, {hidden_size}), got {tuple(tensor.shape)}")
    if not 0 < tensor.shape[0] <= max_rows:
        raise bad(f"has {tensor.shape[0]} rows; 1 to {max_rows} are allowed")
    if not bool(torch.isfinite(tensor).all()):
        raise bad("contains NaN or infinite values")
    return tensor.contiguous()


# ---------------------------------------------------------------- metrics


class _Metrics:
    """Prometheus series of one app (its own registry); labels are routes, topics and kinds, never text."""

    def __init__(self, state: _State):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("eco_guard_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.routes = Counter("eco_guard_routes", "completions by guard route and topic", ["route", "topic"],
                              registry=r)
        self.errors = Counter("eco_guard_errors", "failed requests by kind", ["kind"], registry=r)
        self.latency = Histogram("eco_guard_request_latency_seconds", "request latency", ["endpoint"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("eco_guard_time_to_first_token_seconds", "time to the first generated text",
                              ["endpoint"], buckets=_TTFT_BUCKETS, registry=r)
        self.tokens = Counter("eco_guard_generated_tokens", "completion tokens", ["endpoint"], registry=r)
        Gauge("eco_guard_queue_depth", "admitted requests waiting for a generation slot",
              registry=r).set_function(lambda: max(state.admitted - state.running, 0))
        Gauge("eco_guard_generations_running", "generations running now", registry=r).set_function(
            lambda: state.running)


# ---------------------------------------------------------------- generation in worker threads

_END = object()


@dataclass
class _Failed:
    exc: BaseException


class _State:
    """Admission (bounded queue), the generation pool, draining, and in-flight counts of one app."""

    def __init__(self, guard: Guard, settings: ServerSettings):
        self.guard, self.settings = guard, settings
        self.token = settings.api_key()
        self.model_id = settings.model_id or guard.model_name
        self.pool = ThreadPoolExecutor(settings.max_concurrency, thread_name_prefix="eco-guard-generate")
        self.admitted = 0  # changed on the event loop only
        self.running = 0
        self.in_flight = 0  # HTTP requests being answered (graceful shutdown waits for 0)
        self.draining = False
        self._lock = threading.Lock()
        self.metrics = _Metrics(self)

    def admit(self) -> Callable[[], None]:
        """Take a place in the queue, or refuse with 429; returns the release (call it exactly once)."""
        if self.admitted >= self.settings.max_queue:
            raise ApiError(429, f"the server is busy ({self.admitted} requests queued); retry later",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        self.admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admitted -= 1
        return release

    def _pump(self, make: Callable[[], Iterator[StreamEvent]], put: Callable[[Any], None],
              cancel: threading.Event) -> None:
        """Worker thread: drive the sync event iterator, stop between tokens once cancelled."""
        if cancel.is_set():
            put(_END)
            return
        with self._lock:
            self.running += 1
        it = None
        try:
            it = make()
            for event in it:
                put(event)
                if cancel.is_set():
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the request, which reports it
            put(_Failed(exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()
            with self._lock:
                self.running -= 1
            put(_END)

    async def events(self, make: Callable[[], Iterator[StreamEvent]], cancel: threading.Event,
                     deadline: float) -> AsyncIterator[StreamEvent]:
        """The events of ``make()`` produced in the pool; past ``deadline`` a 504; leaving cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def put(item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed (forced shutdown): nobody is listening
                cancel.set()

        loop.run_in_executor(self.pool, self._pump, make, put, cancel)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0))
                except TimeoutError:
                    raise ApiError(504, f"the completion took longer than {self.settings.request_timeout_s:g} s",
                                   type="server_error", code="timeout") from None
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.exc
                yield item
        finally:
            cancel.set()


# ---------------------------------------------------------------- responses


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class _Job:
    """One admitted completion: how to produce its events, and how to shape them for the caller."""

    endpoint: str
    kind: Literal["chat", "text"]
    make: Callable[[], Iterator[StreamEvent]]
    prompt_tokens: int
    decision: dict[str, Any] | None
    include_usage: bool = False
    token_ids: bool = False  # vLLM's return_token_ids

    def __post_init__(self) -> None:
        chat = self.kind == "chat"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.object = "chat.completion" if chat else "text_completion"
        self.created = int(time.time())

    def _head(self, model: str, obj: str) -> dict[str, Any]:
        head = {"id": self.id, "object": obj, "created": self.created, "model": model}
        if self.decision is not None:
            head["eco_guard"] = self.decision
        return head

    def reply(self, model: str, text: str, finish: str, ids: list[int]) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if self.token_ids:
            choice["token_ids"] = ids
        return {**self._head(model, self.object), "choices": [choice], "usage": _usage(self.prompt_tokens, len(ids))}

    def chunk(self, model: str, text: str | None, finish: str | None, *, first: bool = False,
              ids: list[int] | None = None) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        if self.token_ids:
            choice["token_ids"] = ids or []
        head = self._head(model, obj) if first else {k: v for k, v in self._head(model, obj).items()
                                                      if k != "eco_guard"}
        return {**head, "choices": [choice]}

    def usage_chunk(self, model: str, tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        head = {k: v for k, v in self._head(model, obj).items() if k != "eco_guard"}
        return {**head, "choices": [], "usage": _usage(self.prompt_tokens, tokens)}


def _sse(payload: dict[str, Any]) -> str:
    import json

    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _SSEResponse(StreamingResponse):
    """An SSE response that closes its generator and frees its queue place however the stream ends
    (a client that leaves cancels the generator between tokens, which stops generation)."""

    def __init__(self, body: Any, release: Callable[[], None]):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._body, self._release = body, release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            await self._body.aclose()
            self._release()


# ---------------------------------------------------------------- the app


class _Gate:
    """ASGI middleware: 503 while draining, 413 past the body limit, request counts and latency."""

    def __init__(self, app: Any, state: _State):
        self.app, self.state = app, state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, path = self.state, scope["path"]
        endpoint = path if path in _ROUTES else "other"
        started, status = time.monotonic(), [500]

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        state.in_flight += 1
        try:
            if state.draining:
                err = ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                               headers={"Retry-After": str(state.settings.retry_after_s)})
                await self._refuse(err, scope, receive, send_status)
                return
            replay = await self._read_body(scope, receive)
            if isinstance(replay, ApiError):
                await self._refuse(replay, scope, receive, send_status)
                return
            await self.app(scope, replay, send_status)
        finally:
            state.in_flight -= 1
            state.metrics.requests.labels(endpoint, str(status[0])).inc()
            state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)

    async def _refuse(self, err: ApiError, scope: Any, receive: Any, send: Any) -> None:
        self.state.metrics.errors.labels(err.kind).inc()
        await _json_error(err)(scope, receive, send)

    async def _read_body(self, scope: Any, receive: Any) -> Any:
        """The whole body (at most ``max_body_bytes``) replayed to the app, then the live channel."""
        limit = self.state.settings.max_body_bytes
        too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return too_large
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                chunks, more = None, False  # disconnected while sending
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return too_large
        body, sent = b"".join(chunks or ()), False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent and chunks is not None:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive() if chunks is not None else {"type": "http.disconnect"}
        return replay


def create_app(guard: Guard, settings: ServerSettings | None = None) -> FastAPI:
    """The OpenAI-compatible app serving ``guard`` (see the module docstring for the endpoints).

    Raises:
        ConfigError: ``api_key_env`` names an unset variable.
    """
    settings = settings or ServerSettings()
    state = _State(guard, settings)
    metrics = state.metrics

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="eco-guard", version=_version(), lifespan=lifespan)
    app.state.eco = state
    app.add_middleware(_Gate, state=state)
    _add_error_handlers(app, metrics)
    _add_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI, metrics: _Metrics) -> None:
    """Every failure as OpenAI's error shape, counted by kind; the server stays up."""

    def failed(err: ApiError) -> JSONResponse:
        metrics.errors.labels(err.kind).inc()
        return _json_error(err)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return failed(exc)

    @app.exception_handler(InputError)
    async def on_input_error(_: Request, exc: InputError) -> JSONResponse:
        return failed(ApiError(400, str(exc), code="invalid_input"))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        if first.get("type") == "json_invalid":
            return failed(ApiError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})",
                                   code="invalid_json"))
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{loc}: {first.get('msg', 'invalid')}" if loc else str(first.get("msg", "invalid request body"))
        return failed(ApiError(400, message, param=loc or None, code="invalid_body"))

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return failed(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def on_crash(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error while serving a request", exc_info=exc)
        return failed(ApiError(500, "internal server error", type="server_error", code="internal_error"))


def _add_routes(app: FastAPI, state: _State) -> None:
    guard, settings, metrics = state.guard, state.settings, state.metrics

    def authorise(request: Request) -> None:
        if state.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.token.encode()):
            raise ApiError(401, "missing or wrong bearer token", type="authentication_error", code="invalid_api_key")

    auth = [Depends(authorise)]

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_id}

    @app.get("/metrics", dependencies=auth)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0,
                                            "owned_by": "eco-guard"}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatRequest, request: Request) -> Any:
        _check_model(state, body.model)
        params = _overrides(body, settings, guard.config.generation.max_new_tokens)
        messages = _messages(body)
        return await _run(state, request, body, "/v1/chat/completions", "chat",
                          lambda: _planned(state, guard.aplan(messages, **params)))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        _check_model(state, body.model)
        params = _overrides(body, settings, guard.config.generation.max_new_tokens)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.prompt_embeds is not None or _token_ids(body.prompt):
            return await _run(state, request, body, "/v1/completions", "text", lambda: _embedded(state, body, params))
        prompt = _single(body.prompt, "prompt")
        return await _run(state, request, body, "/v1/completions", "text",
                          lambda: _planned(state, guard.aplan(prompt, **params)))


def _version() -> str:
    from eco_guard import __version__

    return __version__


def _check_model(state: _State, model: str) -> None:
    if model != state.model_id:
        raise ApiError(404, f"model {model!r} is not served here; use {state.model_id!r}", param="model",
                       code="model_not_found")


def _single(value: str | list[str] | None, param: str) -> str:
    if isinstance(value, list):
        if len(value) != 1:
            raise ApiError(400, f"{param} must be one string (batches are not supported)", param=param)
        value = value[0]
    if value is None:
        raise ApiError(400, f"{param} is required", param=param)
    return value


_Planned = tuple[Callable[[], Iterator[StreamEvent]], int, dict[str, Any] | None]


async def _planned(state: _State, planning: Any) -> _Planned:
    """Plan through the guard (the one answering path) and count the route per topic."""
    answer: Answer = await planning
    d = answer.decision
    state.metrics.routes.labels(d.route, d.topic or "none").inc()
    decision = d.to_dict() if state.settings.expose_decision else None
    return answer.stream, len(answer.prompt) if answer.prompt is not None else 0, decision


def _token_ids(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(t, int) for t in prompt)


async def _embedded(state: _State, body: CompletionRequest, params: dict[str, Any]) -> _Planned:
    """Generate from the caller's embeddings (vLLM's prompt_embeds) or token ids, rendered by the caller
    (no chat template is applied) and not classified: what a generation server does behind a guard."""
    field = "prompt_embeds" if body.prompt_embeds is not None else "prompt"
    if not state.settings.enable_prompt_embeds:
        raise ApiError(400, f"{'prompt_embeds' if field == 'prompt_embeds' else 'token-id prompts'} are disabled "
                       "on this server (eco-guard serve --enable-prompt-embeds)", param=field,
                       code="prompt_embeds_disabled")
    backend = state.guard.backend
    rows = min(state.settings.max_embed_tokens, backend.max_input_tokens)
    if field == "prompt_embeds":
        if body.prompt not in (None, "", [""]):
            raise ApiError(400, "send either prompt or prompt_embeds, not both", param="prompt")
        data = _single(body.prompt_embeds, "prompt_embeds")
        embeds = await asyncio.to_thread(load_prompt_embeds, data, backend.hidden_size, rows)
    else:
        embeds = _embed_ids(backend, body.prompt, rows)
    settings = state.guard.params(**params)
    state.metrics.routes.labels(field, "none").inc()
    return (lambda: backend.stream_from_embeds(embeds, settings)), int(embeds.shape[0]), None


def _embed_ids(backend: Any, ids: list[int], max_rows: int) -> torch.Tensor:
    if len(ids) > max_rows:
        raise ApiError(400, f"the prompt is {len(ids)} tokens long; at most {max_rows} are allowed", param="prompt")
    prompt = PreparedPrompt("", tuple(ids), ((0, 0),) * len(ids))
    try:
        return backend.embed([prompt])[0][0]
    except IndexError:  # what an embedding lookup raises for an id outside the vocabulary
        raise ApiError(400, "the prompt has a token id outside the model's vocabulary", param="prompt") from None
    except NotImplementedError:
        raise ApiError(501, f"this server's backend ({backend.name}) cannot embed token ids", type="server_error",
                       param="prompt", code="not_implemented") from None


async def _run(state: _State, request: Any, body: _Sampling, endpoint: str, kind: Literal["chat", "text"],
               plan: Callable[[], Any]) -> Any:
    """Admit (or 429), plan, then answer whole or as SSE; the queue place is held until the reply ends."""
    release = state.admit()
    try:
        make, prompt_tokens, decision = await plan()
    except BaseException:
        release()
        raise
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    job = _Job(endpoint, kind, make, prompt_tokens, decision, include_usage,
               token_ids=bool(getattr(body, "return_token_ids", False)))
    if body.stream:
        return _SSEResponse(_stream(state, job, body.model), release)
    try:
        return await _whole(state, job, body.model, request)
    finally:
        release()


async def _whole(state: _State, job: _Job, model: str, request: Any) -> Response:
    started = time.monotonic()
    cancel, gone = threading.Event(), asyncio.Event()

    async def watch() -> None:  # the body is read: the next message is the client going away
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()
        cancel.set()

    watcher = asyncio.create_task(watch())
    pieces, ids, finish = [], [], "length"
    try:
        async for event in state.events(job.make, cancel, started + state.settings.request_timeout_s):
            if not pieces:
                state.metrics.ttft.labels(job.endpoint).observe(time.monotonic() - started)
            pieces.append(event.text)
            ids.extend(event.token_ids)
            finish = event.finish_reason or finish
    finally:
        watcher.cancel()
    if gone.is_set():
        state.metrics.errors.labels("client_disconnected").inc()
        return Response(status_code=499)
    state.metrics.tokens.labels(job.endpoint).inc(len(ids))
    return JSONResponse(job.reply(model, "".join(pieces), finish, ids))


async def _stream(state: _State, job: _Job, model: str) -> AsyncIterator[str]:
    """SSE events in OpenAI's chunk shapes; a failure after the first byte is an ``error`` event."""
    started = time.monotonic()
    cancel, tokens, first = threading.Event(), 0, True
    try:
        yield _sse(job.chunk(model, None, None, first=True))
        async for event in state.events(job.make, cancel, started + state.settings.request_timeout_s):
            if first:
                state.metrics.ttft.labels(job.endpoint).observe(time.monotonic() - started)
                first = False
            tokens += len(event.token_ids)
            if event.text or event.finish_reason or event.token_ids:
                yield _sse(job.chunk(model, event.text, event.finish_reason, ids=event.token_ids))
        state.metrics.tokens.labels(job.endpoint).inc(tokens)
        if job.include_usage:
            yield _sse(job.usage_chunk(model, tokens))
        yield "data: [DONE]\n\n"
    except ApiError as err:
        state.metrics.errors.labels(err.kind).inc()
        yield _sse(err.body())
    except asyncio.CancelledError:
        state.metrics.errors.labels("client_disconnected").inc()
        raise
    except Exception:  # noqa: BLE001 - the stream has started: report in-band, keep the server up
        log.exception("generation failed mid-stream")
        state.metrics.errors.labels("internal_error").inc()
        yield _sse(ApiError(500, "internal server error", type="server_error", code="internal_error").body())


# ---------------------------------------------------------------- running


class _DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGINT/SIGTERM drains: new requests get 503 while in-flight ones
    finish (up to ``shutdown_grace_s``), then the usual shutdown; a second signal stops at once."""

    def __init__(self, config: uvicorn.Config, state: _State):
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.state.draining:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        self.state.draining = True
        threading.Thread(target=self._drain, name="eco-guard-drain", daemon=True).start()

    def _drain(self) -> None:
        stop = time.monotonic() + self.state.settings.shutdown_grace_s
        while self.state.in_flight > 0 and time.monotonic() < stop:
            time.sleep(0.05)
        self.should_exit = True


def serve(guard: Guard, settings: ServerSettings | None = None) -> None:
    """Run the app with uvicorn until SIGINT/SIGTERM, then drain (see :class:`_DrainingServer`)."""
    settings = settings or ServerSettings()
    app = create_app(guard, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                            timeout_graceful_shutdown=max(int(settings.shutdown_grace_s), 1))
    _DrainingServer(config, app.state.eco).run()
