"""The decision policy: calibration and how evidence moves thresholds (eco_guard.classifier.policy)."""

from __future__ import annotations

import numpy as np
import pytest

from eco_guard.classifier import (
    Classification,
    DecisionPolicy,
    DecisionSettings,
    Evidence,
    calibrate,
    conformal_threshold,
)
from eco_guard.errors import DataError


def test_conformal_threshold_meets_fpr_target_on_fresh_negatives():
    rng = np.random.default_rng(0)
    target = 0.01
    fprs = []
    for _ in range(200):
        calibration = rng.beta(2, 8, size=300)
        fresh = rng.beta(2, 8, size=2000)
        threshold = conformal_threshold(calibration, target)
        fprs.append(float((fresh >= threshold).mean()))
        assert (calibration >= threshold).mean() <= target
    # The guarantee is on average over calibration draws: E[FPR] <= target.
    assert np.mean(fprs) <= target
    assert np.mean(fprs) > target / 3  # and not absurdly conservative


def test_conformal_threshold_order_statistic_and_small_sets():
    scores = [i / 100 for i in range(100)]  # n = 100, target 0.05 -> k = ceil(101 * 0.95) = 96 -> 0.95
    threshold = conformal_threshold(scores, 0.05)
    assert 0.95 < threshold < 0.9500001
    with pytest.warns(UserWarning, match="too few"):
        assert conformal_threshold([0.2, 0.4], 0.01) > 0.4
    with pytest.raises(DataError):
        conformal_threshold([], 0.01)


def test_calibrate_reports_fnr_and_honours_fixed_thresholds():
    scores = {"negatives": {"a": [0.1] * 90 + [0.3] * 9 + [0.9], "b": [0.0] * 100},
              "positives": {"a": [0.2, 0.5, 0.95, 0.99], "b": []}}
    thresholds, report = calibrate(scores, {"a": 0.05, "b": 0.05}, {"b": 0.7})
    assert 0.3 < thresholds["a"] < 0.31
    assert report["a"]["holdout_fnr"] == pytest.approx(0.25)
    assert report["a"]["calibration_fpr"] <= 0.05
    assert thresholds["b"] == 0.7 and report["b"]["source"] == "fixed" and report["b"]["holdout_fnr"] is None


def test_a_term_supports_its_topic_at_one_in_the_largest_margin_rule():
    policy = DecisionPolicy(DecisionSettings())
    thresholds = {"a": 0.5, "b": 0.99}
    # "b" is named by a term: support 1.0 beats a's 0.9, although the model prefers "a"
    v = policy.decide({"a": 0.9, "b": 0.2}, Evidence(terms={"b": "x"}), thresholds)
    assert (v.flagged, v.topic, v.score, v.flagged_topics) == (True, "b", 1.0, ("a", "b"))
    assert v.scores == {"a": 0.9, "b": 0.2} and v.probability == 0.2 and v.terms == {"b": "x"}
    # the margin is taken in logit space: 0.999 over 0.99 beats 0.8 over 0.5
    v = policy.decide({"a": 0.8, "b": 0.999}, Evidence(), thresholds)
    assert v.topic == "b" and v.flagged_topics == ("a", "b")
    # not flagged: the best-supported topic's score
    v = policy.decide({"a": 0.1, "b": 0.3}, Evidence(), thresholds)
    assert (v.flagged, v.topic, v.score, v.flagged_topics) == (False, None, 0.3, ())


def test_a_threshold_over_one_is_not_reached_even_by_a_term():
    # a calibration negative at probability 1.0 puts the conformal threshold just above 1
    v = DecisionPolicy(DecisionSettings()).decide({"a": 0.2}, Evidence(terms={"a": "x"}), {"a": 1.0000000000000002})
    assert not v.flagged and v.score == 1.0


def test_contrast_and_weak_terms_move_the_threshold():
    policy = DecisionPolicy(DecisionSettings(contrast_threshold=0.9, weak_term_threshold=0.6))
    own = {"a": 0.7, "b": 0.7}
    assert policy.decide({"a": 0.8, "b": 0.8}, Evidence(contrast="gandalf"), own).thresholds == {"a": 0.9, "b": 0.9}
    both = policy.decide({"a": 0.8, "b": 0.8}, Evidence(terms={"a": "x"}, contrast="gandalf"), own)
    assert both.thresholds == {"a": 0.7, "b": 0.9} and both.flagged_topics == ("a",) and both.contrast == "gandalf"
    weak = policy.decide({"a": 0.65, "b": 0.65}, Evidence(weak_terms={"b": "luke"}), own)
    assert weak.thresholds == {"a": 0.7, "b": 0.6} and weak.topic == "b"
    shielded = policy.decide({"a": 0.65, "b": 0.65}, Evidence(weak_terms={"b": "luke"}, contrast="gandalf"), own)
    assert shielded.thresholds == {"a": 0.9, "b": 0.9} and not shielded.flagged
    # without a contrast threshold a contrast name moves nothing and is not reported
    plain = DecisionPolicy(DecisionSettings()).decide({"a": 0.8}, Evidence(contrast="gandalf"), {"a": 0.7})
    assert plain.flagged and plain.contrast is None


def test_classification_keeps_its_positional_fields():
    v = Classification(True, "a", 0.9, {"a": 0.9})
    assert v.terms == v.weak_terms == v.thresholds == {} and v.contrast is None and v.flagged_topics == ()


def test_policy_doctests():
    import doctest

    from eco_guard.classifier import policy

    result = doctest.testmod(policy)
    assert result.attempted > 0 and result.failed == 0
