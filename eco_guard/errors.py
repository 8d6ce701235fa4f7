"""The errors eco-guard raises on purpose: each carries a one-line reason."""

from __future__ import annotations


class EcoGuardError(ValueError):
    """Base class: bad input or configuration, explained in one line."""


class ConfigError(EcoGuardError):
    """The YAML config is wrong; the message names the file, line and field path."""


class InputError(EcoGuardError):
    """A prompt cannot be served (empty, too long, wrong type)."""


class DataError(EcoGuardError):
    """A training or evaluation data file is malformed; the message names file and line."""


class ClassifierError(EcoGuardError):
    """The classifier could not score a prompt (missing model, internal failure)."""
