"""The classifier as a whole: the model's probabilities, the lexicon's evidence and the decision, kept apart."""

from __future__ import annotations

import random

import pytest
from tiny import NEG, POS, train

from eco_guard.classifier import Classification, PromptClassifier, support


def test_classify_fields_follow_thresholds(tiny_classifier):
    clf = tiny_classifier
    texts = POS["wizards"][:3] + POS["space"][:3] + NEG[:3]
    for verdict, probabilities in zip(clf.classify(texts), clf.score(texts)):
        assert isinstance(verdict, Classification)
        assert verdict.scores == probabilities and set(verdict.scores) == {"wizards", "space"}
        assert verdict.thresholds == clf.thresholds  # no term, weak term or contrast name in these
        over = tuple(t for t, s in verdict.scores.items() if s >= clf.thresholds[t])
        assert verdict.flagged == bool(over) and verdict.flagged_topics == over
        if verdict.flagged:
            assert verdict.topic in over and verdict.score == verdict.scores[verdict.topic] == verdict.probability
        else:
            assert verdict.topic is None and verdict.score == max(verdict.scores.values()) == verdict.probability


def test_terms_flag_on_their_own_keep_the_models_probability_and_are_saved(tiny_encoder, tmp_path):
    clf = train(tiny_encoder, terms={"space": ["Millennium Falcon"]})
    text = "How do I cook rice and beans on the millennium-falcon for dinner"
    plain = train(tiny_encoder)
    assert plain.score([text])[0]["space"] < 0.9  # random tiny encoder: only the term can make it certain
    verdict = clf.classify([text])[0]
    assert (verdict.flagged, verdict.topic, verdict.score) == (True, "space", 1.0)  # the term's support
    assert verdict.terms == {"space": "millennium-falcon"} and verdict.flagged_topics[-1] == "space"
    assert verdict.scores == clf.score([text])[0] and verdict.probability < 1.0  # the model's, untouched
    assert clf.matched_terms([text, NEG[0]]) == [{"space": "millennium-falcon"}, {}]
    clf.save_pretrained(tmp_path / "clf")
    again = PromptClassifier.from_pretrained(tmp_path / "clf")
    assert again.terms == {"wizards": [], "space": ["Millennium Falcon"]}
    assert again.classify([text])[0].topic == "space"
    # terms are part of the training data: a change makes the saved model stale
    assert clf.metadata["data_hash"] != plain.metadata["data_hash"]


def test_the_hold_out_fnr_counts_a_term_as_support(tiny_encoder, tiny_classifier):
    assert tiny_classifier.metadata["calibration"]["space"]["holdout_fnr"] > 0  # the tiny model alone misses some
    clf = train(tiny_encoder, terms={"space": ["starship"]})  # every space prompt names it
    report = clf.metadata["calibration"]["space"]
    assert report["n_holdout_positives"] > 0 and report["holdout_fnr"] == 0.0
    held_out = POS["space"][:2]  # whichever were held out: each names the term
    assert all(v.score == 1.0 and v.topic == "space" for v in clf.classify(held_out))
    assert support({"space": 0.1, "wizards": 0.2}, {"space": "starship"}) == {"space": 1.0, "wizards": 0.2}


def test_typo_in_a_term_still_flags(tiny_encoder):
    clf = train(tiny_encoder, terms={"space": ["Chewbacca"]})
    assert clf.matched_terms(["cook rice with chewbaca", "cook rice with chew bacon"]) == [{"space": "chewbaca"}, {}]


