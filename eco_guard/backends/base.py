"""What the engine needs from a model backend, and the values that pass between them.

A backend renders a chat into a :class:`PreparedPrompt`, embeds it, and generates from those
embeddings, corrupting the rows a :class:`CorruptionPlan` names. The engine (:mod:`eco_guard.guard`)
only talks to this interface, so a local transformers model (:mod:`eco_guard.backends.local`) and a
remote server that accepts prompt embeddings are interchangeable.

Async follows langchain-core's rule: the twins are derived from the sync methods in a worker thread;
a backend whose I/O is natively async (an HTTP client) overrides them to skip the thread hop.

Example:
    >>> params = GenerationParams(max_new_tokens=8)
    >>> params.max_new_tokens, params.do_sample
    (8, False)
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from eco_guard.corruption import CorruptionSpec

__all__ = [
    "Backend",
    "CorruptionPlan",
    "Generation",
    "GenerationParams",
    "Message",
    "PreparedPrompt",
    "StreamEvent",
]

Message = dict[str, str]


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings for one request."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # keep decoding past end-of-sequence (benchmarks: always max_new_tokens)


@dataclass(frozen=True)
class PreparedPrompt:
    """A chat rendered through the template, tokenised with character offsets."""

    text: str
    input_ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    user_spans: tuple[tuple[int, int], ...] = ()  # character spans of the last user message's content

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class CorruptionPlan:
    """Which prompt tokens to corrupt, how, and the key (the prompt) its noise seed derives from."""

    spec: CorruptionSpec
    mask: tuple[bool, ...]
    key: str

    @property
    def n_tokens(self) -> int:
        return sum(self.mask)


@dataclass
class Generation:
    """One finished completion."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length"
    corrupted_tokens: int = 0


@dataclass
class StreamEvent:
    """A piece of streamed text; the last event carries ``finish_reason``."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class Backend(ABC):
    """A chat model that generates from (optionally corrupted) prompt embeddings.

    Implementations hold no per-request state: one backend serves many threads.
    """

    name: str
    max_input_tokens: int

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the token embeddings (what a corruption's ``dims`` must fit in)."""

    @property
    @abstractmethod
    def special_token_ids(self) -> frozenset[int]:
        """Token ids of the template's special tokens (never corrupted)."""

    @abstractmethod
    def prepare(self, messages: Sequence[Message]) -> PreparedPrompt:
        """Render a chat through the template and tokenise it; too long or empty is an ``InputError``."""

    @abstractmethod
    def embed(self, prompts: Sequence[PreparedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt embeddings ``(batch, seq, dim)`` and the attention mask."""

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids (special tokens skipped)."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[PreparedPrompt],
        plans: Sequence[CorruptionPlan | None] | None = None,
        params: GenerationParams | None = None,
    ) -> list[Generation]:
        """Generate for a batch of prompts, corrupting each row its plan names."""

    @abstractmethod
    def stream(
        self, prompt: PreparedPrompt, plan: CorruptionPlan | None = None, params: GenerationParams | None = None
    ) -> Iterator[StreamEvent]:
        """Yield text pieces as they are decoded; the last event has ``finish_reason``."""

    def stream_from_embeds(self, embeds: torch.Tensor, params: GenerationParams | None = None) -> Iterator[StreamEvent]:
        """Decode from caller-supplied prompt embeddings ``(seq, hidden)`` (vLLM's ``prompt_embeds``): no
        template, no corruption. A backend that cannot raises ``NotImplementedError`` (this default)."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate from prompt embeddings")

    def fingerprint(self) -> str:
        """``sha256:<hex>`` of the token embedding matrix: what a learned corruption was learned against."""
        raise NotImplementedError(f"{type(self).__name__} has no embedding fingerprint")

    def score(self, prompt: PreparedPrompt, plan: CorruptionPlan | None, continuation: str) -> tuple[float, int]:
        """Mean per-token log-probability of ``continuation`` as the reply to ``prompt`` (corrupted by
        ``plan``; the reply's own tokens never are), and its token count. For learning corruptions offline."""
        raise NotImplementedError(f"{type(self).__name__} cannot score replies")

    async def agenerate(
        self,
        prompts: Sequence[PreparedPrompt],
        plans: Sequence[CorruptionPlan | None] | None = None,
        params: GenerationParams | None = None,
    ) -> list[Generation]:
        """Async twin of :meth:`generate` (in a worker thread unless overridden)."""
        return await asyncio.to_thread(self.generate, prompts, plans, params)

    async def astream(
        self, prompt: PreparedPrompt, plan: CorruptionPlan | None = None, params: GenerationParams | None = None
    ) -> AsyncIterator[StreamEvent]:
        """Async twin of :meth:`stream`: each step runs in a worker thread, so the event loop stays free."""
        it = self.stream(prompt, plan, params)
        sentinel = object()
        while True:
            event = await asyncio.to_thread(next, it, sentinel)
            if event is sentinel:
                return
            yield event  # type: ignore[misc]
