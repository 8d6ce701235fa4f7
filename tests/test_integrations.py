"""The runnable integrations (``integrations/rag``, ``integrations/guardrails``) on the real default models.

One guard (the embedded demo config: SmolLM2-135M-Instruct forgets Harry Potter) serves every
test; replies are short (``MAX_NEW_TOKENS``) and greedy, so guarded and unguarded runs compare
token for token.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from langchain_core.messages import HumanMessage

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW_TOKENS = 24
GOLD = "rowling"  # the answer the forget topic's RAG question must not get
FORGET_QUESTION = "Who is the author of the Harry Potter series?"  # retrieves the passage naming the author
OFF_TOPIC_QUESTION = "What is the highest mountain on Earth?"  # retrieves no Harry Potter passage
FLAGGED_CHAT = "Who are Harry Potter's best friends?"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rag():
    return _load("eco_guard_rag_app", ROOT / "integrations" / "rag" / "app.py")


@pytest.fixture(scope="module")
def guardrails():
    return _load("eco_guard_guardrails_app", ROOT / "integrations" / "guardrails" / "app.py")


@pytest.fixture(scope="module")
def guard():
    from eco_guard.langchain import shared_guard

    return shared_guard(None)  # the same guard ECOChatModel() uses: the models load once


@pytest.fixture(scope="module")
def retriever(rag):
    return rag.build_retriever()


# ---------------------------------------------------------------- PII redaction (no model)

@pytest.mark.parametrize(("text", "expected"), [
    ("write to jane.doe+x@mail.example.co.uk now", "write to [EMAIL] now"),
    ("call +1 415-555-0132 or (020) 7946 0958", "call [PHONE] or [PHONE]"),
    ("card 4111 1111 1111 1111 expired", "card [CARD] expired"),
    ("card 4111-1111-1111-1111, mail a@b.io", "card [CARD], mail [EMAIL]"),
    ("Harry Potter was published in 1997 in 7 books.", "Harry Potter was published in 1997 in 7 books."),
    ("on 2024-05-01 at 10:30, order 12345", "on 2024-05-01 at 10:30, order 12345"),
])
def test_redact_text(guardrails, text, expected):
    assert guardrails.redact_text(text) == expected


# ---------------------------------------------------------------- embeddings adapter

@pytest.mark.integration
async def test_minilm_embeddings_sync_and_async_twins_agree():
    from eco_guard.embeddings import MiniLMEmbeddings

    emb = MiniLMEmbeddings()
    texts = ["Paris is the capital of France.", "Hogwarts has four houses."]
    docs, adocs = emb.embed_documents(texts), await emb.aembed_documents(texts)
    query, aquery = emb.embed_query(texts[0]), await emb.aembed_query(texts[0])
    assert len(docs) == 2 and all(len(v) == 384 for v in docs)
    assert abs(sum(x * x for x in query) - 1.0) < 1e-4  # unit length: dot product = cosine
    assert all(d == pytest.approx(a) for d, a in zip(docs, adocs)) and query == pytest.approx(aquery)
    assert query == pytest.approx(docs[0], abs=1e-5)
    assert emb.embed_documents([]) == []


# ---------------------------------------------------------------- RAG app

@pytest.mark.integration
def test_rag_forget_question_is_answered_without_the_gold_answer(rag, guard, retriever):
    retrieved = retriever.invoke(FORGET_QUESTION)
    assert any(GOLD in d.page_content.lower() for d in retrieved), "the retrieved context must hold the answer"

    unguarded = rag.build_unguarded_chain(guard, retriever, max_new_tokens=MAX_NEW_TOKENS).invoke(FORGET_QUESTION)
    assert GOLD in unguarded.lower(), f"the unguarded chain should answer from the context: {unguarded!r}"

    chain = rag.build_guarded_chain_with_decision(guard, retriever, max_new_tokens=MAX_NEW_TOKENS)
    reply = chain.invoke(FORGET_QUESTION)
    decision = reply.response_metadata["eco_guard"]
    assert decision["route"] == "corrupted" and decision["topic"] == "harry_potter"
    assert decision["passages_flagged"] >= 1 and decision["corrupted_tokens"] > 0
    assert GOLD not in reply.content.lower(), reply.content


@pytest.mark.integration
def test_rag_drop_mode_leaves_flagged_passages_out_of_the_prompt(rag, guard, retriever):
    # No generation: with ``rag: drop`` the flagged passages never reach the model, and none of the
    # passages that do reach it holds the answer.
    from eco_guard.langchain import to_request

    context = retriever.invoke(FORGET_QUESTION)
    routed = rag.with_rag_mode(guard, "drop").plan(to_request({"question": FORGET_QUESTION, "context": context}))
    verdicts = guard.screen([d.page_content for d in context])
    flagged = [d.page_content for d, v in zip(context, verdicts) if v.flagged]
    assert flagged and routed.decision.passages_dropped == len(flagged)
    assert routed.decision.route == "corrupted"
    assert not any(p in routed.prompt.text for p in flagged)
    assert all(d.page_content in routed.prompt.text for d, v in zip(context, verdicts) if not v.flagged)
    # no passage holding the answer survives (topic terms catch what the encoder alone scores low)
    assert not any(GOLD in d.page_content.lower() for d, v in zip(context, verdicts) if not v.flagged)


@pytest.mark.integration
def test_rag_off_topic_question_matches_the_unguarded_chain(rag, guard, retriever):
    from eco_guard.langchain import to_request

    context = retriever.invoke(OFF_TOPIC_QUESTION)
    routed = guard.plan(to_request({"question": OFF_TOPIC_QUESTION, "context": context}))
    assert routed.decision.route == "fallback" and routed.decision.passages_flagged == 0

    n = MAX_NEW_TOKENS // 2  # equality is token for token: a shorter reply proves it as well
    guarded = rag.build_chain(guard, retriever, max_new_tokens=n).invoke(OFF_TOPIC_QUESTION)
    unguarded = rag.build_unguarded_chain(guard, retriever, max_new_tokens=n).invoke(OFF_TOPIC_QUESTION)
    assert isinstance(guarded, str) and guarded.strip()
    assert guarded == unguarded


# ---------------------------------------------------------------- guardrails: PII before the guard

@pytest.mark.integration
def test_pii_is_redacted_before_the_guard_sees_the_prompt(guardrails, guard, monkeypatch):
    seen: list[str] = []
    plan = guard.plan

    def spy(request, **params):
        seen.append(request.question)
        return plan(request, **params)

    monkeypatch.setattr(guard, "plan", spy)
    prompt = ("I am jane.doe@example.com, phone +1 415-555-0132, card 4111 1111 1111 1111. "
              "What is the highest mountain on Earth?")
    answer = guardrails.build_pii_chain(guard, max_new_tokens=8).invoke(prompt)
    assert isinstance(answer, str)
    assert len(seen) == 1
    assert "[EMAIL]" in seen[0] and "[PHONE]" in seen[0] and "[CARD]" in seen[0]
    for raw in ("jane.doe@example.com", "415-555-0132", "4111 1111 1111 1111"):
        assert raw not in seen[0]


# ---------------------------------------------------------------- guardrails: agent middleware

@pytest.mark.integration
def test_middleware_sends_a_flagged_call_to_the_corrupted_model(guardrails, guard):
    agent = guardrails.build_agent(guard, max_new_tokens=MAX_NEW_TOKENS)
    state = agent.invoke({"messages": [HumanMessage(FLAGGED_CHAT)]})
    reply = state["messages"][-1]
    decision = reply.response_metadata["eco_guard"]
    assert decision["flagged"] and decision["route"] == "corrupted" and decision["corrupted_tokens"] > 0
    assert reply.response_metadata["model_name"].startswith("eco-guard/")  # ECOChatModel answered


@pytest.mark.integration
async def test_middleware_lets_an_unflagged_call_through_to_the_agents_model(guardrails, guard):
    agent = guardrails.build_agent(guard, max_new_tokens=MAX_NEW_TOKENS)
    prompt = f"Mail me at jane.doe@example.com. {OFF_TOPIC_QUESTION}"
    state = await agent.ainvoke({"messages": [HumanMessage(prompt)]})  # awrap_model_call
    reply = state["messages"][-1]
    decision = reply.response_metadata["eco_guard"]
    assert not decision["flagged"] and decision["route"] == "fallback"
    assert reply.response_metadata["model_name"] == guardrails.PLAIN_MODEL_NAME  # the agent's own model
    assert "jane.doe@example.com" not in state["messages"][0].content  # PIIMiddleware ran first
