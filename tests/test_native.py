"""The native bfloat16 kernels: the product and the whole decoding step against float32 references, and the
fallback to torch's kernels wherever they cannot be built."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from test_decode_step import _prefilled
from transformers import LlamaConfig, LlamaForCausalLM

from eco_guard.backends import native
from eco_guard.backends.batching import SlotCache
from eco_guard.backends.decode_step import LlamaDecodeStep, NativeLlamaStep
from eco_guard.backends.native import NativeLinear, kernels
from eco_guard.backends.packing import Int8Linear, PackedLinear, decoding_layout

needs_kernels = pytest.mark.skipif(kernels() is None, reason="no AVX512-BF16 CPU or no C compiler here")


def _bf16_llama(kv_heads: int = 2, seed: int = 0, intermediate: int = 128) -> LlamaForCausalLM:
    """A random 2-layer Llama whose sizes the kernels take (hidden and intermediate multiples of 32), in bfloat16."""
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.1)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval().to(torch.bfloat16)


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
def test_native_product_equals_the_float32_product_of_the_same_bfloat16_numbers(bias):
    linear = torch.nn.Linear(96, 38, bias=bias).to(torch.bfloat16)  # 38 outputs: a partial last block of rows
    fast = NativeLinear.wrap(linear)
    assert isinstance(fast, NativeLinear)
    x = torch.randn(1, 1, 96, dtype=torch.bfloat16)
    want = x.float() @ linear.weight.float().t() + (linear.bias.float() if bias else 0)
    with torch.inference_mode():
        got = fast(x)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 1, 38)
    # float32 sums of exact bfloat16 products, then one rounding: within a bfloat16 step of the exact result
    assert torch.allclose(got.float(), want, rtol=2 ** -7, atol=1e-3), (got.float() - want).abs().max()


@needs_kernels
def test_several_rows_go_to_the_batched_layer_and_agree_with_the_one_row_kernel():
    linear = torch.nn.Linear(64, 8).to(torch.bfloat16)
    calls = []

    class Batched(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape)
            return torch.nn.functional.linear(x, linear.weight, linear.bias)

    fast = NativeLinear.wrap(linear, batched=Batched())
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        together = fast(x)
        alone = torch.cat([fast(row[None]) for row in x])
    assert calls == [(3, 64)]
    assert torch.allclose(together.float(), alone.float(), rtol=2 ** -7, atol=1e-2)


@needs_kernels
def test_native_parts_of_a_fused_projection_are_views_and_give_its_columns():
    model = _bf16_llama()
    decoding_layout(model, "bfloat16")
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.eco_qkv, NativeLinear) and isinstance(attn.k_proj, NativeLinear)
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.eco_qkv.weight.untyped_storage().data_ptr()
    x = torch.randn(2, 1, 64, dtype=torch.bfloat16)
    with torch.inference_mode():
        q = attn.q_proj.out_features
        assert torch.equal(attn.k_proj(x), attn.eco_qkv(x)[..., q : q + attn.k_proj.out_features])


def _one_row(model) -> tuple[SlotCache, torch.Tensor, torch.Tensor]:
    """One row left of three prefilled ones (what the native step decodes): the shortest, behind 7 masked columns."""
    cache, _, ids, positions = _prefilled(model, [5, 9, 2])
    cache.drop(0)
    cache.drop(1)
    return cache, ids[2:], positions[2:]


def _compared_with_float32(model, reference, steps: int = 5) -> list[tuple[float, float, float]]:
    """Per step (the caches growing): the native step's largest and mean distance from ``reference``'s float32
    logits, and the torch step's mean distance; ``model`` laid out by ``decoding_layout``."""
    fast, torch_step = NativeLlamaStep(model), LlamaDecodeStep(model)
    ours, ids, positions = _one_row(model)
    theirs, rounded_cache = copy.deepcopy(ours), copy.deepcopy(ours)
    # the float32 forward reads the same cached keys and values, in float32
    theirs.keys, theirs.values = [k.float() for k in theirs.keys], [v.float() for v in theirs.values]
    theirs._like = theirs.keys[0]
    found = []
    with torch.inference_mode():
        for _ in range(steps):
            got = fast(ids, positions, ours.step_mask(), ours)
            want = reference(input_ids=ids, attention_mask=theirs.step_mask(), position_ids=positions,
                             use_cache=True, cache=theirs).logits[:, -1]
            rounded = torch_step(ids, positions, rounded_cache.step_mask(), rounded_cache).float()
            assert got.dtype == torch.float32 and got.shape == want.shape
            found.append((float((got - want).abs().max() / want.abs().max()), float((got - want).abs().mean()),
                          float((rounded - want).abs().mean())))
            for cache in (ours, theirs, rounded_cache):
                cache.advance()
            ids, positions = want.argmax(-1)[:, None], positions + 1
    return found


@needs_kernels
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_native_step_is_nearer_the_float32_forward_than_the_bfloat16_torch_step(kv_heads):
    model = _bf16_llama(kv_heads)
    reference = copy.deepcopy(model).float()  # the same bfloat16 numbers, computed in float32
    decoding_layout(model, "bfloat16")
    assert NativeLlamaStep.supports(model)
    for largest, ours, torch_steps in _compared_with_float32(model, reference):
        assert largest < 0.05 and ours <= torch_steps


