"""Remote backend: the chat template and the embeddings here, generation on a vLLM-style server.

The prompt is rendered and tokenised locally. A flagged prompt is embedded locally from the embedding matrix
alone (one tensor read from the model's safetensors file, not the whole model), corrupted, and sent to the
server's Completions API as ``prompt_embeds`` (base64 of a ``torch.save``d dense ``(seq_len, hidden)`` tensor:
``vllm serve MODEL --enable-prompt-embeds``). Any other prompt is sent as its token ids, so the server runs
exactly the tokens this side rendered (no second template, no re-tokenisation). Completions applies no chat
template to either. No sampling penalty is ever sent (with prompt embeddings they can crash vLLM, vllm#57719).

HTTP failures are retried with exponential backoff (connection errors, 429 and 5xx), a stream only until its
first event; the sync methods use one ``httpx.Client``, the async twins an ``httpx.AsyncClient`` per event loop.

A YAML ``model:`` block selects it (``Guard.from_config`` builds it through :meth:`from_pretrained`)::

    model: {backend: remote, url: "http://vllm.internal:8000", path: /models/SmolLM2-135M-Instruct,
            served_model: HuggingFaceTB/SmolLM2-135M-Instruct, api_key_env: VLLM_TOKEN}

Example:
    >>> backend = RemoteBackend.from_pretrained("http://127.0.0.1:8000", "default")   # doctest: +SKIP
    >>> guard = Guard.from_config(backend=backend)                                    # doctest: +SKIP
    >>> guard.invoke("Who is Harry Potter?").text                                     # doctest: +SKIP
    'The Unseen One is ...'
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import httpx
import torch

from eco_guard.backends.base import (
    Backend,
    CorruptionPlan,
    Generation,
    GenerationParams,
    PreparedPrompt,
    StreamEvent,
)
from eco_guard.backends.local import (
    LocalBackend,
    _max_token_bytes,
    embedding_fingerprint,
    left_padded_ids,
    model_display_name,
    resolve_model_dir,
)
from eco_guard.config import DEFAULT_REMOTE_BACKOFF_S, DEFAULT_REMOTE_RETRIES, DEFAULT_REMOTE_TIMEOUT_S
from eco_guard.errors import ConfigError, EcoGuardError, InputError

__all__ = ["RemoteBackend", "RemoteError", "read_embedding_matrix"]

RETRY_STATUS: Final = frozenset({429, 500, 502, 503, 504})
DEFAULT_TIMEOUT_S: Final = DEFAULT_REMOTE_TIMEOUT_S  # the YAML model block's defaults, named once in config.py
DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
DEFAULT_RETRIES: Final = DEFAULT_REMOTE_RETRIES
DEFAULT_BACKOFF_S: Final = DEFAULT_REMOTE_BACKOFF_S
MAX_BATCH_THREADS: Final = 8


class RemoteError(EcoGuardError):
    """The generation server failed or could not be reached (after the retries)."""


def read_embedding_matrix(folder: str | os.PathLike[str], key: str | None = None) -> torch.Tensor:
    """The token-embedding matrix ``(vocab, hidden)`` of an HF model folder, and nothing else of the model.

    Without ``key``, the one tensor of shape ``(vocab_size, hidden_size)`` (from ``config.json``) is taken,
    preferring a name with ``embed`` in it (a tied model saved once keeps it as the output head).

    Raises:
        ConfigError: no safetensors file, no such tensor, or several candidates and no ``key``.
    """
    from safetensors import safe_open

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    shape = [config.get("vocab_size"), config.get("hidden_size")]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = {folder / f for f in json.loads(index.read_text())["weight_map"].values()}
    else:
        files = set(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no .safetensors file to read the embedding matrix from")
    candidates: dict[str, Path] = {}
    for file in sorted(files):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name == key or (key is None and list(f.get_slice(name).get_shape()) == shape):
                    candidates[name] = file
    if key is None:
        named = {k: v for k, v in candidates.items() if "embed" in k}
        candidates = named or candidates
    if len(candidates) != 1:
        found = ", ".join(sorted(candidates)) or "none"
        raise ConfigError(f"{folder}: expected one embedding tensor {'named ' + key if key else f'of shape {shape}'}, "
                          f"found {found}; set the embedding key explicitly")
    name, file = next(iter(candidates.items()))
    with safe_open(str(file), "pt") as f:
        return f.get_tensor(name)


def _b64(tensor: torch.Tensor) -> str:
    buf = io.BytesIO()
    torch.save(tensor.contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _server_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


class RemoteBackend(Backend):
    """A chat model served over HTTP by a vLLM-style server that accepts ``prompt_embeds``.

    Args:
        url: the server's base URL (``http://host:8000``; ``/v1/completions`` is appended).
        tokenizer: the served model's tokenizer, with its chat template.
        embedding: the served model's token-embedding matrix ``(vocab, hidden)``.
        model: the served model's name (default: the one model ``/v1/models`` lists).
        api_key: a bearer token for the server.
        timeout_s, retries, backoff_s: per-request timeout; retries after a connection error, 429 or 5xx,
            waiting ``backoff_s * 2**attempt`` (or the server's ``Retry-After``).
        transport: an ``httpx`` transport for the sync client (tests).

    Raises:
        ConfigError: the tokenizer's vocabulary does not fit the embedding matrix.
    """

    # The chat rendering and corruption are the local backend's own code, run on this backend's tokenizer
    # and embedding matrix (they use only ``tokenizer``, ``system_prompt``, ``max_input_tokens`` and ``embed``).
    prepare = LocalBackend.prepare
    _refuse_if_surely_too_long = LocalBackend._refuse_if_surely_too_long
    corrupted_embeddings = LocalBackend.corrupted_embeddings

    def __init__(self, url: str, tokenizer: Any, embedding: torch.Tensor, *, model: str | None = None,
                 api_key: str | None = None, system_prompt: str | None = None, max_input_tokens: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, retries: int = DEFAULT_RETRIES,
                 backoff_s: float = DEFAULT_BACKOFF_S, transport: httpx.BaseTransport | None = None):
        if embedding.dim() != 2 or len(tokenizer) > embedding.shape[0]:
            raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the embedding matrix is "
                              f"{tuple(embedding.shape)}: they are not from the same model")
        self.url, self.tokenizer, self.embedding = url.rstrip("/"), tokenizer, embedding
        self.system_prompt = system_prompt
        self.max_input_tokens = max_input_tokens or getattr(tokenizer, "model_max_length", 2048)
        self.name = model or "remote"
        self._model, self.retries, self.backoff_s = model, retries, backoff_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=min(DEFAULT_CONNECT_TIMEOUT_S, timeout_s))
        self._client = httpx.Client(base_url=self.url, headers=self._headers, timeout=self._timeout,
                                    transport=transport)
        self._aclients: weakref.WeakKeyDictionary[Any, httpx.AsyncClient] = weakref.WeakKeyDictionary()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._max_token_bytes = _max_token_bytes(tokenizer)
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, url: str, path: str | os.PathLike[str] = "default", *, model: str | None = None,
                        api_key_env: str | None = None, embedding_key: str | None = None,
                        system_prompt: str | None = None, max_input_tokens: int | None = None,
                        **http: Any) -> RemoteBackend:
        """The tokenizer and embedding matrix from a local copy of the served model (``default``, a
        ``.gguf`` file or an HF folder); the weights are not loaded, only the embedding tensor is read."""
        from transformers import AutoTokenizer

        folder = resolve_model_dir(path)
        config = json.loads((folder / "config.json").read_text())
        api_key = None
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env) or None
            if api_key is None:
                raise ConfigError(f"model.api_key_env names {api_key_env!r}, which is unset or empty")
        context = config.get("max_position_embeddings") or 2048
        backend = cls(url, AutoTokenizer.from_pretrained(folder), read_embedding_matrix(folder, embedding_key),
                      model=model, api_key=api_key, system_prompt=system_prompt,
                      max_input_tokens=min(max_input_tokens or context, context), **http)
        if config.get("hidden_size") not in (None, backend.hidden_size):
            raise ConfigError(f"{folder}: config.json says hidden_size {config['hidden_size']}, the embedding "
                              f"matrix has {backend.hidden_size}")
        backend.name = model or model_display_name(path)
        return backend

    @property
    def hidden_size(self) -> int:
        return int(self.embedding.shape[1])

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the embedding matrix, as :meth:`LocalBackend.fingerprint` computes it: a
        corruption learned on the local model is found in the store for the same model served remotely."""
        if self._fingerprint is None:
            self._fingerprint = embedding_fingerprint(self.embedding)
        return self._fingerprint

    def embed(self, prompts: Sequence[PreparedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings ``(batch, seq, dim)`` looked up in the local matrix, and the mask."""
        ids, attn = left_padded_ids(prompts, self.pad_id)
        return torch.nn.functional.embedding(ids, self.embedding), attn

    # ------------------------------------------------------------ requests

    def model_name(self) -> str:
        """The served model's name: the configured one, else the only one ``/v1/models`` lists."""
        if self._model is None:
            listed = [m["id"] for m in self._send(lambda: self._client.get("/v1/models"))["data"]]
            if len(listed) != 1:
                raise ConfigError(f"the server at {self.url} serves {listed}: name the model to use")
            self._model = listed[0]
        return self._model

    def _body(self, prompt: PreparedPrompt, plan: CorruptionPlan | None, params: GenerationParams,
              model: str, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "max_tokens": params.max_new_tokens,
                                "temperature": params.temperature if params.do_sample else 0.0,
                                "stream": stream, "return_token_ids": True}
        if params.do_sample and params.top_p < 1.0:
            body["top_p"] = params.top_p
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.ignore_eos:
            body["ignore_eos"] = True
        if plan is not None and plan.n_tokens:
            body["prompt_embeds"] = _b64(self.corrupted_embeddings([prompt], [plan])[0][0])
        else:
            body["prompt"] = list(prompt.input_ids)
        return body

    def _generation(self, payload: dict[str, Any], prompt: PreparedPrompt, plan: CorruptionPlan | None) -> Generation:
        choice = payload["choices"][0]
        text = choice.get("text") or ""
        ids = choice.get("token_ids")
        if ids is None:  # a server without return_token_ids: the reply's own tokens, as this tokenizer sees them
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Generation(text, list(ids), len(prompt), choice.get("finish_reason") or "stop",
                          plan.n_tokens if plan else 0)

    def _wait(self, attempt: int, response: httpx.Response | None) -> float:
        after = response.headers.get("retry-after", "") if response is not None else ""
        return float(after) if after.isdigit() else self.backoff_s * 2**attempt

    def _unless_retry(self, exc: httpx.TransportError, attempt: int, started: bool) -> None:
        """Raise unless a failed request may be retried (never once a stream has yielded)."""
        if started:
            raise RemoteError(f"the stream from {self.url} broke mid-completion: {exc!r}") from exc
        if attempt == self.retries:
            raise RemoteError(f"the generation server at {self.url} is unreachable: {exc!r}") from exc

    def _check(self, response: httpx.Response) -> None:
        if response.status_code == 400:
            raise InputError(f"the generation server refused the request: {_server_message(response)}")
        if response.status_code >= 400:
            raise RemoteError(f"the generation server at {self.url} answered {response.status_code}: "
                              f"{_server_message(response)}")

    def _send(self, call: Any) -> dict[str, Any]:
        """One request with retries on connection errors, 429 and 5xx."""
        for attempt in range(self.retries + 1):
            try:
                response = call()
            except httpx.TransportError as exc:
                self._unless_retry(exc, attempt, started=False)
                time.sleep(self._wait(attempt, None))
                continue
            if response.status_code in RETRY_STATUS and attempt < self.retries:
                time.sleep(self._wait(attempt, response))
                continue
            self._check(response)
            return response.json()
        raise AssertionError("unreachable")

    def generate(self, prompts: Sequence[PreparedPrompt], plans: Sequence[CorruptionPlan | None] | None = None,
                 params: GenerationParams | None = None) -> list[Generation]:
        """One request per prompt (concurrent for a batch: the server batches them itself)."""
        params = params or GenerationParams()
        plans = list(plans) if plans is not None else [None] * len(prompts)
        model = self.model_name()

        def one(i: int) -> Generation:
            body = self._body(prompts[i], plans[i], params, model, stream=False)
            return self._generation(self._send(lambda: self._client.post("/v1/completions", json=body)),
                                    prompts[i], plans[i])
        if len(prompts) <= 1:
            return [one(i) for i in range(len(prompts))]
        with ThreadPoolExecutor(min(MAX_BATCH_THREADS, len(prompts))) as pool:
            return list(pool.map(one, range(len(prompts))))

    def stream(self, prompt: PreparedPrompt, plan: CorruptionPlan | None = None,
               params: GenerationParams | None = None) -> Iterator[StreamEvent]:
        """Server-sent events as they arrive; retried only until the first event."""
        body = self._body(prompt, plan, params or GenerationParams(), self.model_name(), stream=True)
        for attempt in range(self.retries + 1):
            started = False
            try:
                with self._client.stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code in RETRY_STATUS and attempt < self.retries:
                        wait = self._wait(attempt, response)
                    else:
                        if response.status_code >= 400:
                            response.read()
                            self._check(response)
                        for event in _events(response.iter_lines(), self.url):
                            started = True
                            yield event
                        return
            except httpx.TransportError as exc:
                self._unless_retry(exc, attempt, started)
                wait = self._wait(attempt, None)
            time.sleep(wait)

    # ------------------------------------------------------------ async twins (native I/O)

    def _aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if loop not in self._aclients:
            self._aclients[loop] = httpx.AsyncClient(base_url=self.url, headers=self._headers, timeout=self._timeout)
        return self._aclients[loop]

    async def _asend(self, body: dict[str, Any]) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                response = await self._aclient().post("/v1/completions", json=body)
            except httpx.TransportError as exc:
                self._unless_retry(exc, attempt, started=False)
                await asyncio.sleep(self._wait(attempt, None))
                continue
            if response.status_code in RETRY_STATUS and attempt < self.retries:
                await asyncio.sleep(self._wait(attempt, response))
                continue
            self._check(response)
            return response.json()
        raise AssertionError("unreachable")

    async def agenerate(self, prompts: Sequence[PreparedPrompt], plans: Sequence[CorruptionPlan | None] | None = None,
                        params: GenerationParams | None = None) -> list[Generation]:
        params = params or GenerationParams()
        plans = list(plans) if plans is not None else [None] * len(prompts)
        model = await asyncio.to_thread(self.model_name)
        bodies = [self._body(p, plan, params, model, stream=False) for p, plan in zip(prompts, plans)]
        payloads = await asyncio.gather(*(self._asend(b) for b in bodies))
        return [self._generation(pl, p, plan) for pl, p, plan in zip(payloads, prompts, plans)]

    async def astream(self, prompt: PreparedPrompt, plan: CorruptionPlan | None = None,
                      params: GenerationParams | None = None) -> AsyncIterator[StreamEvent]:
        model = await asyncio.to_thread(self.model_name)
        body = self._body(prompt, plan, params or GenerationParams(), model, stream=True)
        for attempt in range(self.retries + 1):
            started = False
            try:
                async with self._aclient().stream("POST", "/v1/completions", json=body) as response:
                    if response.status_code in RETRY_STATUS and attempt < self.retries:
                        wait = self._wait(attempt, response)
                    else:
                        if response.status_code >= 400:
                            await response.aread()
                            self._check(response)
                        async for event in _aevents(response.aiter_lines(), self.url):
                            started = True
                            yield event
                        return
            except httpx.TransportError as exc:
                self._unless_retry(exc, attempt, started)
                wait = self._wait(attempt, None)
            await asyncio.sleep(wait)

    def close(self) -> None:
        self._client.close()


def _event(line: str, url: str) -> StreamEvent | None | bool:
    """One SSE line: an event, None (nothing to yield), or True at ``[DONE]``."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return True
    payload = json.loads(data)
    if "error" in payload:
        raise RemoteError(f"the generation server at {url} failed mid-stream: {payload['error'].get('message')}")
    if not payload.get("choices"):
        return None  # the usage chunk
    choice = payload["choices"][0]
    event = StreamEvent(choice.get("text") or "", list(choice.get("token_ids") or []), choice.get("finish_reason"))
    return event if event.text or event.token_ids or event.finish_reason else None  # e.g. a leading empty chunk


def _events(lines: Iterator[str], url: str) -> Iterator[StreamEvent]:
    finished = False
    for line in lines:
        event = _event(line, url)
        if event is True:
            break
        if isinstance(event, StreamEvent):
            finished = finished or event.finish_reason is not None
            yield event
    if not finished:
        raise RemoteError(f"the stream from {url} ended before the completion finished")


async def _aevents(lines: AsyncIterator[str], url: str) -> AsyncIterator[StreamEvent]:
    finished = False
    async for line in lines:
        event = _event(line, url)
        if event is True:
            break
        if isinstance(event, StreamEvent):
            finished = finished or event.finish_reason is not None
            yield event
    if not finished:
        raise RemoteError(f"the stream from {url} ended before the completion finished")

