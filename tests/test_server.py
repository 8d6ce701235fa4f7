"""The OpenAI-compatible server on loopback: unit tests run uvicorn in a thread over the tiny random Llama
(or a model-free backend) with a keyword classifier; integration tests start ``eco-guard serve`` in a
subprocess on the embedded demo config and talk to it with the ``openai`` client and ``ChatOpenAI``."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from test_guard import ScriptedBackend, make_guard

from eco_guard.backends.base import GenerationParams, StreamEvent
from eco_guard.server import ServerSettings, _DrainingServer, create_app

TOKEN = "s3cret-test-token"
TOKEN_ENV = "ECO_GUARD_TEST_TOKEN"
FLAGGED = "Tell me about the wizard school"
PLAIN = "What is bread made of?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A server running in a thread: its base URL, uvicorn server and app state."""

    def __init__(self, guard, port=None, **settings):
        self.guard = guard
        self.app = create_app(guard, ServerSettings(**settings))
        self.state = self.app.state.eco
        port = port or _free_port()
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        self.server = _DrainingServer(config, self.state)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def post(self, path, body=None, **kw):
        return httpx.post(self.url + path, json=body, timeout=30, **kw)

    def chat(self, content, **fields):
        body = {"model": self.guard.model_name, "messages": [{"role": "user", "content": content}],
                "max_tokens": 6, **fields}
        return self.post("/v1/chat/completions", body)


def _events(response: httpx.Response) -> list:
    """The JSON payloads of an SSE body, and "[DONE]"."""
    out = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def _b64(obj) -> str:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture
def tiny_guard(tiny_backend):
    return make_guard(tiny_backend)


@pytest.fixture
def tiny_server(tiny_guard):
    with Served(tiny_guard, enable_prompt_embeds=True) as served:
        yield served


# ---------------------------------------------------------------- completions through the guard

def test_chat_replies_equal_the_guard_and_hide_the_decision(tiny_server, tiny_guard):
    for prompt, route in ((FLAGGED, "corrupted"), (PLAIN, "fallback")):
        r = tiny_server.chat(prompt)
        assert r.status_code == 200, r.text
        body = r.json()
        answer = tiny_guard.plan(prompt, max_new_tokens=6)
        assert answer.route == route
        expected = answer.generate()
        assert body["object"] == "chat.completion" and "eco_guard" not in body
        assert body["choices"][0]["message"] == {"role": "assistant", "content": expected.text}
        assert body["choices"][0]["finish_reason"] == expected.finish_reason
        assert body["usage"] == {"prompt_tokens": len(answer.prompt),
                                 "completion_tokens": len(expected.generation.token_ids),
                                 "total_tokens": len(answer.prompt) + len(expected.generation.token_ids)}


def test_a_blocked_request_gets_the_fixed_reply_and_no_generation(tiny_backend):
    from test_guard import BrokenClassifier

    from eco_guard.guard import BLOCKED_REPLY

    with Served(make_guard(tiny_backend, classifier=BrokenClassifier(), policy="block")) as served:
        body = served.chat(FLAGGED).json()
        assert body["choices"][0]["message"]["content"] == BLOCKED_REPLY and "eco_guard" not in body
        assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        streamed = _events(served.chat(FLAGGED, stream=True))
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed[:-1]) == BLOCKED_REPLY


def test_decision_is_exposed_only_when_configured(tiny_guard):
    with Served(tiny_guard, expose_decision=True) as served:
        body = served.chat(FLAGGED).json()
        assert body["eco_guard"]["route"] == "corrupted" and body["eco_guard"]["topic"] == "wizards"
        first = _events(served.chat(FLAGGED, stream=True))[0]
        assert first["eco_guard"]["flagged"] is True


