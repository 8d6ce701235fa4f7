"""Which prompt tokens to corrupt.

Tokens are chosen by character spans of the rendered chat text and the
tokenizer's offset mapping, so the chat template's special tokens and the
system prompt are never touched: they carry no topic knowledge, and corrupting
them only costs fluency.

- ``content`` (default): every token of the last user message's content;
- ``keywords``: only tokens overlapping a configured keyword (case-insensitive)
  inside that content — e.g. an author's name, as the ECO paper does for TOFU.

Example:
    >>> offsets = [(0, 5), (5, 9), (9, 16)]           # "<|u|>Who Potter"
    >>> token_mask(offsets, [(5, 16)])
    [False, True, True]
    >>> token_mask(offsets, keyword_spans("<|u|>Who Potter", ["potter"], [(5, 16)]))
    [False, False, True]
"""

from __future__ import annotations

from collections.abc import Sequence

from eco_guard.config import SelectionConfig
from eco_guard.classifier.lexicon import term_pattern

Span = tuple[int, int]

__all__ = ["Span", "find_spans", "keyword_spans", "select_mask", "token_mask"]


def token_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> list[bool]:
    """True for every token whose characters overlap one of ``spans``."""
    return [
        end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
        for start, end in offsets
    ]


def find_spans(text: str, needles: Sequence[str]) -> list[Span]:
    """Where each needle occurs last in ``text`` (the newest message wins over quoted history)."""
    spans = []
    for needle in needles:
        needle = needle.strip()
        at = text.rfind(needle) if needle else -1
        if at >= 0:
            spans.append((at, at + len(needle)))
    return spans


def keyword_spans(text: str, keywords: Sequence[str], within: Sequence[Span]) -> list[Span]:
    """Whole-word, case-insensitive occurrences of any keyword inside the ``within`` spans.

    Matching follows topic terms (:func:`eco_guard.classifier.lexicon.term_pattern`): "Potter" finds
    "Potter's" but not "pottery"; "Harry Potter" also finds "HarryPotter".
    """
    pattern = term_pattern(keywords, raw=True)
    if pattern is None:
        return []
    return [
        (m.start(), m.end())
        for start, end in within
        for m in pattern.finditer(text, start, end)
    ]


def select_mask(
    text: str,
    offsets: Sequence[Span],
    content_spans: Sequence[Span],
    selection: SelectionConfig,
) -> list[bool]:
    """The corruption mask of one rendered prompt under a topic's selection settings."""
    spans = list(content_spans)
    if selection.mode == "keywords":
        spans = keyword_spans(text, selection.keywords, spans)
    return token_mask(offsets, spans)
