"""The YAML config: schema, loading, ``${VAR}`` interpolation, and errors that point at the line.

One file describes one guard, top to bottom::

    model:            {path: default}            # local chat model: default | HF folder | .gguf file
    classifier:       {path: ./classifier, negatives: [retain.jsonl]}
    topics:
      - name: harry_potter
        data: [{path: hp.jsonl, split: train}]
        max_false_positive_rate: 0.01
        corruption: {method: rand_noise_first_n, dims: 1, strength: 5}
        selection: {mode: content}
    on_classifier_error: flag                    # fail closed
    generation: {max_new_tokens: 128}

Example:
    >>> cfg = load_config("benchmarks/configs/dev_topics.yaml")  # doctest: +SKIP
    >>> [t.name for t in cfg.topics]  # doctest: +SKIP
    ['harry_potter', 'star_wars']
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from eco_guard.classifier_training import TrainingSettings
from eco_guard.corruption import CorruptionSpec
from eco_guard.errors import ConfigError

__all__ = [
    "ClassifierConfig",
    "DataSource",
    "GenerationConfig",
    "GuardConfig",
    "ModelConfig",
    "SelectionConfig",
    "TopicConfig",
    "default_cache_dir",
    "default_config_path",
    "load_config",
]


def default_cache_dir() -> Path:
    """Where eco-guard caches dequantised models and trained classifiers (``$ECO_GUARD_CACHE``)."""
    return Path(os.environ.get("ECO_GUARD_CACHE") or Path.home() / ".cache" / "eco-guard").expanduser()


def default_config_path() -> Path:
    """The embedded demo config shipped inside the package."""
    return Path(__file__).parent / "data" / "default.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSource(_Strict):
    """A JSONL/CSV file of prompts; ``split`` keeps only rows whose ``split`` field equals it.

    ``holdout: false`` puts every row into training: none is held out to calibrate thresholds
    (negatives) or to report the false-negative rate (positives). Use it for curated hard
    examples that do not look like real traffic, so they teach the boundary without setting
    the false-positive budget.
    """

    path: Path
    split: str | None = None
    holdout: bool = True

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, (str, Path)) else value


class TermsFile(_Strict):
    """A text file of topic terms: one per line, ``#`` starts a comment."""

    path: Path


class ModelConfig(_Strict):
    """The local chat model that answers (corrupted or not)."""

    backend: Literal["local"] = "local"
    path: str = Field("default", description="'default' (SmolLM2-135M-Instruct), an HF folder or a .gguf file")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    system_prompt: str | None = None
    max_input_tokens: int | None = Field(None, gt=0, description="reject longer prompts; default: the model's context")


class GenerationConfig(_Strict):
    """Decoding defaults; a request may override them."""

    max_new_tokens: int = Field(128, gt=0, le=8192)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None


class ClassifierConfig(_Strict):
    """The prompt classifier: encoder, where the trained model lives, shared negatives."""

    encoder: str = "default"
    path: Path = Path("classifier")
    negatives: list[DataSource] = Field(default_factory=list)
    contrast_terms: list[str | TermsFile] = Field(default_factory=list, description=(
        "names of things that are NOT any topic but sit close to one (neighbouring franchises, "
        "namesakes); training adds negative prompts built around each; each item is a term or {path: file.txt}"))
    training: TrainingSettings = Field(default_factory=TrainingSettings)


class SelectionConfig(_Strict):
    """Which prompt tokens get corrupted: the user's content, or only keyword spans in it."""

    mode: Literal["content", "keywords"] = "content"
    keywords: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _keywords_needed(self) -> SelectionConfig:
        if self.mode == "keywords" and not any(k.strip() for k in self.keywords):
            raise ValueError("mode 'keywords' needs a non-empty 'keywords' list")
        return self


