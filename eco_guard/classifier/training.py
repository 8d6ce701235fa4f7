"""Training the prompt classifier's network: data split, training examples, head fit, fine-tuning.

:func:`fit` splits the data (negatives: train / calibration; positives: train / hold-out),
augments the training part, adds prompts built around the lexicon's terms, fits the head on
frozen embeddings, then (by default) fine-tunes encoder and head together. What it holds out
is for :func:`eco_guard.classifier.policy.calibrate`.

Example:
    >>> resolved_precision("float32")
    'float32'
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from eco_guard.classifier.augment import Augmenter, distinctive_names, prose_sentences, term_prompts
from eco_guard.classifier.lexicon import english_words
from eco_guard.config import TrainingSettings
from eco_guard.errors import ConfigError, DataError
from eco_guard.precision import resolved_precision

if TYPE_CHECKING:
    from eco_guard.classifier.encoder import TopicNet, Windows

__all__ = ["FitResult", "fit", "keep_lowest_layers", "resolved_precision"]

_NEGATIVE_GROUP = "\x00negatives"
_HEAD_FIT_LR = 0.02  # full-batch Adam on fixed embeddings: a convex problem, a large step is safe
_HEAD_FIT_L2 = 1e-4
_MAX_GRAD_NORM = 1.0
_WARM_START_EXAMPLES = 1500  # embedding every example for the warm start took 43 s of a 375 s fit


@dataclass
class FitResult:
    """What ``fit`` leaves for calibration and the metadata."""

    seconds: float
    calibration_negatives: list[str]
    holdout_positives: dict[str, list[str]]
    losses: list[float] = field(default_factory=list)
    n_examples: int = 0
    precision: str = "float32"


def fit(net: TopicNet, windows: Windows, positives: Mapping[str, Sequence[str]], negatives: Sequence[str],
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
    per_contrast = 0
    if contrast_terms and s.term_prompts:
        per_contrast = max(s.term_prompts, math.ceil(n_topic / len(contrast_terms)))
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
    joined = [" ".join(rng.sample(train_neg, min(len(train_neg), rng.randint(3, 8))))
              for _ in range(s.joined_negatives)]
    joined += [" ".join(rng.sample(prose, min(len(prose), rng.randint(4, 15)))) for _ in range(s.prose_negatives)]
    texts += joined
    labels += [[0.0] * len(positives) for _ in joined]
    ids = windows.first(texts)
    y = torch.tensor(labels, dtype=torch.float32)
    # As a warm start before fine-tuning, the head needs no more than a sample of the embeddings.
    warm = rng.sample(range(len(ids)), min(len(ids), _WARM_START_EXAMPLES)) if s.finetune_encoder and s.epochs else None
    _fit_head(net, windows, ids, y, s, progress, subset=warm)
    precision = resolved_precision(s.precision)
    losses = _finetune(net, windows, ids, y, s, progress, precision) if s.finetune_encoder and s.epochs else []
    net.eval()
    return FitResult(time.perf_counter() - start, cal_neg, holdout_pos, losses, len(texts), precision)


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
    group: dict[str, str] = dict.fromkeys(train_neg, _NEGATIVE_GROUP)
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


def _fit_head(net: TopicNet, windows: Windows, ids: list[list[int]], y: torch.Tensor, s: TrainingSettings,
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
            chunks.append((idx, net.embed(*windows.pad([ids[i] for i in idx]))))
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


def _finetune(net: TopicNet, windows: Windows, ids: list[list[int]], y: torch.Tensor, s: TrainingSettings,
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
    def schedule(k: int) -> float:
        return min((k + 1) / warmup, max(0.0, (total - k) / (total - warmup + 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    loss_fn = nn.BCEWithLogitsLoss()
    losses: list[float] = []
    net.train()
    bar = tqdm(total=total, desc="fine-tuning classifier", disable=not progress)
    for _ in range(s.epochs):
        epoch_loss = 0.0
        for idx in _length_batches(ids, s.batch_size, rng):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                logits = net(*windows.pad([ids[i] for i in idx]))
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


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
