"""Training and calibration of the prompt classifier (used by :mod:`eco_guard.classifier`).

``fit`` splits the data (negatives: train / calibration; positives: train / hold-out),
augments the training part, fits the head on frozen embeddings, then (by default)
fine-tunes encoder and head together. ``calibrate`` turns held-out negative scores into
per-topic thresholds by split-conformal quantiles.

Example:
    >>> conformal_threshold([0.1, 0.2, 0.3, 0.4], max_fpr=0.25) > 0.4
    True
    >>> conformal_threshold([i / 100 for i in range(99)], max_fpr=0.05) > 0.93
    True
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn
from tqdm.auto import tqdm

from eco_guard.augment import Augmenter, distinctive_names, prose_sentences, term_prompts
from eco_guard.errors import ConfigError, DataError
from eco_guard.text import english_words

if TYPE_CHECKING:
    from eco_guard.classifier import _Batcher, _Net

__all__ = ["FitResult", "TrainingSettings", "calibrate", "conformal_threshold", "fit", "keep_lowest_layers",
           "resolved_precision"]

_NEGATIVE_GROUP = "\x00negatives"
_HEAD_FIT_LR = 0.02  # full-batch Adam on fixed embeddings: a convex problem, a large step is safe
_HEAD_FIT_L2 = 1e-4
_MAX_GRAD_NORM = 1.0
_WARM_START_EXAMPLES = 1500  # embedding every example for the warm start took 43 s of a 375 s fit


class TrainingSettings(BaseModel):
    """How the classifier is trained (``classifier.training`` in the YAML config).

    Example:
        >>> TrainingSettings.parse({"epochs": 2}).epochs
        2
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    finetune_encoder: bool = Field(True, description="fine-tune the encoder; False trains only the head")
    freeze_embeddings: bool = Field(True, description="keep the token embedding table fixed while fine-tuning "
                                    "(a third of the cost; keeps rare and misspelt sub-words where pre-training put them)")
    frozen_layers: int = Field(0, ge=0, le=100, description=(
        "lowest transformer layers kept fixed while fine-tuning: no backward pass through them "
        "(2 of all-MiniLM-L6-v2's 6 layers: fine-tuning measured 28% faster)"))
    encoder_layers: int | None = Field(None, ge=1, le=100, description=(
        "keep only the lowest N transformer layers of the encoder (None: all); training and scoring "
        "cost fall in proportion, and fine-tuning adapts the shortened encoder (4 of all-MiniLM-L6-v2's 6: "
        "a third less compute)"))
    precision: Literal["auto", "float32", "bfloat16"] = Field("auto", description=(
        "arithmetic of fine-tuning's forward and backward passes (weights, optimiser and scoring stay float32): "
        "bfloat16 autocast was 1.5x faster on a CPU with native bf16 (AVX512-BF16, AMX) and is emulated, slowly, "
        "elsewhere; auto = bfloat16 where the CPU has it"))
    epochs: int = Field(3, ge=0, le=100, description="fine-tuning passes over the augmented training set")
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(5e-5, gt=0, le=1, description="encoder learning rate (AdamW)")
    head_learning_rate: float = Field(2e-3, gt=0, le=10, description="head learning rate")
    head_steps: int = Field(300, ge=0, le=100_000, description="full-batch steps fitting the head on frozen embeddings")
    weight_decay: float = Field(0.01, ge=0, le=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    augment: bool = Field(True, description="add evasive variants (typos, wrappers, burying, code, names)")
    augment_copies: int = Field(2, ge=0, le=50, description="variants per training prompt")
    term_prompts: int = Field(1, ge=0, le=20, description=(
        "training prompts built around each topic term (contrast terms get as many prompts in all as the topics)"))
    joined_negatives: int = Field(200, ge=0, le=100_000, description=(
        "negatives made of 3-8 negative prompts run together: a long prompt is scored window by window, "
        "and a window of unrelated text must not add up to a topic"))
    prose_negatives: int = Field(200, ge=0, le=100_000, description=(
        "negatives made of 4-15 sentences of everyday prose shipped with eco-guard (mail, manuals, news); "
        "long prompts are mostly documents, and the prompts alone would teach nothing about prose; the same "
        "sentences make half the text that buried variants are surrounded with (0 turns both off)"))
    calibration_fraction: float = Field(0.3, gt=0, lt=1, description="negatives held out to calibrate thresholds")
    positive_holdout_fraction: float = Field(0.15, ge=0, lt=1, description="positives held out to report the FNR")
    min_threshold: float = Field(0.5, ge=0, le=1, description=(
        "floor under calibrated thresholds: a confident model puts every calibration negative near 0, "
        "so the conformal quantile can fall far below 0.5, where unseen text (a long prompt's many "
        "windows, typos) crosses it; 0.5 = flag only what the model finds more likely than not"))
    contrast_threshold: float | None = Field(None, ge=0, le=1, description=(
        "threshold for a prompt that names a contrast term and no term of the topic (None: the topic's own): "
        "a neighbouring work's name is evidence against the topic that the encoder alone cannot weigh"))
    weak_term_threshold: float = Field(0.6, ge=0, le=1, description=(
        "threshold for a prompt that names one of a topic's weak_terms (and no contrast term), when lower than "
        "the topic's own: an ambiguous name (Luke, Empire) is evidence for the topic the encoder alone cannot weigh"))
    window_tokens: int = Field(128, ge=8, le=512, description="tokens per scoring window (special tokens included)")
    window_stride: int = Field(64, ge=1, le=512, description="tokens between window starts")
    quantize: bool = Field(False, description="int8 dynamic quantisation of the encoder: 2-3x faster on CPU, but "
                           "activation scales are per batch, so a prompt's score depends on its batch-mates "
                           "(logit shifts up to ~1.6 measured); off by default")
    seed: int = 0

    @classmethod
    def parse(cls, values: Mapping[str, Any] | None, *, where: str = "classifier.training") -> TrainingSettings:
        """Validate a mapping; errors name the key (``ConfigError``)."""
        try:
            settings = cls.model_validate(dict(values or {}))
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            if err["type"] == "extra_forbidden":
                known = ", ".join(cls.model_fields)
                raise ConfigError(f"{where}.{key}: unknown training setting (known: {known})") from None
            raise ConfigError(f"{where}.{key}: {err['msg']} (got {err.get('input')!r})") from None
        if settings.encoder_layers is not None and settings.frozen_layers >= settings.encoder_layers:
            raise ConfigError(f"{where}.frozen_layers: {settings.frozen_layers} would freeze all "
                              f"{settings.encoder_layers} encoder_layers; nothing would fine-tune")
        if settings.window_stride > settings.window_tokens:
            raise ConfigError(f"{where}.window_stride: {settings.window_stride} exceeds window_tokens "
                              f"{settings.window_tokens}; windows would skip text")
        return settings


@dataclass
class FitResult:
    """What ``fit`` leaves for calibration and the metadata."""

    seconds: float
    calibration_negatives: list[str]
    holdout_positives: dict[str, list[str]]
    losses: list[float] = field(default_factory=list)
    n_examples: int = 0
    precision: str = "float32"


def fit(net: _Net, batcher: _Batcher, positives: Mapping[str, Sequence[str]], negatives: Sequence[str],
        s: TrainingSettings, *, progress: bool = True, terms: Mapping[str, Sequence[str]] | None = None,
        contrast_terms: Sequence[str] = (), train_only_positives: Mapping[str, Sequence[str]] | None = None,
        train_only_negatives: Sequence[str] = ()) -> FitResult:
    """Train ``net`` in place. Returns the held-out data and training statistics.

    ``train_only_*`` prompts join training after the hold-out split, and are removed from
    what is held out (a prompt never both trains and calibrates).
    """
    start = time.perf_counter()
    _seed(s.seed)
    # The head was initialised when the encoder loaded, from whatever state the global RNG was in
    # (a second training in one process got another head and another model): start it from the seed.
    net.head.reset_parameters()
    rng = random.Random(s.seed)
    train_pos, holdout_pos = _split_positives(positives, s.positive_holdout_fraction, rng)
    train_neg, cal_neg = _split(list(dict.fromkeys(negatives)), s.calibration_fraction, rng)
    train_neg, cal_neg = _add_train_only(train_neg, cal_neg, train_only_negatives)
    for topic in train_pos:
        extra = (train_only_positives or {}).get(topic, ())
        train_pos[topic], holdout_pos[topic] = _add_train_only(train_pos[topic], holdout_pos[topic], extra)
        if not train_pos[topic]:
            raise DataError(f"topic {topic!r} has no training prompts (check its data files and split)")
    if not train_neg or not cal_neg:
        raise DataError(f"need negatives for both training and calibration, got {len(negatives)} "
                        f"(calibration_fraction {s.calibration_fraction})")
    # Term prompts come after the hold-out split (the reported FNR stays on real prompts) and are not
    # augmented: the matcher flags a term however it is wrapped, and variants of ~1,000 one-line templates
    # cost a fifth of training. Contrast terms get the same templates, as many as the topics' terms, so the
    # name decides, not the phrasing: with 1,400 topic-term prompts against 200 contrast ones the templates
    # themselves ("Write a short essay about ...") became topic cues (dev FPR 0.0% -> 1.7%).
    term_pos = {t: term_prompts(terms.get(t, ()), rng, per_term=s.term_prompts) for t in train_pos} if terms else {}
    n_topic = sum(map(len, term_pos.values()))
    per_contrast = max(s.term_prompts, math.ceil(n_topic / len(contrast_terms))) if contrast_terms and s.term_prompts else 0
    term_neg = term_prompts(contrast_terms, rng, per_term=per_contrast)
    if len(term_neg) > (cap := max(n_topic, len(contrast_terms))):  # as many as the topics' (rounding up overshoots)
        term_neg = rng.sample(term_neg, cap)
    prose = list(prose_sentences()) if s.prose_negatives else []
    texts, labels = _examples(train_pos, train_neg, s, list(positives), prose=prose)
    for i, topic in enumerate(positives):
        texts += term_pos.get(topic, [])
        labels += [[float(j == i) for j in range(len(positives))] for _ in term_pos.get(topic, [])]
    texts += term_neg
    labels += [[0.0] * len(positives) for _ in term_neg]
    joined = [" ".join(rng.sample(train_neg, min(len(train_neg), rng.randint(3, 8)))) for _ in range(s.joined_negatives)]
    joined += [" ".join(rng.sample(prose, min(len(prose), rng.randint(4, 15)))) for _ in range(s.prose_negatives)]
    texts += joined
    labels += [[0.0] * len(positives) for _ in joined]
    ids = batcher.token_ids(texts)
    y = torch.tensor(labels, dtype=torch.float32)
    # As a warm start before fine-tuning, the head needs no more than a sample of the embeddings.
    warm = rng.sample(range(len(ids)), min(len(ids), _WARM_START_EXAMPLES)) if s.finetune_encoder and s.epochs else None
    _fit_head(net, batcher, ids, y, s, progress, subset=warm)
    precision = resolved_precision(s.precision)
    losses = _finetune(net, batcher, ids, y, s, progress, precision) if s.finetune_encoder and s.epochs else []
    net.eval()
    return FitResult(time.perf_counter() - start, cal_neg, holdout_pos, losses, len(texts), precision)


def resolved_precision(precision: str) -> str:
    """``auto`` resolved for this CPU: bfloat16 where oneDNN has native bf16 kernels.

    Example:
        >>> resolved_precision("float32")
        'float32'
    """
    if precision != "auto":
        return precision
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        native = False
    return "bfloat16" if native else "float32"


def _split(items: list[str], fraction: float, rng: random.Random) -> tuple[list[str], list[str]]:
    shuffled = items[:]
    rng.shuffle(shuffled)
    n_held = round(len(shuffled) * fraction)
    return shuffled[n_held:], shuffled[:n_held]


def _add_train_only(train: list[str], held: list[str], extra: Sequence[str]) -> tuple[list[str], list[str]]:
    extra_set, train_set = set(extra), set(train)
    return train + [p for p in dict.fromkeys(extra) if p not in train_set], [p for p in held if p not in extra_set]


def _split_positives(positives: Mapping[str, Sequence[str]], fraction: float,
                     rng: random.Random) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    train, held = {}, {}
    for topic, prompts in positives.items():
        unique = list(dict.fromkeys(prompts))
        train[topic], held[topic] = _split(unique, fraction, rng) if len(unique) > 1 else (unique, [])
    return train, held


def _examples(train_pos: Mapping[str, list[str]], train_neg: list[str], s: TrainingSettings,
              topics: list[str], *, prose: Sequence[str] = ()) -> tuple[list[str], list[list[float]]]:
    """Texts with multi-hot labels: originals, then (if enabled) their augmented variants.

    Buried variants are surrounded by negatives and, half the time, by ``prose``: a question
    in the middle of a document must stay a topic question.
    """
    labels: dict[str, list[float]] = {t: [0.0] * len(topics) for t in train_neg}
    group: dict[str, str] = {t: _NEGATIVE_GROUP for t in train_neg}
    for i, topic in enumerate(topics):
        for text in train_pos[topic]:
            labels.setdefault(text, [0.0] * len(topics))[i] = 1.0  # a positive wins over a negative duplicate
            group[text] = topic
    texts = list(labels)
    if s.augment and s.augment_copies:
        names = distinctive_names({**train_pos, _NEGATIVE_GROUP: train_neg}, common_words=english_words())
        # ~1.4 tokens per word: 90 words around the prompt, at most 45 before it, in a 128-token window
        aug = Augmenter(train_neg, prose=prose, seed=s.seed, max_filler_words=round(s.window_tokens * 0.7),
                        max_words_before=round(s.window_tokens * 0.35))
        for text in list(texts):
            for variant in aug.variants(text, s.augment_copies, names=names[group[text]]):
                texts.append(variant)
                labels[variant] = labels[text] if variant not in labels else labels[variant]
    return texts, [labels[t] for t in texts]


def _fit_head(net: _Net, batcher: _Batcher, ids: list[list[int]], y: torch.Tensor, s: TrainingSettings,
              progress: bool, *, subset: list[int] | None = None) -> None:
    """Logistic regression of the head on frozen embeddings: the frozen model, or a warm start."""
    if subset is not None:
        ids, y = [ids[i] for i in subset], y[subset]
    net.eval()
    chunks = []
    with torch.inference_mode():
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for b in tqdm(range(0, len(order), 64), desc="embedding", disable=not progress, leave=False):
            idx = order[b:b + 64]
            chunks.append((idx, net.embed(*batcher.pad([ids[i] for i in idx]))))
    emb = torch.empty((len(ids), chunks[0][1].shape[1]))
    for idx, e in chunks:
        emb[idx] = e
    head = net.head
    opt = torch.optim.Adam(head.parameters(), lr=_HEAD_FIT_LR)
    loss_fn = nn.BCEWithLogitsLoss()
    for _ in range(s.head_steps):
        opt.zero_grad()
        loss = loss_fn(head(emb), y) + _HEAD_FIT_L2 * head.weight.pow(2).sum()
        loss.backward()
        opt.step()


def _finetune(net: _Net, batcher: _Batcher, ids: list[list[int]], y: torch.Tensor, s: TrainingSettings,
              progress: bool, precision: str = "float32") -> list[float]:
    """End-to-end AdamW with linear warm-up and decay; batches grouped by length to cut padding."""
    fixed = list(net.transformer.get_input_embeddings().parameters()) if s.freeze_embeddings else []
    if s.frozen_layers:
        layers = _encoder_layers(net.transformer)
        if s.frozen_layers > len(layers):
            raise ConfigError(f"classifier.training.frozen_layers: {s.frozen_layers} exceeds the encoder's "
                              f"{len(layers)} layers")
        fixed += [p for layer in layers[:s.frozen_layers] for p in layer.parameters()]
    frozen = {id(p) for p in fixed}
    for p in net.transformer.parameters():
        p.requires_grad_(id(p) not in frozen)
    encoder_params = [p for p in net.transformer.parameters() if id(p) not in frozen]
    groups = [
        {"params": encoder_params, "lr": s.learning_rate, "weight_decay": s.weight_decay},
        {"params": list(net.head.parameters()), "lr": s.head_learning_rate, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups)
    rng = random.Random(s.seed + 1)
    batches_per_epoch = math.ceil(len(ids) / s.batch_size)
    total = batches_per_epoch * s.epochs
    warmup = max(1, int(total * s.warmup_fraction))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min((k + 1) / warmup, max(0.0, (total - k) / (total - warmup + 1))))
    loss_fn = nn.BCEWithLogitsLoss()
    losses: list[float] = []
    net.train()
    bar = tqdm(total=total, desc="fine-tuning classifier", disable=not progress)
    for _ in range(s.epochs):
        epoch_loss = 0.0
        for idx in _length_batches(ids, s.batch_size, rng):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                logits = net(*batcher.pad([ids[i] for i in idx]))
            loss = loss_fn(logits.float(), y[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), _MAX_GRAD_NORM)
            opt.step()
            sched.step()
            epoch_loss += loss.item() * len(idx)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        losses.append(epoch_loss / len(ids))
    bar.close()
    net.eval()
    return losses


def keep_lowest_layers(transformer: nn.Module, n: int | None) -> None:
    """Drop all transformer layers above the lowest ``n`` (in place; the config follows, so the
    shortened encoder saves and loads as such)."""
    if n is None:
        return
    layers = _encoder_layers(transformer)
    if n > len(layers):
        raise ConfigError(f"classifier.training.encoder_layers: {n} exceeds the encoder's {len(layers)} layers")
    del layers[n:]
    config = getattr(transformer, "config", None)
    if config is not None and hasattr(config, "num_hidden_layers"):
        config.num_hidden_layers = n


def _encoder_layers(transformer: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (BERT-style ``encoder.layer`` or a plain ``layers``)."""
    for path in ("encoder.layer", "layers", "encoder.layers", "transformer.layer"):
        module: Any = transformer
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ConfigError(f"classifier.training.frozen_layers: cannot find the layer stack of {type(transformer).__name__}")


def _length_batches(ids: list[list[int]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, sort within pools of 16 batches by length, shuffle the batches."""
    order = list(range(len(ids)))
    rng.shuffle(order)
    pool = batch_size * 16
    batches = []
    for p in range(0, len(order), pool):
        chunk = sorted(order[p:p + pool], key=lambda i: len(ids[i]))
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


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


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