class TopicConfig(_Strict):
    """One forget topic: its classifier data, threshold and corruption."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    description: str = ""
    data: list[DataSource] = Field(default_factory=list)
    terms: list[str | TermsFile] = Field(default_factory=list, description=(
        "names that on their own make a prompt about the topic (whole words, any case, plurals and "
        "possessives included); each item is a term or {path: file.txt}"))
    weak_terms: list[str | TermsFile] = Field(default_factory=list, description=(
        "ambiguous names of the topic (Luke, Empire, Potter): a prompt naming one needs only "
        "classifier.training.weak_term_threshold for this topic; quote a name to match it only capitalised"))
    max_false_positive_rate: float = Field(0.01, gt=0, lt=1)
    threshold: float | None = Field(None, ge=0, le=1)
    corruption: CorruptionSpec = Field(default_factory=lambda: CorruptionSpec(strength=5.0))
    selection: SelectionConfig = Field(default_factory=SelectionConfig)


class GuardConfig(_Strict):
    """A whole guard. Paths are absolute once loaded (resolved against the YAML file's folder)."""

    version: Literal[1] = 1
    model: ModelConfig = Field(default_factory=ModelConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    topics: list[TopicConfig] = Field(min_length=1)
    fallback: Literal["local"] = "local"
    on_classifier_error: Literal["flag", "block", "pass"] = "flag"
    rag: Literal["corrupt", "drop"] = "corrupt"
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    source: Path | None = Field(None, exclude=True, description="the YAML file this came from")

    @field_validator("topics")
    @classmethod
    def _unique_names(cls, topics: list[TopicConfig]) -> list[TopicConfig]:
        names = [t.name for t in topics]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"topic names must be unique, repeated: {', '.join(dupes)}")
        return topics

    def topic(self, name: str) -> TopicConfig:
        for t in self.topics:
            if t.name == name:
                return t
        raise KeyError(name)


# ---------------------------------------------------------------- loading

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _interpolate(text: str, where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        value = os.environ.get(name)
        if value or (value is not None and default is None):  # like the shell, ${VAR:-x} also replaces ""
            return value
        if default is not None:
            return default
        raise ConfigError(f"{where}: environment variable ${{{name}}} is not set and has no default (use ${{{name}:-value}})")

    return _VAR.sub(sub, text)


def _construct(node: yaml.Node, file: str, lines: dict[tuple, int], path: tuple = ()) -> Any:
    """Build Python values from the YAML node tree, recording each value's line by its path."""
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node))
            if key in out:
                raise ConfigError(f"{file}:{key_node.start_mark.line + 1}: {_dotted(path + (key,))}: duplicate key")
            out[key] = _construct(value_node, file, lines, path + (key,))
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, file, lines, path + (i,)) for i, v in enumerate(node.value)]
    value = yaml.safe_load(yaml.serialize(node))
    if isinstance(value, str) and "${" in value:
        interpolated = _interpolate(value, f"{file}:{lines[path]}: {_dotted(path)}")
        # Re-resolve a plain scalar so ${PORT:-8000} becomes an int, like the literal would;
        # a quoted one ("${PORT}") stays text, like a quoted literal.
        value = interpolated
        if node.style is None and interpolated.strip():
            try:
                value = yaml.safe_load(interpolated)
            except yaml.YAMLError:  # e.g. a value starting with '@' or '%': it is plain text
                value = interpolated
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            value = interpolated
    return value


def _dotted(path: tuple) -> str:
    text = ""
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text or "<root>"


def _line_for(loc: tuple, lines: dict[tuple, int]) -> int:
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    def fix(p: Any) -> Any:
        if isinstance(p, str) and p:
            q = Path(p).expanduser()
            return str(q if q.is_absolute() else (base / q).resolve())
        return p

    def fix_source(s: Any) -> Any:
        if isinstance(s, dict) and "path" in s:
            return {**s, "path": fix(s["path"])}
        return fix(s)

    def fix_terms(items: list[Any]) -> list[Any]:  # a bare string is a term, not a path
        return [fix_source(t) if isinstance(t, dict) else t for t in items]

    clf = data.setdefault("classifier", {})
    if isinstance(clf, dict):
        clf["path"] = fix(clf.get("path", "classifier"))
        if isinstance(clf.get("negatives"), list):
            clf["negatives"] = [fix_source(s) for s in clf["negatives"]]
        if isinstance(clf.get("contrast_terms"), list):
            clf["contrast_terms"] = fix_terms(clf["contrast_terms"])
        if isinstance(clf.get("encoder"), str) and clf["encoder"] != "default":
            clf["encoder"] = fix(clf["encoder"])
    model = data.get("model")
    if isinstance(model, dict) and isinstance(model.get("path"), str) and model["path"] != "default":
        model["path"] = fix(model["path"])
    for topic in data.get("topics") or []:
        if isinstance(topic, dict) and isinstance(topic.get("data"), list):
            topic["data"] = [fix_source(s) for s in topic["data"]]
        for key in ("terms", "weak_terms"):
            if isinstance(topic, dict) and isinstance(topic.get(key), list):
                topic[key] = fix_terms(topic[key])


def _check_topic_names(data: dict[str, Any], file: str, lines: dict[tuple, int]) -> None:
    """Point a repeated topic name at its second occurrence (the schema alone can only blame the list)."""
    topics = data.get("topics")
    seen: set[str] = set()
    for i, topic in enumerate(topics if isinstance(topics, list) else []):
        name = topic.get("name") if isinstance(topic, dict) else None
        if isinstance(name, str) and name in seen:
            where = _line_for(("topics", i, "name"), lines)
            raise ConfigError(f"{file}:{where}: topics[{i}].name: topic names must be unique, repeated: {name}")
        if isinstance(name, str):
            seen.add(name)


def parse_config(text: str, *, file: str = "<string>", base_dir: Path | None = None) -> GuardConfig:
    """Validate YAML text; every error names the file, line and field path."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{file}:{line}: not valid YAML: {problem}") from None
    if root is None:
        raise ConfigError(f"{file}:1: the config is empty; expected a mapping with at least 'topics'")
    lines: dict[tuple, int] = {}
    data = _construct(root, file, lines)
    if not isinstance(data, dict):
        raise ConfigError(f"{file}:1: <root>: expected a mapping of settings, got {type(data).__name__}")
    _resolve_paths(data, base_dir or Path.cwd())
    _check_topic_names(data, file, lines)
    try:
        cfg = GuardConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # pydantic reports the union member or 'literal_error' detail; keep only keys present in the file
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{file}:{_line_for(loc, lines)}: {_dotted(loc)}: {msg}{more}") from None
    return cfg.model_copy(update={"source": Path(file) if file != "<string>" else None})


def load_config(path: str | os.PathLike[str] | None = None) -> GuardConfig:
    """Load and validate a YAML config (``None``: the embedded default)."""
    file = Path(path) if path is not None else default_config_path()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{file}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return parse_config(text, file=str(file), base_dir=file.resolve().parent)