@needs_kernels
@pytest.mark.parametrize("intermediate", [128, 8224], ids=["narrow", "wider-than-the-stack-buffer"])
def test_native_int8_step_is_nearer_the_dequantised_float32_forward_than_the_torch_int8_step(intermediate):
    model = _bf16_llama(2, intermediate=intermediate)
    reference = copy.deepcopy(model).float()
    decoding_layout(model, "int8")
    assert NativeLlamaStep.supports(model)
    for name, layer in model.named_modules():  # the reference multiplies by exactly the rounded weights
        if isinstance(layer, Int8Linear) and "eco_" not in name:
            dequantised = layer.weight_int8.float() * layer.scale.float()[:, None]
            reference.get_submodule(name).weight = torch.nn.Parameter(dequantised)  # untied from the embedding
    for largest, ours, torch_steps in _compared_with_float32(model, reference):
        assert largest < 0.05 and ours <= torch_steps


@needs_kernels
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_native_float32_step_gives_the_models_own_forward_up_to_the_order_of_sums(kv_heads):
    model = _bf16_llama(kv_heads).float()
    reference = copy.deepcopy(model)
    decoding_layout(model, "float32")
    assert NativeLlamaStep.supports(model)
    fast = NativeLlamaStep(model)
    ours, ids, positions = _one_row(model)
    theirs = copy.deepcopy(ours)
    with torch.inference_mode():
        for _ in range(5):
            got = fast(ids, positions, ours.step_mask(), ours)
            want = reference(input_ids=ids, attention_mask=theirs.step_mask(), position_ids=positions,
                             use_cache=True, cache=theirs).logits[:, -1]
            assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
            ours.advance()
            theirs.advance()
            ids, positions = got.argmax(-1)[:, None], positions + 1


@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    """``kernels()`` built anew into an empty cache, and forgotten again afterwards."""
    monkeypatch.setenv("ECO_GUARD_CACHE", str(tmp_path))
    kernels.cache_clear()
    yield tmp_path
    kernels.cache_clear()


def test_kernels_switched_off_leave_bfloat16_on_onednn(fresh_kernels, monkeypatch):
    monkeypatch.setenv("ECO_GUARD_KERNELS", "torch")
    assert kernels() is None
    model = _bf16_llama()
    decoding_layout(model, "bfloat16")
    assert not isinstance(model.lm_head, NativeLinear) and not NativeLlamaStep.supports(model)
    packed = isinstance(model.model.layers[0].self_attn.eco_qkv, PackedLinear)
    assert packed or type(model.model.layers[0].self_attn.eco_qkv) is torch.nn.Linear
    assert not list(fresh_kernels.iterdir())  # nothing was compiled


def test_a_failing_compiler_is_a_warning_and_decoding_stays_on_torch(fresh_kernels, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    monkeypatch.setattr(native, "_cpu_supported", lambda: True)
    with caplog.at_level(logging.WARNING, logger="eco_guard.backends.native"):
        assert kernels() is None
    assert "native kernels unavailable" in caplog.text
    linear = torch.nn.Linear(64, 8).to(torch.bfloat16)
    assert NativeLinear.wrap(linear) is linear


@needs_kernels
def test_the_kernels_are_compiled_once_per_source(fresh_kernels):
    assert kernels() is not None
    [built] = (fresh_kernels / "kernels").iterdir()
    stamp = built.stat().st_mtime_ns
    kernels.cache_clear()
    assert kernels() is not None and built.stat().st_mtime_ns == stamp


@needs_kernels
def test_batch_invariant_bfloat16_gives_each_request_its_lone_tokens_in_any_batch(tiny_model, real_tokenizer):
    from eco_guard.backends.base import GenerationParams
    from eco_guard.backends.local import LocalBackend

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    decoding_layout(model, "bfloat16")
    weight = tiny_model.get_input_embeddings().weight.detach()
    backend = LocalBackend(model, real_tokenizer, embedding=weight, batch_invariant=True)
    assert backend._scheduler._lean.batch_invariant and backend._scheduler._alone
    texts = ["Who is Harry Potter?", "Name a colour.", "What is the capital of France, and why is it there?"]
    prompts = [backend.prepare([{"role": "user", "content": t}]) for t in texts]
    params = GenerationParams(max_new_tokens=12, ignore_eos=True)
    alone = [backend.generate([p], params=params)[0].token_ids for p in prompts]
    assert [g.token_ids for g in backend.generate(prompts, params=params)] == alone
    assert [g.token_ids for g in backend.generate(prompts[::-1], params=params)] == alone[::-1]
    default = LocalBackend(model, real_tokenizer, embedding=weight)
    assert not default._scheduler._lean.batch_invariant and not default._scheduler._alone


@needs_kernels
@pytest.mark.integration
def test_real_model_in_bfloat16_batch_invariant_replies_do_not_depend_on_the_batch():
    from eco_guard.backends.base import GenerationParams
    from eco_guard.backends.local import LocalBackend

    backend = LocalBackend.from_pretrained("default", dtype="bfloat16", batch_invariant=True)
    texts = ["Who is Harry Potter?", "What is the capital of France?", "Name three primary colours.",
             "Write a haiku about the sea.", "How do vaccines work?", "What is 17 times 23?"]
    prompts = [backend.prepare([{"role": "user", "content": t}]) for t in texts]
    params = GenerationParams(max_new_tokens=32, ignore_eos=True)
    alone = [backend.generate([p], params=params)[0].token_ids for p in prompts]
    # without batch_invariant some of these replies change in a batch (this test then fails)
    assert [g.token_ids for g in backend.generate(prompts, params=params)] == alone
