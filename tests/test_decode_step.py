"""The lean decoding step and the decoding layout of linear layers: the model's own numbers, faster."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from eco_guard.backends.base import GenerationParams
from eco_guard.backends.batching import SlotCache
from eco_guard.backends.decode_step import LlamaDecodeStep
from eco_guard.backends.local import LocalBackend
from eco_guard.backends.packing import Int8Linear, TransposedLinear, decoding_layout


def _llama(kv_heads: int, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _prefilled(model, lengths: list[int]) -> tuple[SlotCache, SlotCache, torch.Tensor, torch.Tensor]:
    """Two identical slot caches holding left-padded random prompts of ``lengths``, the last ids and positions."""
    width = max(lengths)
    attn = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        attn[row, width - n:] = 1
    ids = torch.randint(0, model.config.vocab_size, (len(lengths), width), generator=torch.Generator().manual_seed(1))
    prefill = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True, cache=prefill)
    caches = []
    for _ in range(2):
        cache = SlotCache(len(prefill.layers))
        cache.admit([(layer.keys.clone(), layer.values.clone()) for layer in prefill.layers], attn)
        caches.append(cache)
    return caches[0], caches[1], out.logits[:, -1].argmax(-1)[:, None], attn.sum(-1)[:, None]


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("layout", [None, "float32", "int8"])
def test_lean_step_logits_equal_the_models_own_forward(kv_heads, layout):
    model = _llama(kv_heads)
    if layout:
        decoding_layout(model, layout)
    lean = LlamaDecodeStep(model)
    ours, theirs, ids, positions = _prefilled(model, [5, 9, 2])
    with torch.inference_mode():
        for _ in range(4):  # the caches grow step by step: every step must agree, not only the first
            mask = ours.step_mask()
            assert torch.equal(mask, theirs.step_mask())
            got = lean(ids, positions, mask, ours)
            want = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         cache=theirs).logits[:, -1]
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
            ours.advance()
            theirs.advance()
            ids, positions = got.argmax(-1)[:, None], positions + 1


@pytest.mark.parametrize("precision, kind", [("float32", TransposedLinear), ("int8", Int8Linear)])
def test_decoding_layout_keeps_the_numbers_and_stores_fused_weights_once(precision, kind):
    model = _llama(2)
    before = copy.deepcopy(model)
    decoding_layout(model, precision)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.eco_qkv, kind) and isinstance(attn.q_proj, kind)
    assert attn.eco_qkv.out_features == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    stored = (lambda m: m.weight_t) if kind is TransposedLinear else (lambda m: m.weight_int8)
    for part in (attn.q_proj, attn.k_proj, attn.v_proj):  # views into the fused weight, not copies
        assert stored(part).untyped_storage().data_ptr() == stored(attn.eco_qkv).untyped_storage().data_ptr()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        got, want = model(input_ids=ids).logits, before(input_ids=ids).logits
    atol = 1e-5 if precision == "float32" else 0.3  # int8: each weight rounded by at most half its row's scale
    assert torch.allclose(got, want, atol=atol), (got - want).abs().max()


def test_only_llama_family_models_take_the_lean_step():
    assert LlamaDecodeStep.supports(_llama(2))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert not LlamaDecodeStep.supports(gpt2)
    assert not LlamaDecodeStep.supports(object())


def test_an_unsupported_model_decodes_through_its_own_forward(real_tokenizer):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(real_tokenizer))).eval()
    backend = LocalBackend(gpt2, real_tokenizer)
    assert backend._scheduler._lean is None
    prompt = backend.prepare([{"role": "user", "content": "Who wrote Dune?"}])
    params = GenerationParams(max_new_tokens=5, ignore_eos=True)
    [g] = backend.generate([prompt], params=params)
    ids = torch.tensor([prompt.input_ids])
    with torch.inference_mode():
        want = gpt2.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False, pad_token_id=backend.pad_id)[0, ids.shape[1]:].tolist()
    assert g.token_ids == want


@pytest.mark.integration
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_real_model_lean_step_gives_the_tokens_of_the_models_forward(dtype, monkeypatch):
    backend = LocalBackend.from_pretrained("default", dtype=dtype)
    prompts = [backend.prepare([{"role": "user", "content": t}])
               for t in ("Who is Harry Potter?", "What is the capital of France?", "Name three primary colours.")]
    params = GenerationParams(max_new_tokens=24, ignore_eos=True)
    lean = [g.token_ids for g in backend.generate(prompts, params=params)]
    monkeypatch.setattr(backend._scheduler, "_lean", None)
    assert [g.token_ids for g in backend.generate(prompts, params=params)] == lean


def test_a_stored_float32_layout_is_used_as_it_is_and_gives_the_same_numbers():
    model, again = _llama(2), _llama(2)
    made = decoding_layout(model, "float32")
    assert "model.layers.0.self_attn.eco_qkv.weight_t" in made and "lm_head.weight_t" in made
    stored = {k: v.clone() for k, v in made.items()}
    decoding_layout(again, "float32", stored)
    head = again.lm_head.weight_t
    assert head.data_ptr() == stored["lm_head.weight_t"].data_ptr()  # used, not copied
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_the_float32_layout_is_made_once_and_then_read_from_the_cache(tmp_path):
    from eco_guard.backends.local import _float32_layout

    folder = tmp_path / "tiny"
    _llama(2).save_pretrained(folder)
    first = _float32_layout(folder, tmp_path / "cache")
    [file] = (tmp_path / "cache" / "layouts").iterdir()
    stamp = file.stat().st_mtime_ns
    second = _float32_layout(folder, tmp_path / "cache")
    assert file.stat().st_mtime_ns == stamp and first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    made = decoding_layout(_llama(2), "float32")
    assert all(torch.equal(made[k], first[k]) for k in made)


def test_a_damaged_layout_file_is_made_again_and_an_unwritable_cache_makes_it_in_place(tmp_path):
    from eco_guard.backends.local import _float32_layout

    folder = tmp_path / "tiny"
    _llama(2).save_pretrained(folder)
    good = {k: v.clone() for k, v in _float32_layout(folder, tmp_path / "cache").items()}  # not the mapped file's
    [file] = (tmp_path / "cache" / "layouts").iterdir()
    file.write_bytes(file.read_bytes()[:100])  # truncated, as by a full disk
    again = _float32_layout(folder, tmp_path / "cache")
    assert again.keys() == good.keys() and all(torch.equal(again[k], good[k]) for k in good)
    (tmp_path / "not-a-folder").write_text("")
    assert _float32_layout(folder, tmp_path / "not-a-folder") is None
    model = _llama(2)
    decoding_layout(model, "float32", None)  # what from_pretrained then does: the layout made in place
    assert torch.equal(model.lm_head.weight_t, good["lm_head.weight_t"])
