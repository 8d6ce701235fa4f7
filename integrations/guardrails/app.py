"""eco-guard composed with other guardrails: PII redaction, and LangChain v1 agent middleware.

Two compositions, both offline with the embedded demo config (forget topic: Harry Potter):

1. **LCEL**: ``redact_pii | ECOGuard | StrOutputParser``. A regex step replaces e-mail
   addresses, phone numbers and card-like numbers with placeholders *before* the guard (and
   the model, and any tracer) sees the text.
2. **Agent middleware**: ``ECORoutingMiddleware`` is an ``AgentMiddleware`` whose
   ``wrap_model_call`` / ``awrap_model_call`` judge the last user message with the guard's
   classifier; flagged model calls go to ``ECOChatModel`` (the local model with corrupted
   prompt embeddings), the others to the agent's own model (here ``LocalChatModel``: the same
   local SmolLM2 without any guard). LangChain's built-in ``PIIMiddleware`` runs before it.

Run::

    .venv/bin/python integrations/guardrails/app.py                 # both demos
    .venv/bin/python integrations/guardrails/app.py "My mail is a@b.com. Who is Harry Potter?"
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse, PIIMiddleware  # noqa: E402
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun  # noqa: E402
from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.outputs import ChatGeneration, ChatResult  # noqa: E402
from langchain_core.prompt_values import PromptValue  # noqa: E402
from langchain_core.runnables import Runnable, RunnableLambda  # noqa: E402
from pydantic import ConfigDict, Field  # noqa: E402

from eco_guard.config import load_config  # noqa: E402
from eco_guard.guard import BLOCKED_REPLY, Decision, Guard  # noqa: E402
from eco_guard.langchain import ECOChatModel, ECOGuard, shared_guard, to_request  # noqa: E402

MAX_NEW_TOKENS: Final = 48
PLAIN_MODEL_NAME: Final = "local-plain"
DEMO_PROMPTS: Final = (
    "I'm jane.doe@example.com, +1 415-555-0132. Who is the author of the Harry Potter series?",
    "My card 4111 1111 1111 1111 was declined in Paris. What is the capital of France?",
)

# ---------------------------------------------------------------- 1. PII redaction (LCEL)

EMAIL_PATTERN: Final = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
CARD_PATTERN: Final = r"\b(?:\d[ -]?){12,18}\d\b"  # 13-19 digits, optionally grouped
PHONE_PATTERN: Final = (  # optional country code, optional (area), then 2-3 more digit groups; not ISO dates
    r"(?<![\w@+(])(?!\d{4}-\d{2}-\d{2}\b)(?:\+?\d{1,3}[ .-]?)?\(?\d{2,4}\)?(?:[ .-]?\d{2,4}){2,3}\b"
)
_PII: Final = (  # order matters: cards before phones (a card looks like a long phone number)
    ("EMAIL", re.compile(EMAIL_PATTERN)),
    ("CARD", re.compile(CARD_PATTERN)),
    ("PHONE", re.compile(PHONE_PATTERN)),
)


def redact_text(text: str) -> str:
    """Replace e-mail addresses, card-like numbers and phone numbers with ``[EMAIL]``, ``[CARD]``, ``[PHONE]``.

    Example:
        >>> redact_text("mail jane@example.com or call 415-555-0132")
        'mail [EMAIL] or call [PHONE]'
    """
    for label, pattern in _PII:
        text = pattern.sub(f"[{label}]", text)
    return text


def redact_pii(value: Any) -> Any:
    """Redact every text the guard will read: a string, a PromptValue, messages, or a question dict."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, PromptValue):
        return [_redact_message(m) for m in value.to_messages()]
    if isinstance(value, dict):
        return {k: redact_pii(v) if k in ("question", "context") else v for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_message(m) if isinstance(m, BaseMessage) else redact_pii(m) for m in value]
    return value


def _redact_message(message: BaseMessage) -> BaseMessage:
    if isinstance(message.content, str):
        return message.model_copy(update={"content": redact_text(message.content)})
    return message


def build_pii_guard(guard: Guard, **generation: Any) -> Runnable:
    """``redact_pii | ECOGuard``: replies are ``AIMessage``s carrying the decision."""
    generation.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    return RunnableLambda(redact_pii, name="pii_redaction") | ECOGuard(guard, **generation)


def build_pii_chain(guard: Guard, **generation: Any) -> Runnable:
    """``redact_pii | ECOGuard | StrOutputParser``: the guard never sees the personal data."""
    return build_pii_guard(guard, **generation) | StrOutputParser()


# ---------------------------------------------------------------- 2. agent middleware

