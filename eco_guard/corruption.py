"""Embedding corruptions: what happens to a flagged prompt's token embeddings.

A *corruptor* has one signature, ``corruptor(embeds, mask, *, generator) -> new tensor``, over floating
``(batch, seq, dim)`` embeddings and a boolean ``(batch, seq)`` mask of the tokens to corrupt. It never
modifies its input nor touches unmasked positions. Random draws are made per batch row, for that row's
masked tokens only, on the generator's device: with one generator per row, a row's corruption depends
neither on the other rows nor on padding, and a CPU generator gives the same noise on any device.

The fourteen corruptions of the ECO paper's code are registered under their names (:data:`CORRUPTORS`).
:class:`CorruptionSpec` is the serialisable form (a pydantic model that configs and the store embed; defined
with the rest of the schema in :mod:`eco_guard.config` and re-exported here);
:func:`derive_seed` turns a topic's seed and a prompt into the seed of that request's noise.

Example:
    >>> import torch
    >>> spec = CorruptionSpec(method="rand_noise_first_n", dims=1, strength=3.0, seed=7)
    >>> embeds = torch.zeros(1, 4, 8)
    >>> mask = torch.tensor([[False, True, True, False]])
    >>> out = spec.apply(embeds, mask, keys=["Who is Harry Potter?"])
    >>> (out != 0).nonzero().tolist()  # only dimension 0 of tokens 1 and 2 changed
    [[0, 1, 0], [0, 2, 0]]
    >>> torch.equal(out, spec.apply(embeds, mask, keys=["Who is Harry Potter?"]))  # same prompt, same noise
    True
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar, Final, TypeAlias

import torch

# The spec is config schema (loading a config needs no torch); it lives there and is re-exported here.
from eco_guard.config import DEFAULT_DIMS, DEFAULT_METHOD, DEFAULT_SEED, DEFAULT_STRENGTH, MAX_SEED, CorruptionSpec  # noqa: F401
from eco_guard.errors import ConfigError, InputError

Generators: TypeAlias = torch.Generator | Sequence[torch.Generator] | None
SeedKey: TypeAlias = str | bytes | Sequence[int] | torch.Tensor
"""What identifies a request's prompt: its text, raw bytes, or its token ids."""


