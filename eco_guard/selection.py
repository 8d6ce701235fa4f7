"""Which prompt tokens to corrupt.

Tokens are chosen by character spans of the rendered chat text and the
tokenizer's offset mapping, so the chat template's special tokens and the
system prompt are never touched: they carry no topic knowledge, and corrupting
them only costs fluency.

- ``content`` (default): every token of the last user message's content;
- ``keywords``: only tokens overlapping a configured keyword (case-insensitive)
  inside that content — e.g. an author's name, as the ECO paper does for TOFU; with no
  keywords configured, the topic's terms and weak terms (:func:`topic_keywords`);
- ``salient``: only the words that make the classifier flag the prompt (:func:`salient_spans`:
  the words whose removal lowers the topic's logit most, plus its matched terms), found per
  flagged prompt; words are character spans, so the classifier's WordPiece and the chat
  model's BPE never need to agree.

Example:
    >>> offsets = [(0, 5), (5, 9), (9, 16)]           # "<|u|>Who Potter"
    >>> token_mask(offsets, [(5, 16)])
    [False, True, True]
    >>> token_mask(offsets, keyword_spans("<|u|>Who Potter", ["potter"], [(5, 16)]))
    [False, False, True]
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from eco_guard.classifier.lexicon import term_pattern
from eco_guard.config import SelectionConfig, TopicConfig

Span = tuple[int, int]

__all__ = ["Span", "find_spans", "keyword_spans", "salient_spans", "select_mask", "token_mask", "topic_keywords",
           "with_keywords", "word_spans"]

_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")
MIN_LOGIT_DROP = 1.0  # a word whose removal moves the topic's logit less than this is not what fired it
RELATIVE_DROP = 0.5  # words within this share of the largest drop count as salient too


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


def topic_keywords(topic: TopicConfig) -> list[str]:
    """What the topic's ``keywords`` selection matches: its own list, else its terms and weak terms (the names
    that flag it; a quoted term's quotes dropped, since in a flagged prompt the name is corrupted in any case)."""
    if any(k.strip() for k in topic.selection.keywords):
        return list(topic.selection.keywords)
    from eco_guard.classifier.data import read_terms

    return list(dict.fromkeys(t.strip('"') for t in read_terms([*topic.terms, *topic.weak_terms])))


def with_keywords(selection: SelectionConfig, topic: TopicConfig) -> SelectionConfig:
    """``selection`` with its keywords filled in from the topic where it selects keywords and lists none."""
    if selection.mode != "keywords" or any(k.strip() for k in selection.keywords):
        return selection
    return selection.model_copy(update={"keywords": topic_keywords(topic)})


def word_spans(text: str) -> list[Span]:
    """Character spans of the words of ``text`` (letters and digits of any script; inner ' and - kept)."""
    return [(m.start(), m.end()) for m in _WORD.finditer(text)]


def salient_spans(text: str, topic: str, score: Callable[[list[str]], list[dict[str, float]]],
                  terms: Sequence[str] = ()) -> list[Span]:
    """The words of ``text`` that make the classifier see ``topic``, by occlusion in one batched call.

    Each word is removed in turn; the words whose removal lowers the topic's logit most (at least
    :data:`MIN_LOGIT_DROP`, and at least :data:`RELATIVE_DROP` of the largest drop) are salient, and
    so is every occurrence of a matched topic term. Logits, not probabilities: a saturated 0.9999
    still tells which word carried it.

    Example:
        >>> score = lambda texts: [{"t": 0.99 if "Hogwarts" in x else 0.01} for x in texts]
        >>> text = "Where is Hogwarts?"
        >>> [text[s:e] for s, e in salient_spans(text, "t", score)]
        ['Hogwarts']
    """
    words = word_spans(text)
    if not words:
        return []
    scored = score([text] + [text[:s] + text[e:] for s, e in words])
    full, occluded = _logit(scored[0][topic]), [_logit(row[topic]) for row in scored[1:]]
    drops = [full - o for o in occluded]
    top = max(drops)
    picked = {w for w, d in zip(words, drops) if top >= MIN_LOGIT_DROP and d >= RELATIVE_DROP * top}
    picked.update(keyword_spans(text, [t for t in terms if t], [(0, len(text))]))
    return sorted(picked)


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


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
