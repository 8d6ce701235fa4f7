"""Shared fixtures: the real default backend and a tiny random Llama that speaks the real tokenizer.

Nothing here touches the network: the Hugging Face libraries are put offline before they are imported.
``$ECO_GUARD_CACHE`` is left alone (the user's default ``~/.cache/eco-guard`` unless set), so the
dequantised default model is reused across test runs instead of being rebuilt (~20 s) every time.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from tiny_llama import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def default_model_dir():
    """The HF folder of the default model (the dequantised GGUF in the cache)."""
    from eco_guard.backends.local import resolve_model_dir

    return resolve_model_dir("default")


@pytest.fixture(scope="session")
def real_tokenizer(default_model_dir):
    """SmolLM2-135M-Instruct's tokenizer, with its chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def tiny_model(real_tokenizer):
    return build_tiny_model(real_tokenizer)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model, real_tokenizer):
    """A :class:`LocalBackend` over the tiny random Llama, with the real SmolLM2 tokenizer and template."""
    from eco_guard.backends.local import LocalBackend

    return LocalBackend(tiny_model, real_tokenizer)


@pytest.fixture(scope="session")
def real_backend():
    """The real default backend (SmolLM2-135M-Instruct); mark tests using it ``integration``."""
    from eco_guard.backends.local import LocalBackend

    return LocalBackend.from_pretrained("default")
