"""The engine: check a request, classify it, decide its route, and say how to produce the reply.

:meth:`Guard.plan` is the one answering path: every face (the LangChain runnable and chat model, the
document filter, the CLI) asks it for an :class:`Answer` and produces the reply through that answer,
never through a backend. An answer knows its route before the first token is generated:

- ``corrupted``: the prompt is flagged; its embeddings get the topic's corruption;
- ``fallback``: not flagged; plain generation (or the face's own fallback model);
- ``blocked``: the classifier failed and the policy is ``block``; a fixed reply, nothing generated.

Example:
    >>> guard = Guard.from_config()                       # the embedded demo config  # doctest: +SKIP
    >>> answer = guard.plan("Who is Harry Potter?")       # doctest: +SKIP
    >>> answer.route, answer.decision.topic               # doctest: +SKIP
    ('corrupted', 'harry_potter')
    >>> answer.generate().text                            # doctest: +SKIP
    'The Unseen One is ...'
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from eco_guard.backends.base import (
    Backend,
    CorruptionPlan,
    Generation,
    GenerationParams,
    Message,
    PreparedPrompt,
    StreamEvent,
)
from eco_guard.config import GuardConfig, TopicConfig, load_config
from eco_guard.errors import EcoGuardError, InputError
from eco_guard.selection import find_spans, salient_spans, select_mask, token_mask, with_keywords

if TYPE_CHECKING:
    from eco_guard.classifier import Classification, PromptClassifier
    from eco_guard.config import SelectionConfig
    from eco_guard.corruption import CorruptionSpec

__all__ = ["BLOCKED_REPLY", "Answer", "Decision", "Guard", "GuardRequest", "GuardResult", "Route", "Verdict"]

Route = Literal["corrupted", "fallback", "blocked"]
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
class Verdict:
    """The guard's judgement of one text on its own (a retrieved passage), error policy applied."""

    flagged: bool
    topic: str | None
    score: float
    error: str | None = None


