"""Fixtures of the classifier tests: the tiny encoder and a classifier trained on it (once per session)."""

from __future__ import annotations

import pytest
from tiny import build_tiny_encoder, train


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"), layers=1)


@pytest.fixture(scope="session")
def tiny_classifier(tiny_encoder):
    return train(tiny_encoder)
