"""Terms, weak terms and contrast terms found in prompts (eco_guard.classifier.lexicon)."""

from __future__ import annotations

from pathlib import Path

import pytest

from eco_guard.classifier import Lexicon, TermMatcher, english_words, normalize_text, read_terms, term_pattern
from eco_guard.classifier.augment import prose_sentences
from eco_guard.config import DataSource

REPO = Path(__file__).resolve().parents[2]


def test_term_pattern_matches_whole_words_with_variants():
    p = term_pattern(["Obi-Wan", "Horcrux", "light saber", "Padmé", "Harry Potter"])
    hits = ["obiwan's plan", "Two HORCRUXES", "a lightsaber duel", "light-saber", "PADME AMIDALA",
            "h\u200barry potter fans", "Obi Wan"]
    misses = ["horcruxology", "the pottery wheel", "Harry Houdini", "a saber-toothed cat"]
    assert all(p.search(normalize_text(t)) for t in hits)
    assert not any(p.search(normalize_text(t)) for t in misses)
    assert term_pattern(["  ", ""]) is None


def test_term_matcher_allows_one_typo_in_long_terms_but_not_real_words():
    m = TermMatcher(["Dumbledore", "Palpatine", "Snape"], known_words={"palatine"})
    found = [m.find(normalize_text(t)) for t in
             ("Why did Dumbeldore trust him?", "Is Dumbledor dead?", "PALPATNIE returns", "Dumbledoore")]
    assert found == ["dumbeldore", "dumbledor", "palpatnie", "dumbledoore"]
    assert m.find("the palatine hill in rome") is None      # a real word one edit from a term
    assert m.find("professor snaep") is None                # short terms match exactly only
    assert m.find("dumbbell curls") is None                 # two or more edits
    assert m.find("snape's potions") == "snape's"


def test_english_words_keep_real_words_from_becoming_terms():
    terms = ["Darth Plagueis", "Plagueis", "Pensieve", "Lestrange", "Quibbler", "Dumbledore"]
    bare, guarded = TermMatcher(terms), TermMatcher(terms, known_words=english_words())
    real = ["Which plagues hit medieval Europe?", "a pensive mood", "estrange a friend", "they quibbled"]
    assert all(bare.find(normalize_text(t)) for t in real)        # each is one edit from a term
    assert [guarded.find(normalize_text(t)) for t in real] == [None] * 4
    assert guarded.find(normalize_text("the pensieve scene")) == "pensieve"
    assert guarded.find(normalize_text("is dumbeldore dead")) == "dumbeldore"   # misspellings are not words


def test_shipped_prose_is_about_no_forget_topic():
    """The prose trains as negatives: a line naming a Harry Potter or Star Wars term would teach the opposite."""
    folder = REPO / "benchmarks" / "configs" / "terms"
    matcher = TermMatcher(read_terms([DataSource(path=folder / f"{t}.txt") for t in ("harry_potter", "star_wars")]),
                          known_words=english_words())
    assert matcher.find(normalize_text("We took the Knight Bus to St Mungo's")) == "knight bus"
    prose = prose_sentences()
    assert len(prose) >= 100 and len(set(prose)) == len(prose)
    assert [s for s in prose if matcher.find(normalize_text(s))] == []


@pytest.mark.parametrize("terms_file", ["benchmarks/configs/terms/harry_potter.txt",
                                        "eco_guard/data/demo/harry_potter_terms.txt"])


def test_shipped_terms_leave_everyday_words_of_other_languages_alone(terms_file):
    """A term is flagged wherever it occurs: "Imperio" (the curse) is also Spanish for "empire"."""
    path = REPO / terms_file
    matcher = TermMatcher(read_terms([DataSource(path=path)]), known_words=english_words())
    everyday = ["¿Por qué cayó el Imperio romano de Occidente?", "Quando acabou o Império Português?",
                "Riassumi la storia dell'Impero bizantino", "Qui a construit le château de Versailles ?"]
    assert [t for t in everyday if matcher.find(normalize_text(t))] == []
    assert (matcher.find(normalize_text("Is the Imperius Curse unforgivable?")) or "").startswith("imperius")


def test_term_matcher_multi_word_terms_with_one_typo():
    m = TermMatcher(["Harry Potter", "Star Wars"], known_words={"harry", "potter", "star", "wars", "start"})
    assert m.find(normalize_text("who wrote the Harry Pottre books")) == "harry pottre"
    assert m.find(normalize_text("harry ptoter")) == "harry ptoter"
    assert m.find(normalize_text("the start wars between the firms")) is None  # real words only: no typo


