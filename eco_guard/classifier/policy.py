"""The decision policy: from the model's probabilities and the lexicon's evidence to a verdict.

A topic is flagged when its support reaches the threshold the prompt is held to:

- **support** is the model's probability, or 1.0 when the prompt names one of the topic's
  terms (a term is conclusive, whatever the encoder says);
- the **threshold** is the topic's calibrated one (split-conformal on held-out negatives, see
  :func:`calibrate`, never under ``min_threshold``), raised to ``contrast_threshold`` when the
  prompt names a contrast term and no term of the topic, or lowered to ``weak_term_threshold``
  when it names a weak term of the topic (and no contrast term).

Among flagged topics the one with the largest margin in logit space wins (thresholds close
to 1 make raw differences tiny). None of this is trained: changing a decision setting
re-decides at once.

Example:
    >>> from eco_guard.config import DecisionSettings
    >>> from eco_guard.classifier.lexicon import Evidence
    >>> policy = DecisionPolicy(DecisionSettings(weak_term_threshold=0.6))
    >>> v = policy.decide({"sw": 0.65}, Evidence(weak_terms={"sw": "Luke"}), {"sw": 0.9})
    >>> v.flagged, v.topic, v.scores, v.thresholds
    (True, 'sw', {'sw': 0.65}, {'sw': 0.6})
    >>> v = policy.decide({"sw": 0.01}, Evidence(terms={"sw": "yoda"}), {"sw": 0.9})
    >>> v.flagged, v.score, v.scores    # a term flags; the model's probability is kept as it was
    (True, 1.0, {'sw': 0.01})
    >>> conformal_threshold([i / 100 for i in range(99)], max_fpr=0.05) > 0.93
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from eco_guard.classifier.lexicon import Evidence
from eco_guard.config import DecisionSettings
from eco_guard.errors import DataError

__all__ = ["TERM_SUPPORT", "Classification", "DecisionPolicy", "calibrate", "conformal_threshold", "support"]

TERM_SUPPORT: Final = 1.0
"""The support a topic gets from one of its terms in the prompt: certainty."""


@dataclass(frozen=True)
class Classification:
    """The verdict on one prompt: the model's probabilities, the lexicon's evidence, and the decision.

    Attributes:
        flagged: some topic's support reached the threshold this prompt was held to.
        topic: the flagged topic with the largest margin over its threshold (logit space), else None.
        score: the support of ``topic`` (of the best-supported topic when not flagged): the model's
            probability, or 1.0 when the prompt names one of that topic's terms.
        scores: the model's probability per topic (max over the prompt's token windows), evidence
            left out.
        terms: per topic, the term found in the prompt (such a topic is supported at 1.0).
        contrast: the contrast term found in the prompt, when the policy has a ``contrast_threshold``
            (topics without a term hit then need that probability), else None.
        weak_terms: per topic, the weak term found (an ambiguous name: the topic then needed only
            ``weak_term_threshold``, unless a contrast term was found too).
        thresholds: per topic, the threshold this prompt was held to (the calibrated one, moved by a
            contrast or weak term).
        flagged_topics: every topic whose support reached its threshold, in topic order (``topic``
            is one of them).

    Example:
        >>> v = Classification(True, "sw", 1.0, {"sw": 0.2}, terms={"sw": "yoda"}, flagged_topics=("sw",))
        >>> v.score, v.probability
        (1.0, 0.2)
    """

    flagged: bool
    topic: str | None
    score: float
    scores: dict[str, float]
    terms: dict[str, str] = field(default_factory=dict)
    contrast: str | None = None
    weak_terms: dict[str, str] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    flagged_topics: tuple[str, ...] = ()

    @property
    def probability(self) -> float:
        """The model's probability of ``topic`` (of its most probable topic when not flagged)."""
        if self.topic is not None:
            return self.scores[self.topic]
        return max(self.scores.values(), default=0.0)


