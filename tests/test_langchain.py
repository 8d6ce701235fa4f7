"""LangChain adapters: every entry point, composition, fallback, decision events; then the real models."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.language_models import FakeListChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from test_guard import make_guard

from eco_guard.errors import InputError
from eco_guard.langchain import DECISION_EVENT, ECODocumentFilter, ECOGuard, to_request

FLAGGED, PLAIN = "Tell me about the wizard school", "What is the capital of France?"


@pytest.fixture(scope="module")
def runnable(tiny_backend):
    return ECOGuard(make_guard(tiny_backend), max_new_tokens=5)


def decision(message):
    return message.response_metadata["eco_guard"]


def test_invoke_accepts_every_input_shape(runnable):
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{q}")])
    shapes = [
        FLAGGED,
        [HumanMessage(FLAGGED)],
        [("system", "Be brief."), ("human", FLAGGED)],
        prompt.invoke({"q": FLAGGED}),
        {"question": FLAGGED},
    ]
    for shape in shapes:
        out = runnable.invoke(shape)
        assert isinstance(out, AIMessage)
        assert decision(out)["route"] == "corrupted" and decision(out)["topic"] == "wizards"
        assert out.usage_metadata["output_tokens"] > 0


def test_sync_and_async_entry_points_agree(runnable):
    inputs = [FLAGGED, PLAIN, "rocket science", "bake a cake"]
    invoked = [runnable.invoke(i).content for i in inputs]
    assert runnable.batch(inputs) and [m.content for m in runnable.batch(inputs)] == invoked
    assert [m.content for m in asyncio.run(runnable.abatch(inputs))] == invoked
    assert asyncio.run(runnable.ainvoke(FLAGGED)).content == invoked[0]
    streamed = list(runnable.stream(FLAGGED))
    assert "".join(c.content for c in streamed) == invoked[0]
    assert decision(sum(streamed[1:], streamed[0]))["flagged"] is True

    async def collect():
        return [c async for c in runnable.astream(PLAIN)]

    chunks = asyncio.run(collect())
    assert "".join(c.content for c in chunks) == invoked[1]
    full = sum(chunks[1:], chunks[0])
    assert decision(full)["route"] == "fallback" and full.response_metadata["finish_reason"] in ("stop", "length")


def test_composes_with_prompt_and_parser(runnable):
    chain = ChatPromptTemplate.from_template("{q}") | runnable | StrOutputParser()
    assert chain.invoke({"q": PLAIN}) == runnable.invoke(PLAIN).content
    assert "".join(chain.stream({"q": FLAGGED})) == runnable.invoke(FLAGGED).content


def test_decision_reaches_callbacks_and_stream_events(runnable):
    seen = []

    class Recorder(BaseCallbackHandler):
        def on_custom_event(self, name, data, **kwargs):
            seen.append((name, data))

    runnable.invoke(FLAGGED, config={"callbacks": [Recorder()]})
    assert seen and seen[0][0] == DECISION_EVENT and seen[0][1]["topic"] == "wizards"

    async def events():
        return [e async for e in runnable.astream_events(PLAIN, version="v2")]

    evs = asyncio.run(events())
    custom = [e for e in evs if e["event"] == "on_custom_event"]
    assert custom and custom[0]["data"]["route"] == "fallback"
    assert any(e["event"] == "on_llm_stream" or e["event"] == "on_chain_stream" for e in evs)


def test_fallback_runnable_answers_unflagged_prompts(tiny_backend):
    fallback = FakeListChatModel(responses=["from the fallback"])
    guard = ECOGuard(make_guard(tiny_backend), fallback=fallback, max_new_tokens=4)
    plain = guard.invoke(PLAIN)
    assert plain.content == "from the fallback" and decision(plain)["route"] == "fallback"
    flagged = guard.invoke(FLAGGED)
    assert flagged.content != "from the fallback" and decision(flagged)["route"] == "corrupted"
    assert "".join(c.content for c in guard.stream(PLAIN)) == "from the fallback"


def test_rag_dict_input_judges_passages(runnable):
    docs = [Document("Paris is the capital of France."), Document("The wizard school has four houses.")]
    out = runnable.invoke({"question": "Tell me a fact.", "context": docs})
    assert decision(out)["passages_flagged"] == 1 and decision(out)["route"] == "corrupted"


def test_document_filter_drops_or_marks(tiny_backend):
    guard = make_guard(tiny_backend)
    docs = [Document("rocket launch schedule"), Document("bread recipes"), Document("a wizard's wand")]
    assert [d.page_content for d in ECODocumentFilter(guard).invoke(docs)] == ["bread recipes"]
    marked = asyncio.run(ECODocumentFilter(guard, mode="mark").ainvoke(docs))
    assert [d.metadata["eco_guard"]["flagged"] for d in marked] == [True, False, True]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ({"query": "x"}, "no 'question' key"),
        (3.5, "unsupported input type"),
        ([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])], "only text content"),
        ({"question": "hi", "context": [1, 2]}, "Documents or text"),
    ],
)
def test_bad_inputs_get_one_line_errors(value, reason):
    with pytest.raises(InputError) as err:
        to_request(value)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_system_message_is_kept(runnable):
    req = to_request([SystemMessage("Answer in French."), HumanMessage("Hello")])
    assert req.messages[0] == {"role": "system", "content": "Answer in French."}


def test_flagged_stream_never_touches_the_fallback(tiny_backend):
    class Recorder(FakeListChatModel):
        calls: int = 0

        def _call(self, *args, **kwargs):
            self.calls += 1
            return super()._call(*args, **kwargs)

    fallback = Recorder(responses=["LEAK"])
    guard = ECOGuard(make_guard(tiny_backend), fallback=fallback, max_new_tokens=4)
    chunks = list(guard.stream(FLAGGED))
    assert decision(chunks[0])["route"] == "corrupted" and chunks[0].content == ""  # decided before any token
    assert "LEAK" not in "".join(c.content for c in chunks) and fallback.calls == 0

    async def collect():
        return [c async for c in guard.astream(FLAGGED)]

    assert "LEAK" not in "".join(c.content for c in asyncio.run(collect())) and fallback.calls == 0


def test_blocked_route_streams_the_fixed_reply(tiny_backend):
    from test_guard import BrokenClassifier

    from eco_guard.guard import BLOCKED_REPLY

    runnable = ECOGuard(make_guard(tiny_backend, classifier=BrokenClassifier(), policy="block"))
    chunks = list(runnable.stream(PLAIN))
    assert decision(chunks[0])["route"] == "blocked"
    assert "".join(c.content for c in chunks) == BLOCKED_REPLY == runnable.invoke(PLAIN).content


def test_chat_model_faces_agree_on_the_tiny_guard(tiny_backend):
    from eco_guard.langchain import ECOChatModel

    llm = ECOChatModel.from_guard(make_guard(tiny_backend), max_tokens=5)
    invoked = [llm.invoke(p) for p in (FLAGGED, PLAIN)]
    assert [decision(m)["route"] for m in invoked] == ["corrupted", "fallback"]
    assert [m.content for m in llm.batch([FLAGGED, PLAIN])] == [m.content for m in invoked]
    assert [m.content for m in asyncio.run(llm.abatch([FLAGGED, PLAIN]))] == [m.content for m in invoked]
    assert asyncio.run(llm.ainvoke(FLAGGED)).content == invoked[0].content
    streamed = list(llm.stream(FLAGGED))
    assert decision(streamed[0])["route"] == "corrupted" and streamed[0].content == ""
    merged = sum(streamed[1:], streamed[0])
    assert merged.content == invoked[0].content and merged.usage_metadata == invoked[0].usage_metadata

    async def collect():
        return [c async for c in llm.astream(PLAIN)]

    assert "".join(c.content for c in asyncio.run(collect())) == invoked[1].content


# ---------------------------------------------------------------- real models

@pytest.fixture(scope="module")
def real_runnable():
    return ECOGuard(max_new_tokens=20)


@pytest.mark.integration
async def test_real_flagged_prompt_through_ainvoke_and_astream(real_runnable):
    question = "Who wrote the Harry Potter books?"
    answer = await real_runnable.ainvoke(question)
    assert decision(answer)["route"] == "corrupted" and decision(answer)["corrupted_tokens"] > 0
    assert "rowling" not in answer.content.lower()
    chunks = [c async for c in real_runnable.astream(question)]
    assert "".join(c.content for c in chunks) == answer.content
    assert decision(sum(chunks[1:], chunks[0]))["topic"] == "harry_potter"


@pytest.mark.integration
def test_real_unflagged_prompt_matches_unguarded_model(real_runnable):
    from eco_guard.backends.base import GenerationParams

    backend = real_runnable.guard.backend
    question = "What is the boiling point of water?"
    guarded = real_runnable.invoke(question)
    plain = backend.generate([backend.prepare([{"role": "user", "content": question}])], None,
                             GenerationParams(max_new_tokens=20))[0]
    assert decision(guarded)["route"] == "fallback"
    assert guarded.content == plain.text


@pytest.mark.integration
async def test_real_abatch_of_mixed_prompts(real_runnable):
    prompts = [
        "Who is Harry Potter?", "What is the capital of Japan?", "Tell me about Hogwarts houses.",
        "How do I boil an egg?", "Who is Hermione Granger?", "What is 12 times 12?",
        "Name the Weasley siblings.", "Who painted the Mona Lisa?",
    ]
    expected = [True, False, True, False, True, False, True, False]
    params = {"max_new_tokens": 8}
    small = ECOGuard(real_runnable.guard, **params)
    batched = await small.abatch(prompts)
    assert [decision(m)["flagged"] for m in batched] == expected
    sequential = [small.invoke(p) for p in prompts]
    assert [m.content for m in batched] == [m.content for m in sequential]
