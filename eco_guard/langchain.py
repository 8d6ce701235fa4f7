"""LangChain adapters: the guard as a ``Runnable`` and as a ``BaseChatModel``.

``ECOGuard`` is the guard as a step in a chain; it takes a string, a
``PromptValue``, a list of messages or a dict (question + retrieved context)
and returns an ``AIMessage`` whose ``response_metadata["eco_guard"]`` holds the
decision::

    chain = ChatPromptTemplate.from_template("{q}") | ECOGuard() | StrOutputParser()
    chain.invoke({"q": "Who is Harry Potter?"})

``ECOChatModel`` is the guard wherever a chat model goes::

    llm = ECOChatModel(config="guard.yaml")
    llm.invoke("Who wrote the Harry Potter books?").response_metadata["eco_guard"]["route"]   # 'corrupted'

``ECODocumentFilter`` judges retrieved documents one by one and drops (or marks)
those about a forget topic.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from langchain_core.callbacks import (
    CallbackManagerForLLMRun,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    convert_to_messages,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import ensure_config
from pydantic import ConfigDict, Field, PrivateAttr

from eco_guard.backends.base import StreamEvent
from eco_guard.config import default_config_path
from eco_guard.errors import InputError
from eco_guard.guard import Answer, Decision, Guard, GuardRequest, GuardResult

__all__ = ["DECISION_EVENT", "ECOChatModel", "ECODocumentFilter", "ECOGuard", "to_request"]

DECISION_EVENT = "eco_guard_decision"
"""Name of the custom callback event carrying each decision (seen by tracers and ``astream_events``)."""

_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "tool", "chat": "user"}

_GUARDS: dict[str, Guard] = {}
_GUARDS_LOCK = threading.Lock()


def shared_guard(config: str | os.PathLike[str] | None = None) -> Guard:
    """One guard per config file per process (loading the model and classifier once)."""
    key = str(Path(config if config is not None else default_config_path()).resolve())
    with _GUARDS_LOCK:
        if key not in _GUARDS:
            _GUARDS[key] = Guard.from_config(config)
        return _GUARDS[key]


# ---------------------------------------------------------------- input conversion

def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type") == "text":
                parts.append(str(block.get("text", "")))
            else:
                kind = block.get("type") if isinstance(block, dict) else type(block).__name__
                raise InputError(f"only text content is supported, got a {kind!r} block")
        return "".join(parts)
    raise InputError(f"message content must be text, got {type(content).__name__}")


def _messages_to_dicts(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        role = _ROLES.get(m.type)
        if role is None:
            raise InputError(f"unsupported message type {m.type!r}")
        if role == "tool":  # this local model has no tool role; show the result as user-visible text
            role = "user"
        out.append({"role": role, "content": _text_of(m.content)})
    return out


def _passage_text(item: Any) -> str:
    if isinstance(item, Document):
        return item.page_content
    if isinstance(item, str):
        return item
    raise InputError(f"context items must be Documents or text, got {type(item).__name__}")


def to_request(value: Any, *, input_key: str = "question", context_key: str = "context") -> GuardRequest:
    """Turn any supported input (str, PromptValue, messages, dict) into a :class:`GuardRequest`."""
    if isinstance(value, GuardRequest):
        return value
    if isinstance(value, str):
        return GuardRequest.of(value)
    if isinstance(value, PromptValue):
        return GuardRequest.of(_messages_to_dicts(value.to_messages()))
    if isinstance(value, dict):
        if input_key not in value:
            raise InputError(f"the input dict has no {input_key!r} key (keys: {', '.join(map(str, value)) or 'none'})")
        question = to_request(value[input_key], input_key=input_key, context_key=context_key)
        context = value.get(context_key) or []
        context = [context] if isinstance(context, (str, Document)) else context
        if not isinstance(context, Sequence):
            raise InputError(f"{context_key!r} must be a list of Documents or strings, got {type(context).__name__}")
        return GuardRequest.of(list(question.messages), [_passage_text(c) for c in context])
    if isinstance(value, Sequence):
        try:
            messages = convert_to_messages(value)
        except (ValueError, TypeError, NotImplementedError) as exc:
            raise InputError(f"cannot read the input as chat messages: {str(exc).splitlines()[0]}") from None
        return GuardRequest.of(_messages_to_dicts(messages))
    raise InputError(f"unsupported input type {type(value).__name__}: pass a str, PromptValue, messages or a dict")


def _as_langchain_messages(answer: Answer) -> list[BaseMessage]:
    """The chat the guard would have answered, for a face's own fallback model."""
    return convert_to_messages([(m["role"], m["content"]) for m in answer.messages])


