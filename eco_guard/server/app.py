"""The FastAPI app (routes, error handlers, the body-size and draining gate) and ``serve`` under uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, Literal

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from eco_guard.backends.base import PreparedPrompt, StreamEvent
from eco_guard.config import ServerSettings
from eco_guard.errors import InputError
from eco_guard.server.runtime import _Job, _Metrics, _sse, _SSEResponse, _State
from eco_guard.server.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    _json_error,
    _messages,
    _overrides,
    _Sampling,
    load_prompt_embeds,
)

if TYPE_CHECKING:
    import torch

    from eco_guard.guard import Answer, Guard

__all__ = ["create_app", "serve"]

log = logging.getLogger(__name__)

_ROUTES: Final = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/healthz", "/metrics")


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
