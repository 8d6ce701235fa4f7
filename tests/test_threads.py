"""Tests for eco_guard.threads: the decoder on every core, the callers' classification on one."""

from __future__ import annotations

import doctest
import threading
from pathlib import Path

import pytest
import torch
from test_guard import KeywordClassifier, make_guard

from eco_guard import threads
from eco_guard.backends.batching import DecodeScheduler
from eco_guard.guard import Guard


def test_doctests():
    result = doctest.testmod(threads)
    assert result.attempted > 0 and result.failed == 0


def test_a_threads_count_set_in_a_block_is_restored_and_stays_on_its_thread():
    before = torch.get_num_threads()
    seen = {}

    def other():
        with threads.torch_threads(1):
            seen["inside"] = torch.get_num_threads()
            seen["main while inside"] = main_count
    main_count = torch.get_num_threads()
    t = threading.Thread(target=other)
    with threads.torch_threads(2):
        main_count = torch.get_num_threads()
        t.start()
        t.join()
    assert seen == {"inside": 1, "main while inside": 2}
    assert torch.get_num_threads() == before


def test_the_decoder_defaults_to_every_core_or_omp_num_threads(tiny_model, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.default_decode_threads() >= 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_decode_threads() == 3
    assert DecodeScheduler(tiny_model, pad_id=0, eos_ids={1}).threads == 3
    assert DecodeScheduler(tiny_model, pad_id=0, eos_ids={1}, threads=5).threads == 5


@pytest.mark.skipif(not list((Path(torch.__file__).parent / "lib").glob("libgomp*.so*")),
                    reason="torch ships no libgomp beside itself here")
def test_idle_openmp_workers_of_this_thread_are_released():
    torch.ones(512, 512) @ torch.ones(512, 512)  # a multi-threaded operation leaves a pool
    assert threads.release_idle_threads() is True
    assert threads.release_idle_threads() is True  # nothing left to release is no error


class CountingClassifier(KeywordClassifier):
    """Records the torch thread count each classification ran with."""

    def __init__(self):
        self.counts: list[int] = []

    def classify(self, texts):
        self.counts.append(torch.get_num_threads())
        return super().classify(texts)


@pytest.mark.parametrize(("setting", "expected"), [(1, 1), (None, 2)])
def test_the_guard_classifies_with_classifier_threads(tiny_backend, setting, expected):
    cfg = make_guard(tiny_backend).config
    assert cfg.classifier.threads == 1  # the default
    cfg = cfg.model_copy(update={"classifier": cfg.classifier.model_copy(update={"threads": setting})})
    guard = Guard(cfg, tiny_backend, CountingClassifier())
    with threads.torch_threads(2):
        guard.plan("Tell me about a wizard.")
        assert torch.get_num_threads() == 2  # the caller's count is back
    assert guard.classifier.counts == [expected]


def test_rag_embeddings_encode_with_their_own_thread_count():
    import numpy as np

    from eco_guard.embeddings import MiniLMEmbeddings

    counts = []

    class Recorder:
        def encode(self, texts, **kwargs):
            counts.append(torch.get_num_threads())
            return np.zeros((len(texts), 3))

    for setting, expected in ((1, 1), (None, 2)):
        emb = MiniLMEmbeddings(threads=setting)
        emb._model = Recorder()
        with threads.torch_threads(2):
            assert emb.embed_query("Where is Paris?") == [0.0, 0.0, 0.0]
        assert counts.pop() == expected
