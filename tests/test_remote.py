"""The remote backend against our own server on loopback (standing in for vLLM): the same guard answers the
same, token for token, whether generation runs in-process or behind HTTP; retries, timeouts and mismatches."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch
from safetensors.torch import save_model
from test_guard import CONFIG, KeywordClassifier, make_guard
from test_server import FLAGGED, HP, PLAIN, TOKEN, TOKEN_ENV, Served, real_server  # noqa: F401 - a fixture

from eco_guard.backends.base import GenerationParams, PreparedPrompt
from eco_guard.backends.local import LocalBackend
from eco_guard.backends.remote import RemoteBackend, RemoteError, read_embedding_matrix
from eco_guard.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_model, real_tokenizer):
    """The tiny Llama saved as an HF folder (safetensors, config, tokenizer), as a served model's copy."""
    folder = tmp_path_factory.mktemp("tiny-model")
    save_model(tiny_model, str(folder / "model.safetensors"))
    tiny_model.config.save_pretrained(folder)
    real_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(tiny_model, real_tokenizer):
    from eco_guard.backends.local import LocalBackend

    with Served(make_guard(LocalBackend(tiny_model, real_tokenizer)), enable_prompt_embeds=True) as s:
        yield s


@pytest.fixture
def remote(served, tiny_folder):
    backend = RemoteBackend.from_pretrained(served.url, tiny_folder, backoff_s=0.01)
    yield backend
    backend.close()


def test_only_the_embedding_matrix_is_read(tiny_folder, tiny_model, tiny_backend, remote):
    matrix = read_embedding_matrix(tiny_folder)
    assert torch.equal(matrix, tiny_model.get_input_embeddings().weight)
    assert remote.fingerprint() == tiny_backend.fingerprint()  # a learned corruption's store entry matches
    head = read_embedding_matrix(tiny_folder, "lm_head.weight")  # same shape, named explicitly
    assert torch.equal(head, tiny_model.lm_head.weight)