def test_flagged_stream_carries_only_the_corrupted_generation(tiny_server, tiny_guard):
    r = tiny_server.chat(FLAGGED, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert events[-1] == "[DONE]" and "eco_guard" not in json.dumps(events)
    chunks, usage = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    corrupted = tiny_guard.plan(FLAGGED, max_new_tokens=6).generate().text
    plain = tiny_guard.unguarded(FLAGGED, max_new_tokens=6).generate().text
    assert corrupted != plain
    assert streamed == corrupted == tiny_server.chat(FLAGGED).json()["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] > 0


def test_text_completion_goes_through_the_guard(tiny_server, tiny_guard):
    body = {"model": tiny_guard.model_name, "prompt": FLAGGED, "max_tokens": 6}
    r = tiny_server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"
    assert r.json()["choices"][0]["text"] == tiny_guard.plan(FLAGGED, max_new_tokens=6).generate().text
    streamed = _events(tiny_server.post("/v1/completions", {**body, "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == r.json()["choices"][0]["text"]


async def test_openai_client_and_chat_openai_work_unchanged(tiny_server, tiny_guard):
    from langchain_openai import ChatOpenAI
    from openai import AsyncOpenAI, OpenAI

    expected = tiny_guard.plan(FLAGGED, max_new_tokens=6).generate().text
    client = OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [tiny_guard.model_name]
    reply = client.chat.completions.create(model=tiny_guard.model_name, max_tokens=6,
                                           messages=[{"role": "user", "content": FLAGGED}])
    assert reply.choices[0].message.content == expected and reply.usage.completion_tokens > 0
    stream = client.chat.completions.create(model=tiny_guard.model_name, max_tokens=6, stream=True,
                                            messages=[{"role": "user", "content": FLAGGED}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected
    aclient = AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0)
    areply = await aclient.chat.completions.create(model=tiny_guard.model_name, max_tokens=6,
                                                   messages=[{"role": "user", "content": FLAGGED}])
    assert areply.choices[0].message.content == expected

    llm = ChatOpenAI(base_url=tiny_server.url + "/v1", api_key="unused", model=tiny_guard.model_name,
                     max_tokens=6, max_retries=0)
    assert llm.invoke(FLAGGED).content == expected
    assert "".join(c.content for c in llm.stream(FLAGGED)) == expected
    assert (await llm.ainvoke(FLAGGED)).content == expected
    assert "".join([c.content async for c in llm.astream(FLAGGED)]) == expected


# ---------------------------------------------------------------- prompt_embeds

def _embeds_request(guard, data, **fields):
    return {"model": guard.model_name, "prompt": "", "prompt_embeds": data, "max_tokens": 6,
            "temperature": 0, **fields}


def test_prompt_embeds_equal_local_generation(tiny_server, tiny_guard, tiny_backend):
    params = GenerationParams(max_new_tokens=6)
    for prompt in (PLAIN, FLAGGED):
        answer = tiny_guard.plan(prompt)
        plans = [answer.corruption]
        embeds = tiny_backend.corrupted_embeddings([answer.prompt], plans)[0][0]
        local = tiny_backend.generate([answer.prompt], plans, params)[0]
        r = tiny_server.post("/v1/completions", _embeds_request(tiny_guard, _b64(embeds)))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == local.text
        assert r.json()["usage"]["prompt_tokens"] == len(answer.prompt)
        assert r.json()["usage"]["completion_tokens"] == len(local.token_ids)


def _bad_tensors(hidden: int, max_rows: int = 32):
    one = torch.tensor([[0], [0]]), torch.tensor([1.0])
    sparse = torch.sparse_coo_tensor(*one, (10**6, hidden), check_invariants=True)  # densified: 10**6 rows
    return {
        "sparse": sparse,
        "wrong hidden size": torch.zeros(3, hidden + 1),
        "three dimensions": torch.zeros(1, 3, hidden),
        "integer dtype": torch.zeros(3, hidden, dtype=torch.int64),
        "too many rows": torch.zeros(max_rows + 1, hidden),
        "not a tensor": {"embeds": torch.zeros(3, hidden)},
        "NaN": torch.full((3, hidden), float("nan")),
        "empty": torch.zeros(0, hidden),
    }


@pytest.mark.parametrize("case", list(_bad_tensors(4)))
def test_bad_prompt_embeds_are_refused_and_the_server_stays_up(tiny_guard, tiny_backend, case):
    with Served(tiny_guard, enable_prompt_embeds=True, max_embed_tokens=32) as served:
        tensor = _bad_tensors(tiny_backend.hidden_size)[case]
        r = served.post("/v1/completions", _embeds_request(tiny_guard, _b64(tensor)))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompt_embeds"
        assert served.chat(PLAIN).status_code == 200


def test_prompt_embeds_need_the_switch_and_valid_base64(tiny_guard, tiny_server, tiny_backend):
    ok = _b64(torch.zeros(3, tiny_backend.hidden_size))
    with Served(tiny_guard) as served:
        r = served.post("/v1/completions", _embeds_request(tiny_guard, ok))
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_embeds_disabled"
    assert tiny_server.post("/v1/completions", _embeds_request(tiny_guard, "%%%")).status_code == 400
    both = _embeds_request(tiny_guard, ok, prompt="and text")
    assert tiny_server.post("/v1/completions", both).status_code == 400
    penalty = _embeds_request(tiny_guard, ok, presence_penalty=0.5)
    assert tiny_server.post("/v1/completions", penalty).json()["error"]["param"] == "presence_penalty"


def test_token_id_prompts_are_raw_completions_behind_the_same_switch(tiny_server, tiny_guard, tiny_backend):
    prompt = tiny_guard.plan(PLAIN).prompt
    local = tiny_backend.generate([prompt], params=GenerationParams(max_new_tokens=6))[0]
    body = {"model": tiny_guard.model_name, "prompt": list(prompt.input_ids), "max_tokens": 6,
            "return_token_ids": True}
    r = tiny_server.post("/v1/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == local.text and r.json()["choices"][0]["token_ids"] == local.token_ids
    streamed = _events(tiny_server.post("/v1/completions", {**body, "stream": True}))[:-1]
    assert [t for e in streamed for t in e["choices"][0]["token_ids"]] == local.token_ids
    out_of_range = tiny_server.post("/v1/completions", {**body, "prompt": [10**9]})
    assert out_of_range.status_code == 400 and out_of_range.json()["error"]["param"] == "prompt"
    with Served(tiny_guard) as served:
        assert served.post("/v1/completions", body).json()["error"]["code"] == "prompt_embeds_disabled"


# ---------------------------------------------------------------- auth, limits, errors

def test_bearer_token_is_required_when_configured(tiny_guard, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with Served(tiny_guard, api_key_env=TOKEN_ENV) as served:
        body = {"model": tiny_guard.model_name, "messages": [{"role": "user", "content": PLAIN}], "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = served.post("/v1/chat/completions", body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(served.url + "/metrics").status_code == 401
        assert httpx.get(served.url + "/v1/models").status_code == 401
        assert httpx.get(served.url + "/healthz").status_code == 200
        ok = served.post("/v1/chat/completions", body, headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200


def test_an_unset_token_variable_is_a_config_error(tiny_guard, monkeypatch):
    from eco_guard.errors import ConfigError

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        create_app(tiny_guard, ServerSettings(api_key_env=TOKEN_ENV))


def test_limits_are_4xx_errors_in_openai_shape(tiny_guard):
    with Served(tiny_guard, max_body_bytes=4096, max_tokens_cap=8) as served:
        big = served.chat("x" * 5000)
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
        chunked = httpx.post(served.url + "/v1/chat/completions", content=iter([b"{" + b" " * 3000] * 2))
        assert chunked.status_code == 413
        assert served.chat(PLAIN, max_tokens=9).json()["error"]["param"] == "max_tokens"
        assert served.chat(PLAIN, n=2).status_code == 400
        assert served.chat(PLAIN, frequency_penalty=1.0).status_code == 400
        wrong_model = served.post("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user",
                                                                                            "content": PLAIN}]})
        assert wrong_model.status_code == 404 and wrong_model.json()["error"]["param"] == "model"
    with Served(make_guard(ScriptedBackend())) as served:  # 64 tokens at most
        long = served.chat("bread " * 20)
        assert long.status_code == 400 and "tokens long" in long.json()["error"]["message"]


def test_malformed_bodies_get_400_and_the_next_request_works(tiny_server):
    for content in (b"{not json", b"[]", b'{"model": "llama"}', b'{"model": "llama", "messages": "hi"}',
                    b'{"model": "llama", "messages": [{"role": "wizard", "content": "x"}]}'):
        r = httpx.post(tiny_server.url + "/v1/chat/completions", content=content,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, (content, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    empty = tiny_server.chat("   ")
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    assert httpx.get(tiny_server.url + "/nowhere").json()["error"]["code"] == "not_found"
    assert httpx.get(tiny_server.url + "/v1/chat/completions").status_code == 405
    assert tiny_server.chat(PLAIN).status_code == 200


def test_metrics_count_routes_per_topic_and_hold_no_prompt_text(tiny_guard):
    with Served(tiny_guard) as served:
        served.chat(FLAGGED)
        served.chat(FLAGGED, stream=True)
        served.chat(PLAIN)
        served.post("/v1/chat/completions", {"model": "nope"})
        text = httpx.get(served.url + "/metrics").text
    assert 'eco_guard_routes_total{route="corrupted",topic="wizards"} 2.0' in text
    assert 'eco_guard_routes_total{route="fallback",topic="none"} 1.0' in text
    assert 'eco_guard_requests_total{endpoint="/v1/chat/completions",status="200"} 3.0' in text
    assert 'eco_guard_errors_total{kind="invalid_body"} 1.0' in text
    assert 'eco_guard_time_to_first_token_seconds_count{endpoint="/v1/chat/completions"} 3.0' in text
    assert "eco_guard_queue_depth 0.0" in text
    assert "wizard school" not in text and "bread" not in text


def test_schema_fuzzing_finds_no_server_error(tiny_guard):
    """schemathesis over the app's OpenAPI schema, 40 cases per operation (derandomised: the same cases every run)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    app = create_app(tiny_guard, ServerSettings(enable_prompt_embeds=True, max_tokens_cap=4, expose_decision=True))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/metrics"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=True)
        def fuzz(case):
            body = case.body
            if isinstance(body, dict):  # past the refusals the unit tests cover, into the engine
                for key in ("n", "logprobs", "tools", "presence_penalty", "frequency_penalty", "echo",
                            "max_completion_tokens"):
                    body.pop(key, None)
                body.update(model=tiny_guard.model_name, max_tokens=4)
                if isinstance(body.get("messages"), list):  # a fuzzed history, then a question to answer
                    for m in body["messages"]:
                        if isinstance(m, dict) and m.get("content") is None:
                            m["content"] = ""
                    body["messages"].append({"role": "user", "content": "the wizard?"})
                if "prompt_embeds" in body:
                    body.pop("prompt", None)
                elif body.get("prompt") is None and "messages" not in body:
                    body["prompt"] = "the wizard?"
            case.call_and_validate(checks=[not_a_server_error])
        fuzz()
    routed = [x for m in app.state.eco.metrics.routes.collect() for x in m.samples if x.name.endswith("_total")]
    assert sum(x.value for x in routed) >= 20  # fuzzed requests reached the guard (50 of these cases do)


# ---------------------------------------------------------------- queue, timeout, disconnect, failure, shutdown

class GatedBackend(ScriptedBackend):
    """Streams one event per ``step`` seconds, ``n`` of them, after ``gate`` opens; counts what it made."""

    def __init__(self, n=2, step=0.0, fail=False):
        super().__init__()
        self.gate, self.n, self.step, self.fail, self.made = threading.Event(), n, step, fail, 0

    def stream(self, prompt, plan=None, params=None):
        self.gate.wait(30)
        if self.fail:
            raise RuntimeError("the accelerator fell over")
        for i in range(self.n):
            time.sleep(self.step)
            self.made += 1
            yield StreamEvent("x", [1], "length" if i == self.n - 1 else None)


def _in_thread(fn):
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", fn()), daemon=True)
    thread.start()
    return thread, box


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_a_full_queue_gets_429_with_retry_after():
    backend = GatedBackend()
    with Served(make_guard(backend), max_queue=1, retry_after_s=3) as served:
        thread, box = _in_thread(lambda: served.chat(PLAIN))
        _wait_for(lambda: served.state.admitted == 1)
        busy = served.chat(PLAIN)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "3"
        assert busy.json()["error"]["code"] == "queue_full"
        backend.gate.set()
        thread.join(10)
        assert box["r"].status_code == 200 and box["r"].json()["choices"][0]["message"]["content"] == "xx"
        assert served.chat(PLAIN).status_code == 200


def test_a_slow_completion_gets_504_and_stops():
    backend = GatedBackend(n=1000, step=0.01)
    backend.gate.set()
    with Served(make_guard(backend), request_timeout_s=0.3) as served:
        r = served.chat(PLAIN)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        events = _events(served.chat(PLAIN, stream=True))
        assert events[-1]["error"]["code"] == "timeout"
        _wait_for(lambda: served.state.running == 0)
        assert backend.made < 200


def test_a_client_that_leaves_stops_generation():
    backend = GatedBackend(n=100000, step=0.005)
    backend.gate.set()
    with Served(make_guard(backend)) as served:
        body = {"model": "scripted", "messages": [{"role": "user", "content": PLAIN}], "stream": True}
        with httpx.stream("POST", served.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines), next(lines), next(lines)
        _wait_for(lambda: served.state.running == 0)
        made = backend.made
        time.sleep(0.2)
        assert backend.made == made < 100000
        with httpx.Client() as client, contextlib.suppress(httpx.TimeoutException):  # a whole reply, given up on
            client.post(served.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
        _wait_for(lambda: served.state.running == 0)
        made = backend.made
        time.sleep(0.2)
        assert backend.made == made
        assert 'eco_guard_errors_total{kind="client_disconnected"} 2.0' in httpx.get(served.url + "/metrics").text


def test_a_failing_backend_is_a_json_error_and_the_server_stays_up():
    backend = GatedBackend(fail=True)
    backend.gate.set()
    with Served(make_guard(backend)) as served:
        r = served.chat(PLAIN)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert _events(served.chat(PLAIN, stream=True))[-1]["error"]["code"] == "internal_error"
        backend.fail = False
        assert served.chat(PLAIN).status_code == 200


def test_shutdown_lets_in_flight_requests_finish_and_refuses_new_ones():
    backend = GatedBackend()
    with Served(make_guard(backend)) as served:
        thread, box = _in_thread(lambda: served.chat(PLAIN))
        _wait_for(lambda: served.state.admitted == 1)
        served.server.handle_exit(signal.SIGTERM, None)
        refused = served.chat(PLAIN)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(served.url + "/healthz").status_code == 503
        backend.gate.set()
        thread.join(10)
        assert box["r"].status_code == 200
        served.thread.join(10)
        assert not served.thread.is_alive()
        served.server._captured_signals.clear()  # a thread-run server re-raises nothing, but be sure


# ---------------------------------------------------------------- the real server in a subprocess

@pytest.fixture(scope="module")
def real_server():
    """``eco-guard serve`` on the embedded demo config, prompt_embeds on, bearer auth; SIGTERM at the end."""
    port = _free_port()
    env = {**os.environ, TOKEN_ENV: TOKEN, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "eco_guard.cli", "serve", "--port", str(port), "--enable-prompt-embeds",
           "--api-key-env", TOKEN_ENV, "--max-tokens-cap", "64"]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"eco-guard-serve-{port}.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # a first run trains the demo classifier (~2 min)
    try:
        while True:
            assert proc.poll() is None, f"the server exited: {Path(log.name).read_text()[-2000:]}"
            assert time.monotonic() < deadline, "the server did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
    assert "Application shutdown complete" in Path(log.name).read_text()


@pytest.fixture(scope="module")
def real_clients(real_server):
    from langchain_openai import ChatOpenAI
    from openai import AsyncOpenAI, OpenAI

    kw = {"base_url": real_server + "/v1", "api_key": TOKEN, "max_retries": 0}
    model = OpenAI(**kw).models.list().data[0].id
    llm = ChatOpenAI(model=model, max_tokens=40, temperature=0, **kw)
    return OpenAI(**kw), AsyncOpenAI(**kw), llm, model


HP = "Who wrote the Harry Potter books?"
FRANCE = "What is the capital of France?"


@pytest.mark.integration
async def test_real_server_answers_flagged_and_unflagged_through_real_clients(real_clients):
    client, aclient, llm, model = real_clients
    msgs = lambda q: [{"role": "user", "content": q}]  # noqa: E731
    france = client.chat.completions.create(model=model, messages=msgs(FRANCE), max_tokens=40, temperature=0)
    assert "Paris" in france.choices[0].message.content
    hp = client.chat.completions.create(model=model, messages=msgs(HP), max_tokens=40, temperature=0)
    text = hp.choices[0].message.content
    assert "Rowling" not in text and not hasattr(hp, "eco_guard") and "eco_guard" not in (hp.model_extra or {})
    stream = client.chat.completions.create(model=model, messages=msgs(HP), max_tokens=40, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    areply = await aclient.chat.completions.create(model=model, messages=msgs(HP), max_tokens=40, temperature=0)
    assert areply.choices[0].message.content == text
    assert llm.invoke(HP).content == text
    assert "".join(c.content for c in llm.stream(HP)) == text
    assert (await llm.ainvoke(FRANCE)).content == france.choices[0].message.content


@pytest.mark.integration
def test_real_server_prompt_embeds_equal_the_local_backend(real_clients, real_backend):
    client, _, _, model = real_clients
    prompt = real_backend.prepare([{"role": "user", "content": HP}])
    embeds = real_backend.embed([prompt])[0][0]
    local = real_backend.generate([prompt], params=GenerationParams(max_new_tokens=24))[0]
    reply = client.completions.create(model=model, prompt="", max_tokens=24, temperature=0,
                                      extra_body={"prompt_embeds": _b64(embeds)})
    assert reply.choices[0].text == local.text and "Rowling" in local.text  # uncorrupted embeddings: it knows


@pytest.mark.integration
def test_real_server_refusals_and_metrics(real_server, real_clients, real_backend):
    _, _, _, model = real_clients
    auth = {"Authorization": f"Bearer {TOKEN}"}
    chat = {"model": model, "messages": [{"role": "user", "content": FRANCE}], "max_tokens": 4}
    assert httpx.post(real_server + "/v1/chat/completions", json=chat).status_code == 401
    huge = {**chat, "messages": [{"role": "user", "content": "bread " * 3_000_000}]}
    assert httpx.post(real_server + "/v1/chat/completions", json=huge, headers=auth, timeout=60).status_code == 413
    long = {**chat, "messages": [{"role": "user", "content": "bread " * 10_000}]}
    r = httpx.post(real_server + "/v1/chat/completions", json=long, headers=auth, timeout=60)
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]
    for tensor in _bad_tensors(real_backend.hidden_size, max_rows=2048).values():
        body = {"model": model, "prompt": "", "prompt_embeds": _b64(tensor), "max_tokens": 4}
        assert httpx.post(real_server + "/v1/completions", json=body, headers=auth).status_code == 400
    bad = httpx.post(real_server + "/v1/chat/completions", content=b"{oops",
                     headers={**auth, "content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert httpx.post(real_server + "/v1/chat/completions", json=chat, headers=auth).status_code == 200
    metrics = httpx.get(real_server + "/metrics", headers=auth).text
    assert 'eco_guard_routes_total{route="corrupted",topic="harry_potter"}' in metrics
    assert 'eco_guard_routes_total{route="fallback",topic="none"}' in metrics
    assert "Harry" not in metrics and "France" not in metrics


# ---------------------------------------------------------------- eco-guard serve: the config's server block

def test_serve_reads_the_server_block_and_flags_override_it(tmp_path, monkeypatch, capsys):
    import eco_guard.server
    from eco_guard.cli import main
    from eco_guard.guard import Guard

    path = tmp_path / "guard.yaml"
    path.write_text("server: {port: 9001, max_queue: 3, expose_decision: true, request_timeout_s: 5}\n"
                    "topics: [{name: a}]\n")
    served = []
    monkeypatch.setattr(Guard, "from_config", classmethod(lambda cls, cfg, **kw: cfg))
    monkeypatch.setattr(eco_guard.server, "serve", lambda guard, settings: served.append((guard, settings)))
    assert main(["serve", str(path)]) == 0
    cfg, settings = served.pop()
    assert settings == cfg.server == ServerSettings(port=9001, max_queue=3, expose_decision=True, request_timeout_s=5)
    assert main(["serve", str(path), "--port", "9002", "--max-queue", "7", "--request-timeout", "9"]) == 0
    _, settings = served.pop()
    got = (settings.port, settings.max_queue, settings.request_timeout_s, settings.expose_decision)
    assert got == (9002, 7, 9, True)
    assert main(["serve", str(path), "--port", "70000"]) == 2 and not served
    assert "--port" in capsys.readouterr().err
