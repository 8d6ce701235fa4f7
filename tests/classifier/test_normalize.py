"""normalize_text on prompts in other languages: scripts kept, only Latin/Greek/Cyrillic diacritics dropped."""

import pytest

from eco_guard.classifier import normalize_text


@pytest.mark.parametrize("text", [
    "哈利·波特的猫头鹰叫什么名字",      # Chinese: unchanged (no case, no diacritics)
    "星球大战里的尤达大师是谁",
    "ハリー・ポッターの魔法",            # Japanese: the dakuten/handakuten are kept (ポ stays ポ, not ホ)
    "почему гарри поттер",               # Russian words are not read as Cyrillic look-alikes
    "해리 포터의 부엉이",                 # Korean syllables survive NFD/NFC
    "हैरी पॉटर की उल्लू",                   # Devanagari vowel signs are kept
])
def test_non_latin_scripts_are_kept(text: str) -> None:
    assert normalize_text(text) == text


def test_chinese_full_width_punctuation_becomes_ascii() -> None:
    # NFKC: the full-width question mark is the ASCII one; the characters stay
    assert normalize_text("星球大战里的尤达大师是谁？") == "星球大战里的尤达大师是谁?"


@pytest.mark.parametrize(("text", "expected"), [
    ("Wie heißt Harrys Eule? Größe", "wie heisst harrys eule? grosse"),           # casefold: ß -> ss
    ("Qui a construit l'Étoile de la Mort ? Où", "qui a construit l'etoile de la mort ? ou"),
    ("¿Quién mató a Dumbledore? año", "¿quien mato a dumbledore? ano"),
])
def test_latin_diacritics_are_dropped(text: str, expected: str) -> None:
    # the encoder's (uncased) tokenizer strips accents as well, so this changes no encoder input
    assert normalize_text(text) == expected


def test_mixed_latin_and_chinese() -> None:
    assert normalize_text("H4rry 和 R2-D2") == "harry 和 r2-d2"
