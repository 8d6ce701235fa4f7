"""The lexicon: names that are evidence about a prompt, beside what the encoder thinks.

Three kinds of names, all matched in :func:`~eco_guard.classifier.normalize.normalize_text`
output as whole words (plurals and possessives included):

- a topic's **terms** ("Hogwarts", "Darth Vader"): a prompt naming one is about the topic,
  whatever the encoder says; long terms also match one typo away;
- a topic's **weak terms** ("Luke", "the Empire"): ambiguous names, weak evidence for it;
- **contrast terms** ("Gandalf", "Beatrix Potter"): names of neighbouring things, evidence
  against every topic the prompt names no term of; a term inside one does not count.

:class:`Lexicon` turns a prompt into :class:`Evidence`; how evidence moves a decision is
:mod:`eco_guard.classifier.policy`'s business.

Example:
    >>> lex = Lexicon({"sw": ["Yoda"]}, weak_terms={"sw": ['"Luke"']}, contrast_terms=["Luke Combs"])
    >>> lex.evidence(["was yoda a jedi?"], ["Was Yoda a Jedi?"])[0]
    Evidence(terms={'sw': 'yoda'}, weak_terms={}, contrast=None)
    >>> lex.evidence(["luke combs tour"], ["Luke Combs tour"])[0]
    Evidence(terms={}, weak_terms={}, contrast='luke combs')
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Final

from eco_guard.classifier.normalize import normalize_text

__all__ = ["Evidence", "Lexicon", "TermMatcher", "case_sensitive_term", "english_words", "term_pattern"]


@dataclass(frozen=True)
class Evidence:
    """What the lexicon found in one prompt.

    Attributes:
        terms: per topic, the first term found (as written in the normalised prompt).
        weak_terms: per topic, the first weak term found.
        contrast: the first contrast term found (only searched when asked for), else None.
    """

    terms: dict[str, str] = field(default_factory=dict)
    weak_terms: dict[str, str] = field(default_factory=dict)
    contrast: str | None = None


class Lexicon:
    """Per-topic term matchers plus the contrast names, built once and only read afterwards (thread-safe).

    Args:
        terms: per topic, names that alone make a prompt about it (typos allowed in long ones).
        weak_terms: per topic, ambiguous names (exact matches only).
        contrast_terms: names about no topic; they also shield the topic terms inside them.
        known_words: real words that typo matching never reads as a misspelt term.
    """

    def __init__(self, terms: Mapping[str, Sequence[str]], *, weak_terms: Mapping[str, Sequence[str]] | None = None,
                 contrast_terms: Sequence[str] = (), known_words: frozenset[str] | set[str] = frozenset()) -> None:
        contrast = list(contrast_terms)
        self._terms = {t: TermMatcher(v, known_words=known_words, except_terms=contrast) for t, v in terms.items() if v}
        # Weak terms are short, everyday words: exact matches only, no typo search.
        self._weak = {t: TermMatcher(v, except_terms=contrast, typos=False) for t, v in (weak_terms or {}).items() if v}
        self._contrast = term_pattern(contrast)

    def terms(self, normalized: Sequence[str], raw: Sequence[str]) -> list[dict[str, str]]:
        """Per prompt, the first term found for each topic that has one."""
        return [_found(self._terms, norm, text) for norm, text in zip(normalized, raw)]

    def evidence(self, normalized: Sequence[str], raw: Sequence[str], *, contrast: bool = True) -> list[Evidence]:
        """Per prompt (normalised, and as sent: quoted terms match case-sensitively there), what was found."""
        out = []
        for norm, text in zip(normalized, raw):
            found = self._contrast.search(norm) if contrast and self._contrast is not None else None
            out.append(Evidence(_found(self._terms, norm, text), _found(self._weak, norm, text),
                                found.group(0) if found else None))
        return out


def _found(matchers: Mapping[str, TermMatcher], normalized: str, raw: str) -> dict[str, str]:
    return {t: hit for t, m in matchers.items() if (hit := m.find(normalized, raw))}


def case_sensitive_term(term: str) -> str | None:
    """The name inside a term written in double quotes, which matches only as capitalised there; else None.

    A film or chapter title can be an everyday phrase in lower case: '"A New Hope"' flags
    "the plot of A New Hope", not "a new hope for patients".

    Example:
        >>> case_sensitive_term('"A New Hope"'), case_sensitive_term("Hogwarts")
        ('A New Hope', None)
    """
    term = term.strip()
    return term[1:-1].strip() or None if len(term) > 2 and term[0] == term[-1] == '"' else None


def term_pattern(terms: Sequence[str], *, raw: bool = False, ignore_case: bool = True) -> re.Pattern[str] | None:
    """A regex finding any of ``terms`` in :func:`normalize_text` output, as whole words.

    Spaces and hyphens inside a term match any run of them or none ("light saber",
    "lightsaber", "light-saber"); a plural or possessive ending is allowed. ``raw=True``
    searches unnormalised text instead (terms as written, in any case unless ``ignore_case=False``).

    Example:
        >>> p = term_pattern(["Obi-Wan", "Horcrux"])
        >>> [bool(p.search(normalize_text(t))) for t in ("obiwan's plan", "two HORCRUXES", "horcruxology")]
        [True, True, False]
    """
    keys = frozenset(t.strip() if raw else normalize_text(t) for t in terms if t.strip())
    return _term_pattern(keys, raw, ignore_case)


@functools.lru_cache(maxsize=64)
def _term_pattern(terms: frozenset[str], raw: bool, ignore_case: bool) -> re.Pattern[str] | None:
    # Cached: a classifier builds the contrast pattern once per topic matcher and once for itself
    # (1,600 names: 0.13 s each).
    spaced: dict[str, Any] = {}
    unspaced: dict[str, Any] = {}
    for term in terms:
        # Chinese and Japanese put no space between words: such a term is found inside a run of text
        # ("哈利·波特的猫头鹰"), its name dots optional ("哈利波特").
        trie, gap = (unspaced, _UNSPACED_GAP) if _UNSPACED.search(term) else (spaced, r"[\s\-]+")
        parts = [p for p in re.split(gap, term) if p]
        if parts:
            node = trie
            for atom in [*parts[0], *(a for p in parts[1:] for a in (_GAP if trie is spaced else _DOT, *p))]:
                node = node.setdefault(atom, {})
            # Russian nouns inflect ("Гарри Поттера"): a term with Cyrillic in it takes a short case ending.
            node[_CYRILLIC_END if _CYRILLIC.search(term) else _END] = {}
    branches = ([r"(?<!\w)" + _trie_regex(spaced) + r"(?:s|es|'s|’s|')?(?!\w)"] if spaced else []) + (
        [_trie_regex(unspaced)] if unspaced else [])
    if not branches:
        return None
    flags = re.IGNORECASE if raw and ignore_case else 0
    return re.compile("|".join(branches), flags)


# Trie atoms besides single characters: the gap between a term's words (a name dot in Chinese and
# Japanese names), and the two term ends.
_GAP, _DOT, _END, _CYRILLIC_END = "\x00gap", "\x00dot", "\x00end", "\x00cyr"
_UNSPACED_GAP: Final = r"[\s\-·・•.]+"
_ATOMS: Final[dict[str, str]] = {_GAP: r"[\s\-]*", _DOT: _UNSPACED_GAP[:-1] + "*", _END: "",
                                 _CYRILLIC_END: r"[a-zа-яё]{0,3}"}
# Scripts written without spaces between words: CJK ideographs, kana.
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _trie_regex(node: dict[str, Any]) -> str:
    """The alternation of a character trie, factored by prefix: Python's ``re`` tries every branch of
    a flat alternation at every position (1,800 terms: 0.6 ms a prompt), a trie only the branch
    that the next character selects. Longer continuations come before a term's end, as in the
    longest-first flat alternation it replaces; the rest in a fixed order, so every process builds
    the same pattern (the terms arrive as a set)."""
    branches = [_ATOMS.get(a, re.escape(a)) + _trie_regex(child)
                for a, child in sorted(node.items(), key=lambda kv: (kv[0] in (_END, _CYRILLIC_END), kv[0]))]
    if len(branches) <= 1:
        return "".join(branches)
    return "(?:" + "|".join(branches) + ")"


_CYRILLIC = re.compile(r"[\u0400-\u04ff]")


class TermMatcher:
    """Finds topic terms in :func:`normalize_text` output: exactly (:func:`term_pattern`), or one typo away.

    A typo is one substitution, insertion, deletion or swap, in a text word missing from
    ``known_words`` (a vocabulary of real words), so "quibble" does not become the term
    "Quibbler", nor "start wars" "Star Wars". Two kinds are found:

    - one typo in the whole term, if the term has ``fuzzy_min_len`` letters or more (spaces not
      counted: "harry ptoter" is one swap from "Harry Potter");
    - one typo in each of several words ("sttar wasr", "prisoner of akzaban"), each such word
      of 4 letters or more; a one-word term needs ``fuzzy_word_min_len`` letters ("hagird").

    ``typos=False`` finds terms exactly only. A term in double quotes (:func:`case_sensitive_term`)
    matches as written (a title's first letter in either case: "the Burrow"), in the prompt as sent
    (``raw``), never with a typo.

    ``except_terms`` are names about something else that contain a term ("Hermione Lee", the
    biographer; "Lando Norris", the driver): a term found inside one of them does not count (quoted
    terms too), and their words are never read as typos of a term ("Fondor" is not "Gondor").

    Example:
        >>> m = TermMatcher(["Dumbledore", "Hogwarts", "Star Wars"], known_words={"quibble"})
        >>> m.find(normalize_text("Is Dumbeldore dead?")), m.find("hogwartz"), m.find("pottery")
        ('dumbeldore', 'hogwartz', None)
        >>> m.find("sttar wasr lego")
        'sttar wasr'
        >>> TermMatcher(["Hermione"], except_terms=["Hermione Lee"]).find("hermione lee's biography of woolf")
    """

    def __init__(self, terms: Sequence[str], *, known_words: frozenset[str] | set[str] = frozenset(),
                 fuzzy_min_len: int = 8, fuzzy_word_min_len: int = 6, except_terms: Sequence[str] = (),
                 typos: bool = True) -> None:
        # A title's first word may start a sentence or follow one: "watch the Prince's Tale", "the Burrow";
        # a one-word name keeps its capital ("Luke", not "luke-warm").
        cased = [v for t in terms if (name := case_sensitive_term(t))
                 for v in ({name, name[0].lower() + name[1:]} if " " in name else {name})]
        terms = [t for t in terms if case_sensitive_term(t) is None]
        self.pattern = term_pattern(terms)
        self._cased = term_pattern(cased, raw=True, ignore_case=False)
        self._except = term_pattern(except_terms)
        self._except_raw = term_pattern(except_terms, raw=True) if self._cased is not None else None
        self._known = known_words
        # kept apart from known_words: a union would copy the 160,000-word dictionary per matcher
        self._except_words = frozenset(w for t in except_terms for w in _WORDS.findall(normalize_text(t)))
        self._min = fuzzy_min_len
        # Word by word: each term word (4+ letters) by its one-letter deletions, and the terms holding it.
        self._word_by_delete: dict[str, set[str]] = {}
        self._terms_with: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        # sorted: the same span is reported in every process (sets iterate in a per-process order)
        fuzzy_terms = terms if typos else []
        fuzzy = {tuple(_WORDS.findall(n)) for n in map(normalize_text, fuzzy_terms) if _FUZZY_TERM.fullmatch(n)}
        for words in sorted(fuzzy):
            for k, word in enumerate(words):
                if len(word) >= (_FUZZY_WORD_MIN_LEN if len(words) > 1 else fuzzy_word_min_len):
                    self._terms_with.setdefault(word, []).append((words, k))
                    for variant in _deletes(word):
                        self._word_by_delete.setdefault(variant, set()).add(word)
        # Per word count: a two-word span is only compared with two-word terms ("the stra" is not "Thestral").
        self._by_delete: dict[int, dict[str, set[str]]] = {}
        for term in {normalize_text(t) for t in fuzzy_terms}:
            joined = term.replace(" ", "")
            if joined.isalpha() and len(joined) >= fuzzy_min_len:
                index = self._by_delete.setdefault(term.count(" ") + 1, {})
                for variant in _deletes(joined):
                    index.setdefault(variant, set()).add(joined)

    def find(self, normalized: str, raw: str | None = None) -> str | None:
        """The first term found in already normalised text (case-sensitive terms: in ``raw``, the
        text before normalisation), as it appears there; None if none."""
        if self.pattern is not None and (found := self._find_exact(normalized)):
            return found
        if self._cased is not None and raw is not None and (found := _unshielded(self._cased, raw, self._except_raw)):
            return found
        if not self._by_delete and not self._word_by_delete:
            return None
        words = _WORDS.findall(normalized)
        unknown = [i for i, w in enumerate(words) if w not in self._known and w not in self._except_words]
        if found := self._find_word_by_word(words, unknown):
            return found
        for n, index in self._by_delete.items():  # a term of n words, typed with one slip
            # only spans holding a word missing from the vocabulary: most prompts have none
            starts = sorted({s for i in unknown for s in range(max(0, i - n + 1), min(i, len(words) - n) + 1)})
            for i in starts:
                span = words[i:i + n]
                joined = "".join(span)
                if len(joined) < self._min - 1:
                    continue
                for variant in _deletes(joined):
                    if any(_one_edit(joined, term) for term in index.get(variant, ())):
                        return " ".join(span)
        return None

    def _find_exact(self, normalized: str) -> str | None:
        assert self.pattern is not None
        return _unshielded(self.pattern, normalized, self._except)

    def _find_word_by_word(self, words: list[str], unknown: list[int]) -> str | None:
        """A span where every word is the term's word or, if not a known word, one typo from it
        that keeps its first letter (typists rarely miss it; names that differ only there are
        other names: "Kakashi" is not "Makashi")."""
        for i in unknown:
            for near in sorted({w for v in _deletes(words[i]) for w in self._word_by_delete.get(v, ())}):
                if not _one_edit(words[i], near):
                    continue
                for term, k in self._terms_with[near]:
                    span = words[i - k:i - k + len(term)] if i >= k else []
                    if len(span) == len(term) and all(
                            w == t or (w not in self._known and w not in self._except_words
                                       and len(t) >= _FUZZY_WORD_MIN_LEN and w[0] == t[0] and _one_edit(w, t))
                            for w, t in zip(span, term)):
                        return " ".join(span)
        return None


_WORDS = re.compile(r"[a-z]+")
_FUZZY_WORD_MIN_LEN = 4  # a word of a longer term may carry a typo: "sttar wasr" (each word one slip)
_FUZZY_TERM = re.compile(r"[a-z][a-z '’\-]*")  # plain Latin letters: digits ("R2-D2") match exactly


@functools.cache
def english_words() -> frozenset[str]:
    """About 160,000 lower-case English words (pyspellchecker's frequency list), read once.

    Typo matching must not turn real words into terms: "plagues" is one letter from
    "Plagueis", "pensive" from "Pensieve", "estrange" from "Lestrange".
    """
    with resources.files("spellchecker").joinpath("resources", "en.json.gz").open("rb") as raw:
        return frozenset(w for w in json.load(gzip.open(raw)) if w.isalpha())


def _unshielded(pattern: re.Pattern[str], text: str, shield: re.Pattern[str] | None) -> str | None:
    """The first match of ``pattern`` in ``text`` that lies inside no match of ``shield``."""
    first = pattern.search(text)
    if first is None or shield is None:
        return first.group(0) if first else None
    inside = [e.span() for e in shield.finditer(text)]
    for m in pattern.finditer(text, first.start()):
        if not any(a <= m.start() and m.end() <= b for a, b in inside):
            return m.group(0)
    return None


def _deletes(word: str) -> set[str]:
    return {word, *(word[:i] + word[i + 1:] for i in range(len(word)))}


def _one_edit(a: str, b: str) -> bool:
    """Optimal-string-alignment distance of at most 1 (equal strings excluded: those match exactly)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    i = next((k for k in range(len(short)) if short[k] != long_[k]), len(short))
    return short[i:] == long_[i + 1:]

