"""Evasive variants of training prompts (eco_guard.classifier.augment)."""

from __future__ import annotations

import doctest

from eco_guard.classifier import augment
from eco_guard.classifier.augment import Augmenter


def test_buried_variants_draw_half_their_surrounding_text_from_prose():
    aug = Augmenter(["How do I boil an egg?"], prose=["The ferry leaves at noon."], seed=0)
    buried = [aug.bury("Who is Yoda?") for _ in range(60)]
    assert all("Who is Yoda?" in b for b in buried)
    assert sum("ferry" in b for b in buried) > 15 and sum("egg" in b for b in buried) > 15
    plain = Augmenter(["How do I boil an egg?"], seed=0)
    assert not any("ferry" in plain.bury("Who is Yoda?") for _ in range(20))


def test_buried_prompt_stays_inside_the_first_window():
    aug = Augmenter([f"Unrelated sentence number {i} about the weather today." for i in range(20)], seed=1)
    buried = [aug.bury("Who is Yoda?") for _ in range(200)]
    before = [len(b.split("Who is Yoda?")[0].split()) for b in buried]
    total = [len(b.split()) - 3 for b in buried]
    assert max(before) <= 45 and max(total) > 60 and min(before) == 0 and max(before) > 20


def test_augment_doctests():
    result = doctest.testmod(augment)
    assert result.attempted > 0 and result.failed == 0
