"""The corruption store: each topic's learned corruption, in one versioned JSON file next to its config.

``eco-guard optimize CONFIG`` writes it; a topic whose config says ``corruption: learned`` reads its
entry at start-up. The file records what was learned against which model (a hash of the embedding
matrix): corruption strengths mean nothing for another model, so a mismatch is an error, as is a
missing entry or a malformed file — never a silent default.

Example:
    >>> store = CorruptionStore(model_name="tiny", fingerprint="sha256:ab")
    >>> store.topics["t"] = StoredTopic(CorruptionSpec(strength=3.0), SelectionConfig())
    >>> CorruptionStore.from_json(store.to_json(), file="x.json").topics["t"].corruption.strength
    3.0
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from eco_guard.config import SelectionConfig
from eco_guard.corruption import CorruptionSpec
from eco_guard.errors import ConfigError

__all__ = ["FORMAT_VERSION", "CorruptionStore", "StoreError", "StoredTopic", "default_store_path"]

FORMAT_VERSION: Final = 1


class StoreError(ConfigError):
    """The corruption store is missing, malformed, or was learned for another model."""


def default_store_path(config_source: str | os.PathLike[str] | None) -> Path | None:
    """``guard.yaml`` → ``guard.eco.json`` beside it (None for a config that came from no file)."""
    if config_source is None:
        return None
    source = Path(config_source)
    return source.with_name(f"{source.stem}.eco.json")


@dataclass
class StoredTopic:
    """A topic's learned corruption and token selection, with how it measured."""

    corruption: CorruptionSpec
    selection: SelectionConfig
    objective: dict[str, Any] = field(default_factory=dict)  # name, target, baseline and achieved values
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every corruption tried

    def to_dict(self) -> dict[str, Any]:
        return {"corruption": self.corruption.model_dump(), "selection": self.selection.model_dump(),
                "objective": self.objective, "candidates": self.candidates}


@dataclass
class CorruptionStore:
    """Learned corruptions of one config, and the model they were learned against."""

    model_name: str
    fingerprint: str
    topics: dict[str, StoredTopic] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    version: str = ""

    def to_json(self) -> str:
        from eco_guard import __version__

        data = {"format_version": FORMAT_VERSION, "eco_guard_version": self.version or __version__,
                "created": self.created, "model": {"name": self.model_name, "fingerprint": self.fingerprint},
                "topics": {name: t.to_dict() for name, t in sorted(self.topics.items())}}
        return json.dumps(data, indent=2) + "\n"

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a reader sees the old file or the new one, never half of it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, command: str = "eco-guard optimize CONFIG") -> CorruptionStore:
        """Read a store; every problem is a one-line ``StoreError`` naming the file and the command to re-run."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise StoreError(f"{path}: no corruption store ({exc.strerror or exc}); run `{command}`") from None
        return cls.from_json(text, file=str(path), command=command)

    @classmethod
    def from_json(cls, text: str, *, file: str = "<store>",
                  command: str = "eco-guard optimize CONFIG") -> CorruptionStore:
        def bad(why: str) -> StoreError:
            return StoreError(f"{file}: {why}; run `{command}` to write it again")

        try:
            data = json.loads(text)
        except ValueError as exc:
            raise bad(f"not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise bad("expected a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise bad(f"format_version {data.get('format_version')!r} is not {FORMAT_VERSION}")
        model, topics = data.get("model"), data.get("topics")
        if not isinstance(model, dict) or not isinstance(model.get("fingerprint"), str):
            raise bad("no model fingerprint")
        if not isinstance(topics, dict):
            raise bad("no 'topics' mapping")
        store = cls(str(model.get("name", "")), model["fingerprint"], created=str(data.get("created", "")),
                    version=str(data.get("eco_guard_version", "")))
        for name, entry in topics.items():
            try:
                store.topics[name] = StoredTopic(CorruptionSpec.model_validate(entry["corruption"]),
                                                 SelectionConfig.model_validate(entry.get("selection", {})),
                                                 dict(entry.get("objective", {})), list(entry.get("candidates", [])))
            except (KeyError, TypeError, AttributeError, ValidationError) as exc:
                detail = str(exc).splitlines()[0]
                raise bad(f"topics.{name}: malformed entry ({detail})") from None
        return store

    def entry(self, topic: str, fingerprint: str, *, file: str, command: str) -> StoredTopic:
        """The topic's entry, if it was learned against the model whose fingerprint is given."""
        if fingerprint != self.fingerprint:
            raise StoreError(f"{file}: learned for another model (fingerprint {self.fingerprint[:19]}, this model "
                             f"{fingerprint[:19]}); run `{command}` for this model")
        if topic not in self.topics:
            raise StoreError(f"{file}: no learned corruption for topic {topic!r}; run `{command}`")
        return self.topics[topic]
