"""What one server app holds at run time: admission (the bounded queue), the generation pool, in-flight
counts for draining, its Prometheus series, and the shapes of its replies and SSE chunks."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import ClientDisconnect

from eco_guard.backends.base import StreamEvent
from eco_guard.config import ServerSettings
from eco_guard.server.schemas import ApiError

if TYPE_CHECKING:
    from eco_guard.guard import Guard

__all__: list[str] = []  # the app's machinery, private to the package

_LATENCY_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
_TTFT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16)


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
