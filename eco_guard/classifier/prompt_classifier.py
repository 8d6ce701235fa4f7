"""The prompt classifier: which forget topic, if any, a prompt is about.

Three parts, each in its module: the encoder's probability per topic
(:mod:`~eco_guard.classifier.encoder`), the lexicon's evidence, i.e. the terms, weak terms and
contrast terms a prompt names (:mod:`~eco_guard.classifier.lexicon`), and the decision policy
that weighs both against calibrated thresholds (:mod:`~eco_guard.classifier.policy`). A
:class:`~eco_guard.classifier.policy.Classification` keeps them apart: ``scores`` are the
model's probabilities, the evidence sits beside them, and ``flagged``/``topic`` are the decision.

Robustness: prompts are normalised (:mod:`~eco_guard.classifier.normalize`), long prompts are
scored as overlapping token windows, and training adds evasive variants
(:mod:`~eco_guard.classifier.augment`) of positives and negatives alike.

Example:
    >>> clf = PromptClassifier.train(  # doctest: +SKIP
    ...     {"star_wars": ["Who trained Luke Skywalker?", ...]}, ["How do I boil an egg?", ...])
    >>> clf.classify(["What colour is Mace Windu's lightsaber?"])[0].topic  # doctest: +SKIP
    'star_wars'
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from eco_guard.classifier.data import TrainingData, data_hash
from eco_guard.classifier.encoder import Encoder, load_encoder
from eco_guard.classifier.lexicon import Lexicon, english_words
from eco_guard.classifier.normalize import normalize_text
from eco_guard.classifier.persistence import (
    FORMAT_VERSION,
    folder_lock,
    is_saved,
    read_folder,
    stale_keys,
    swap_in,
    write_folder,
)
from eco_guard.classifier.policy import Classification, DecisionPolicy, calibrate, support
from eco_guard.classifier.training import fit, keep_lowest_layers
from eco_guard.config import DecisionSettings, TrainingSettings
from eco_guard.errors import ClassifierError, ConfigError, InputError

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from eco_guard.classifier.encoder import TopicNet
    from eco_guard.config import GuardConfig

__all__ = ["PromptClassifier"]


class PromptClassifier:
    """Scores prompts against forget topics and decides, with thresholds calibrated per topic.

    Build one with :meth:`train`, :meth:`from_config` or :meth:`from_pretrained`.
    Inference (:meth:`score`, :meth:`classify`) touches no shared mutable state, so one
    instance can serve many threads.

    Attributes:
        topics: the topics, in the model's order.
        thresholds: the calibrated threshold per topic.
        decision: the :class:`~eco_guard.config.DecisionSettings` in force; assigning new ones
            re-decides (and re-derives thresholds from the stored calibration scores) at once.
        encoder: the :class:`~eco_guard.classifier.encoder.Encoder` giving the model's probabilities.
        lexicon: the :class:`~eco_guard.classifier.lexicon.Lexicon` finding terms in prompts.

    Example:
        >>> clf = PromptClassifier.from_pretrained("benchmarks/results/classifier/model")  # doctest: +SKIP
        >>> clf.classify(["Who killed Dumbledore?", "How do I boil an egg?"])  # doctest: +SKIP
        [Classification(flagged=True, topic='harry_potter', ...), Classification(flagged=False, ...)]
    """

    def __init__(self, st: SentenceTransformer, net: TopicNet, topics: list[str], thresholds: dict[str, float],
                 metadata: dict[str, Any], calibration: dict[str, Any],
                 decision: DecisionSettings | Mapping[str, Any] | None = None) -> None:
        self.topics = list(topics)
        self.thresholds = dict(thresholds)
        self.metadata = metadata
        self._calibration = calibration
        self.encoder = Encoder(st, net, window_tokens=int(metadata["window_tokens"]),
                               quantize=bool(metadata.get("quantize", False)))
        self.terms: dict[str, list[str]] = {t: list(metadata.get("terms", {}).get(t, [])) for t in self.topics}
        # Typo matching skips real words: an English dictionary plus the encoder's whole-word vocabulary.
        known: frozenset[str] = frozenset()
        if any(self.terms.values()):
            known = english_words() | {w for w in self.encoder.windows.tokenizer.get_vocab() if w.isalpha()}
        weak = {t: v for t, v in metadata.get("weak_terms", {}).items() if v and t in self.topics}
        # Contrast terms are names of other things: a topic term inside one ("Hermione Lee") does not count.
        self.lexicon = Lexicon(self.terms, weak_terms=weak, contrast_terms=list(metadata.get("contrast_terms", [])),
                               known_words=known)
        self._policy = DecisionPolicy(_saved_decision(metadata))
        self.decision = DecisionSettings.parse(decision) if decision is not None else self._policy.settings

    @property
    def decision(self) -> DecisionSettings:
        """The decision settings in force (the config's ``classifier.decision``, or the saved ones)."""
        return self._policy.settings

    @decision.setter
    def decision(self, settings: DecisionSettings) -> None:
        _check_stride(settings, int(self.metadata["window_tokens"]))
        floor_moved = settings.min_threshold != self._policy.settings.min_threshold
        self._policy = DecisionPolicy(settings)
        self.metadata["decision"] = settings.model_dump()
        report = self.metadata.get("calibration")
        if floor_moved and self._calibration and report:  # thresholds follow a new floor at once
            self.recalibrate({t: r["target_fpr"] for t, r in report.items()},
                             {t: r["threshold"] for t, r in report.items() if r["source"] == "fixed"})

    # ------------------------------------------------------------------ building

    @classmethod
    def train(cls, positives: Mapping[str, Sequence[str]], negatives: Sequence[str], *, encoder: str = "default",
              settings: TrainingSettings | Mapping[str, Any] | None = None,
              decision: DecisionSettings | Mapping[str, Any] | None = None, progress: bool = True,
              max_false_positive_rate: float | Mapping[str, float] = 0.01,
              thresholds: Mapping[str, float | None] | None = None,
              terms: Mapping[str, Sequence[str]] | None = None,
              contrast_terms: Sequence[str] = (),
              train_only_positives: Mapping[str, Sequence[str]] | None = None,
              train_only_negatives: Sequence[str] = (),
              weak_terms: Mapping[str, Sequence[str]] | None = None) -> PromptClassifier:
        """Fine-tune (or fit a frozen-encoder head), then calibrate thresholds on held-out negatives.

        Args:
            positives: prompts per topic (the topic order is the model's).
            negatives: prompts about none of the topics; a fraction is held out for calibration.
            encoder: "default" (packaged all-MiniLM-L6-v2) or a sentence-transformers folder.
            settings: :class:`~eco_guard.config.TrainingSettings` or a mapping of its fields.
            decision: :class:`~eco_guard.config.DecisionSettings` or a mapping of its fields.
            progress: show progress bars.
            max_false_positive_rate: target per topic (one number for all, or a mapping).
            thresholds: fixed thresholds that override calibration for some topics.
            terms: per topic, names that alone flag a prompt (whole-word match after
                normalisation); training also learns them from prompts built around each.
            contrast_terms: names that are about no topic (neighbouring works, namesakes);
                training adds negative prompts built around each, with the same templates.
            train_only_positives: per topic, prompts that always train (never held out to report the FNR).
            train_only_negatives: negatives that always train (never held out to calibrate): curated
                hard cases that would otherwise set the false-positive budget of ordinary traffic.
            weak_terms: per topic, ambiguous names (Luke, Empire) that lower its threshold to
                ``decision.weak_term_threshold`` in a prompt that names one (they do not train).

        Raises:
            ConfigError: unknown or invalid training or decision settings.
            DataError: a topic without prompts, or too few negatives to calibrate.
        """
        s = TrainingSettings.parse(settings)
        d = DecisionSettings.parse(decision)
        _check_stride(d, s.window_tokens)  # before the training it would waste
        terms = {t: list(dict.fromkeys((terms or {}).get(t, []))) for t in positives}
        weak_terms = {t: list(dict.fromkeys((weak_terms or {}).get(t, []))) for t in positives}
        st, net = load_encoder(encoder, len(positives))
        keep_lowest_layers(net.transformer, s.encoder_layers)
        contrast_terms = list(dict.fromkeys(contrast_terms))
        extra_pos, extra_neg = dict(train_only_positives or {}), list(train_only_negatives)
        windows = Encoder(st, net, window_tokens=s.window_tokens).windows
        result = fit(net, windows, positives, negatives, s, progress=progress, terms=terms,
                     contrast_terms=contrast_terms, train_only_positives=extra_pos, train_only_negatives=extra_neg)
        metadata = {
            "format_version": FORMAT_VERSION, "encoder": encoder, "pooling": net.pooling, "normalize": net.normalize,
            "window_tokens": s.window_tokens, "quantize": s.quantize, "settings": s.model_dump(),
            "terms": terms, "contrast_terms": contrast_terms, "weak_terms": weak_terms,
            "data_hash": data_hash(positives, negatives, terms, contrast_terms, extra_pos, extra_neg, weak_terms),
            "train_seconds": result.seconds, "training_losses": result.losses, "n_train_examples": result.n_examples,
            "training_precision": result.precision,
        }
        clf = cls(st, net, list(positives), dict.fromkeys(positives, 1.0), metadata, {}, decision=d)
        clf.metadata["term_hits_in_negatives"] = clf._term_hits_in([*negatives, *extra_neg])
        # Thresholds come from the encoder's probabilities alone (a term supports its topic at 1.0 whatever
        # the threshold); the hold-out FNR is that of the whole classifier, terms included.
        neg = clf._probabilities(result.calibration_negatives)
        clf._calibration = {
            "negatives": {t: neg[:, i].tolist() for i, t in enumerate(clf.topics)},
            "positives": {t: [s[t] for s in clf._support(p)] if p else [] for t, p in result.holdout_positives.items()},
        }
        clf.recalibrate(max_false_positive_rate, thresholds)
        return clf

    @classmethod
    def from_config(cls, cfg: GuardConfig, *, train_if_missing: bool = True, progress: bool = True,
                    retrain: bool = False) -> PromptClassifier:
        """Load the classifier at ``cfg.classifier.path``, or train and save it there if missing or stale.

        Stale means the training data, training settings, encoder or topics changed (compared
        by hash). A changed false-positive target, fixed threshold or ``classifier.decision``
        setting only re-decides: nothing retrains and the saved folder is left as it is.
        ``retrain`` trains (and saves) even when the saved classifier is up to date.

        Raises:
            ClassifierError: no usable classifier and ``train_if_missing`` is False.
        """
        prefix = f"{cfg.source}: " if cfg.source else ""
        settings = TrainingSettings.parse(cfg.classifier.training, where=f"{prefix}classifier.training")
        decision = DecisionSettings.parse(cfg.classifier.decision, where=f"{prefix}classifier.decision")
        data = TrainingData.from_config(cfg)
        fpr = {t.name: t.max_false_positive_rate for t in cfg.topics}
        fixed = {t.name: t.threshold for t in cfg.topics}
        expected = {"data_hash": data.hash(), "settings": settings.model_dump(),
                    "encoder": cfg.classifier.encoder, "topics": list(data.positives)}
        path = Path(cfg.classifier.path)
        # One process trains, the others wait and then load its result (e.g. several server workers
        # starting at once on an empty cache); the folder is swapped in whole, never seen half-written.
        with folder_lock(path):
            if is_saved(path) and not retrain:
                clf = cls.from_pretrained(path, decision=decision)
                stale = stale_keys(clf.metadata, expected)
                if not stale or (not train_if_missing and clf.topics == expected["topics"]):
                    if stale:
                        warnings.warn(f"{path}: classifier is stale ({', '.join(stale)} changed); "
                                      f"run `eco-guard train` to retrain", stacklevel=2)
                    clf.recalibrate(fpr, fixed)
                    return clf
            if not train_if_missing:
                raise ClassifierError(f"{path}: no trained classifier for these topics; "
                                      f"run `eco-guard train {cfg.source or 'CONFIG'}`")
            clf = cls.train(data.positives, data.negatives, encoder=cfg.classifier.encoder, settings=settings,
                            decision=decision, progress=progress, max_false_positive_rate=fpr, thresholds=fixed,
                            terms=data.terms, contrast_terms=data.contrast_terms,
                            train_only_positives=data.train_only_positives,
                            train_only_negatives=data.train_only_negatives, weak_terms=data.weak_terms)
            swap_in(clf.save_pretrained, path)
            return clf

    def recalibrate(self, max_false_positive_rate: float | Mapping[str, float] = 0.01,
                    thresholds: Mapping[str, float | None] | None = None) -> None:
        """Recompute thresholds from the stored calibration scores (no retraining).

        Example:
            >>> clf.recalibrate({"harry_potter": 0.005})  # doctest: +SKIP
        """
        targets = {t: float(max_false_positive_rate if isinstance(max_false_positive_rate, (int, float))
                            else max_false_positive_rate.get(t, 0.01)) for t in self.topics}
        fixed = {t: v for t, v in (thresholds or {}).items() if v is not None and t in self.topics}
        floor = self.decision.min_threshold
        self.thresholds, report = calibrate(self._calibration, targets, fixed, min_threshold=floor)
        self.metadata["thresholds"] = dict(self.thresholds)
        self.metadata["calibration"] = report

    # ------------------------------------------------------------------ inference

    def score(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """The model's probability per topic for each prompt (max over its token windows; no evidence).

        Example:
            >>> clf.score(["Who is Yoda?"])  # doctest: +SKIP
            [{'harry_potter': 0.0012, 'star_wars': 0.9993}]
        """
        return [dict(zip(self.topics, row.tolist())) for row in self._probabilities(texts)]

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        """Probabilities, evidence and the decision for each prompt (see :mod:`eco_guard.classifier.policy`).

        Example:
            >>> [c.flagged for c in clf.classify(["Who is Yoda?", "Boil an egg"])]  # doctest: +SKIP
            [True, False]
        """
        normalized = _normalized(texts)  # once: the encoder and the lexicon read the same text
        probs = self.encoder.probabilities(normalized, stride=self.decision.window_stride)
        evidence = self.lexicon.evidence(normalized, texts, contrast=self._policy.uses_contrast)
        return [self._policy.decide(dict(zip(self.topics, row.tolist())), ev, self.thresholds)
                for row, ev in zip(probs, evidence)]

    def matched_terms(self, texts: Sequence[str]) -> list[dict[str, str]]:
        """Per prompt, the first topic term found (exactly or one typo away) for each topic that has one.

        Example:
            >>> clf.matched_terms(["Was Yoda a Jedi?", "Boil an egg"])  # doctest: +SKIP
            [{'star_wars': 'yoda'}, {}]
        """
        return self.lexicon.terms(_normalized(texts), texts)

    def _probabilities(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.probabilities(_normalized(texts), stride=self.decision.window_stride)

    def _support(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Per prompt, each topic's support: the model's probability, 1.0 where a topic term occurs."""
        return [support(p, t) for p, t in zip(self.score(texts), self.matched_terms(texts))]

    def _term_hits_in(self, negatives: Sequence[str]) -> list[dict[str, Any]]:
        """Negatives a topic term matches: each is a false positive no threshold can prevent."""
        found_in = zip(negatives, self.matched_terms(negatives))
        hits = [{"text": text, "terms": found} for text, found in found_in if found]
        if hits:
            shown = "; ".join(f"{h['text'][:60]!r} ({', '.join(h['terms'].values())})" for h in hits[:5])
            warnings.warn(f"{len(hits)} negative prompt(s) contain a topic term and will always be flagged: {shown}",
                          stacklevel=3)
        return hits

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, path: str | Path) -> None:
        """Write encoder, head, calibration scores and metadata to ``path`` (a folder)."""
        head = self.encoder.net.head
        write_folder(path, st=self.encoder.st, head={"weight": head.weight, "bias": head.bias},
                     calibration=self._calibration,
                     metadata={**self.metadata, "topics": self.topics, "thresholds": self.thresholds})

    @classmethod
    def from_pretrained(cls, path: str | Path, *,
                        decision: DecisionSettings | Mapping[str, Any] | None = None) -> PromptClassifier:
        """Load a folder written by :meth:`save_pretrained`.

        Args:
            path: the folder.
            decision: decision settings to use instead of the saved ones; thresholds are then
                re-derived from the saved calibration scores and targets.

        Raises:
            ClassifierError: the folder is missing or not a saved classifier.
        """
        saved = read_folder(path)
        meta = saved.metadata
        st, net = load_encoder(str(saved.encoder_dir), len(meta["topics"]))
        net.head.load_state_dict(saved.head)
        return cls(st, net, meta["topics"], meta["thresholds"], meta, saved.calibration, decision=decision)


def _saved_decision(metadata: Mapping[str, Any]) -> DecisionSettings:
    """The decision settings a folder was saved with (older folders kept them among the training settings)."""
    legacy = {k: v for k, v in metadata.get("settings", {}).items() if k in DecisionSettings.model_fields}
    if "window_stride" in metadata:
        legacy.setdefault("window_stride", metadata["window_stride"])
    return DecisionSettings.parse({**legacy, **metadata.get("decision", {})})


def _check_stride(decision: DecisionSettings, window_tokens: int) -> None:
    if decision.window_stride > window_tokens:
        raise ConfigError(f"classifier.decision.window_stride: {decision.window_stride} exceeds the "
                          f"classifier's window_tokens {window_tokens}; windows would skip text")


def _normalized(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InputError("classifier input must be a sequence of strings")
    return [normalize_text(t) for t in texts]