def derive_seed(seed: int, key: SeedKey) -> int:
    """Derive a request's noise seed from a topic's seed and the prompt, stably across runs and machines.

    Args:
        seed: the topic's seed, ``0 <= seed <= MAX_SEED``.
        key: the prompt: text (``str``), raw ``bytes``, or token ids (a sequence of ints or a 1-D tensor).
            Text and token ids of the same prompt give different seeds; use one kind consistently.

    Returns:
        An integer in ``[0, MAX_SEED]``, fit for ``torch.Generator.manual_seed``.

    Raises:
        ConfigError: ``seed`` is out of range.
        InputError: ``key`` has an unsupported type.

    Example:
        >>> derive_seed(0, "Who is Harry Potter?") == derive_seed(0, "Who is Harry Potter?")
        True
        >>> derive_seed(0, [1, 2, 3]) == derive_seed(0, torch.tensor([1, 2, 3]))
        True
    """
    _check_seed(seed)
    digest = hashlib.blake2b(_key_bytes(key), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") & MAX_SEED


def request_generators(seed: int, keys: Sequence[SeedKey]) -> list[torch.Generator]:
    """One CPU generator per prompt, seeded by :func:`derive_seed` (pass as a corruptor's ``generator``)."""
    return [torch.Generator().manual_seed(derive_seed(seed, key)) for key in keys]


@dataclass(frozen=True)
class Corruptor(ABC):
    """Base class of corruptions: one call signature, parameters checked once.

    Subclasses set ``name`` and the capability flags, and implement ``_corrupt``.

    Args:
        dims: how many embedding dimensions per token are corrupted (ignored where ``uses_dims`` is False).
        strength: the noise standard deviation or the value added/subtracted (ignored where
            ``uses_strength`` is False); ``>= 0`` and finite.

    Raises:
        ConfigError: ``dims`` is not a positive integer or ``strength`` is negative or not finite.
    """

    dims: int = DEFAULT_DIMS
    strength: float = DEFAULT_STRENGTH

    name: ClassVar[str]
    uses_dims: ClassVar[bool] = True
    uses_strength: ClassVar[bool] = True
    stochastic: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if isinstance(self.dims, bool) or not isinstance(self.dims, int) or self.dims < 1:
            raise ConfigError(f"{self.name}: dims={self.dims!r} is not allowed; use a positive integer such as 1")
        if not isinstance(self.strength, int | float) or not math.isfinite(self.strength) or self.strength < 0:
            raise ConfigError(
                f"{self.name}: strength={self.strength!r} is not allowed; use a finite number >= 0 such as 5.0"
            )

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor, *, generator: Generators = None) -> torch.Tensor:
        """Return a corrupted copy of ``embeds``; positions where ``mask`` is False are left as they are.

        Args:
            embeds: floating ``(batch, seq, dim)`` prompt embeddings; not modified.
            mask: boolean ``(batch, seq)``; True marks the tokens to corrupt.
            generator: ``None`` (the device's global RNG), one generator shared by the rows in order,
                or one generator per batch row.

        Returns:
            A new tensor with the shape, dtype and device of ``embeds``.

        Raises:
            InputError: wrong shapes or dtypes, or as many generators as rows were not given.
            ConfigError: ``dims`` exceeds the embedding width.
        """
        mask = _checked_mask(embeds, mask)
        if self.uses_dims and self.dims > embeds.shape[-1]:
            raise ConfigError(
                f"{self.name}: dims={self.dims} exceeds the embedding width {embeds.shape[-1]}; "
                f"use dims between 1 and {embeds.shape[-1]}"
            )
        generators = _row_generators(generator, embeds.shape[0])
        if not mask.any():
            return embeds.clone()
        return self._corrupt(embeds, mask, generators)

    @abstractmethod
    def _corrupt(
        self, embeds: torch.Tensor, mask: torch.Tensor, generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Return the corrupted copy; inputs are validated and at least one token is masked."""


class _RowRandom:
    """Random draws for the masked tokens (in row-major order), each row's block from that row's generator."""

    def __init__(self, mask: torch.Tensor, generators: list[torch.Generator | None], like: torch.Tensor) -> None:
        counts = mask.sum(dim=1).tolist()
        self._rows = [(count, gen) for count, gen in zip(counts, generators, strict=True) if count > 0]
        self._like = like

    def _device(self, gen: torch.Generator | None) -> torch.device:
        return gen.device if gen is not None else self._like.device

    def normal(self, k: int, scale: float) -> torch.Tensor:
        """``(tokens, k)`` draws of N(0, scale²), in the dtype and on the device of the embeddings."""
        blocks = [torch.randn(n, k, generator=g, device=self._device(g)).to(self._like.device) for n, g in self._rows]
        return (scale * torch.cat(blocks)).to(self._like.dtype)

    def columns(self, width: int, k: int) -> torch.Tensor:
        """``(tokens, k)`` distinct column indices, drawn once per row and shared by that row's tokens."""
        blocks = [
            torch.randperm(width, generator=g, device=self._device(g))[:k].to(self._like.device).expand(n, k)
            for n, g in self._rows
        ]
        return torch.cat(blocks)


class _TokenwiseCorruptor(Corruptor):
    """A corruption applied to each masked token's vector on its own."""

    def _corrupt(self, embeds, mask, generators):
        out = embeds.clone()
        rows = embeds[mask]  # (tokens, dim), a copy that _rows may change in place
        out[mask] = self._rows(rows, _RowRandom(mask, generators, embeds))
        return out

    @abstractmethod
    def _rows(self, x: torch.Tensor, rand: _RowRandom) -> torch.Tensor:
        """Corrupt ``x`` of shape ``(tokens, dim)``; may modify and return it."""

    def _top_k(self, x: torch.Tensor, *, by_abs: bool = True, largest: bool = True) -> torch.Tensor:
        return (x.abs() if by_abs else x).topk(self.dims, dim=1, largest=largest).indices


class _OrderCorruptor(Corruptor):
    """A corruption that moves masked tokens' vectors among the masked positions of their row."""

    uses_dims = False
    uses_strength = False

    def _corrupt(self, embeds, mask, generators):
        out = embeds.clone()
        for row, gen in enumerate(generators):
            positions = mask[row].nonzero().squeeze(1)
            if positions.numel() > 1:
                out[row, positions] = embeds[row, positions[self._order(positions.numel(), gen, embeds.device)]]
        return out

    @abstractmethod
    def _order(self, n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """The new order of ``n`` masked positions, as indices into them."""


_REGISTRY: dict[str, type[Corruptor]] = {}
CORRUPTORS: Final[Mapping[str, type[Corruptor]]] = MappingProxyType(_REGISTRY)
"""Read-only view of the registered corruptors by name."""


def register_corruptor(cls: type[Corruptor]) -> type[Corruptor]:
    """Class decorator: make a :class:`Corruptor` subclass available by its ``name`` (specs, configs, store).

    Raises:
        ConfigError: another corruptor already has that name.
    """
    if cls.name in _REGISTRY:
        raise ConfigError(f"corruptor name {cls.name!r} is already registered; choose another name")
    _REGISTRY[cls.name] = cls
    return cls


def get_corruptor(name: str) -> type[Corruptor]:
    """The corruptor class registered as ``name``.

    Raises:
        ConfigError: no corruptor has that name; the message lists the ones that exist.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"method={name!r} is not a known corruption; use one of: {', '.join(sorted(_REGISTRY))}"
        ) from None


@register_corruptor
class RandNoiseFirstN(_TokenwiseCorruptor):
    """Add N(0, strength²) noise to the first ``dims`` dimensions (the paper's default)."""

    name = "rand_noise_first_n"
    stochastic = True

    def _rows(self, x, rand):
        x[:, : self.dims] += rand.normal(self.dims, self.strength)
        return x


@register_corruptor
class RandNoiseRandN(_TokenwiseCorruptor):
    """Add N(0, strength²) noise to ``dims`` random dimensions, drawn once per row."""

    name = "rand_noise_rand_n"
    stochastic = True

    def _rows(self, x, rand):
        return x.scatter_add_(1, rand.columns(x.shape[1], self.dims), rand.normal(self.dims, self.strength))


@register_corruptor
class RandNoiseTopK(_TokenwiseCorruptor):
    """Add N(0, strength²) noise to each token's ``dims`` largest-magnitude dimensions."""

    name = "rand_noise_top_k"
    stochastic = True

    def _rows(self, x, rand):
        return x.scatter_add_(1, self._top_k(x), rand.normal(self.dims, self.strength))


@register_corruptor
class ZeroOutTopK(_TokenwiseCorruptor):
    """Set each token's ``dims`` largest-magnitude dimensions to zero."""

    name = "zero_out_top_k"
    uses_strength = False

    def _rows(self, x, rand):
        return x.scatter_(1, self._top_k(x), 0.0)


@register_corruptor
class ZeroOutFirstN(_TokenwiseCorruptor):
    """Set the first ``dims`` dimensions to zero."""

    name = "zero_out_first_n"
    uses_strength = False

    def _rows(self, x, rand):
        x[:, : self.dims] = 0
        return x


@register_corruptor
class FlipSignFirstN(_TokenwiseCorruptor):
    """Negate the first ``dims`` dimensions."""

    name = "flip_sign_first_n"
    uses_strength = False

    def _rows(self, x, rand):
        x[:, : self.dims] *= -1
        return x


@register_corruptor
class FlipSignTopK(_TokenwiseCorruptor):
    """Negate each token's ``dims`` largest-magnitude dimensions."""

    name = "flip_sign_top_k"
    uses_strength = False

    def _rows(self, x, rand):
        top = self._top_k(x)
        return x.scatter_(1, top, -x.gather(1, top))


@register_corruptor
class SubValueTopK(_TokenwiseCorruptor):
    """Subtract ``strength`` from each token's ``dims`` largest (signed) dimensions."""

    name = "sub_value_top_k"

    def _rows(self, x, rand):
        top = self._top_k(x, by_abs=False)
        return x.scatter_add_(1, top, torch.full(top.shape, -self.strength, dtype=x.dtype, device=x.device))


@register_corruptor
class AddValueLeastK(_TokenwiseCorruptor):
    """Add ``strength`` to each token's ``dims`` smallest (signed) dimensions."""

    name = "add_value_least_k"

    def _rows(self, x, rand):
        least = self._top_k(x, by_abs=False, largest=False)
        return x.scatter_add_(1, least, torch.full(least.shape, self.strength, dtype=x.dtype, device=x.device))


@register_corruptor
class SubValueFirstN(_TokenwiseCorruptor):
    """Subtract ``strength`` from the first ``dims`` dimensions."""

    name = "sub_value_first_n"

    def _rows(self, x, rand):
        x[:, : self.dims] -= self.strength
        return x


@register_corruptor
class AddValueFirstN(_TokenwiseCorruptor):
    """Add ``strength`` to the first ``dims`` dimensions."""

    name = "add_value_first_n"

    def _rows(self, x, rand):
        x[:, : self.dims] += self.strength
        return x


@register_corruptor
class SetRandNoiseFirstN(_TokenwiseCorruptor):
    """Replace the first ``dims`` dimensions with N(0, strength²) noise.

    Unlike the paper's code, which overwrote those dimensions of every token, only masked tokens change.
    """

    name = "set_rand_noise_first_n"
    stochastic = True

    def _rows(self, x, rand):
        x[:, : self.dims] = rand.normal(self.dims, self.strength)
        return x


@register_corruptor
class ReverseOrder(_OrderCorruptor):
    """Reverse the order of the masked tokens within each row (the whole prompt when all are masked)."""

    name = "reverse_order"

    def _order(self, n, generator, device):
        return torch.arange(n - 1, -1, -1, device=device)


@register_corruptor
class Shuffle(_OrderCorruptor):
    """Shuffle the masked tokens within each row (the whole prompt when all are masked)."""

    name = "shuffle"
    stochastic = True

    def _order(self, n, generator, device):
        gen_device = generator.device if generator is not None else device
        return torch.randperm(n, generator=generator, device=gen_device).to(device)


class CorruptionList(list):
    """Corruptors applied one after another, each to the previous one's output, with the same generator(s).

    Example:
        >>> both = CorruptionList([FlipSignFirstN(dims=1), AddValueFirstN(dims=1, strength=1.0)])
        >>> both(torch.ones(1, 2, 3), torch.tensor([[True, False]])).tolist()
        [[[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]]
    """

    def __call__(self, embeds: torch.Tensor, mask: torch.Tensor, *, generator: Generators = None) -> torch.Tensor:
        out = embeds
        for corruptor in self:
            out = corruptor(out, mask, generator=generator)
        return out if self else embeds.clone()


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed={seed!r} is not allowed; use an integer between 0 and {MAX_SEED}")


def _key_bytes(key: SeedKey) -> bytes:
    if isinstance(key, str):
        return b"s" + key.encode("utf-8")
    if isinstance(key, bytes):
        return b"b" + key
    ids = key.tolist() if isinstance(key, torch.Tensor) else key
    if isinstance(ids, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return b"i" + b"".join(i.to_bytes(8, "little", signed=True) for i in ids)
    raise InputError(f"seed key of type {type(key).__name__} is not supported; pass the prompt text or token ids")


def _checked_mask(embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(embeds, torch.Tensor) or embeds.dim() != 3 or not embeds.is_floating_point():
        shape = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise InputError(f"embeds must be a floating (batch, seq, dim) tensor, got {shape}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"mask must be a boolean tensor, got {got}; convert it with mask.bool()")
    if mask.shape != embeds.shape[:2]:
        raise InputError(f"mask shape {tuple(mask.shape)} must equal embeds' (batch, seq) {tuple(embeds.shape[:2])}")
    return mask.to(embeds.device)


def _row_generators(generator: Generators, batch: int) -> list[torch.Generator | None]:
    if generator is None or isinstance(generator, torch.Generator):
        return [generator] * batch
    generators = list(generator)
    if len(generators) != batch or not all(isinstance(g, torch.Generator) for g in generators):
        raise InputError(f"got {len(generators)} generators for {batch} rows; pass one torch.Generator per row")
    return generators
