"""The package's public surface: what it exports, and that its torch-free parts load without torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import eco_guard
import eco_guard.classifier as classifier

REPO = Path(__file__).resolve().parents[2]


def test_the_public_api_is_exported():
    for name in ("PromptClassifier", "Classification", "read_prompts", "read_rows", "default_encoder_path",
                 "TrainingData", "suggest_terms", "normalize_text", "add_typos", "TrainingSettings",
                 "DecisionSettings"):
        assert name in classifier.__all__ and getattr(classifier, name) is not None, name
    assert eco_guard.PromptClassifier is classifier.PromptClassifier
    assert eco_guard.TrainingSettings is classifier.TrainingSettings
    assert eco_guard.DecisionSettings is classifier.DecisionSettings


def test_reading_data_and_terms_needs_no_torch():
    code = ("import sys; from eco_guard.classifier import Classification, Lexicon, normalize_text, read_prompts; "
            "print([m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_package_doctests():
    import doctest

    from eco_guard.classifier import persistence

    for module in (classifier, persistence):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
