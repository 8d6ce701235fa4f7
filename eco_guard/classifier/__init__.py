"""The prompt classifier: which forget topic, if any, a prompt is about.

One module per concern:

| module | holds |
|---|---|
| :mod:`~eco_guard.classifier.normalize` | text normalisation (look-alikes, invisibles, leetspeak, spacing) |
| :mod:`~eco_guard.classifier.lexicon` | terms, weak terms, contrast terms → :class:`Evidence` about a prompt |
| :mod:`~eco_guard.classifier.policy` | the decision: thresholds, conformal calibration, how evidence moves them |
| :mod:`~eco_guard.classifier.encoder` | the sentence-transformers encoder + head, token windows |
| :mod:`~eco_guard.classifier.training` | fitting the network (split, examples, head fit, fine-tuning) |
| :mod:`~eco_guard.classifier.augment` | evasive variants of training prompts |
| :mod:`~eco_guard.classifier.data` | reading prompt and term files, the training-data hash, term suggestions |
| :mod:`~eco_guard.classifier.persistence` | the saved folder: format, staleness, lock and swap |
| :mod:`~eco_guard.classifier.prompt_classifier` | :class:`PromptClassifier`, which ties them together |

Importing the package is cheap: the torch-backed parts (:class:`PromptClassifier`, the
encoder, training) load on first use.

Example:
    >>> from eco_guard.classifier import normalize_text, read_prompts
    >>> normalize_text("H4rry P\u043etter")
    'harry potter'
"""

from __future__ import annotations

import importlib
from typing import Any

from eco_guard.classifier.augment import add_typos
from eco_guard.classifier.data import TrainingData, data_hash, read_prompts, read_rows, read_terms, suggest_terms
from eco_guard.classifier.lexicon import Evidence, Lexicon, TermMatcher, english_words, term_pattern
from eco_guard.classifier.normalize import normalize_text
from eco_guard.classifier.policy import Classification, DecisionPolicy, calibrate, conformal_threshold, support
from eco_guard.config import DecisionSettings, TrainingSettings

# torch, transformers and sentence-transformers load on first use of these.
_LAZY = {
    "PromptClassifier": "eco_guard.classifier.prompt_classifier",
    "default_encoder_path": "eco_guard.classifier.encoder",
}

__all__ = [
    "Classification", "DecisionPolicy", "DecisionSettings", "Evidence", "Lexicon", "TermMatcher", "TrainingData",
    "TrainingSettings", "add_typos", "calibrate", "conformal_threshold", "data_hash", "english_words",
    "normalize_text", "read_prompts", "read_rows", "read_terms", "suggest_terms", "support", "term_pattern", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eco_guard.classifier' has no attribute {name!r}")
