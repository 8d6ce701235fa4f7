"""A tiny random Llama over a real tokenizer, for unit tests (a module, not conftest: tests/classifier has a
conftest of its own, and ``from conftest import`` finds whichever was imported first)."""

from __future__ import annotations

import torch

TINY_HIDDEN = 64
TINY_HEADS = 4
TINY_LAYERS = 2


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