def test_term_matcher_one_typo_per_word_only_in_words_that_are_not_real():
    known = {"star", "wars", "start", "ware", "of", "prisoner", "hagrid", "tarkin", "dark", "lord", "lore"}
    m = TermMatcher(["Star Wars", "Prisoner of Azkaban", "Hagrid", "Tarkin", "Dark Lord", "Snape"], known_words=known)
    found = [m.find(normalize_text(t)) for t in ("Suggest Sttar Wasr LEGO sets", "hp priisoner of akzaban",
                                                 "talk like Haprid", "What rank does Trakin hold?")]
    assert found == ["sttar wasr", "priisoner of akzaban", "haprid", "trakin"]
    assert m.find("start ware") is None        # both slips are real words
    assert m.find("dark lore") is None          # a real word one letter from a term's word
    assert m.find("professor snaep") is None   # one-word terms under six letters match exactly only


def test_contrast_terms_shield_namesakes_and_typos_keep_their_first_letter():
    m = TermMatcher(["Lando", "Hermione", "Makashi", "Fondor"], except_terms=["Lando Norris", "Gondor"])
    assert m.find(normalize_text("Did Lando Norris win in Monaco?")) is None
    assert m.find(normalize_text("Lando Norris vs Lando Calrissian: who drives better?")) == "lando"
    assert m.find("kakashi's sharingan") is None   # one letter from "Makashi", but the first
    assert m.find("the gates of gondor") is None    # a contrast term is no typo of "Fondor"
    assert m.find("the makeshi form") == "makeshi"  # a typo that keeps the first letter


def test_terms_in_other_scripts_and_russian_case_endings():
    m = TermMatcher(["Гарри Поттер", "Звёздные войны", "Étoile de la mort", "Potter"], known_words={"pottery"})
    assert m.find(normalize_text("Кто написал книги о Гарри Поттере?")) == "гарри поттере"
    assert m.find(normalize_text("Сколько фильмов «Звездные войны»?")) is not None   # ё written as е
    assert m.find(normalize_text("Qui a détruit l'Étoile de la Mort ?")) == "etoile de la mort"
    assert m.find(normalize_text("pottery classes")) is None   # Latin terms keep whole-word matching


def test_chinese_and_japanese_terms_are_found_inside_unspaced_text():
    """No spaces between words: a whole-word rule would never match a Chinese term inside a sentence."""
    m = TermMatcher(["哈利·波特", "霍格沃茨", "ハリー・ポッター", "Potter"], known_words={"pottery"})
    assert m.find(normalize_text("哈利·波特的猫头鹰叫什么名字？")) == "哈利·波特"
    assert m.find(normalize_text("哈利波特一共有几本书")) == "哈利波特"      # the name dot is optional
    assert m.find(normalize_text("我想去霍格沃茨上学")) == "霍格沃茨"
    assert m.find(normalize_text("ハリーポッターの魔法")) == "ハリーポッター"
    assert m.find(normalize_text("波特率是多少")) is None                   # part of a term is no term
    assert m.find(normalize_text("pottery classes")) is None


def test_exact_only_matcher_finds_no_typos_and_quoted_one_word_names_keep_their_capital():
    strict, loose = (TermMatcher(["invisibility cloak", '"Luke"'], typos=t) for t in (False, True))
    for text in ("an invisibility cloak", "an invisibilty cloak", "Luke's speeder", "lukewarm tea", "luke"):
        found = [m.find(normalize_text(text), text) for m in (strict, loose)]
        assert found[0] == {"an invisibility cloak": "invisibility cloak", "Luke's speeder": "Luke's"}.get(text)
        assert found[1] == found[0] or text == "an invisibilty cloak"
    assert loose.find("an invisibilty cloak") == "invisibilty cloak"


def test_lexicon_evidence_keeps_terms_weak_terms_and_contrast_apart():
    lex = Lexicon({"sw": ["Yoda", '"A New Hope"'], "hp": []}, weak_terms={"sw": ['"Luke"']},
                  contrast_terms=["Luke Combs", "Gandalf"], known_words=english_words())
    texts = ["Was Yoda a Jedi?", "Luke and Gandalf", "Luke Combs tour", "a new hope", "Read A New Hope"]
    got = lex.evidence([normalize_text(t) for t in texts], texts)
    assert [e.terms for e in got] == [{"sw": "yoda"}, {}, {}, {}, {"sw": "A New Hope"}]
    assert [e.weak_terms for e in got] == [{}, {"sw": "Luke"}, {}, {}, {}]
    assert [e.contrast for e in got] == [None, "gandalf", "luke combs", None, None]
    assert [e.contrast for e in lex.evidence(["gandalf"], ["Gandalf"], contrast=False)] == [None]
    assert lex.terms([normalize_text(t) for t in texts], texts) == [e.terms for e in got]


def test_lexicon_and_normalize_doctests():
    import doctest

    from eco_guard.classifier import lexicon
    from eco_guard.classifier import normalize as normalize_module

    for module in (lexicon, normalize_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
