"""The engine: classify a prompt, route it, generate (corrupted or plain), report the decision.

Example:
    >>> guard = Guard.from_config()                       # the embedded demo config  # doctest: +SKIP
    >>> result = guard.invoke("Who is Harry Potter?")     # doctest: +SKIP
    >>> result.decision.route, result.decision.topic      # doctest: +SKIP
    ('corrupted', 'harry_potter')
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from eco_guard.backends.local import (
    CorruptionPlan,
    Generation,
    GenerationParams,
    LocalBackend,
    PreparedPrompt,
    StreamEvent,
)
from eco_guard.classifier import Classification, PromptClassifier
from eco_guard.config import GuardConfig, TopicConfig, load_config
from eco_guard.errors import ClassifierError, EcoGuardError, InputError
from eco_guard.selection import find_spans, select_mask, token_mask

__all__ = ["BLOCKED_REPLY", "Decision", "Guard", "GuardRequest", "GuardResult", "Route"]

Route = Literal["corrupted", "fallback", "blocked"]
Message = dict[str, str]
BLOCKED_REPLY = "I can't answer that right now."
_RAG_TEMPLATE = "Use the context to answer the question.\n\nContext:\n{context}\n\nQuestion: {question}"


@dataclass(frozen=True)
class Decision:
    """What the guard decided for one request (also stored in ``response_metadata["eco_guard"]``)."""

    flagged: bool
    topic: str | None
    score: float
    route: Route
    corrupted_tokens: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    passages_flagged: int = 0
    passages_dropped: int = 0
    error: str | None = None  # why the classifier could not score (fail-closed/open decisions)
    terms: dict[str, str] = field(default_factory=dict)  # topic terms found in the question
    weak_terms: dict[str, str] = field(default_factory=dict)  # ambiguous names that lowered a topic's bar
    contrast: str | None = None  # a neighbouring work's name that raised it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GuardRequest:
    """One request: a chat, and for RAG the retrieved passages to judge one by one."""

    messages: tuple[Message, ...]
    passages: tuple[str, ...] = ()

    @classmethod
    def of(cls, prompt: str | Sequence[Message] | GuardRequest, passages: Sequence[str] = ()) -> GuardRequest:
        if isinstance(prompt, GuardRequest):
            return prompt
        if isinstance(prompt, str):
            messages: tuple[Message, ...] = ({"role": "user", "content": prompt},)
        elif isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
            messages = tuple(dict(m) for m in prompt)
        else:
            raise InputError(f"a prompt must be text or a list of {{role, content}} messages, got {type(prompt).__name__}")
        for p in passages:
            if not isinstance(p, str):
                raise InputError(f"retrieved passages must be text, got {type(p).__name__}")
        return cls(messages, tuple(passages))

    @property
    def question(self) -> str:
        users = [m for m in self.messages if m.get("role") == "user"]
        content = users[-1].get("content") if users else None
        if not isinstance(content, str):
            raise InputError("the prompt has no user message with text content")
        if not content.strip():
            raise InputError("the prompt is empty: there is no user text to answer")
        return content


@dataclass
class GuardResult:
    """The answer and the decision behind it."""

    text: str
    decision: Decision
    generation: Generation | None = None

    @property
    def usage(self) -> dict[str, int]:
        g = self.generation
        inp, out = (g.prompt_tokens, len(g.token_ids)) if g else (0, 0)
        return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out}


@dataclass(frozen=True)
class _Routed:
    decision: Decision
    prompt: PreparedPrompt | None
    plan: CorruptionPlan | None


def _load_backend(cfg: GuardConfig, model: str | os.PathLike[str]) -> LocalBackend:
    m = cfg.model
    return LocalBackend.from_pretrained(
        model, dtype=m.dtype, system_prompt=m.system_prompt, max_input_tokens=m.max_input_tokens
    )


class Guard:
    """Classify → route → generate. Holds no per-request state, so one guard serves many threads."""

    def __init__(self, config: GuardConfig, backend: LocalBackend, classifier: PromptClassifier | None):
        self.config = config
        self.backend = backend
        self.classifier = classifier
        for topic in config.topics:  # a dims too wide for this model fails now, not on a user's request
            if topic.corruption.dims > backend.hidden_size:
                raise EcoGuardError(
                    f"topic {topic.name!r}: corruption dims={topic.corruption.dims} exceeds the model's "
                    f"embedding width {backend.hidden_size}"
                )

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | GuardConfig | None = None,
        *,
        backend: LocalBackend | None = None,
        classifier: PromptClassifier | None = None,
        train_if_missing: bool = True,
        progress: bool = True,
    ) -> Guard:
        """Build the guard a YAML file describes (``None``: the embedded demo config).

        The classifier is loaded from ``classifier.path``, or trained there first when missing.
        """
        cfg = config if isinstance(config, GuardConfig) else load_config(config)
        backend = backend or _load_backend(cfg, cfg.model.path)
        if classifier is None:
            classifier = PromptClassifier.from_config(cfg, train_if_missing=train_if_missing, progress=progress)
        return cls(cfg, backend, classifier)

    def with_model(self, model: str | os.PathLike[str]) -> Guard:
        """The same config and classifier answering with another local model (``default``, a ``.gguf``
        file or an HF folder); the classifier is shared and loaded weights are reused across calls."""
        return type(self)(self.config, _load_backend(self.config, model), self.classifier)

    # ------------------------------------------------------------ deciding

    def params(self, **overrides: Any) -> GenerationParams:
        """The config's generation defaults with per-request overrides (``None`` values ignored)."""
        gen = self.config.generation
        values: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "do_sample": gen.do_sample,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "stop": tuple(gen.stop),
            "seed": gen.seed,
        }
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in values and key != "ignore_eos":
                raise InputError(f"unknown generation setting {key!r}; use one of {', '.join(values)}")
            values[key] = tuple(value) if key == "stop" else value
        if not isinstance(values["max_new_tokens"], int) or values["max_new_tokens"] < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {values['max_new_tokens']!r}")
        return GenerationParams(**values)

    def classify(self, texts: Sequence[str]) -> list[Classification] | str:
        """Score texts; on failure return the reason (routing then follows ``on_classifier_error``)."""
        if self.classifier is None:
            return "no classifier is loaded"
        try:
            return self.classifier.classify(list(texts))
        except EcoGuardError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - any scoring failure must route by policy, not crash
            return f"{type(exc).__name__}: {exc}"

    def route(self, request: GuardRequest) -> _Routed:
        """Decide one request and, when it is to be corrupted, which tokens and how."""
        question = request.question
        verdicts = self.classify([question, *request.passages])
        if isinstance(verdicts, str):
            return self._on_error(request, verdicts)
        head, passage_verdicts = verdicts[0], verdicts[1:]
        flagged_passages = [p for p, v in zip(request.passages, passage_verdicts) if v.flagged]
        if self.config.rag == "drop" and flagged_passages:
            kept = tuple(p for p, v in zip(request.passages, passage_verdicts) if not v.flagged)
            request = replace(request, passages=kept)
            corrupt_passages: list[str] = []
        else:
            corrupt_passages = flagged_passages
        prompt = self.backend.prepare(self.render(request))
        flagged_topics = [v for v in (head, *passage_verdicts) if v.flagged]
        common = {
            "scores": dict(head.scores),
            "terms": dict(head.terms),
            "weak_terms": dict(head.weak_terms),
            "contrast": head.contrast,
            "passages_flagged": len(flagged_passages),
            "passages_dropped": len(flagged_passages) if self.config.rag == "drop" else 0,
        }
        if not head.flagged and not corrupt_passages:
            return _Routed(Decision(False, None, head.score, "fallback", **common), prompt, None)
        lead = head if head.flagged else max(flagged_topics, key=lambda v: v.score)
        topic = self.config.topic(lead.topic) if lead.topic else self.config.topics[0]
        spans = (list(prompt.user_spans) if head.flagged else []) + find_spans(prompt.text, corrupt_passages)
        plan = self._plan(prompt, topic, spans)
        decision = Decision(True, topic.name, lead.score, "corrupted", plan.n_tokens, **common)
        return _Routed(decision, prompt, plan)

    def _on_error(self, request: GuardRequest, reason: str) -> _Routed:
        policy = self.config.on_classifier_error
        if policy == "block":
            return _Routed(Decision(True, None, 1.0, "blocked", error=reason), None, None)
        prompt = self.backend.prepare(self.render(request))
        if policy == "pass":
            return _Routed(Decision(False, None, 0.0, "fallback", error=reason), prompt, None)
        # Fail closed: corrupt with the first topic's corruption; better a wrong answer than a leak.
        topic = self.config.topics[0]
        plan = self._plan(prompt, topic, list(prompt.user_spans))
        return _Routed(Decision(True, topic.name, 1.0, "corrupted", plan.n_tokens, error=reason), prompt, plan)

    def _plan(self, prompt: PreparedPrompt, topic: TopicConfig, spans: list[tuple[int, int]]) -> CorruptionPlan:
        mask = select_mask(prompt.text, prompt.offsets, spans, topic.selection)
        if not any(mask):
            # A flagged prompt must never go out uncorrupted: no keyword in it (an indirect
            # reference) -> corrupt the whole span; span not found -> every non-special token.
            mask = token_mask(prompt.offsets, spans or [(0, len(prompt.text))])
            special = set(self.backend.tokenizer.all_special_ids)
            mask = [m and t not in special for m, t in zip(mask, prompt.input_ids)]
        return CorruptionPlan(topic.corruption, tuple(mask), prompt.text)

    def render(self, request: GuardRequest) -> list[Message]:
        """The chat the model sees: for RAG, the passages go into the last user message."""
        messages = [dict(m) for m in request.messages]
        if request.passages:
            context = "\n\n".join(request.passages)
            messages[-1] = {**messages[-1], "content": _RAG_TEMPLATE.format(context=context, question=request.question)}
        return messages

    # ------------------------------------------------------------ answering

    def invoke(self, prompt: str | Sequence[Message] | GuardRequest, **params: Any) -> GuardResult:
        """Answer one prompt (text or chat messages).

        Example:
            >>> guard.invoke("What is the capital of France?").decision.route  # doctest: +SKIP
            'fallback'
        """
        routed = self.route(GuardRequest.of(prompt))
        if routed.prompt is None:
            return GuardResult(BLOCKED_REPLY, routed.decision)
        gen = self.backend.generate([routed.prompt], [routed.plan], self.params(**params))[0]
        return GuardResult(gen.text, routed.decision, gen)

    async def ainvoke(self, prompt: str | Sequence[Message] | GuardRequest, **params: Any) -> GuardResult:
        """Async twin of :meth:`invoke`."""
        import asyncio

        return await asyncio.to_thread(self.invoke, prompt, **params)

    def batch(self, prompts: Sequence[str | Sequence[Message] | GuardRequest], *, max_workers: int | None = None,
              **params: Any) -> list[GuardResult]:
        """Answer many prompts. Each is generated on its own (in threads), so results equal sequential calls."""
        if not prompts:
            return []
        workers = max_workers or min(4, len(prompts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda p: self.invoke(p, **params), prompts))

    def stream(self, prompt: str | Sequence[Message] | GuardRequest, **params: Any) -> Iterator[tuple[Decision, StreamEvent]]:
        """Yield ``(decision, event)`` pairs as text is decoded; the decision is known before the first token."""
        routed = self.route(GuardRequest.of(prompt))
        if routed.prompt is None:
            yield routed.decision, StreamEvent(BLOCKED_REPLY, [], "stop")
            return
        for event in self.backend.stream(routed.prompt, routed.plan, self.params(**params)):
            yield routed.decision, event

    async def astream(self, prompt: str | Sequence[Message] | GuardRequest, **params: Any) -> AsyncIterator[tuple[Decision, StreamEvent]]:
        """Async twin of :meth:`stream`."""
        import asyncio

        routed = await asyncio.to_thread(self.route, GuardRequest.of(prompt))
        if routed.prompt is None:
            yield routed.decision, StreamEvent(BLOCKED_REPLY, [], "stop")
            return
        async for event in self.backend.astream(routed.prompt, routed.plan, self.params(**params)):
            yield routed.decision, event
