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

from eco_guard.backends.native import Layer, NativeLinear, Shape, kernels
from eco_guard.backends.packing import Int8Linear, TransposedLinear

__all__ = ["LlamaDecodeStep", "NativeLlamaStep"]

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


class NativeLlamaStep(LlamaDecodeStep):
    """The same step as one call of ``native.c``'s ``eco_llama_step`` when one row decodes; several rows take
    the torch step (with ``batch_invariant``, in bfloat16, the native step too: slower, but a row's numbers are
    then those it gets alone). For models laid out by :func:`~eco_guard.backends.packing.decoding_layout` in bfloat16
    (:class:`~eco_guard.backends.native.NativeLinear` products), float32 (transposed weights) or int8 (weights
    widened as they are read; inputs rounded to int16 steps, finer than the torch step's bfloat16).

    Between its products, the torch step makes about 40 small operations a layer, a few microseconds of dispatch
    each: 8-9 ms a token for SmolLM2-135M, for one row as for sixteen. In C the one-row step costs about what
    reading its weights costs. Several rows are compute-bound, where oneDNN's and MKL's blocked kernels (AMX
    where the CPU has it) beat a loop that reads each weight once, and the torch step's fixed cost is shared.
    The weights are the model's own, read in place. In float32 the numbers are the model's own forward's up to
    the order of the sums; in bfloat16 the residual stream, attention and logits stay float32 where the torch
    step rounds them, so they lie between the bfloat16 and the float32 forward (tests compare both).
    """

    def __init__(self, model: Any, *, batch_invariant: bool = False):
        super().__init__(model)
        config = model.config
        self._call = kernels().eco_llama_step
        weights, self._cache_dtype = _layout(model)
        self._layers = (Layer * len(self.layers))()
        for slot, layer in zip(self._layers, self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            slot.input_norm = layer.input_layernorm.weight.data_ptr()
            slot.post_norm = layer.post_attention_layernorm.weight.data_ptr()
            for field, product in (("qkv", attn.eco_qkv), ("o", attn.o_proj), ("gate_up", mlp.eco_gate_up),
                                   ("down", mlp.down_proj)):
                matrix, scale = _matrix(product)
                setattr(slot, field, matrix.data_ptr())
                setattr(slot, f"{field}_scale", None if scale is None else scale.data_ptr())
        self._head, self._head_scale = _matrix(self.head)
        # batches too, where the native product is the layout's: each row summed as it would be alone
        self.batch_invariant = batch_invariant and weights == _W_BF16
        self._sizes = {"hidden": config.hidden_size, "intermediate": config.intermediate_size,
                       "q_heads": self.q_heads, "kv_heads": config.num_key_value_heads, "head_dim": self.head_dim,
                       "vocab": self.head.out_features, "eps": self.layers[0].input_layernorm.variance_epsilon,
                       "scale": self.scaling, "precision": int(self._cache_dtype == torch.float32),
                       "weights": weights}

    @staticmethod
    def supports(model: Any) -> bool:
        """Whether ``model`` is a Llama-family LM laid out for the native step (one layout, fused, no biases)."""
        if kernels() is None or not LlamaDecodeStep.supports(model) or (layout := _layout(model)) is None:
            return False
        layers = model.model.layers[: model.config.num_hidden_layers]
        norms = [model.model.norm, *(n for layer in layers for n in (layer.input_layernorm,
                                                                     layer.post_attention_layernorm))]
        head_dim = layers[0].self_attn.head_dim
        return (all(n.weight.dtype == layout[1] for n in norms)
                and getattr(model.config, "hidden_act", None) == "silu" and head_dim % 2 == 0 and head_dim <= 256)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: Any) -> torch.Tensor:
        rows = ids.shape[0]
        if (rows != 1 and not self.batch_invariant) or cache.keys[0].dtype != self._cache_dtype:
            return super().__call__(ids, positions, mask, cache)
        hidden = self.embed(ids)[:, 0].float().contiguous()
        cos, sin = self.rotary(hidden[:, None], positions)  # float32 angles: the input's dtype
        cos, sin = cos[:, 0].contiguous(), sin[:, 0].contiguous()
        for slot, keys, values in zip(self._layers, cache.keys, cache.values):
            slot.keys, slot.values = keys.data_ptr(), values.data_ptr()
        columns = cache.keys[0].shape[2]
        shape = Shape(rows=rows, column=cache.t, columns=columns, mask_stride=cache.mask.shape[1], **self._sizes)
        logits = torch.empty((rows, self._sizes["vocab"]), dtype=torch.float32)
        self._call(hidden.data_ptr(), self._layers, len(self.layers), cos.data_ptr(), sin.data_ptr(),
                   cache.mask.data_ptr(), self.norm.weight.data_ptr(), self._head.data_ptr(),
                   None if self._head_scale is None else self._head_scale.data_ptr(), logits.data_ptr(), shape)
        return logits


def _products(model: Any) -> list[Any]:
    """The linear layers the native step multiplies through, in order (``None`` where a fused one is missing)."""
    found = []
    for layer in model.model.layers[: model.config.num_hidden_layers]:
        attn, mlp = layer.self_attn, layer.mlp
        found += [getattr(attn, "eco_qkv", None), attn.o_proj, getattr(mlp, "eco_gate_up", None), mlp.down_proj]
    return [*found, model.lm_head]


def _matrix(layer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the native step reads of a layer: its weight matrix as laid out, and the int8 row scales (or ``None``)."""
    if isinstance(layer, NativeLinear):
        return layer.weight, None
    if isinstance(layer, Int8Linear):
        return layer.weight_int8, layer.scale
    return layer.weight_t, None


_W_BF16, _W_FLOAT32_T, _W_INT8 = 0, 1, 2  # native.c's weight layouts


def _layout(model: Any) -> tuple[int, torch.dtype] | None:
    """The weight layout every product the step needs shares (native bfloat16, contiguous transposed float32, or
    int8 rows), and the model's floating-point dtype (its norms, cache and int8 scales); ``None`` if they differ,
    a layer has a bias or a fused layer is missing."""
    products = _products(model)
    if any(p is None or getattr(p, "bias", None) is not None for p in products):
        return None
    if all(isinstance(p, NativeLinear) for p in products):
        return _W_BF16, torch.bfloat16
    if all(isinstance(p, TransposedLinear) and p.weight_t.dtype == torch.float32 and p.weight_t.is_contiguous()
           for p in products):
        return _W_FLOAT32_T, torch.float32
    if all(isinstance(p, Int8Linear) and p.weight_int8.is_contiguous() for p in products):
        dtypes = {p.scale.dtype for p in products}
        if len(dtypes) == 1 and (dtype := dtypes.pop()) in (torch.bfloat16, torch.float32):
            return _W_INT8, dtype
    return None