def test_quoted_terms_match_only_as_capitalised_and_contrast_terms_shield_namesakes(tiny_encoder, tmp_path):
    clf = train(tiny_encoder, contrast_terms=["Lando Norris"],
                terms={"space": ['"A New Hope"', '"The Burrow"', "Chewbacca", "Lando"]})
    found = clf.matched_terms(["Summarize the plot of A New Hope.", "Is there a new hope for bees?",
                               "A NEW HOPE", "Chewbacca", "Who lives at the Burrow?", "Rabbits dig the burrow",
                               "Did Lando Norris win?", "Lando's cape"])
    assert found == [{"space": "A New Hope"}, {}, {}, {"space": "chewbacca"}, {"space": "the Burrow"}, {}, {},
                     {"space": "lando's"}]
    clf.save_pretrained(tmp_path / "clf")
    saved = PromptClassifier.from_pretrained(tmp_path / "clf")
    assert saved.matched_terms(["Did Lando Norris win?", "Summarize A New Hope"]) == [{}, {"space": "A New Hope"}]
    [verdict] = clf.classify(["Summarize the plot of A New Hope."])
    assert verdict.flagged and verdict.topic == "space" and verdict.score == 1.0
    from eco_guard.classifier.augment import term_prompts
    prompts = term_prompts(['"A New Hope"', "Chewbacca"], random.Random(0), per_term=3)
    assert len(prompts) == 3 and all("Chewbacca" in p for p in prompts)


def test_a_contrast_name_raises_the_bar_for_topics_without_a_term(tiny_encoder, tmp_path):
    clf = train(tiny_encoder, decision={"contrast_threshold": 0.999}, contrast_terms=["Gandalf"],
                terms={"wizards": ["Merlin"]})
    clf.recalibrate(thresholds={"wizards": 1e-6, "space": 1.0})  # every prompt reaches the plain threshold
    prompt = POS["wizards"][0]
    plain, named = clf.classify([prompt, f"{prompt} Gandalf"])
    assert plain.flagged and plain.contrast is None
    assert named.contrast == "gandalf" and not named.flagged   # ...but not at 0.999 next to a contrast name
    assert named.scores["wizards"] < 0.999
    with_term = clf.classify(["Merlin and Gandalf"])[0]
    assert with_term.flagged and with_term.topic == "wizards"  # a topic term still decides
    clf.save_pretrained(tmp_path / "clf")
    assert PromptClassifier.from_pretrained(tmp_path / "clf").classify([f"{prompt} Gandalf"])[0].flagged is False
    # without a contrast threshold a contrast name is not evidence: not even reported
    clf.decision = clf.decision.model_copy(update={"contrast_threshold": None})
    assert clf.classify([f"{prompt} Gandalf"])[0].contrast is None


def test_a_weak_term_lowers_the_bar_unless_a_contrast_name_is_there_too(tiny_encoder, tmp_path):
    clf = train(tiny_encoder, decision={"weak_term_threshold": 1e-6, "contrast_threshold": 0.999},
                contrast_terms=["Gandalf", "Luke Combs"], weak_terms={"space": ['"Luke"', "droid"]})
    clf.recalibrate(thresholds={"wizards": 1.0, "space": 1.0})  # nothing reaches the plain threshold
    prompts = ["Dinner plans tonight", "Dinner plans with Luke tonight", "dinner plans with luke", "a droid for dinner",
               "Dinner with Luke and Gandalf", "Luke Combs dinner tour"]
    got = clf.classify(prompts)
    assert [c.flagged for c in got] == [False, True, False, True, False, False]
    assert got[1].topic == "space" and got[1].weak_terms == {"space": "Luke"} and got[1].terms == {}
    assert got[1].scores == pytest.approx(clf.score([prompts[1]])[0])  # the encoder's score: only the bar moved
    assert got[4].weak_terms == {"space": "Luke"} and got[4].contrast == "gandalf"
    assert got[5].weak_terms == {}  # "Luke Combs" is a contrast name: it shields its "Luke"
    assert got[1].thresholds == {"wizards": 1.0, "space": 1e-6} and got[4].thresholds["space"] == 1.0
    from eco_guard.eval.classifier_report import EvalRow, evaluate
    report = evaluate(clf, [EvalRow(prompts[1], "space", {}), EvalRow(prompts[0], "space", {})])
    assert report["topics"]["space"]["false_negatives"] == 1  # the evaluation counts the lowered bar
    clf.save_pretrained(tmp_path / "clf")
    assert [c.flagged for c in PromptClassifier.from_pretrained(tmp_path / "clf").classify(prompts)] == \
        [c.flagged for c in got]
