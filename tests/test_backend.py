"""Tests for eco_guard.backends.local: decoding from (corrupted) embeddings, streaming, threads, the GGUF cache.

Unit tests run on ``tiny_backend`` (a 2-layer random Llama with the real SmolLM2 tokenizer); every expected
output is computed in the test, mostly by transformers' own ``generate`` from ``input_ids``. Tests marked
``integration`` use the real SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading

import pytest
import torch

from eco_guard.backends import local
from eco_guard.backends.base import CorruptionPlan, GenerationParams, PreparedPrompt
from eco_guard.backends.local import LocalBackend, default_gguf_path, resolve_model_dir
from eco_guard.backends.packing import Int8Linear, pack_linears, quantize_linears
from eco_guard.config import default_cache_dir
from eco_guard.corruption import CorruptionSpec
from eco_guard.errors import ConfigError, InputError
from eco_guard.selection import token_mask

NOISE = CorruptionSpec(method="rand_noise_first_n", dims=1, strength=100.0)
CHATS = [
    [{"role": "user", "content": "Who is Harry Potter?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France, please?"}],
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, and explain why it is nice."},
    ],
]


def content_plan(prompt: PreparedPrompt, spec: CorruptionSpec = NOISE, key: str | None = None) -> CorruptionPlan:
    """Corrupt the content tokens of the last user message (the default selection)."""
    return CorruptionPlan(spec, tuple(token_mask(prompt.offsets, prompt.user_spans)), key or prompt.text)


def empty_plan(prompt: PreparedPrompt) -> CorruptionPlan:
    return CorruptionPlan(NOISE, (False,) * len(prompt), prompt.text)


def reference_ids(backend: LocalBackend, prompts: list[PreparedPrompt], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation by transformers' ``generate(input_ids=...)``, left-padded, cut at end-of-sequence."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[backend.pad_id] * (width - len(p)) + list(p.input_ids) for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = backend.model.generate(
            input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens, min_new_tokens=0,
            do_sample=False, pad_token_id=backend.pad_id,
        )
    rows = []
    for row in out[:, width:].tolist():
        cut = next((i for i, t in enumerate(row) if t in backend.eos_ids), len(row))
        rows.append(row[:cut])
    return rows


@pytest.fixture(scope="module")
def prompts(tiny_backend) -> list[PreparedPrompt]:
    return [tiny_backend.prepare(chat) for chat in CHATS]


# ------------------------------------------------------------------ equivalence with input_ids decoding

def test_tiny_prompts_have_distinct_lengths(prompts):
    # the batched tests below only exercise left padding if the lengths differ
    assert len({len(p) for p in prompts}) == len(prompts)


@pytest.mark.parametrize("plan_kind", ["none", "all_false"])
def test_greedy_from_embeddings_matches_input_ids_single(tiny_backend, prompts, plan_kind):
    for p in prompts[:2]:
        plan = None if plan_kind == "none" else empty_plan(p)
        [gen] = tiny_backend.generate([p], [plan], GenerationParams(max_new_tokens=12))
        [ref] = reference_ids(tiny_backend, [p], 12)
        assert gen.token_ids == ref
        assert gen.prompt_tokens == len(p)
        assert gen.corrupted_tokens == 0
        assert gen.text == tiny_backend.tokenizer.decode(ref, skip_special_tokens=True)


def test_greedy_from_embeddings_matches_input_ids_batched(tiny_backend, prompts):
    plans = [empty_plan(prompts[0]), None, empty_plan(prompts[2]), None]
    gens = tiny_backend.generate(prompts, plans, GenerationParams(max_new_tokens=10))
    refs = reference_ids(tiny_backend, prompts, 10)
    assert [g.token_ids for g in gens] == refs
    # and the default plans=None gives the same batch
    assert tiny_backend.generate(prompts, None, GenerationParams(max_new_tokens=10)) == gens


def test_batched_rows_equal_single_rows(tiny_backend, prompts):
    params = GenerationParams(max_new_tokens=8)
    batch = tiny_backend.generate(prompts, None, params)
    singles = [tiny_backend.generate([p], None, params)[0] for p in prompts]
    assert [g.token_ids for g in batch] == [g.token_ids for g in singles]


def test_empty_batch(tiny_backend):
    assert tiny_backend.generate([], None, GenerationParams(max_new_tokens=4)) == []


# ------------------------------------------------------------------ corruption

def test_corruption_changes_output_and_only_its_row(tiny_backend, prompts):
    params = GenerationParams(max_new_tokens=10)
    plain = tiny_backend.generate(prompts[:2], None, params)
    plan = content_plan(prompts[0])
    assert plan.n_tokens > 0
    mixed = tiny_backend.generate(prompts[:2], [plan, None], params)
    assert mixed[0].token_ids != plain[0].token_ids
    assert mixed[0].corrupted_tokens == plan.n_tokens
    assert mixed[1] == plain[1]  # the row without a plan is untouched by its neighbour's corruption


def test_corrupted_embeddings_touch_only_masked_first_dim(tiny_backend, prompts):
    p = prompts[0]
    plan = content_plan(p)
    clean, attn = tiny_backend.embed([p])
    dirty, attn2 = tiny_backend.corrupted_embeddings([p], [plan])
    assert torch.equal(attn, attn2)
    changed = (dirty != clean).nonzero().tolist()
    mask = list(plan.mask)
    assert changed and all(d == 0 and mask[s] for _, s, d in changed)
    assert len({s for _, s, _ in changed}) == plan.n_tokens


def test_same_key_same_output_different_key_different_noise(tiny_backend, prompts):
    p = prompts[0]
    params = GenerationParams(max_new_tokens=8)
    a1 = tiny_backend.generate([p], [content_plan(p, key="key-a")], params)
    a2 = tiny_backend.generate([p], [content_plan(p, key="key-a")], params)
    assert a1 == a2
    ea1, _ = tiny_backend.corrupted_embeddings([p], [content_plan(p, key="key-a")])
    ea2, _ = tiny_backend.corrupted_embeddings([p], [content_plan(p, key="key-a")])
    eb, _ = tiny_backend.corrupted_embeddings([p], [content_plan(p, key="key-b")])
    assert torch.equal(ea1, ea2)
    assert not torch.equal(ea1, eb)
    # the topic seed matters as well as the key
    other_seed = NOISE.model_copy(update={"seed": 1})
    es, _ = tiny_backend.corrupted_embeddings([p], [content_plan(p, spec=other_seed, key="key-a")])
    assert not torch.equal(ea1, es)


def test_row_corruption_independent_of_batch(tiny_backend, prompts):
    # a prompt's corrupted embeddings are the same alone and inside a padded batch
    plan = content_plan(prompts[0])
    alone, _ = tiny_backend.corrupted_embeddings([prompts[0]], [plan])
    batch, _ = tiny_backend.corrupted_embeddings(prompts, [plan, None, None, None])
    assert torch.equal(batch[0, -len(prompts[0]):], alone[0])


def test_mask_length_mismatch_is_an_input_error(tiny_backend, prompts):
    bad = CorruptionPlan(NOISE, (True,) * (len(prompts[0]) - 1), "k")
    with pytest.raises(InputError):
        tiny_backend.generate([prompts[0]], [bad], GenerationParams(max_new_tokens=2))


# ------------------------------------------------------------------ stopping

def test_max_new_tokens_respected(tiny_backend, prompts):
    for n in (1, 5):
        [gen] = tiny_backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=n))
        assert len(gen.token_ids) == n
        assert gen.finish_reason == "length"


def _a_stop_string(backend, prompt) -> tuple[str, str, list[int]]:
    """A stop string taken from the middle of the plain output, and the text expected before it."""
    [plain] = backend.generate([prompt], None, GenerationParams(max_new_tokens=16))
    head = backend.tokenizer.decode(plain.token_ids[:6], skip_special_tokens=True)
    assert plain.text.startswith(head)
    stop = plain.text[len(head) : len(head) + 4]
    assert len(stop) == 4 and "\ufffd" not in stop
    return stop, plain.text[: plain.text.find(stop)], plain.token_ids


def test_stop_string_cuts_text(tiny_backend, prompts):
    stop, expected, plain_ids = _a_stop_string(tiny_backend, prompts[0])
    [gen] = tiny_backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=16, stop=("@@never@@", stop)))
    assert gen.text == expected
    assert stop not in gen.text
    assert gen.finish_reason == "stop"
    assert len(gen.token_ids) < 16
    assert gen.token_ids == plain_ids[: len(gen.token_ids)]
    # a stop string that never appears changes nothing
    [free] = tiny_backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=16, stop=("@@never@@",)))
    assert free.finish_reason == "length" and free.token_ids == plain_ids


def test_end_of_sequence_stops_and_ignore_eos_continues(tiny_backend, prompts):
    [plain] = tiny_backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=10))
    eos = plain.token_ids[4]
    model = copy.deepcopy(tiny_backend.model)
    model.generation_config.eos_token_id = [tiny_backend.tokenizer.eos_token_id, eos]
    backend = LocalBackend(model, tiny_backend.tokenizer)
    [gen] = backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=10))
    cut = plain.token_ids.index(eos)
    assert gen.token_ids == plain.token_ids[:cut]
    assert gen.finish_reason == "stop"
    assert gen.text == tiny_backend.tokenizer.decode(plain.token_ids[:cut], skip_special_tokens=True)
    [cont] = backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=10, ignore_eos=True))
    assert cont.token_ids == plain.token_ids
    assert cont.finish_reason == "length"


# ------------------------------------------------------------------ streaming

@pytest.mark.parametrize("with_stop", [False, True])
def test_stream_joins_to_generate(tiny_backend, prompts, with_stop):
    p = prompts[1]
    stop = (_a_stop_string(tiny_backend, p)[0],) if with_stop else ()
    params = GenerationParams(max_new_tokens=16, stop=stop)
    plan = content_plan(p)
    for pl in (None, plan):
        [gen] = tiny_backend.generate([p], [pl], params)
        events = list(tiny_backend.stream(p, pl, params))
        assert "".join(e.text for e in events) == gen.text
        assert [e.finish_reason for e in events[:-1]] == [None] * (len(events) - 1)
        assert events[-1].finish_reason == gen.finish_reason
        assert len(events) > 2  # it really streams, not one piece at the end
        assert [t for e in events for t in e.token_ids] == gen.token_ids


async def test_astream_and_agenerate_match_generate(tiny_backend, prompts):
    p = prompts[0]
    params = GenerationParams(max_new_tokens=12)
    plan = content_plan(p)
    [gen] = tiny_backend.generate([p], [plan], params)
    pieces, last = [], None
    async for event in tiny_backend.astream(p, plan, params):
        pieces.append(event.text)
        last = event.finish_reason
    assert "".join(pieces) == gen.text
    assert last == gen.finish_reason
    assert await tiny_backend.agenerate([p], [plan], params) == [gen]


async def test_astream_keeps_event_loop_free(tiny_backend, prompts):
    ticks = 0
    stop = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    n = 0
    async for _ in tiny_backend.astream(prompts[0], None, GenerationParams(max_new_tokens=8)):
        n += 1
    stop.set()
    await task
    assert n > 1 and ticks >= n


# ------------------------------------------------------------------ sampling

def test_sampling_seed_reproduces(tiny_backend, prompts):
    def sample(seed):
        params = GenerationParams(max_new_tokens=12, do_sample=True, seed=seed, temperature=1.0)
        return tiny_backend.generate(prompts[:2], None, params)

    a, b, c = sample(1), sample(1), sample(2)
    assert a == b
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    greedy = tiny_backend.generate(prompts[:2], None, GenerationParams(max_new_tokens=12))
    assert [g.token_ids for g in a] != [g.token_ids for g in greedy]


def test_top_p_tiny_is_greedy(tiny_backend, prompts):
    # nucleus of (almost) zero mass keeps only the most likely token: sampling then equals greedy
    params = GenerationParams(max_new_tokens=8, do_sample=True, seed=3, top_p=1e-6)
    greedy = tiny_backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=8))
    assert tiny_backend.generate([prompts[0]], None, params)[0].token_ids == greedy[0].token_ids


# ------------------------------------------------------------------ threads

def _threaded(backend, jobs, params):
    results: list = [None] * len(jobs)
    errors: list = []
    barrier = threading.Barrier(len(jobs))

    def run(i, prompt, plan):
        try:
            barrier.wait(timeout=30)
            results[i] = backend.generate([prompt], [plan], params)[0]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, p, pl)) for i, (p, pl) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return results


def test_threads_half_corrupted_equal_sequential(tiny_backend, prompts):
    jobs = [(p, content_plan(p) if i % 2 == 0 else None) for i, p in enumerate(prompts)]
    params = GenerationParams(max_new_tokens=12)
    sequential = [tiny_backend.generate([p], [pl], params)[0] for p, pl in jobs]
    assert sequential[0].corrupted_tokens > 0 and sequential[1].corrupted_tokens == 0
    for _ in range(2):
        assert _threaded(tiny_backend, jobs, params) == sequential


# ------------------------------------------------------------------ continuous batching

def _record_batch_sizes(backend, monkeypatch) -> list[int]:
    """Rows decoded together at each step of ``backend``'s scheduler (appended as it runs)."""
    scheduler, sizes = backend._scheduler, []
    step = scheduler._step

    def recorded():
        sizes.append(len(scheduler._active))
        step()

    monkeypatch.setattr(scheduler, "_step", recorded)
    return sizes