class DecisionPolicy:
    """Turns probabilities, evidence and calibrated thresholds into a :class:`Classification`.

    Args:
        settings: the ``classifier.decision`` block of the config.
    """

    def __init__(self, settings: DecisionSettings) -> None:
        self.settings = settings

    @property
    def uses_contrast(self) -> bool:
        """Whether contrast terms move thresholds (else the lexicon need not look for them)."""
        return self.settings.contrast_threshold is not None

    def threshold_for(self, topic: str, own: float, evidence: Evidence) -> float:
        """The calibrated threshold ``own`` of ``topic``, moved by the names in the prompt."""
        if self.uses_contrast and evidence.contrast is not None:
            # A neighbouring work's name ("Gandalf", "Beatrix Potter") is evidence against a topic the prompt
            # names no term of, which the encoder alone cannot weigh.
            return own if topic in evidence.terms else max(own, self.settings.contrast_threshold)
        # An ambiguous name of the topic ("Luke", "the Empire") is weak evidence for it.
        return min(own, self.settings.weak_term_threshold) if topic in evidence.weak_terms else own

    def decide(self, probabilities: Mapping[str, float], evidence: Evidence,
               thresholds: Mapping[str, float]) -> Classification:
        """The verdict on one prompt, given the model's probability per topic (in topic order)."""
        limits = {t: self.threshold_for(t, thresholds[t], evidence) for t in probabilities}
        backed = support(probabilities, evidence.terms)
        flagged = tuple(t for t in probabilities if backed[t] >= limits[t])
        contrast = evidence.contrast if self.uses_contrast else None
        topic = max(flagged, key=lambda t: _logit(backed[t]) - _logit(limits[t])) if flagged else None
        best = topic if topic is not None else max(probabilities, key=backed.__getitem__)
        return Classification(bool(flagged), topic, backed[best], dict(probabilities), dict(evidence.terms),
                              contrast, dict(evidence.weak_terms), limits, flagged)


def support(probabilities: Mapping[str, float], terms: Mapping[str, str]) -> dict[str, float]:
    """Per topic, the model's probability, or 1.0 where the prompt names one of the topic's terms.

    Example:
        >>> support({"a": 0.2, "b": 0.3}, {"b": "yoda"})
        {'a': 0.2, 'b': 1.0}
    """
    return {t: TERM_SUPPORT if t in terms else p for t, p in probabilities.items()}


def conformal_threshold(negative_scores: Sequence[float], max_fpr: float) -> float:
    """Smallest threshold that keeps the false-positive rate of new negatives at most ``max_fpr``.

    Split-conformal: with ``n`` held-out negative scores, flag a score above the
    ``k = ceil((n + 1)(1 - max_fpr))``-th smallest; for a new negative exchangeable with
    them, P(flagged) <= max_fpr. A prompt is flagged when ``score >= threshold``, so the
    returned threshold is the next float above that order statistic.
    """
    n = len(negative_scores)
    if n == 0:
        raise DataError("no calibration negatives: cannot calibrate a threshold")
    ordered = sorted(float(v) for v in negative_scores)
    k = math.ceil((n + 1) * (1 - max_fpr))
    if k > n:
        warnings.warn(f"{n} calibration negatives are too few to guarantee a false-positive rate of {max_fpr} "
                      f"(need {math.ceil(1 / max_fpr) - 1}); using the largest score", stacklevel=2)
        k = n
    return float(np.nextafter(ordered[k - 1], np.inf))


def calibrate(scores: Mapping[str, Mapping[str, Sequence[float]]], targets: Mapping[str, float],
              fixed: Mapping[str, float], *, min_threshold: float = 0.0) -> tuple[dict[str, float], dict[str, Any]]:
    """Thresholds per topic, and a report with the calibration FPR and hold-out FNR at each.

    Args:
        scores: ``{"negatives": {topic: [...]}, "positives": {topic: [...]}}`` held-out scores.
        targets: max false-positive rate per topic.
        fixed: thresholds that override calibration.
        min_threshold: floor under calibrated thresholds.
    """
    thresholds: dict[str, float] = {}
    report: dict[str, Any] = {}
    for topic, target in targets.items():
        neg = np.asarray(scores["negatives"][topic], dtype=np.float64)
        pos = np.asarray(scores.get("positives", {}).get(topic, []), dtype=np.float64)
        if topic in fixed:
            thr, source = float(fixed[topic]), "fixed"
        else:
            thr, source = max(conformal_threshold(neg, target), min_threshold), "calibrated"
        thresholds[topic] = thr
        report[topic] = {
            "threshold": thr, "source": source, "target_fpr": target, "n_negatives": int(neg.size),
            "calibration_fpr": float((neg >= thr).mean()),
            "n_holdout_positives": int(pos.size),
            "holdout_fnr": float((pos < thr).mean()) if pos.size else None,
        }
    return thresholds, report


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))
