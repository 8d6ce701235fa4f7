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
import torch  # noqa: E402

TINY_HIDDEN = 64
TINY_HEADS = 4
TINY_LAYERS = 2


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


def build_tiny_model(tokenizer, *, seed: int = 0):
    """A 2-layer random Llama (hidden 64, 4 heads) over ``tokenizer``'s vocabulary, in float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_HIDDEN,
        intermediate_size=2 * TINY_HIDDEN,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_HEADS,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    return model


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