def test_remote_guard_equals_the_local_guard_token_for_token(remote, tiny_backend):
    local, far = make_guard(tiny_backend), make_guard(remote)
    for prompt, route in ((FLAGGED, "corrupted"), (PLAIN, "fallback")):
        want, got = local.invoke(prompt), far.invoke(prompt)
        assert got.decision.route == want.decision.route == route
        assert got.text == want.text and got.generation.token_ids == want.generation.token_ids
        assert got.usage == want.usage
        assert "".join(e.text for e in far.plan(prompt).stream()) == want.text
    assert [r.text for r in far.batch([FLAGGED, PLAIN])] == [r.text for r in local.batch([FLAGGED, PLAIN])]
    sampled = {"do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 7, "max_new_tokens": 8}
    assert far.invoke(FLAGGED, **sampled).text == local.invoke(FLAGGED, **sampled).text


async def test_remote_async_twins_equal_the_local_guard(remote, tiny_backend):
    local, far = make_guard(tiny_backend), make_guard(remote)
    for prompt in (FLAGGED, PLAIN):
        want = local.invoke(prompt).text
        assert (await far.ainvoke(prompt)).text == want
        answer = await far.aplan(prompt)
        assert "".join([e.text async for e in answer.astream()]) == want


def test_a_yaml_remote_model_block_builds_a_guard_on_the_server(served, tiny_folder, tiny_backend, tmp_path):
    from eco_guard.guard import Guard

    block = f"model: {{backend: remote, url: '{served.url}', path: {tiny_folder}, retries: 1, backoff_s: 0.01}}\n"
    path = tmp_path / "remote.yaml"
    path.write_text(block + CONFIG.format(policy="flag", rag="corrupt", selection="{mode: content}"))
    guard = Guard.from_config(path, classifier=KeywordClassifier())
    try:
        assert isinstance(guard.backend, RemoteBackend) and guard.backend.url == served.url
        assert (guard.backend.retries, guard.backend.backoff_s) == (1, 0.01)
        local = make_guard(tiny_backend)
        for prompt, route in ((FLAGGED, "corrupted"), (PLAIN, "fallback")):
            got, want = guard.invoke(prompt), local.invoke(prompt)
            assert got.decision.route == route and got.generation.token_ids == want.generation.token_ids
    finally:
        guard.backend.close()


def test_flagged_prompts_go_as_corrupted_embeddings_and_others_as_token_ids(remote, served):
    guard = make_guard(remote)
    before = httpx.get(served.url + "/metrics").text
    guard.invoke(FLAGGED)
    guard.invoke(PLAIN)
    after = httpx.get(served.url + "/metrics").text

    def count(text, route):
        line = f'eco_guard_routes_total{{route="{route}",topic="none"}} '
        return float(text.split(line)[1].split()[0]) if line in text else 0.0
    assert count(after, "prompt_embeds") - count(before, "prompt_embeds") == 1
    assert count(after, "prompt") - count(before, "prompt") == 1
    body = remote._body(guard.plan(FLAGGED).prompt, guard.plan(FLAGGED).corruption,
                        GenerationParams(), "m", stream=False)
    assert "prompt" not in body and "prompt_embeds" in body
    assert not {"presence_penalty", "frequency_penalty", "repetition_penalty"} & set(body)


def _canned(text="ok"):
    return {"choices": [{"text": text, "finish_reason": "stop", "token_ids": [1, 2]}]}


def _flaky(failures, status=503):
    calls = []

    def handler(request):
        calls.append(request)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        if len([c for c in calls if c.url.path == "/v1/completions"]) <= failures:
            if status is None:
                raise httpx.ConnectError("connection refused")
            return httpx.Response(status, json={"error": {"message": "busy"}})
        return httpx.Response(200, json=_canned())
    return handler, calls


def _prompt():
    return PreparedPrompt("hi", (1, 2), ((0, 1), (1, 2)))


@pytest.mark.parametrize("status", [503, 429, None])
def test_failures_are_retried_with_backoff_then_reported(real_tokenizer, tiny_model, status):
    matrix = tiny_model.get_input_embeddings().weight.detach()
    handler, calls = _flaky(2, status)
    backend = RemoteBackend("http://gen", real_tokenizer, matrix, retries=2, backoff_s=0.001,
                            transport=httpx.MockTransport(handler))
    assert backend.generate([_prompt()])[0].text == "ok" and len(calls) == 4  # models + 2 failures + success
    handler, calls = _flaky(5, status)
    backend = RemoteBackend("http://gen", real_tokenizer, matrix, model="m", retries=2, backoff_s=0.001,
                            transport=httpx.MockTransport(handler))
    with pytest.raises(RemoteError):
        backend.generate([_prompt()])
    assert len(calls) == 3


def test_a_refused_request_is_an_input_error_and_not_retried(real_tokenizer, tiny_model):
    calls = []

    def handler(request):
        calls.append(request)
        return httpx.Response(400, json={"error": {"message": "prompt_embeds must have shape (seq_len, 576)"}})
    backend = RemoteBackend("http://gen", real_tokenizer, tiny_model.get_input_embeddings().weight.detach(),
                            model="m", transport=httpx.MockTransport(handler))
    with pytest.raises(InputError, match="576"):
        backend.generate([_prompt()])
    assert len(calls) == 1


def test_a_stream_is_not_retried_once_it_has_yielded(real_tokenizer, tiny_model):
    def handler(request):
        chunk = {"choices": [{"text": "a", "token_ids": [5], "finish_reason": None}]}
        return httpx.Response(200, content=f"data: {json.dumps(chunk)}\n\n".encode())  # ends without finishing
    backend = RemoteBackend("http://gen", real_tokenizer, tiny_model.get_input_embeddings().weight.detach(),
                            model="m", transport=httpx.MockTransport(handler))
    events = backend.stream(_prompt())
    assert next(events).text == "a"
    with pytest.raises(RemoteError, match="ended before"):
        next(events)


class SlowLocalBackend(LocalBackend):
    """The tiny Llama, 10 ms per streamed event (time to kill the server mid-stream)."""

    def stream_from_embeds(self, embeds, params=None):
        for event in super().stream_from_embeds(embeds, params):
            time.sleep(0.01)
            yield event


def test_a_server_killed_mid_stream_is_a_clear_error_and_a_retry_after_restart_succeeds(
        tiny_folder, tiny_model, real_tokenizer, tiny_backend):
    guard = make_guard(SlowLocalBackend(tiny_model, real_tokenizer))
    first = Served(guard, enable_prompt_embeds=True)
    port = int(first.url.rsplit(":", 1)[1])
    remote = RemoteBackend.from_pretrained(first.url, tiny_folder, model=guard.model_name, retries=5,
                                           backoff_s=0.05)
    prompt = tiny_backend.prepare([{"role": "user", "content": PLAIN}])
    params = GenerationParams(max_new_tokens=200, ignore_eos=True)
    with first:
        events = remote.stream(prompt, params=params)
        assert next(events).token_ids
        first.server.force_exit = first.server.should_exit = True  # killed, not drained
        with pytest.raises(RemoteError, match="broke mid-completion|ended before"):
            for _ in events:
                pass
    with Served(guard, port=port, enable_prompt_embeds=True):
        small = GenerationParams(max_new_tokens=6)
        assert remote.generate([prompt], params=small)[0].text == tiny_backend.generate([prompt], params=small)[0].text


def test_an_unreachable_server_is_a_clear_error(tiny_folder):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    backend = RemoteBackend.from_pretrained(f"http://127.0.0.1:{port}", tiny_folder, model="m", retries=1,
                                            backoff_s=0.001, timeout_s=2)
    with pytest.raises(RemoteError, match="unreachable"):
        backend.generate([_prompt()])


def test_a_vocabulary_or_hidden_size_mismatch_fails_at_start_up(real_tokenizer, tiny_folder):
    with pytest.raises(ConfigError, match="not from the same model"):
        RemoteBackend("http://gen", real_tokenizer, torch.zeros(100, 64))
    config = json.loads((tiny_folder / "config.json").read_text())
    bad = tiny_folder.parent / "tiny-bad-config"
    bad.mkdir(exist_ok=True)
    for f in tiny_folder.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**config, "hidden_size": 68}))
    with pytest.raises(ConfigError, match="embedding"):
        RemoteBackend.from_pretrained("http://gen", bad)


@pytest.mark.integration
def test_real_remote_backend_equals_the_local_backend(real_server, real_backend, monkeypatch):  # noqa: F811
    from eco_guard.guard import Guard

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    remote = RemoteBackend.from_pretrained(real_server, "default", api_key_env=TOKEN_ENV)
    assert remote.hidden_size == real_backend.hidden_size
    local_guard = Guard.from_config(backend=real_backend, progress=False)
    remote_guard = Guard(local_guard.config, remote, local_guard.classifier)
    for prompt, route in ((HP, "corrupted"), ("What is the capital of France?", "fallback")):
        want, got = local_guard.invoke(prompt, max_new_tokens=24), remote_guard.invoke(prompt, max_new_tokens=24)
        assert got.decision == want.decision and got.decision.route == route
        assert got.text == want.text and got.generation.token_ids == want.generation.token_ids
        assert route == "fallback" or "Rowling" not in got.text
