"""eco-guard: unlearning for LangChain apps by Embedding-COrrupted (ECO) prompts."""

from eco_guard.errors import ClassifierError, ConfigError, DataError, EcoGuardError, InputError

__version__ = "0.1.0"

__all__ = ["ClassifierError", "ConfigError", "DataError", "EcoGuardError", "InputError", "__version__"]