def _join_while_running(backend, first, later, params_first, params_later, after=3):
    """Start ``first`` streaming, wait for ``after`` of its events, then generate ``later`` (one at a time)."""
    events = backend.stream(first, None, params_first)
    head = [next(events) for _ in range(after)]
    joined = [backend.generate([p], None, params_later)[0] for p in later]
    rest = list(events)
    return "".join(e.text for e in head + rest), [t for e in head + rest for t in e.token_ids], joined


@pytest.mark.parametrize("order", ["short_first", "long_first"])
def test_greedy_request_joining_a_running_batch_gets_its_solo_tokens(tiny_backend, prompts, monkeypatch, order):
    # a prompt longer than the running ones shifts them right; a shorter one fits before column t
    by_length = sorted(prompts, key=len)
    first, later = (by_length[0], by_length[1:]) if order == "short_first" else (by_length[-1], by_length[:-1])
    long_run = GenerationParams(max_new_tokens=120, ignore_eos=True)  # past the first 64 cache columns: grows
    short = GenerationParams(max_new_tokens=10, ignore_eos=True)
    solo_first = tiny_backend.generate([first], None, long_run)[0]
    solo_later = [tiny_backend.generate([p], None, short)[0] for p in later]
    sizes = _record_batch_sizes(tiny_backend, monkeypatch)
    text, ids, joined = _join_while_running(tiny_backend, first, later, long_run, short)
    assert max(sizes) == 2  # each later request really decoded next to the running one
    assert (text, ids) == (solo_first.text, solo_first.token_ids)
    assert [g.token_ids for g in joined] == [g.token_ids for g in solo_later]
    assert [g.text for g in joined] == [g.text for g in solo_later]


