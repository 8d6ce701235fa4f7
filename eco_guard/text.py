"""Text normalisation applied before the prompt classifier sees a prompt.

Users who want to slip a forget-topic prompt past the classifier reach for cheap
tricks first: odd case, full-width or mathematical letters, Cyrillic look-alikes,
zero-width characters, diacritics, letter spacing ("H.a.r.r.y"), leetspeak and
stretched letters. :func:`normalize_text` undoes them, so the classifier is
trained and queried on the same canonical text.

Example:
    >>> normalize_text("Who is H\u200barry P\u043etter?")   # zero-width space, Cyrillic o
    'who is harry potter?'
    >>> normalize_text("ｄａｒｔｈ v4d3r")                   # full-width, leetspeak
    'darth vader'
    >>> normalize_text("H.a.r.r.y  P o t t e r")
    'harry potter'
"""

from __future__ import annotations

import functools
import gzip
import json
import re
import unicodedata
from collections.abc import Sequence
from importlib import resources
from typing import Any, Final

__all__ = ["CONFUSABLES", "TermMatcher", "case_sensitive_term", "english_words", "normalize_text", "term_pattern"]

# Look-alike letters from other scripts, mapped to the Latin letter they imitate
# (a hand-picked subset of Unicode's confusables.txt: the ones that render as
# plain Latin in common fonts). Applied only where it cannot damage real text,
# see _unconfuse_word.
CONFUSABLES: Final[dict[str, str]] = {
    # Cyrillic (lower case; casefold runs first)
    "а": "a", "в": "b", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k",
    "м": "m", "н": "h", "о": "o", "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ѕ": "s",
    "ԁ": "d", "ԛ": "q", "ԝ": "w", "ɡ": "g", "ӏ": "l", "ѵ": "v", "ү": "y", "ҽ": "e", "ո": "n",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w", "ϲ": "c", "ϳ": "j",
    # Latin look-alikes outside ASCII that NFKC keeps
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɩ": "i", "ʏ": "y", "ᴠ": "v", "ᴡ": "w", "ꮃ": "w", "ꭱ": "r",
}
# Looser look-alikes: mapped only inside words that also hold Latin letters, because
# whole Russian words made of them ("гора") are common.
_MIXED_ONLY: Final[dict[str, str]] = {"г": "r", "п": "n", "ь": "b", "д": "d", "л": "n", "и": "u"}