def _check_text(text: str, what: str) -> None:
    """Text that cannot be encoded would fail deep inside a tokenizer; say why here instead."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(f"{what} contains an unpaired surrogate (U+{ord(text[exc.start]):04X}) at character "
                         f"{exc.start}: send valid Unicode text") from None


@dataclass(frozen=True)
class GuardRequest:
    """One request: a chat, and for RAG the retrieved passages to judge one by one."""

    messages: tuple[Message, ...]
    passages: tuple[str, ...] = ()

    @classmethod
    def of(cls, prompt: str | Sequence[Message] | GuardRequest, passages: Sequence[str] = ()) -> GuardRequest:
        """A checked request: text (one user message) or a list of ``{role, content}`` messages.

        Raises:
            InputError: a wrong type, no user text, or text that is not valid Unicode (one-line reason).
        """
        if isinstance(prompt, GuardRequest):
            return prompt.check()
        if isinstance(prompt, str):
            messages: tuple[Message, ...] = ({"role": "user", "content": prompt},)
        elif isinstance(prompt, Sequence) and all(isinstance(m, dict) for m in prompt):
            messages = tuple(dict(m) for m in prompt)
        else:
            raise InputError(f"a prompt must be text or a list of {{role, content}} messages, "
                             f"got {type(prompt).__name__}")
        for p in passages:
            if not isinstance(p, str):
                raise InputError(f"retrieved passages must be text, got {type(p).__name__}")
        return cls(messages, tuple(passages)).check()

    def check(self) -> GuardRequest:
        """This request, if it can be served: it has user text, and all its text is valid Unicode."""
        self.question  # noqa: B018 - raises InputError for a request with no user text
        for m in self.messages:
            if isinstance(m.get("content"), str):
                _check_text(m["content"], f"the {m.get('role', 'unnamed')} message")
        for p in self.passages:
            _check_text(p, "a retrieved passage")
        return self

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
    """The reply and the decision behind it."""

    text: str
    decision: Decision
    generation: Generation | None = None

    @property
    def usage(self) -> dict[str, int]:
        g = self.generation
        inp, out = (g.prompt_tokens, len(g.token_ids)) if g else (0, 0)
        return {"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out}

    @property
    def finish_reason(self) -> str:
        return self.generation.finish_reason if self.generation else "stop"


@dataclass(frozen=True)
class Answer:
    """A decided request and what it takes to produce its reply.

    ``prompt`` and ``corruption`` are None when the route is ``blocked``; ``corruption`` is None on
    the ``fallback`` route. ``messages`` is the chat the model sees (RAG passages rendered into the
    last user message), for a face that answers unflagged prompts with a model of its own.

    Example:
        >>> answer = guard.plan("What is the capital of France?")   # doctest: +SKIP
        >>> answer.route                                             # doctest: +SKIP
        'fallback'
        >>> "".join(e.text for e in answer.stream())                # doctest: +SKIP
        'The capital of France is Paris.'
    """

    decision: Decision
    messages: tuple[Message, ...]
    prompt: PreparedPrompt | None
    corruption: CorruptionPlan | None
    params: GenerationParams
    backend: Backend = field(repr=False, compare=False)

    @property
    def route(self) -> Route:
        return self.decision.route

    def generate(self) -> GuardResult:
        """The whole reply."""
        if self.prompt is None:
            return GuardResult(BLOCKED_REPLY, self.decision)
        gen = self.backend.generate([self.prompt], [self.corruption], self.params)[0]
        return GuardResult(gen.text, self.decision, gen)

    async def agenerate(self) -> GuardResult:
        """Async twin of :meth:`generate`."""
        if self.prompt is None:
            return GuardResult(BLOCKED_REPLY, self.decision)
        gen = (await self.backend.agenerate([self.prompt], [self.corruption], self.params))[0]
        return GuardResult(gen.text, self.decision, gen)

    def stream(self) -> Iterator[StreamEvent]:
        """The reply as it is decoded; the last event carries ``finish_reason``."""
        if self.prompt is None:
            yield StreamEvent(BLOCKED_REPLY, [], "stop")
            return
        yield from self.backend.stream(self.prompt, self.corruption, self.params)

    async def astream(self) -> AsyncIterator[StreamEvent]:
        """Async twin of :meth:`stream`."""
        if self.prompt is None:
            yield StreamEvent(BLOCKED_REPLY, [], "stop")
            return
        async for event in self.backend.astream(self.prompt, self.corruption, self.params):
            yield event

    def corrupted_pieces(self) -> list[str]:
        """The text of each corrupted prompt token, in order (what the corruption hides)."""
        if self.prompt is None or self.corruption is None:
            return []
        return [self.backend.decode([t]) for t, m in zip(self.prompt.input_ids, self.corruption.mask) if m]


def _resolve_corruptions(config: GuardConfig, backend: Backend,
                         use_store: bool) -> dict[str, tuple[CorruptionSpec, SelectionConfig]]:
    """Each topic's corruption; ``learned`` ones from the store, which must match this model. A keyword
    selection that lists no keywords gets the topic's terms (:func:`~eco_guard.selection.topic_keywords`)."""
    from eco_guard.config import CorruptionSpec
    from eco_guard.store import CorruptionStore, StoreError, default_store_path

    learned = [t.name for t in config.topics if t.corruption == "learned"]
    resolved = {t.name: (t.corruption, t.selection) for t in config.topics if t.corruption != "learned"}
    if learned and not use_store:
        resolved.update({name: (CorruptionSpec(), config.topic(name).selection) for name in learned})
    elif learned:
        command = f"eco-guard optimize {config.source or 'CONFIG'}"
        path = config.store or default_store_path(config.source)
        if path is None:
            raise StoreError(f"topics {', '.join(learned)} use 'corruption: learned' but the config names no 'store'")
        store = CorruptionStore.load(path, command=command)
        fingerprint = backend.fingerprint()
        for name in learned:
            entry = store.entry(name, fingerprint, file=str(path), command=command)
            resolved[name] = (entry.corruption, entry.selection)
    return {t.name: (resolved[t.name][0], with_keywords(resolved[t.name][1], t)) for t in config.topics}


def _load_backend(cfg: GuardConfig, model: str | os.PathLike[str]) -> Backend:
    """The backend ``cfg.model.backend`` names, over ``model`` (for ``remote``: the served model's local copy)."""
    m = cfg.model
    if m.backend == "remote":
        from eco_guard.backends.remote import RemoteBackend

        return RemoteBackend.from_pretrained(
            m.url, model, model=m.served_model, api_key_env=m.api_key_env, embedding_key=m.embedding_key,
            system_prompt=m.system_prompt, max_input_tokens=m.max_input_tokens, timeout_s=m.timeout_s,
            retries=m.retries, backoff_s=m.backoff_s,
        )
    from eco_guard.backends.local import LocalBackend

    return LocalBackend.from_pretrained(
        model, dtype=m.dtype, system_prompt=m.system_prompt, max_input_tokens=m.max_input_tokens, threads=m.threads,
        batch_invariant=m.batch_invariant
    )


