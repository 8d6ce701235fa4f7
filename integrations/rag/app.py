"""A retrieval-augmented QA app with eco-guard in the chain.

Twenty short passages (eight about Harry Potter, the demo forget topic) live in an
``InMemoryVectorStore`` over the packaged all-MiniLM-L6-v2. A question retrieves its three
nearest passages and goes to ``ECOGuard``, which judges the question and every passage:
flagged passages are corrupted like the question (config ``rag: corrupt``) or dropped
(``rag: drop``); everything else is answered by the plain local model. The unguarded chain
builds the very same prompt and answers it with the same model, uncorrupted, to compare.

Run::

    .venv/bin/python integrations/rag/app.py "Who wrote the Harry Potter books?"
    .venv/bin/python integrations/rag/app.py                      # a few demo questions
    .venv/bin/python integrations/rag/app.py --rag drop "..."    # drop flagged passages instead
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Final

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.output_parsers import StrOutputParser  # noqa: E402
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough  # noqa: E402
from langchain_core.vectorstores import InMemoryVectorStore  # noqa: E402

from eco_guard.embeddings import MiniLMEmbeddings  # noqa: E402
from eco_guard.guard import Guard  # noqa: E402
from eco_guard.langchain import ECOGuard, to_request  # noqa: E402

HERE: Final = Path(__file__).resolve().parent
DOCS_PATH: Final = HERE / "docs.jsonl"
TOP_K: Final = 3
MAX_NEW_TOKENS: Final = 48
DEMO_QUESTIONS: Final = (
    "Who is the author of the Harry Potter series?",  # forget topic: question and passages flagged
    "What are the four Hogwarts houses?",
    "What is the highest mountain on Earth?",         # off topic, off-topic passages: plain answer
    "What is the capital of France?",                 # off topic, but one retrieved passage is about Hogwarts
)


def load_documents(path: Path = DOCS_PATH) -> list[Document]:
    """The passages of ``docs.jsonl`` (one ``{"id", "topic", "text"}`` object a line)."""
    docs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            docs.append(Document(page_content=row["text"], id=row["id"], metadata={"topic": row["topic"]}))
    return docs


def build_retriever(docs: list[Document] | None = None, *, k: int = TOP_K) -> Any:
    """An ``InMemoryVectorStore`` retriever (MiniLM embeddings) over the passages."""
    store = InMemoryVectorStore(MiniLMEmbeddings())
    store.add_documents(docs if docs is not None else load_documents())
    return store.as_retriever(search_kwargs={"k": k})


def with_rag_mode(guard: Guard, mode: str) -> Guard:
    """The same guard (same model and classifier, loaded once) with ``rag: corrupt`` or ``rag: drop``."""
    return Guard(guard.config.model_copy(update={"rag": mode}), guard.backend, guard.classifier)


def build_chain(guard: Guard, retriever: Any = None, **generation: Any) -> Runnable:
    """question -> retrieve -> ECOGuard (judges question and passages) -> answer text."""
    retriever = retriever or build_retriever()
    generation.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    return {"context": retriever, "question": RunnablePassthrough()} | ECOGuard(guard, **generation) | StrOutputParser()


def build_guarded_chain_with_decision(guard: Guard, retriever: Any = None, **generation: Any) -> Runnable:
    """Like :func:`build_chain` but returns the ``AIMessage`` (its metadata holds the decision)."""
    retriever = retriever or build_retriever()
    generation.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    return {"context": retriever, "question": RunnablePassthrough()} | ECOGuard(guard, **generation)


def build_unguarded_chain(guard: Guard, retriever: Any = None, **generation: Any) -> Runnable:
    """The same retrieval and prompt, answered by the same local model with no classifier and no corruption."""
    retriever = retriever or build_retriever()
    generation.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    guard.params(**generation)  # unknown settings fail here, not on the first question

    def answer(value: dict[str, Any]) -> str:
        # the question and the passages as ECOGuard reads them, in the same RAG prompt, never classified
        return guard.unguarded(to_request(value), **generation).generate().text

    return {"context": retriever, "question": RunnablePassthrough()} | RunnableLambda(
        answer, name="unguarded_local_model")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("questions", nargs="*", help="questions to ask (default: a few demo questions)")
    parser.add_argument("--config", default=None, help="guard YAML (default: the embedded demo config)")
    parser.add_argument("--rag", choices=("corrupt", "drop"), default=None,
                        help="override the config's rag mode for flagged passages")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--no-compare", action="store_true", help="skip the unguarded chain")
    args = parser.parse_args(argv)

    guard = Guard.from_config(args.config)
    if args.rag:
        guard = with_rag_mode(guard, args.rag)
    retriever = build_retriever()
    guarded = build_guarded_chain_with_decision(guard, retriever, max_new_tokens=args.max_new_tokens)
    unguarded = build_unguarded_chain(guard, retriever, max_new_tokens=args.max_new_tokens)
    for question in args.questions or DEMO_QUESTIONS:
        passages = [d.id for d in retriever.invoke(question)]
        reply = guarded.invoke(question)
        d = reply.response_metadata["eco_guard"]
        print(f"Q: {question}")
        print(f"   retrieved: {', '.join(map(str, passages))}")
        print(f"   decision:  route={d['route']} topic={d['topic']} score={d['score']:.3f} "
              f"passages flagged={d['passages_flagged']} dropped={d['passages_dropped']} "
              f"corrupted tokens={d['corrupted_tokens']}")
        print(f"   guarded:   {reply.content.strip()}")
        if not args.no_compare:
            print(f"   unguarded: {unguarded.invoke(question).strip()}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