def _metadata(decision: Decision, model_name: str, finish_reason: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"eco_guard": decision.to_dict(), "model_name": model_name}
    if finish_reason:
        meta["finish_reason"] = finish_reason
    return meta


def _usage(prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    total = prompt_tokens + output_tokens
    return {"input_tokens": prompt_tokens, "output_tokens": output_tokens, "total_tokens": total}


def _message(result: GuardResult, model_name: str) -> AIMessage:
    g = result.generation
    return AIMessage(
        content=result.text,
        response_metadata=_metadata(result.decision, model_name, g.finish_reason if g else "stop"),
        usage_metadata=_usage(g.prompt_tokens, len(g.token_ids)) if g else _usage(0, 0),
    )


def _with_decision(message: Any, decision: Decision) -> AIMessage:
    if isinstance(message, str):
        message = AIMessage(content=message)
    if not isinstance(message, BaseMessage):
        raise InputError(f"the fallback returned {type(message).__name__}; expected a message or text")
    meta = {**message.response_metadata, "eco_guard": decision.to_dict()}
    usage = getattr(message, "usage_metadata", None)
    return AIMessage(content=message.content, response_metadata=meta, usage_metadata=usage)


# ---------------------------------------------------------------- ECOGuard

class ECOGuard(Runnable[Any, AIMessage]):
    """The guard as a chain step: classify, then answer corrupted or fall back.

    Args:
        guard: an engine; default ``Guard.from_config(config)``.
        config: a YAML path (``None``: the embedded demo config).
        fallback: answers unflagged prompts (any chat model or runnable); default: the same local model, uncorrupted.
        input_key / context_key: for dict inputs, where the question and the retrieved context are.
        **generation: defaults for generation (``max_new_tokens``, ``stop``, ``temperature``...).

    Example:
        >>> chain = ChatPromptTemplate.from_template("{q}") | ECOGuard() | StrOutputParser()  # doctest: +SKIP
        >>> chain.invoke({"q": "What is the capital of France?"})  # doctest: +SKIP
        'The capital of France is Paris.'
    """

    def __init__(
        self,
        guard: Guard | None = None,
        *,
        config: str | os.PathLike[str] | None = None,
        fallback: Runnable | None = None,
        input_key: str = "question",
        context_key: str = "context",
        **generation: Any,
    ):
        self.guard = guard or shared_guard(config)
        self.fallback = fallback
        self.input_key, self.context_key = input_key, context_key
        self.generation = generation
        self.guard.params(**generation)  # unknown settings fail here, not on the first request
        self.name = "ECOGuard"

    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        return Any

    @property
    def OutputType(self) -> type[AIMessage]:  # noqa: N802
        return AIMessage

    @property
    def model_name(self) -> str:
        return self.guard.model_name

    def _plan(self, value: Any, kwargs: dict[str, Any]) -> Answer:
        request = to_request(value, input_key=self.input_key, context_key=self.context_key)
        return self.guard.plan(request, **{**self.generation, **kwargs})

    def _own_fallback(self, answer: Answer) -> bool:
        return answer.route == "fallback" and self.fallback is not None

    # -- invoke

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return self._call_with_config(self._invoke, input, config, run_type="llm", **kwargs)

    def _invoke(self, value: Any, run_manager: Any, config: RunnableConfig, **kwargs: Any) -> AIMessage:
        answer = self._plan(value, kwargs)
        dispatch_custom_event(DECISION_EVENT, answer.decision.to_dict(), config=config)
        if self._own_fallback(answer):
            return _with_decision(self.fallback.invoke(_as_langchain_messages(answer), config), answer.decision)
        return _message(answer.generate(), self.model_name)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return await self._acall_with_config(self._ainvoke, input, config, run_type="llm", **kwargs)

    # Native async, not derived: the fallback is often a remote chat model whose ainvoke needs no thread.
    async def _ainvoke(self, value: Any, run_manager: Any, config: RunnableConfig, **kwargs: Any) -> AIMessage:
        answer = await asyncio.to_thread(self._plan, value, kwargs)
        await adispatch_custom_event(DECISION_EVENT, answer.decision.to_dict(), config=config)
        if self._own_fallback(answer):
            return _with_decision(await self.fallback.ainvoke(_as_langchain_messages(answer), config), answer.decision)
        return _message(await answer.agenerate(), self.model_name)

    # -- streaming: the decision is the first chunk, made before any token

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        yield from self._transform_stream_with_config(iter([input]), self._stream, config, run_type="llm", **kwargs)

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None,
                  **kwargs: Any) -> Iterator[AIMessageChunk]:
        yield from self._transform_stream_with_config(input, self._stream, config, run_type="llm", **kwargs)

    def _stream(self, inputs: Iterator[Any], run_manager: Any, config: RunnableConfig,
                **kwargs: Any) -> Iterator[AIMessageChunk]:
        answer = self._plan(_single(inputs), kwargs)
        dispatch_custom_event(DECISION_EVENT, answer.decision.to_dict(), config=config)
        yield _decision_chunk(answer)
        if self._own_fallback(answer):
            for chunk in self.fallback.stream(_as_langchain_messages(answer), config):
                yield _chunk(chunk)
            return
        to_chunk = _Chunker(answer, self.model_name)
        for event in answer.stream():
            yield to_chunk(event)

    async def astream(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        async def one() -> AsyncIterator[Any]:
            yield input

        async for chunk in self._atransform_stream_with_config(one(), self._astream, config, run_type="llm", **kwargs):
            yield chunk

    async def atransform(self, input: AsyncIterator[Any], config: RunnableConfig | None = None,
                         **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        async for chunk in self._atransform_stream_with_config(input, self._astream, config, run_type="llm", **kwargs):
            yield chunk

    async def _astream(self, inputs: AsyncIterator[Any], run_manager: Any, config: RunnableConfig,
                       **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        values = [v async for v in inputs]
        answer = await asyncio.to_thread(self._plan, _single(iter(values)), kwargs)
        await adispatch_custom_event(DECISION_EVENT, answer.decision.to_dict(), config=config)
        yield _decision_chunk(answer)
        if self._own_fallback(answer):
            async for chunk in self.fallback.astream(_as_langchain_messages(answer), config):
                yield _chunk(chunk)
            return
        to_chunk = _Chunker(answer, self.model_name)
        async for event in answer.astream():
            yield to_chunk(event)


def _single(inputs: Iterator[Any]) -> Any:
    values = list(inputs)
    if len(values) != 1:
        raise InputError(f"ECOGuard streams one input at a time, got {len(values)}")
    return values[0]


def _chunk(chunk: Any) -> AIMessageChunk:
    if isinstance(chunk, AIMessageChunk):
        return chunk
    if isinstance(chunk, str):
        return AIMessageChunk(content=chunk)
    if isinstance(chunk, BaseMessage):
        return AIMessageChunk(content=chunk.content)
    raise InputError(f"the fallback streamed {type(chunk).__name__}; expected messages or text")


def _decision_chunk(answer: Answer) -> AIMessageChunk:
    return AIMessageChunk(content="", response_metadata={"eco_guard": answer.decision.to_dict()})


class _Chunker:
    """Turns one answer's stream events into message chunks, counting the tokens produced."""

    def __init__(self, answer: Answer, model_name: str):
        self.prompt_tokens = len(answer.prompt) if answer.prompt is not None else 0
        self.model_name = model_name
        self.produced = 0

    def __call__(self, event: StreamEvent) -> AIMessageChunk:
        self.produced += len(event.token_ids)
        if event.finish_reason is None:
            return AIMessageChunk(content=event.text)
        # Usage and finish reason go on the last chunk only: chunk metadata is summed when merged.
        return AIMessageChunk(
            content=event.text,
            response_metadata={"finish_reason": event.finish_reason, "model_name": self.model_name},
            usage_metadata=_usage(self.prompt_tokens, self.produced),
            chunk_position="last",
        )


# ---------------------------------------------------------------- ECOChatModel

class ECOChatModel(BaseChatModel):
    """The guard as a LangChain chat model (no tool calling).

    ``model=`` at call time (``llm.invoke(msgs, model="path/to/hf-folder-or.gguf")``) answers with
    another local model under the same classifier and topics; ``response_metadata["model_name"]``
    then names it. LangChain serialization (``dumpd``/``load``) round-trips the constructor arguments.

    Example:
        >>> llm = ECOChatModel()                              # the embedded demo config  # doctest: +SKIP
        >>> llm.invoke("Who is Harry Potter?").response_metadata["eco_guard"]["flagged"]  # doctest: +SKIP
        True
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    config: str | None = Field(
        default_factory=lambda: os.environ.get("ECO_GUARD_CONFIG") or None,
        description="YAML config path; default $ECO_GUARD_CONFIG, else the embedded demo config",
    )
    max_tokens: int | None = Field(None, alias="max_new_tokens", description="max new tokens per reply")
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = Field(None, alias="stop_sequences")
    _guard: Guard | None = PrivateAttr(None)
    _overrides: dict[str, Guard] = PrivateAttr(default_factory=dict)
    _overrides_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @classmethod
    def is_lc_serializable(cls) -> bool:
        return True

    @classmethod
    def get_lc_namespace(cls) -> list[str]:
        return ["eco_guard", "langchain"]

    @classmethod
    def from_guard(cls, guard: Guard, **kwargs: Any) -> ECOChatModel:
        """A chat model over an already loaded guard (no second load of model or classifier)."""
        model = cls(config=str(guard.config.source) if guard.config.source else None, **kwargs)
        model._guard = guard
        return model

    @property
    def guard(self) -> Guard:
        if self._guard is None:  # loaded on first use, so constructing a model is instant
            self._guard = shared_guard(self.config_path)
        return self._guard

    @property
    def config_path(self) -> str:
        """The YAML this model answers with: ``config``, else ``$ECO_GUARD_CONFIG``, else the embedded demo."""
        return self.config or os.environ.get("ECO_GUARD_CONFIG") or str(default_config_path())

    @property
    def model_name(self) -> str:
        if self._guard is not None:
            return f"eco-guard/{self._guard.model_name}"
        # From the config alone: naming the model must not load it (LangChain reads this eagerly).
        from eco_guard.backends.local import model_display_name
        from eco_guard.config import load_config

        return f"eco-guard/{model_display_name(load_config(self.config_path).model.path)}"

    @property
    def _llm_type(self) -> str:
        return "eco-guard"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"config": self.config_path, "max_tokens": self.max_tokens, "temperature": self.temperature}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> Any:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "eco_guard"
        params["ls_model_name"] = kwargs.get("model") or self.model_name
        if self.max_tokens is not None:
            params["ls_max_tokens"] = self.max_tokens
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        return params

    def _plan(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[Answer, str]:
        guard, name = self._for_call(kwargs)
        temperature = kwargs.pop("temperature", self.temperature)
        settings = {
            "max_new_tokens": kwargs.pop("max_tokens", kwargs.pop("max_new_tokens", self.max_tokens)),
            "temperature": temperature,
            "do_sample": bool(temperature) if temperature is not None else None,
            "top_p": kwargs.pop("top_p", self.top_p),
            "seed": kwargs.pop("seed", self.seed),
            "stop": stop if stop is not None else self.stop,
        }
        return guard.plan(GuardRequest.of(_messages_to_dicts(messages)), **settings), name

    def _for_call(self, kwargs: dict[str, Any]) -> tuple[Guard, str]:
        """The guard and model name for one call: ``model=`` (a local model path) overrides the config's."""
        model = kwargs.pop("model", None)
        if model is None:
            return self.guard, self.model_name
        model = str(model)
        with self._overrides_lock:  # built once per model; the weights themselves are shared process-wide
            if model not in self._overrides:
                self._overrides[model] = self.guard.with_model(model)
            return self._overrides[model], f"eco-guard/{model}"

    # Async (_agenerate, _astream) is langchain-core's: these run in a worker thread, as the local model
    # would anyway; the decision still comes before the first token.

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        answer, name = self._plan(messages, stop, kwargs)
        return ChatResult(generations=[ChatGeneration(message=_message(answer.generate(), name))])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        answer, name = self._plan(messages, stop, kwargs)
        yield ChatGenerationChunk(message=_decision_chunk(answer))
        to_chunk = _Chunker(answer, name)
        for event in answer.stream():
            chunk = ChatGenerationChunk(message=to_chunk(event))
            if run_manager and event.text:
                run_manager.on_llm_new_token(event.text, chunk=chunk)
            yield chunk


# ---------------------------------------------------------------- ECODocumentFilter

class ECODocumentFilter(Runnable[list[Document], list[Document]]):
    """Judge retrieved documents; drop those about a forget topic (``mode="drop"``) or mark them.

    Marked documents carry ``metadata["eco_guard"] = {"flagged", "topic", "score"}``.

    Example:
        >>> retriever | ECODocumentFilter(guard)  # doctest: +SKIP
    """

    def __init__(self, guard: Guard | None = None, *, config: str | os.PathLike[str] | None = None, mode: str = "drop"):
        if mode not in ("drop", "mark"):
            raise InputError(f"mode must be 'drop' or 'mark', got {mode!r}")
        self.guard = guard or shared_guard(config)
        self.mode = mode
        self.name = "ECODocumentFilter"

    def invoke(self, input: list[Document], config: RunnableConfig | None = None, **kwargs: Any) -> list[Document]:
        return self._call_with_config(self._filter, input, ensure_config(config), run_type="retriever")

    async def ainvoke(self, input: list[Document], config: RunnableConfig | None = None,
                      **kwargs: Any) -> list[Document]:
        return await self._acall_with_config(self._afilter, input, ensure_config(config), run_type="retriever")

    async def _afilter(self, docs: list[Document]) -> list[Document]:
        return await asyncio.to_thread(self._filter, docs)

    def _filter(self, docs: list[Document]) -> list[Document]:
        if not isinstance(docs, list) or not all(isinstance(d, Document) for d in docs):
            raise InputError("ECODocumentFilter takes a list of Documents")
        verdicts = self.guard.screen([d.page_content for d in docs])
        if self.mode == "drop":
            return [d for d, v in zip(docs, verdicts) if not v.flagged]
        return [self._mark(d, v.flagged, v.topic, v.score) for d, v in zip(docs, verdicts)]

    @staticmethod
    def _mark(doc: Document, flagged: bool, topic: str | None, score: float) -> Document:
        meta = {**doc.metadata, "eco_guard": {"flagged": flagged, "topic": topic, "score": score}}
        return Document(page_content=doc.page_content, metadata=meta, id=doc.id)