class Guard:
    """Check → classify → route → (corrupted or plain) generation. Holds no per-request state,
    so one guard serves many threads."""

    def __init__(self, config: GuardConfig, backend: Backend, classifier: PromptClassifier | None, *,
                 use_store: bool = True):
        """``use_store=False`` gives ``corruption: learned`` topics the default corruption instead of the
        store's (only for learning them: ``eco-guard optimize``)."""
        self.config = config
        self.backend = backend
        self.classifier = classifier
        self._corruptions = _resolve_corruptions(config, backend, use_store)
        for name, (spec, _) in self._corruptions.items():  # a dims too wide fails now, not on a user's request
            if spec.dims > backend.hidden_size:
                raise EcoGuardError(
                    f"topic {name!r}: corruption dims={spec.dims} exceeds the model's embedding width "
                    f"{backend.hidden_size}"
                )

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | GuardConfig | None = None,
        *,
        backend: Backend | None = None,
        classifier: PromptClassifier | None = None,
        train_if_missing: bool = True,
        progress: bool = True,
        use_store: bool = True,
    ) -> Guard:
        """Build the guard a YAML file describes (``None``: the embedded demo config).

        The classifier is loaded from ``classifier.path``, or trained there first when missing.
        """
        from eco_guard.classifier import PromptClassifier

        cfg = config if isinstance(config, GuardConfig) else load_config(config)
        backend = backend or _load_backend(cfg, cfg.model.path)
        if classifier is None:
            classifier = PromptClassifier.from_config(cfg, train_if_missing=train_if_missing, progress=progress)
        from eco_guard.threads import release_idle_threads

        release_idle_threads()  # loading and training left this thread idle OpenMP workers (eco_guard.threads)
        return cls(cfg, backend, classifier, use_store=use_store)

    def with_model(self, model: str | os.PathLike[str]) -> Guard:
        """The same config and classifier answering with another local model (``default``, a ``.gguf``
        file or an HF folder); the classifier is shared and loaded weights are reused across calls."""
        # a learned store must fit the other model too (its fingerprint is checked)
        return type(self)(self.config, _load_backend(self.config, model), self.classifier)

    def with_corruption(self, topic: str, spec: CorruptionSpec, selection: SelectionConfig | None = None) -> Guard:
        """The same guard with one topic's corruption (and token selection) replaced: what the optimiser tries."""
        if topic not in self._corruptions:
            raise EcoGuardError(f"no topic named {topic!r}; the config has {', '.join(self._corruptions)}")
        selection = with_keywords(selection, self.config.topic(topic)) if selection else self._corruptions[topic][1]
        topics = [t.model_copy(update={"corruption": spec, "selection": selection}) if t.name == topic else t
                  for t in self.config.topics]
        guard = type(self)(self.config.model_copy(update={"topics": topics}), self.backend, self.classifier,
                           use_store=False)
        guard._corruptions = {**self._corruptions, topic: (spec, selection)}  # the others as resolved here
        return guard

    @property
    def model_name(self) -> str:
        return self.backend.name

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

    def plan(self, request: str | Sequence[Message] | GuardRequest, **params: Any) -> Answer:
        """Decide one request: check it, classify it, and say how its reply is to be produced.

        Bad input fails first and cheaply (type, invalid Unicode, empty, too long), before any
        model runs.

        Raises:
            InputError: the request cannot be served (one-line reason).
        """
        settings = self.params(**params)
        request = GuardRequest.of(request)
        prompt = self.backend.prepare(self.render(request))  # the length check, before the classifier
        verdicts = self._classify([request.question, *request.passages])
        if isinstance(verdicts, str):
            return self._on_error(request, prompt, settings, verdicts)
        head, passage_verdicts = verdicts[0], verdicts[1:]
        flagged_passages = [p for p, v in zip(request.passages, passage_verdicts) if v.flagged]
        if self.config.rag == "drop" and flagged_passages:
            kept = tuple(p for p, v in zip(request.passages, passage_verdicts) if not v.flagged)
            request = replace(request, passages=kept)
            prompt = self.backend.prepare(self.render(request))
            corrupt_passages: list[str] = []
        else:
            corrupt_passages = flagged_passages
        common = {
            "scores": dict(head.scores),
            "terms": dict(head.terms),
            "weak_terms": dict(head.weak_terms),
            "contrast": head.contrast,
            "passages_flagged": len(flagged_passages),
            "passages_dropped": len(flagged_passages) if self.config.rag == "drop" else 0,
        }
        messages = tuple(self.render(request))
        if not head.flagged and not corrupt_passages:
            decision = Decision(False, None, head.score, "fallback", **common)
            return self._answer(decision, messages, prompt, None, settings)
        lead = head if head.flagged else max((v for v in passage_verdicts if v.flagged), key=lambda v: v.score)
        topic = self.config.topic(lead.topic) if lead.topic else self.config.topics[0]
        user = list(prompt.user_spans) if head.flagged else []
        if head.flagged and self._corruptions[topic.name][1].mode == "salient":
            user = self._salient(request.question, topic.name, head, prompt) or user  # none found: all content
        plan = self._corruption(prompt, topic, user, whole=find_spans(prompt.text, corrupt_passages))
        decision = Decision(True, topic.name, lead.score, "corrupted", plan.n_tokens, **common)
        return self._answer(decision, messages, prompt, plan, settings)

    def unguarded(self, request: str | Sequence[Message] | GuardRequest, **params: Any) -> Answer:
        """The request as the same model answers it with no classifier and no corruption: the baseline
        that demos and evaluations compare the guard against (never a serving path)."""
        settings = self.params(**params)
        request = GuardRequest.of(request)
        messages = tuple(self.render(request))
        prompt = self.backend.prepare(messages)
        return self._answer(Decision(False, None, 0.0, "fallback"), messages, prompt, None, settings)

    async def aplan(self, request: str | Sequence[Message] | GuardRequest, **params: Any) -> Answer:
        """Async twin of :meth:`plan` (classification runs in a worker thread)."""
        return await asyncio.to_thread(self.plan, request, **params)

    def screen(self, texts: Sequence[str]) -> list[Verdict]:
        """Judge texts one by one (retrieved passages), following ``on_classifier_error`` on failure."""
        for text in texts:
            if not isinstance(text, str):
                raise InputError(f"texts to screen must be strings, got {type(text).__name__}")
            _check_text(text, "a text to screen")
        verdicts = self._classify(list(texts))
        if isinstance(verdicts, str):
            flagged = self.config.on_classifier_error != "pass"
            return [Verdict(flagged, None, 1.0 if flagged else 0.0, verdicts) for _ in texts]
        return [Verdict(v.flagged, v.topic, v.score) for v in verdicts]

    def render(self, request: GuardRequest) -> list[Message]:
        """The chat the model sees: for RAG, the passages go into the last user message."""
        messages = [dict(m) for m in request.messages]
        if request.passages:
            context = "\n\n".join(request.passages)
            messages[-1] = {**messages[-1], "content": _RAG_TEMPLATE.format(context=context, question=request.question)}
        return messages

    def _classify(self, texts: Sequence[str]) -> list[Classification] | str:
        """Scores, or the reason they could not be had (routing then follows ``on_classifier_error``)."""
        if not texts:
            return []
        if self.classifier is None:
            return "no classifier is loaded"
        try:
            with self._classifier_threads():
                return self.classifier.classify(list(texts))
        except EcoGuardError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - any scoring failure must route by policy, not crash
            return f"{type(exc).__name__}: {exc}"

    def _classifier_threads(self) -> AbstractContextManager[None]:
        """The classifier runs on the calling thread with ``classifier.threads`` (eco_guard.threads: why one)."""
        from eco_guard.threads import torch_threads

        return torch_threads(self.config.classifier.threads)

    def _on_error(self, request: GuardRequest, prompt: PreparedPrompt, settings: GenerationParams,
                  reason: str) -> Answer:
        policy = self.config.on_classifier_error
        messages = tuple(self.render(request))
        if policy == "block":
            return self._answer(Decision(True, None, 1.0, "blocked", error=reason), (), None, None, settings)
        if policy == "pass":
            return self._answer(Decision(False, None, 0.0, "fallback", error=reason), messages, prompt, None, settings)
        # Fail closed: corrupt with the first topic's corruption; better a wrong answer than a leak.
        topic = self.config.topics[0]
        plan = self._corruption(prompt, topic, list(prompt.user_spans))
        decision = Decision(True, topic.name, 1.0, "corrupted", plan.n_tokens, error=reason)
        return self._answer(decision, messages, prompt, plan, settings)

    def corruption_of(self, topic: str) -> tuple[CorruptionSpec, SelectionConfig]:
        """The corruption and token selection a topic's flagged prompts get (a learned one resolved)."""
        return self._corruptions[topic]

    def _salient(self, question: str, topic: str, verdict: Classification,
                 prompt: PreparedPrompt) -> list[tuple[int, int]]:
        """The question's salient words (:func:`~eco_guard.selection.salient_spans`) where the prompt has them."""
        if self.classifier is None or not prompt.user_spans:
            return []
        terms = [verdict.terms[topic]] if topic in verdict.terms else []
        try:
            with self._classifier_threads():
                spans = salient_spans(question, topic, self.classifier.score, terms)
        except Exception:  # noqa: BLE001 - attribution is best effort: the whole content is corrupted instead
            return []
        # prepare() located the stripped content; the question's words shift by where it starts
        shift = prompt.user_spans[0][0] - (len(question) - len(question.lstrip()))
        return [(s + shift, e + shift) for s, e in spans]

    def _corruption(self, prompt: PreparedPrompt, topic: TopicConfig, spans: list[tuple[int, int]],
                    whole: Sequence[tuple[int, int]] = ()) -> CorruptionPlan:
        """The topic's corruption over the tokens its selection picks in ``spans``, and over all of ``whole``:
        a flagged passage states its knowledge in every word, not only in the names a keyword selection picks."""
        spec, selection = self._corruptions[topic.name]
        mask = select_mask(prompt.text, prompt.offsets, spans, selection)
        if whole:
            mask = [a or b for a, b in zip(mask, token_mask(prompt.offsets, whole))]
        if not any(mask):
            # A flagged prompt must never go out uncorrupted: no keyword in it (an indirect
            # reference) -> corrupt the whole span; span not found -> every non-special token.
            mask = token_mask(prompt.offsets, spans or [(0, len(prompt.text))])
            special = self.backend.special_token_ids
            mask = [m and t not in special for m, t in zip(mask, prompt.input_ids)]
        return CorruptionPlan(spec, tuple(mask), prompt.text)

    def _answer(self, decision: Decision, messages: tuple[Message, ...], prompt: PreparedPrompt | None,
                plan: CorruptionPlan | None, settings: GenerationParams) -> Answer:
        return Answer(decision, messages, prompt, plan, settings, self.backend)

    # ------------------------------------------------------------ answering (plan, then generate)

    def generate_all(self, answers: Sequence[Answer]) -> list[GuardResult]:
        """Produce many planned answers in one decoding batch per generation setting (evaluation: a batch
        is several times faster than one answer at a time; serving keeps requests apart)."""
        results: list[GuardResult | None] = [None] * len(answers)
        groups: dict[GenerationParams, list[int]] = {}
        for i, answer in enumerate(answers):
            if answer.prompt is None:
                results[i] = answer.generate()
            else:
                groups.setdefault(answer.params, []).append(i)
        for params, rows in groups.items():
            prompts, plans = [answers[i].prompt for i in rows], [answers[i].corruption for i in rows]
            gens = self.backend.generate(prompts, plans, params)
            for i, gen in zip(rows, gens):
                results[i] = GuardResult(gen.text, answers[i].decision, gen)
        return results  # type: ignore[return-value]

    def score_replies(self, answers: Sequence[Answer], replies: Sequence[str]) -> list[tuple[float, int]]:
        """Per answer, the mean log-probability of a given reply under its (corrupted) prompt, and its length."""
        return [self.backend.score(a.prompt, a.corruption, r) if a.prompt is not None else (0.0, 0)
                for a, r in zip(answers, replies)]

    def invoke(self, prompt: str | Sequence[Message] | GuardRequest, **params: Any) -> GuardResult:
        """Answer one prompt (text or chat messages).

        Example:
            >>> guard.invoke("What is the capital of France?").decision.route  # doctest: +SKIP
            'fallback'
        """
        return self.plan(prompt, **params).generate()

    async def ainvoke(self, prompt: str | Sequence[Message] | GuardRequest, **params: Any) -> GuardResult:
        """Async twin of :meth:`invoke`."""
        return await (await self.aplan(prompt, **params)).agenerate()

    def batch(self, prompts: Sequence[str | Sequence[Message] | GuardRequest], *, max_workers: int | None = None,
              **params: Any) -> list[GuardResult]:
        """Answer many prompts. Each is generated on its own (in threads), so results equal sequential calls."""
        if not prompts:
            return []
        workers = max_workers or min(4, len(prompts))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda p: self.invoke(p, **params), prompts))