# Digits and symbols used as letters; only inside words that are mostly letters.
_LEET: Final[dict[str, str]] = {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
_LEET_INNER = re.compile(r"(?<=[a-z])[013457@$]{1,2}(?=[a-z])")
_LEET_ENDS = re.compile(r"^[013457@$]{1,2}|[013457@$]{1,2}$")

# Invisible characters that are not Unicode "format" (Cf) characters but still render as nothing.
_INVISIBLE: Final[frozenset[str]] = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180e\u3164\uffa0")

# Diacritic blocks used with Latin/Greek/Cyrillic (and by "Zalgo" text). Marks of other
# scripts (Devanagari vowel signs, Japanese dakuten, ...) change meaning and are kept.
_DIACRITIC_RANGES: Final[tuple[tuple[int, int], ...]] = (
    (0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF), (0xFE20, 0xFE2F),
)

_DIACRITICS = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _DIACRITIC_RANGES) + "]")
_WORD = re.compile(r"[^\W_]+|[0-9@$]+", re.UNICODE)
_LEETY_WORD = re.compile(r"(?<![\w@$])[\w@$]*[a-z][\w@$]*(?![\w@$])")
# Four or more single letters joined by one repeated separator: "h.a.r.r.y", "p o t t e r".
_SPACED = re.compile(r"(?<!\w)(\w)(?P<sep>[ .\-_*·|/])(?:\w(?P=sep)){2,}\w(?!\w)")
_STRETCHED = re.compile(r"(?<=[a-z])([a-z])\1{2,}")  # "harrrry", not "www" or "zzz"
_SPACES = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Canonical form of a prompt: NFKC, no invisibles or diacritics, case-folded, de-obfuscated.

    Args:
        text: any prompt.

    Returns:
        The normalised prompt (may be shorter; never longer than a few characters more).

    Example:
        >>> normalize_text("ＨＡＲＲＹ")
        'harry'
    """
    if text.isascii():  # most prompts: no compatibility forms, invisibles, diacritics or look-alikes
        text = text.lower()
    else:
        text = unicodedata.normalize("NFKC", text)
        text = "".join(ch for ch in text if not _invisible(ch))
        text = _strip_diacritics(text.casefold())
        text = _WORD.sub(lambda m: _unconfuse_word(m.group(0)), text)
    text = _LEETY_WORD.sub(lambda m: _unleet_word(m.group(0)), text)
    text = _SPACED.sub(lambda m: m.group(0).replace(m.group("sep"), ""), text)
    text = _STRETCHED.sub(r"\1\1", text)
    return _SPACES.sub(" ", text).strip()


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
    return _term_pattern(frozenset(t.strip() if raw else normalize_text(t) for t in terms if t.strip()), raw, ignore_case)


@functools.lru_cache(maxsize=64)
def _term_pattern(terms: frozenset[str], raw: bool, ignore_case: bool) -> re.Pattern[str] | None:
    # Cached: a classifier builds the contrast pattern once per topic matcher and once for itself
    # (1,600 names: 0.13 s each).
    trie: dict[str, Any] = {}
    for term in terms:
        parts = [p for p in re.split(r"[\s\-]+", term) if p]
        if parts:
            node = trie
            for atom in [*parts[0], *(a for p in parts[1:] for a in (_GAP, *p))]:
                node = node.setdefault(atom, {})
            # Russian nouns inflect ("Гарри Поттера"): a term with Cyrillic in it takes a short case ending.
            node[_CYRILLIC_END if _CYRILLIC.search(term) else _END] = {}
    if not trie:
        return None
    flags = re.IGNORECASE if raw and ignore_case else 0
    return re.compile(r"(?<!\w)" + _trie_regex(trie) + r"(?:s|es|'s|’s|')?(?!\w)", flags)


# Trie atoms besides single characters: the gap between a term's words, and the two term ends.
_GAP, _END, _CYRILLIC_END = "\x00gap", "\x00end", "\x00cyr"
_ATOMS: Final[dict[str, str]] = {_GAP: r"[\s\-]*", _END: "", _CYRILLIC_END: r"[a-zа-яё]{0,3}"}


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
        for words in sorted({tuple(_WORDS.findall(n)) for n in map(normalize_text, fuzzy_terms) if _FUZZY_TERM.fullmatch(n)}):
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
    m = pattern.search(text)
    if m is None or shield is None:
        return m.group(0) if m else None
    inside = [e.span() for e in shield.finditer(text)]
    for m in pattern.finditer(text, m.start()):
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


def _invisible(ch: str) -> bool:
    # Cf covers zero-width space/joiners, BOM, soft hyphen, bidi controls, tag characters.
    return unicodedata.category(ch) == "Cf" or ch in _INVISIBLE or 0xFE00 <= ord(ch) <= 0xFE0F


def _strip_diacritics(text: str) -> str:
    return unicodedata.normalize("NFC", _DIACRITICS.sub("", unicodedata.normalize("NFD", text)))


def _unconfuse_word(word: str) -> str:
    """Map look-alikes in a mixed-script word, or in a word made only of look-alikes.

    Real Russian or Greek words contain letters with no Latin twin ("Гарри" has "г"),
    so they are left alone; "Рotter" (Cyrillic Р + Latin) or "Нагrу" is not.
    """
    if not any(ch in CONFUSABLES or ch in _MIXED_ONLY for ch in word):
        return word
    if any("a" <= ch <= "z" for ch in word):
        return "".join(CONFUSABLES.get(ch) or _MIXED_ONLY.get(ch, ch) for ch in word)
    if all(ch in CONFUSABLES for ch in word):
        return "".join(CONFUSABLES[ch] for ch in word)
    return word


def _unleet_word(word: str) -> str:
    """Undo leetspeak: runs of one or two digits between letters ("h4rry", "w34sley"); then, in a
    word that had some, also at its ends ("y0d4", "angl14"). Plain numbers and "mp3"/"win10"/"3po"
    stay as they are.
    """
    inner = _LEET_INNER.sub(lambda m: "".join(_LEET[c] for c in m.group(0)), word)
    if inner == word:
        return word
    return _LEET_ENDS.sub(lambda m: "".join(_LEET[c] for c in m.group(0)), inner)
