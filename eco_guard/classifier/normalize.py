"""Text normalisation applied before the prompt classifier sees a prompt.

Users who want to slip a forget-topic prompt past the classifier reach for cheap
tricks first: odd case, full-width or mathematical letters, Cyrillic look-alikes,
zero-width characters, diacritics, letter spacing ("H.a.r.r.y"), leetspeak and
stretched letters. :func:`normalize_text` undoes them, so the encoder and the
lexicon read the same canonical text, in training and at inference.

Example:
    >>> normalize_text("Who is H\u200barry P\u043etter?")   # zero-width space, Cyrillic o
    'who is harry potter?'
    >>> normalize_text("ｄａｒｔｈ v4d3r")                   # full-width, leetspeak
    'darth vader'
    >>> normalize_text("H.a.r.r.y  P o t t e r")
    'harry potter'
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

__all__ = ["CONFUSABLES", "normalize_text"]

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
