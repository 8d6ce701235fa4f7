"""Token windows and the encoder's probabilities (eco_guard.classifier.encoder)."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from tiny import NEG, POS

from eco_guard.classifier import normalize_text
from eco_guard.errors import InputError


def test_windows_cover_every_short_span_and_end_at_the_end(tiny_classifier):
    windows, stride = tiny_classifier.encoder.windows, tiny_classifier.decision.window_stride
    ids = list(range(1000, 1000 + 1500))
    split = windows.split(ids, stride)
    assert all(len(w) <= windows.window_tokens for w in split)
    contents = [w[len(windows.prefix): len(w) - len(windows.suffix)] for w in split]
    assert contents[-1][-1] == ids[-1] and contents[0][0] == ids[0]
    assert windows.content_tokens == windows.window_tokens - len(windows.prefix) - len(windows.suffix)
    span = windows.content_tokens - stride + 1  # any span this short lies wholly inside some window
    for start in range(0, len(ids) - span, 7):
        piece = ids[start:start + span]
        assert any(piece[0] in c and c[c.index(piece[0]):c.index(piece[0]) + span] == piece for c in contents)
    assert len(windows.split(ids[:10], stride)) == 1


def test_long_prompt_scores_max_over_windows(tiny_classifier):
    clf = tiny_classifier
    windows = clf.encoder.windows
    question = "Tell me about the wizard school lesson number 3 on potions"
    long = " ".join(NEG * 6) + " " + question
    split = windows.split(windows.token_ids([normalize_text(long)])[0], clf.decision.window_stride)
    assert len(split) > 3
    question_ids = windows.token_ids([normalize_text(question)])[0]
    assert split[-1][-len(windows.suffix) - len(question_ids):-len(windows.suffix)] == question_ids
    per_window = 1 / (1 + np.exp(-np.vstack([clf.encoder.logits([w]) for w in split])))
    [scores] = clf.score([long])
    for i, topic in enumerate(clf.topics):
        assert scores[topic] == pytest.approx(per_window[:, i].max(), abs=1e-6)


def test_a_smaller_stride_reads_more_windows_and_never_scores_lower(tiny_classifier):
    from eco_guard.classifier.encoder import Encoder

    clf = tiny_classifier
    long = [" ".join(NEG * 6) + " " + POS["wizards"][0]]
    normalized = [normalize_text(t) for t in long]
    ids = clf.encoder.windows.token_ids(normalized)[0]
    assert len(clf.encoder.windows.split(ids, 16)) > len(clf.encoder.windows.split(ids, 64))
    assert isinstance(clf.encoder, Encoder)
    dense, sparse = (clf.encoder.probabilities(normalized, stride=s) for s in (16, 64))
    assert (dense >= sparse - 1e-6).all()  # every stride-64 window start is also a stride-16 one


def test_a_prompts_score_does_not_depend_on_its_batch(tiny_classifier):
    texts = POS["wizards"][:3] + NEG[:3] + [" ".join(NEG * 4)]
    together = tiny_classifier.score(texts)
    for text, expected in zip(texts, together):
        assert tiny_classifier.score([text])[0] == pytest.approx(expected, abs=1e-5)


def test_classify_is_thread_safe(tiny_classifier):
    texts = [t for pair in zip(POS["wizards"], POS["space"], NEG) for t in pair] + [" ".join(NEG * 3)]
    expected = tiny_classifier.score(texts)
    results: dict[int, list] = {}

    def work(k: int) -> None:
        order = random.Random(k).sample(range(len(texts)), len(texts))
        got = tiny_classifier.score([texts[i] for i in order])
        results[k] = [got[order.index(i)] for i in range(len(texts))]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results.values():
        for a, b in zip(got, expected):
            assert a == pytest.approx(b, abs=1e-6)


def test_bad_input_is_an_input_error(tiny_classifier):
    with pytest.raises(InputError):
        tiny_classifier.score("not a list")
    with pytest.raises(InputError):
        tiny_classifier.classify(["ok", None])