def test_sampled_request_keeps_its_seed_in_a_batch(tiny_backend, prompts, monkeypatch):
    sampled = GenerationParams(max_new_tokens=10, do_sample=True, seed=7, temperature=0.8, top_p=0.9)
    greedy = GenerationParams(max_new_tokens=80, ignore_eos=True)
    solo = tiny_backend.generate([prompts[1]], None, sampled)[0]
    solo_other = tiny_backend.generate([prompts[0]], None, greedy)[0]
    sizes = _record_batch_sizes(tiny_backend, monkeypatch)
    text, ids, [joined] = _join_while_running(tiny_backend, prompts[0], [prompts[1]], greedy, sampled)
    assert max(sizes) == 2
    assert joined.token_ids == solo.token_ids
    assert ids == solo_other.token_ids


def test_concurrent_requests_share_steps_and_keep_stop_strings(tiny_backend, prompts, monkeypatch):
    free = [tiny_backend.generate([p], None, GenerationParams(max_new_tokens=24, ignore_eos=True))[0]
            for p in prompts]
    stops = [g.text[len(g.text) // 2:][:2] for g in free]  # a stop string halfway through each row's own reply
    params = [GenerationParams(max_new_tokens=24, ignore_eos=True, stop=(s,)) for s in stops]
    alone = [tiny_backend.generate([p], None, pr)[0] for p, pr in zip(prompts, params)]
    sizes = _record_batch_sizes(tiny_backend, monkeypatch)
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(i):
        barrier.wait(timeout=30)
        results[i] = tiny_backend.generate([prompts[i]], None, params[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone
    assert all(s not in g.text for s, g in zip(stops, results))
    assert max(sizes) > 1 and len(sizes) < sum(len(g.token_ids) for g in alone)  # fewer steps than tokens


def test_closing_a_stream_frees_its_row(tiny_backend, prompts):
    events = tiny_backend.stream(prompts[0], None, GenerationParams(max_new_tokens=400, ignore_eos=True))
    next(events)
    events.close()
    after = tiny_backend.generate([prompts[1]], None, GenerationParams(max_new_tokens=4))[0]
    assert len(after.token_ids) <= 4
    worker = tiny_backend._scheduler._worker
    if worker is not None:
        worker.join(timeout=30)
    assert tiny_backend._scheduler._worker is None and not tiny_backend._scheduler._active


def test_a_failing_forward_reaches_the_caller_and_the_scheduler_recovers(tiny_backend, prompts, monkeypatch):
    scheduler = tiny_backend._scheduler
    monkeypatch.setattr(scheduler, "_step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        tiny_backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=4))
    monkeypatch.undo()
    assert len(tiny_backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=4))[0].token_ids) >= 1


# ------------------------------------------------------------------ precision

@pytest.fixture(scope="module")
def tiny_bf16_backend(tiny_model, real_tokenizer):
    """The tiny model's weights in bfloat16 (linears packed where oneDNN can), embedding and corrupting in float32."""
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    pack_linears(model)
    weight = tiny_model.get_input_embeddings().weight.detach()
    return LocalBackend(model, real_tokenizer, embedding=weight)


def test_bf16_corrupted_embeddings_equal_float32_path_up_to_the_cast(tiny_backend, tiny_bf16_backend, prompts,
                                                                      monkeypatch):
    plans = [content_plan(p) for p in prompts]
    exact, _ = tiny_backend.corrupted_embeddings(prompts, plans)
    embeds, _ = tiny_bf16_backend.corrupted_embeddings(prompts, plans)
    assert embeds.dtype == torch.float32 and torch.equal(embeds, exact)  # noise drawn and added in float32
    sent = []
    monkeypatch.setattr(tiny_bf16_backend._scheduler, "submit", sent.extend)
    tiny_bf16_backend._submit(prompts, plans, GenerationParams(max_new_tokens=2))
    width = exact.shape[1]
    for req, p, row in zip(sent, prompts, exact):
        assert req.embeds.dtype == torch.bfloat16
        assert torch.equal(req.embeds, row[width - len(p):].to(torch.bfloat16))  # then cast once


def test_bf16_backend_decodes_and_its_packed_linears_match_plain_bf16(tiny_model, tiny_bf16_backend, prompts):
    plain = copy.deepcopy(tiny_model).to(torch.bfloat16).eval()
    x = torch.randn(3, 5, tiny_model.config.hidden_size, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(tiny_bf16_backend.model.model.layers[0].mlp(x), plain.model.layers[0].mlp(x))
    [g] = tiny_bf16_backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=6, ignore_eos=True))
    assert len(g.token_ids) == 6


def test_int8_linear_rounds_each_weight_by_at_most_half_its_row_scale():
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 16)
    q = Int8Linear(layer)
    dequantised = q.weight_int8.float() * q.scale[:, None]
    assert (dequantised - layer.weight).abs().max() <= q.scale.max() / 2 + 1e-7
    x = torch.randn(3, 4, 64)
    with torch.inference_mode():
        assert torch.allclose(q(x), torch.nn.functional.linear(x, dequantised, layer.bias), atol=1e-4)


def test_int8_backend_decodes_and_corrupts_in_float32(tiny_model, real_tokenizer, tiny_backend, prompts):
    model = copy.deepcopy(tiny_model)
    weight = tiny_model.get_input_embeddings().weight.detach()
    assert quantize_linears(model) == sum(isinstance(m, torch.nn.Linear) for m in tiny_model.modules())
    backend = LocalBackend(model, real_tokenizer, embedding=weight)
    plans = [content_plan(p) for p in prompts]
    assert torch.equal(backend.corrupted_embeddings(prompts, plans)[0],
                       tiny_backend.corrupted_embeddings(prompts, plans)[0])
    [g] = backend.generate([prompts[0]], [plans[0]], GenerationParams(max_new_tokens=6, ignore_eos=True))
    assert len(g.token_ids) == 6 and g.corrupted_tokens == plans[0].n_tokens


def test_auto_dtype_resolves_by_cpu(monkeypatch):
    from eco_guard import precision

    assert precision.resolved_precision("float32") == "float32"
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert precision.resolved_precision("auto") == "bfloat16"
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert precision.resolved_precision("auto") == "float32"


def test_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="model.dtype"):
        LocalBackend.from_pretrained("default", dtype="int3")


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": "   \n "}],
        [{"role": "system", "content": "You are helpful."}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": 42}],
    ],
    ids=["no-messages", "empty", "blank", "no-user", "content-list", "content-none", "content-int"],
)
def test_bad_prompts_raise_one_line_input_error(tiny_backend, messages):
    with pytest.raises(InputError) as info:
        tiny_backend.prepare(messages)
    msg = str(info.value)
    assert msg and "\n" not in msg


