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
    AsyncCallbackManagerForLLMRun,
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

from eco_guard.config import default_config_path
from eco_guard.guard import BLOCKED_REPLY, Decision, Guard, GuardRequest, GuardResult
from eco_guard.errors import InputError

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


def _as_langchain_messages(request: GuardRequest, guard: Guard) -> list[BaseMessage]:
    return convert_to_messages([(m["role"], m["content"]) for m in guard.render(request)])


def _metadata(decision: Decision, model_name: str, finish_reason: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"eco_guard": decision.to_dict(), "model_name": model_name}
    if finish_reason:
        meta["finish_reason"] = finish_reason
    return meta


def _usage(prompt_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"input_tokens": prompt_tokens, "output_tokens": output_tokens, "total_tokens": prompt_tokens + output_tokens}


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
    return AIMessage(content=message.content, response_metadata=meta, usage_metadata=getattr(message, "usage_metadata", None))


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
        return self.guard.backend.name

    def _request(self, value: Any) -> GuardRequest:
        return to_request(value, input_key=self.input_key, context_key=self.context_key)

    def _params(self, kwargs: dict[str, Any]) -> Any:
        return self.guard.params(**{**self.generation, **kwargs})

    # -- invoke

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return self._call_with_config(self._invoke, input, config, run_type="llm", **kwargs)

    def _invoke(self, value: Any, run_manager: Any, config: RunnableConfig, **kwargs: Any) -> AIMessage:
        request = self._request(value)
        routed = self.guard.route(request)
        dispatch_custom_event(DECISION_EVENT, routed.decision.to_dict(), config=config)
        if routed.prompt is None:
            return _message(GuardResult(BLOCKED_REPLY, routed.decision), self.model_name)
        if routed.plan is None and self.fallback is not None:
            answer = self.fallback.invoke(_as_langchain_messages(request, self.guard), config)
            return _with_decision(answer, routed.decision)
        gen = self.guard.backend.generate([routed.prompt], [routed.plan], self._params(kwargs))[0]
        return _message(GuardResult(gen.text, routed.decision, gen), self.model_name)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AIMessage:
        return await self._acall_with_config(self._ainvoke, input, config, run_type="llm", **kwargs)

    async def _ainvoke(self, value: Any, run_manager: Any, config: RunnableConfig, **kwargs: Any) -> AIMessage:
        request = self._request(value)
        routed = await asyncio.to_thread(self.guard.route, request)
        await adispatch_custom_event(DECISION_EVENT, routed.decision.to_dict(), config=config)
        if routed.prompt is None:
            return _message(GuardResult(BLOCKED_REPLY, routed.decision), self.model_name)
        if routed.plan is None and self.fallback is not None:
            answer = await self.fallback.ainvoke(_as_langchain_messages(request, self.guard), config)
            return _with_decision(answer, routed.decision)
        gen = (await self.guard.backend.agenerate([routed.prompt], [routed.plan], self._params(kwargs)))[0]
        return _message(GuardResult(gen.text, routed.decision, gen), self.model_name)

    # -- streaming

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        yield from self._transform_stream_with_config(iter([input]), self._stream, config, run_type="llm", **kwargs)

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        yield from self._transform_stream_with_config(input, self._stream, config, run_type="llm", **kwargs)

    def _stream(self, inputs: Iterator[Any], run_manager: Any, config: RunnableConfig, **kwargs: Any) -> Iterator[AIMessageChunk]:
        value = _single(inputs)
        request = self._request(value)
        routed = self.guard.route(request)
        dispatch_custom_event(DECISION_EVENT, routed.decision.to_dict(), config=config)
        yield AIMessageChunk(content="", response_metadata={"eco_guard": routed.decision.to_dict()})
        if routed.prompt is None:
            yield AIMessageChunk(content=BLOCKED_REPLY, response_metadata={"finish_reason": "stop"})
            return
        if routed.plan is None and self.fallback is not None:
            for chunk in self.fallback.stream(_as_langchain_messages(request, self.guard), config):
                yield _chunk(chunk)
            return
        produced = 0
        for event in self.guard.backend.stream(routed.prompt, routed.plan, self._params(kwargs)):
            produced += len(event.token_ids)
            yield _event_chunk(event, len(routed.prompt), produced, self.model_name)

    async def astream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        async def one() -> AsyncIterator[Any]:
            yield input

        async for chunk in self._atransform_stream_with_config(one(), self._astream, config, run_type="llm", **kwargs):
            yield chunk

    async def atransform(self, input: AsyncIterator[Any], config: RunnableConfig | None = None, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        async for chunk in self._atransform_stream_with_config(input, self._astream, config, run_type="llm", **kwargs):
            yield chunk

    async def _astream(self, inputs: AsyncIterator[Any], run_manager: Any, config: RunnableConfig, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        values = [v async for v in inputs]
        request = self._request(_single(iter(values)))
        routed = await asyncio.to_thread(self.guard.route, request)
        await adispatch_custom_event(DECISION_EVENT, routed.decision.to_dict(), config=config)
        yield AIMessageChunk(content="", response_metadata={"eco_guard": routed.decision.to_dict()})
        if routed.prompt is None:
            yield AIMessageChunk(content=BLOCKED_REPLY, response_metadata={"finish_reason": "stop"})
            return
        if routed.plan is None and self.fallback is not None:
            async for chunk in self.fallback.astream(_as_langchain_messages(request, self.guard), config):
                yield _chunk(chunk)
            return
        produced = 0
        async for event in self.guard.backend.astream(routed.prompt, routed.plan, self._params(kwargs)):
            produced += len(event.token_ids)
            yield _event_chunk(event, len(routed.prompt), produced, self.model_name)


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


def _event_chunk(event: Any, prompt_tokens: int, produced: int, model_name: str) -> AIMessageChunk:
    if event.finish_reason is None:
        return AIMessageChunk(content=event.text)
    # Usage and finish reason go on the last chunk only: chunk metadata is summed when merged.
    return AIMessageChunk(
        content=event.text,
        response_metadata={"finish_reason": event.finish_reason, "model_name": model_name},
        usage_metadata=_usage(prompt_tokens, produced),
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
            return f"eco-guard/{self._guard.backend.name}"
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

    def _params(self, stop: list[str] | None, kwargs: dict[str, Any]) -> Any:
        temperature = kwargs.pop("temperature", self.temperature)
        settings = {
            "max_new_tokens": kwargs.pop("max_tokens", kwargs.pop("max_new_tokens", self.max_tokens)),
            "temperature": temperature,
            "do_sample": bool(temperature) if temperature is not None else None,
            "top_p": kwargs.pop("top_p", self.top_p),
            "seed": kwargs.pop("seed", self.seed),
            "stop": stop if stop is not None else self.stop,
        }
        return self.guard.params(**settings)

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

    @staticmethod
    def _route(guard: Guard, messages: list[BaseMessage]) -> Any:
        return guard.route(GuardRequest.of(_messages_to_dicts(messages)))

    @staticmethod
    def _result(guard: Guard, name: str, routed: Any, params: Any) -> ChatResult:
        if routed.prompt is None:
            result = GuardResult(BLOCKED_REPLY, routed.decision)
        else:
            gen = guard.backend.generate([routed.prompt], [routed.plan], params)[0]
            result = GuardResult(gen.text, routed.decision, gen)
        return ChatResult(generations=[ChatGeneration(message=_message(result, name))])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        guard, name = self._for_call(kwargs)
        params = self._params(stop, kwargs)
        return self._result(guard, name, self._route(guard, messages), params)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        guard, name = await asyncio.to_thread(self._for_call, kwargs)
        params = self._params(stop, kwargs)
        routed = await asyncio.to_thread(self._route, guard, messages)
        return await asyncio.to_thread(self._result, guard, name, routed, params)

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        guard, name = self._for_call(kwargs)
        params = self._params(stop, kwargs)
        routed = self._route(guard, messages)
        yield from _opening_chunks(routed)
        if routed.prompt is None:
            return
        produced = 0
        for event in guard.backend.stream(routed.prompt, routed.plan, params):
            produced += len(event.token_ids)
            chunk = ChatGenerationChunk(message=_event_chunk(event, len(routed.prompt), produced, name))
            if run_manager and event.text:
                run_manager.on_llm_new_token(event.text, chunk=chunk)
            yield chunk

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        guard, name = await asyncio.to_thread(self._for_call, kwargs)
        params = self._params(stop, kwargs)
        routed = await asyncio.to_thread(self._route, guard, messages)
        for chunk in _opening_chunks(routed):
            yield chunk
        if routed.prompt is None:
            return
        produced = 0
        async for event in guard.backend.astream(routed.prompt, routed.plan, params):
            produced += len(event.token_ids)
            chunk = ChatGenerationChunk(message=_event_chunk(event, len(routed.prompt), produced, name))
            if run_manager and event.text:
                await run_manager.on_llm_new_token(event.text, chunk=chunk)
            yield chunk


def _opening_chunks(routed: Any) -> list[ChatGenerationChunk]:
    """The decision first; for a blocked request, the whole (fixed) reply right after it."""
    chunks = [ChatGenerationChunk(message=AIMessageChunk(content="", response_metadata={"eco_guard": routed.decision.to_dict()}))]
    if routed.prompt is None:
        chunks.append(ChatGenerationChunk(message=AIMessageChunk(
            content=BLOCKED_REPLY, response_metadata={"finish_reason": "stop"}, usage_metadata=_usage(0, 0),
            chunk_position="last")))
    return chunks


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

    async def ainvoke(self, input: list[Document], config: RunnableConfig | None = None, **kwargs: Any) -> list[Document]:
        return await self._acall_with_config(self._afilter, input, ensure_config(config), run_type="retriever")

    async def _afilter(self, docs: list[Document]) -> list[Document]:
        return await asyncio.to_thread(self._filter, docs)

    def _filter(self, docs: list[Document]) -> list[Document]:
        if not isinstance(docs, list) or not all(isinstance(d, Document) for d in docs):
            raise InputError("ECODocumentFilter takes a list of Documents")
        if not docs:
            return []
        verdicts = self.guard.classify([d.page_content for d in docs])
        if isinstance(verdicts, str):  # cannot score: follow the guard's policy for passages
            if self.guard.config.on_classifier_error == "pass":
                return docs
            return [] if self.mode == "drop" else [self._mark(d, True, None, 1.0) for d in docs]
        if self.mode == "drop":
            return [d for d, v in zip(docs, verdicts) if not v.flagged]
        return [self._mark(d, v.flagged, v.topic, v.score) for d, v in zip(docs, verdicts)]

    @staticmethod
    def _mark(doc: Document, flagged: bool, topic: str | None, score: float) -> Document:
        meta = {**doc.metadata, "eco_guard": {"flagged": flagged, "topic": topic, "score": score}}
        return Document(page_content=doc.page_content, metadata=meta, id=doc.id)
