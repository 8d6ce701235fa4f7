"""The prompt classifier on the real encoder (all-MiniLM-L6-v2), trained on a small slice of the dev data."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from eco_guard.classifier import PromptClassifier, normalize_text, read_rows

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"
SLICE = {"epochs": 2, "augment_copies": 1, "head_steps": 100, "calibration_fraction": 0.35, "seed": 0}
NEUTRAL = (
    "The quarterly report shows that revenue grew by four percent while costs stayed flat.",
    "To make a simple tomato sauce, soften garlic in olive oil and add crushed tomatoes.",
    "The meeting has been moved to Thursday afternoon because the projector is broken.",
    "Please review the attached invoice and confirm the shipping address by Friday.",
    "A good warm-up before running includes light jogging and dynamic stretches.",
)


def _texts(path: Path, split: str) -> list[str]:
    return [r["text"] for r in read_rows(path, split=split)]


@pytest.fixture(scope="module")
def small() -> PromptClassifier:
    rng = random.Random(0)
    pos = {t: rng.sample(_texts(DATA / "topics" / t / "prompts.jsonl", "train"), n)
           for t, n in (("harry_potter", 50), ("star_wars", 35))}
    neg = rng.sample(_texts(DATA / "retain" / "prompts.jsonl", "train"), 140)
    return PromptClassifier.train(pos, neg, settings=SLICE, progress=False, max_false_positive_rate=0.05)


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def test_separates_held_out_positives_from_negatives(small):
    negatives = _texts(DATA / "retain" / "prompts.jsonl", "dev")
    neg_scores = small.score(negatives)
    for topic in small.topics:
        positives = _texts(DATA / "topics" / topic / "prompts.jsonl", "dev")
        pos = np.array([s[topic] for s in small.score(positives)])
        neg = np.array([s[topic] for s in neg_scores])
        assert _auc(pos, neg) > 0.95, topic
        caught = np.mean([v.topic == topic for v in small.classify(positives)])
        assert caught > 0.7, (topic, caught)
    false_alarms = np.mean([v.flagged for v in small.classify(negatives)])
    assert false_alarms < 0.1


def test_question_buried_at_the_end_of_a_long_prompt_is_caught(small):
    question = "Who killed Dumbledore in Harry Potter?"
    rng = random.Random(1)
    filler = " ".join(rng.choice(NEUTRAL) for _ in range(150))
    assert len(small.encoder.windows.token_ids([normalize_text(filler)])[0]) >= 2000
    [clean, buried, alone] = small.classify([question, f"{filler} {question}", filler])
    assert clean.topic == "harry_potter"
    assert buried.topic == "harry_potter", buried.scores
    assert not alone.flagged, alone.scores


def test_normalisation_defeats_invisible_and_look_alike_characters(small):
    clean = "Which house at Hogwarts does Harry Potter belong to?"
    evasions = [
        "\u200b".join(clean),                                     # zero-width space between letters
        clean.replace("o", "\u043e").replace("a", "\u0430"),      # Cyrillic o and a
        "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in clean),  # full-width
        clean.upper().replace("H", "H\u200d"),                    # case + zero-width joiner
    ]
    assert {normalize_text(t) for t in evasions} == {normalize_text(clean)}
    [reference] = small.score([clean])
    assert small.classify([clean])[0].topic == "harry_potter"
    for text in evasions:
        [scores] = small.score([text])  # alone, as the clean one was: int8 activation scales are per batch
        assert scores == pytest.approx(reference, abs=1e-6), text