class LocalChatModel(BaseChatModel):
    """The guard's local model as a plain chat model: no classifier, no corruption (the "normal" model)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    guard: Any = Field(description="a Guard whose backend generates")
    max_tokens: int = MAX_NEW_TOKENS

    @property
    def _llm_type(self) -> str:
        return "local-plain"

    def _answer(self, messages: list[BaseMessage], stop: list[str] | None) -> Any:
        return self.guard.unguarded(to_request(messages), max_new_tokens=self.max_tokens, stop=stop)

    def _result(self, result: Any) -> ChatResult:
        meta = {"model_name": PLAIN_MODEL_NAME, "finish_reason": result.finish_reason}
        message = AIMessage(content=result.text, response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._result(self._answer(messages, stop).generate())

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._result(await self._answer(messages, stop).agenerate())


def corrupted_chat_model(guard: Guard, max_new_tokens: int = MAX_NEW_TOKENS) -> ECOChatModel:
    """``ECOChatModel`` over the config file ``guard`` was built from (the embedded demo: no file).

    ``ECOChatModel`` loads its engine through ``shared_guard``, so with ``guard = shared_guard(path)``
    both share one model and one classifier.
    """
    source = guard.config.source
    embedded = source is None or Path(source).resolve() == Path(load_config(None).source).resolve()
    return ECOChatModel(config=None if embedded else str(source), max_new_tokens=max_new_tokens)


class ECORoutingMiddleware(AgentMiddleware):
    """Route flagged model calls to the corrupted backend; let the others through to the agent's model.

    The decision is added to the reply's ``response_metadata["eco_guard"]`` either way.

    Args:
        guard: the engine whose classifier judges the last user message.
        corrupted_model: answers flagged calls; default ``ECOChatModel`` over the guard's config file.
    """

    def __init__(self, guard: Guard, corrupted_model: BaseChatModel | None = None):
        super().__init__()
        self.guard = guard
        self.corrupted_model = corrupted_model or corrupted_chat_model(guard)

    def judge(self, messages: list[BaseMessage]) -> Decision:
        """The guard's decision for the conversation's last user message."""
        return self.guard.plan(to_request(messages)).decision

    def _corrupted_call(self, request: ModelRequest) -> ModelRequest | list[BaseMessage]:
        if request.tools:  # the corrupted local model cannot call tools: answer in text, skipping binding
            return [*([request.system_message] if request.system_message else []), *request.messages]
        return request.override(model=self.corrupted_model)

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        decision = self.judge(request.messages)
        if decision.route == "blocked":
            return _annotated(ModelResponse(result=[AIMessage(content=BLOCKED_REPLY)]), decision)
        if not decision.flagged:
            return _annotated(handler(request), decision)
        call = self._corrupted_call(request)
        if isinstance(call, list):
            return _annotated(ModelResponse(result=[self.corrupted_model.invoke(call)]), decision)
        return _annotated(handler(call), decision)

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[ModelResponse]]) -> Any:
        decision = await asyncio.to_thread(self.judge, request.messages)
        if decision.route == "blocked":
            return _annotated(ModelResponse(result=[AIMessage(content=BLOCKED_REPLY)]), decision)
        if not decision.flagged:
            return _annotated(await handler(request), decision)
        call = self._corrupted_call(request)
        if isinstance(call, list):
            return _annotated(ModelResponse(result=[await self.corrupted_model.ainvoke(call)]), decision)
        return _annotated(await handler(call), decision)


def _annotated(response: ModelResponse, decision: Decision) -> ModelResponse:
    result = [
        m.model_copy(update={"response_metadata": {**m.response_metadata, "eco_guard": decision.to_dict()}})
        if isinstance(m, AIMessage) else m
        for m in response.result
    ]
    return ModelResponse(result=result, structured_response=response.structured_response)


def build_agent(guard: Guard, *, normal_model: BaseChatModel | None = None,
                corrupted_model: BaseChatModel | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> Any:
    """A tool-less agent: built-in PII middleware, then eco-guard routing, over a local model."""
    normal_model = normal_model or LocalChatModel(guard=guard, max_tokens=max_new_tokens)
    corrupted_model = corrupted_model or corrupted_chat_model(guard, max_new_tokens)
    middleware = [
        PIIMiddleware("email", strategy="redact", apply_to_input=True),
        PIIMiddleware("credit_card", strategy="redact", apply_to_input=True),
        PIIMiddleware("phone", detector=PHONE_PATTERN, strategy="redact", apply_to_input=True),
        ECORoutingMiddleware(guard, corrupted_model),
    ]
    return create_agent(model=normal_model, tools=[], middleware=middleware)


# ---------------------------------------------------------------- command line

def _decision_line(reply: AIMessage) -> str:
    d = reply.response_metadata["eco_guard"]
    model = reply.response_metadata.get("model_name", "?")
    return f"route={d['route']} topic={d['topic']} score={d['score']:.3f} model={model}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", nargs="*", help="prompts (default: two demo prompts with PII)")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    args = parser.parse_args(argv)

    guard = shared_guard(None)  # the embedded demo config; ECOChatModel() shares this guard
    chain = build_pii_guard(guard, max_new_tokens=args.max_new_tokens)
    agent = build_agent(guard, max_new_tokens=args.max_new_tokens)
    for prompt in args.prompts or DEMO_PROMPTS:
        print(f"prompt:        {prompt}")
        print(f"redacted:      {redact_text(prompt)}")
        reply = chain.invoke(prompt)
        print(f"LCEL chain:    {_decision_line(reply)}")
        print(f"               {reply.content.strip()}")
        state = agent.invoke({"messages": [HumanMessage(prompt)]})
        reply = state["messages"][-1]
        print(f"agent input:   {state['messages'][0].content}")
        print(f"agent:         {_decision_line(reply)}")
        print(f"               {reply.content.strip()}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