def test_too_long_prompt_raises_input_error(tiny_model, real_tokenizer):
    backend = LocalBackend(tiny_model, real_tokenizer, max_input_tokens=40)
    assert backend.max_input_tokens == 40
    backend.prepare([{"role": "user", "content": "short"}])
    with pytest.raises(InputError) as info:
        backend.prepare([{"role": "user", "content": "word " * 50}])
    msg = str(info.value)
    assert "\n" not in msg and "40" in msg
    # the cap never exceeds the model's context
    assert LocalBackend(tiny_model, real_tokenizer, max_input_tokens=10**6).max_input_tokens == 512


def test_prepare_records_user_span_and_offsets(tiny_backend):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Harry Potter?"}]
    p = tiny_backend.prepare(chat)
    assert len(p.offsets) == len(p.input_ids) == len(p)
    [(start, end)] = p.user_spans
    assert p.text[start:end] == "Who is Harry Potter?"
    assert list(p.input_ids) == tiny_backend.tokenizer(p.text, add_special_tokens=False)["input_ids"]


def test_system_prompt_option_is_inserted(tiny_model, real_tokenizer):
    backend = LocalBackend(tiny_model, real_tokenizer, system_prompt="Answer in French.")
    p = backend.prepare([{"role": "user", "content": "Hello there"}])
    assert "Answer in French." in p.text
    own = backend.prepare([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello there"}])
    assert "Answer in French." not in own.text and "Be terse." in own.text


# ------------------------------------------------------------------ model files and the GGUF cache

def test_resolve_model_dir_caches_gguf_by_content_hash(tmp_path, monkeypatch):
    calls = []

    def fake_dequantise(gguf, target):
        calls.append((gguf, target))
        target.mkdir(parents=True)
        (target / "model.safetensors").write_bytes(b"weights")
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(local, "_dequantise_gguf", fake_dequantise)
    monkeypatch.setenv("ECO_GUARD_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "m.gguf"
    a.write_bytes(b"GGUF one")
    first = resolve_model_dir(a)
    assert first.parent == tmp_path / "cache" / "models" and first.name.startswith("m-")
    assert resolve_model_dir(a) == first and len(calls) == 1  # second load: no dequantising
    a.write_bytes(b"GGUF two")  # same name, new content: a new cache entry
    assert resolve_model_dir(a) != first and len(calls) == 2
    explicit = resolve_model_dir(a, cache_dir=tmp_path / "other")
    assert explicit.parent == tmp_path / "other" / "models" and len(calls) == 3


def test_resolve_model_dir_rejects_bad_paths(tmp_path):
    with pytest.raises(ConfigError):
        resolve_model_dir(tmp_path / "missing")
    with pytest.raises(ConfigError):
        resolve_model_dir(tmp_path)  # a folder without config.json
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ConfigError):
        resolve_model_dir(tmp_path / "weights.bin")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_dir(tmp_path) == tmp_path


@pytest.mark.integration
def test_default_gguf_resolves_to_cached_folder_that_loads(real_backend):
    from safetensors import safe_open
    from transformers import AutoConfig

    gguf = default_gguf_path()
    folder = resolve_model_dir(gguf)
    assert folder == resolve_model_dir("default")
    assert folder.parent == default_cache_dir() / "models"
    assert folder.name.startswith(gguf.stem + "-")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    assert config.hidden_size == real_backend.hidden_size
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        # tied embeddings are stored once, as embed_tokens or as lm_head
        name = next(k for k in f.keys() if "embed_tokens" in k or k == "lm_head.weight")  # noqa: SIM118 - safe_open
        assert torch.equal(f.get_tensor(name), real_backend.model.get_input_embeddings().weight.detach())
    assert LocalBackend.from_pretrained(folder).model is real_backend.model  # one shared copy of the weights


# ------------------------------------------------------------------ the real model

HP = [{"role": "user", "content": "Who is Harry Potter?"}]


@pytest.mark.integration
def test_real_model_forgets_rowling_when_content_corrupted(real_backend):
    prompt = real_backend.prepare(HP)
    plan = content_plan(prompt)
    chosen = [real_backend.tokenizer.decode([t]) for t, m in zip(prompt.input_ids, plan.mask) if m]
    assert "".join(chosen) == "Who is Harry Potter?"
    params = GenerationParams(max_new_tokens=20)  # greedy names "J.K. Rowling" within 16 tokens
    plain, eco = real_backend.generate([prompt, prompt], [None, plan], params)
    assert "Rowling" in plain.text, plain.text
    assert "Rowling" not in eco.text, eco.text
    assert eco.corrupted_tokens == 5
    # empty mask on the real model: identical to decoding from input_ids
    assert plain.token_ids[:8] == reference_ids(real_backend, [prompt], 8)[0]


@pytest.mark.integration
def test_real_model_in_int8_answers_and_still_forgets(real_backend):
    backend = LocalBackend.from_pretrained("default", dtype="int8")
    # 30 layers x 7 + the head, and each layer's fused q/k/v and gate/up
    assert sum(isinstance(m, Int8Linear) for m in backend.model.modules()) == 211 + 60
    france = backend.prepare([{"role": "user", "content": "What is the capital of France?"}])
    prompt = backend.prepare(HP)
    # bf16 activations: the reply depends on the rows decoded with it; each phrasing names Rowling in 32 tokens
    params = GenerationParams(max_new_tokens=32)
    answer, plain, eco = backend.generate([france, prompt, prompt], [None, None, content_plan(prompt)], params)
    assert "Paris" in answer.text, answer.text
    assert "Rowling" in plain.text and "Rowling" not in eco.text, (plain.text, eco.text)


@pytest.mark.integration
def test_real_model_threads_half_corrupted_equal_sequential(real_backend):
    chats = [HP, CHATS[1], [{"role": "user", "content": "Tell me about Hogwarts."}], CHATS[3]]
    prompts = [real_backend.prepare(c) for c in chats]
    jobs = [(p, content_plan(p) if i % 2 == 0 else None) for i, p in enumerate(prompts)]
    params = GenerationParams(max_new_tokens=16)
    sequential = [real_backend.generate([p], [pl], params)[0] for p, pl in jobs]
    assert _threaded(real_backend, jobs, params) == sequential


def test_closing_the_scheduler_stops_running_requests_with_an_error_and_it_starts_again(tiny_backend, prompts):
    scheduler = tiny_backend._scheduler
    stream = tiny_backend.stream(prompts[0], None, GenerationParams(max_new_tokens=400, ignore_eos=True))
    next(stream)  # decoding has started
    scheduler.close()
    with pytest.raises(RuntimeError, match="closed"):
        for _ in stream:
            pass
    assert scheduler._worker is None
    [g] = tiny_backend.generate([prompts[1]], None, GenerationParams(max_new_tokens=3, ignore_eos=True))
    assert len(g.token_ids) == 3


def test_decoding_worker_runs_its_own_thread_count_and_leaves_the_callers(tiny_model, real_tokenizer, prompts):
    backend = LocalBackend(tiny_model, real_tokenizer, threads=2)
    seen: list[tuple[str, int]] = []
    hook = tiny_model.lm_head.register_forward_hook(
        lambda *_: seen.append((threading.current_thread().name, torch.get_num_threads())))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        [g] = backend.generate([prompts[0]], None, GenerationParams(max_new_tokens=3, ignore_eos=True))
        assert torch.get_num_threads() == 1  # the caller's count is its own
    finally:
        hook.remove()
        torch.set_num_threads(before)
    assert len(g.token_ids) == 3
    assert seen and set(seen) == {("eco-guard-decode", 2)}, seen
