"""eco-guard: unlearning for LangChain apps by Embedding-COrrupted (ECO) prompts.

Example:
    >>> from eco_guard import ECOGuard            # doctest: +SKIP
    >>> ECOGuard().invoke("Who is Harry Potter?").response_metadata["eco_guard"]["route"]  # doctest: +SKIP
    'corrupted'
"""

from __future__ import annotations

import importlib
from typing import Any

from eco_guard.errors import ClassifierError, ConfigError, DataError, EcoGuardError, InputError

__version__ = "0.1.0"

# Heavy modules (torch, transformers) load on first use, so `import eco_guard` stays instant.
_LAZY = {
    "Guard": "eco_guard.guard",
    "Decision": "eco_guard.guard",
    "GuardConfig": "eco_guard.config",
    "load_config": "eco_guard.config",
    "CorruptionSpec": "eco_guard.corruption",
    "PromptClassifier": "eco_guard.classifier",
    "Classification": "eco_guard.classifier",
    "TrainingSettings": "eco_guard.config",
    "DecisionSettings": "eco_guard.config",
    "MiniLMEmbeddings": "eco_guard.embeddings",
    "LocalBackend": "eco_guard.backends.local",
    "ECOGuard": "eco_guard.langchain",
    "ECOChatModel": "eco_guard.langchain",
    "ECODocumentFilter": "eco_guard.langchain",
}

__all__ = ["ClassifierError", "ConfigError", "DataError", "EcoGuardError", "InputError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'eco_guard' has no attribute {name!r}")
