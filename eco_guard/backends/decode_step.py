"""One decoding step of a Llama-family model, without the framework around it.

Decoding one token per row reads every weight once: for SmolLM2-135M one row's products take 20-35 ms on
one CPU thread, and transformers' generic forward (mask building, keyword plumbing, output objects, the cache
protocol, a dispatch per attention call) adds 15-22 ms a token on top. This step runs the same modules in the
same order over the scheduler's :class:`~eco_guard.backends.batching.SlotCache` and adds 8-9 ms; its numbers are
those of the model's own forward (tests compare logits and greedy tokens), and it multiplies through the fused
q/k/v and gate/up layers where :func:`~eco_guard.backends.packing.decoding_layout` made them. Models it does not
recognise decode through their own forward.

Example:
    >>> LlamaDecodeStep.supports(object())
    False
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import rms_norm, scaled_dot_product_attention

__all__ = ["LlamaDecodeStep"]

# architectures whose decoder layer is exactly: norm, attention (q/k/v/o, rotary), residual, norm, MLP, residual
_LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2"})


class LlamaDecodeStep:
    """``step(ids, positions, mask, cache) -> logits`` for a transformers Llama-family causal LM (read only).

    ``ids`` and ``positions`` are ``(rows, 1)``, ``mask`` the ``(rows, 1, 1, columns)`` boolean mask of the
    step, ``cache`` a :class:`~eco_guard.backends.batching.SlotCache`; the logits are ``(rows, vocab)``.
    """

    def __init__(self, model: Any):
        base = model.model
        self.embed, self.rotary, self.norm, self.head = base.embed_tokens, base.rotary_emb, base.norm, model.lm_head
        self.layers = list(base.layers[: model.config.num_hidden_layers])
        first = self.layers[0].self_attn
        self.head_dim, self.scaling = first.head_dim, first.scaling
        config = model.config
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.q_heads = config.num_attention_heads
        self.qk_heads = config.num_attention_heads + config.num_key_value_heads

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether ``model`` is a Llama-family LM whose decoder layers this step reproduces exactly."""
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in _LLAMA_LIKE or getattr(config, "sliding_window", None):
            return False
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if not layers or not all(hasattr(inner, a) for a in ("embed_tokens", "rotary_emb", "norm")):
            return False
        if not hasattr(getattr(layers[0], "input_layernorm", None), "variance_epsilon"):
            return False
        attn = getattr(layers[0], "self_attn", None)
        return all(hasattr(attn, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")) and \
            not hasattr(attn, "q_norm")

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        hidden = self.embed(ids)
        cos, sin = self.rotary(hidden, positions)  # (rows, 1, head_dim): broadcast over heads
        half = cos.shape[-1] // 2
        # rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]: one copy instead of two slices, a negation, a cat
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        # the additive mask attention turns a boolean one into, made once per step instead of once per layer
        bias = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill_(~mask, float("-inf"))
        rows, d, groups, nq, nqk = ids.shape[0], self.head_dim, self.groups, self.q_heads, self.qk_heads
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = _rms_norm(layer.input_layernorm, hidden)
            heads = _qkv(attn, x).view(rows, -1, d)  # q heads, then k heads, then v heads
            qk = heads[:, :nqk]
            qk = qk * cos + qk.roll(half, dims=-1) * sin
            keys, values = cache.update(qk[:, nq:, None], heads[:, nqk:, None], i)
            # one query per row: its heads sharing a key head become that head's queries (no repeated keys)
            q = qk[:, :nq].reshape(rows, -1, groups, d)
            out = scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=self.scaling)
            hidden = hidden + attn.o_proj(out.reshape(rows, 1, -1))
            x = _rms_norm(layer.post_attention_layernorm, hidden)
            fused = getattr(mlp, "eco_gate_up", None)
            if fused is None:
                hidden = hidden + mlp(x)
            else:
                gate, up = fused(x).chunk(2, dim=-1)
                hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
        return self.head(_rms_norm(self.norm, hidden))[:, -1]


def _qkv(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """The q, k and v projections of ``x``, side by side: one product where the layer has them fused."""
    fused = getattr(attn, "eco_qkv", None)
    if fused is not None:
        return fused(x)
    return torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm``'s numbers (normalised in float32, cast, then scaled) in three operations instead of eight."""
    normed = rms_norm(x.to(torch.float32), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)
