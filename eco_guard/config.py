"""The YAML config: schema, loading, ``${VAR}`` interpolation, and errors that point at the line.

One file describes one guard, top to bottom::

    model:            {path: default}            # local chat model: default | HF folder | .gguf file
    classifier:
      path: ./classifier
      negatives: [retain.jsonl]
      training: {epochs: 2}                      # what the model learns: a change retrains
      decision: {min_threshold: 0.5}             # how its scores are read: a change re-decides at once
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

The whole schema lives here, pure pydantic: loading a config imports no model code (no torch,
transformers or sentence-transformers); the classifier, the corruptions and the engine read the
parts they need.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from eco_guard.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from eco_guard.corruption import Corruptor, SeedKey

__all__ = [
    "ClassifierConfig",
    "CorruptionSpec",
    "DataSource",
    "DecisionSettings",
    "GenerationConfig",
    "GuardConfig",
    "ModelConfig",
    "SelectionConfig",
    "ServerSettings",
    "TopicConfig",
    "TrainingSettings",
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


# ---------------------------------------------------------------- corruption

DEFAULT_METHOD: Final = "rand_noise_first_n"  # the paper's default corruption
DEFAULT_DIMS: Final = 1  # the paper's default: only the first embedding dimension
# Name-only corruption of SmolLM2 fine-tuned on invented author facts, at sigma 3-5, forgot 24 of 25 facts and
# stayed fluent; `eco-guard optimize` learns it per topic.
DEFAULT_STRENGTH: Final = 5.0
DEFAULT_SEED: Final = 0
MAX_SEED: Final = 2**63 - 1  # seeds stay within a signed 64-bit integer (torch, JSON)
BUILTIN_CORRUPTIONS: Final = (
    "rand_noise_first_n", "rand_noise_rand_n", "rand_noise_top_k", "zero_out_top_k", "zero_out_first_n",
    "flip_sign_first_n", "flip_sign_top_k", "sub_value_top_k", "add_value_least_k", "sub_value_first_n",
    "add_value_first_n", "set_rand_noise_first_n", "reverse_order", "shuffle",
)
"""The corruptions :mod:`eco_guard.corruption` registers (the ECO paper's fourteen)."""


class CorruptionSpec(BaseModel):
    """A topic's stored corruption: which function, its parameters and the seed of its noise.

    The schema is plain pydantic (a config validates without torch); :meth:`build` and
    :meth:`apply` load :mod:`eco_guard.corruption`, which also re-exports this class.

    Args:
        method: a registered corruption name (see :data:`eco_guard.corruption.CORRUPTORS`).
        dims: embedding dimensions corrupted per token.
        strength: noise standard deviation or added/subtracted value; the optimiser tunes it.
        seed: the topic's seed; a request's noise seed is derived from it and the prompt.

    Raises:
        pydantic.ValidationError: a field is out of range or ``method`` is unknown (the message lists the
            known methods).

    Example:
        >>> import torch
        >>> spec = CorruptionSpec(method="zero_out_first_n", dims=2)
        >>> spec.apply(torch.ones(1, 2, 3), torch.tensor([[True, False]])).tolist()
        [[[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]]
        >>> CorruptionSpec.model_validate_json(spec.model_dump_json()) == spec
        True
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = Field(DEFAULT_METHOD, description="Registered corruption name, e.g. rand_noise_first_n.")
    dims: int = Field(DEFAULT_DIMS, ge=1, description="Embedding dimensions corrupted per token.")
    strength: float = Field(
        DEFAULT_STRENGTH, ge=0, allow_inf_nan=False, description="Noise std or added/subtracted value (sigma)."
    )
    seed: int = Field(DEFAULT_SEED, ge=0, le=MAX_SEED,
                      description="Topic seed; request noise derives from it and the prompt.")

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in BUILTIN_CORRUPTIONS:  # one registered by the user, or a typo: only the registry can tell
            from eco_guard.corruption import get_corruptor

            get_corruptor(method)
        return method

    @property
    def uses_strength(self) -> bool:
        """Whether ``strength`` changes the result (the optimiser has something to tune)."""
        from eco_guard.corruption import get_corruptor

        return get_corruptor(self.method).uses_strength

    def build(self) -> Corruptor:
        """The corruptor this spec describes."""
        from eco_guard.corruption import get_corruptor

        return get_corruptor(self.method)(dims=self.dims, strength=self.strength)

    def with_strength(self, strength: float) -> CorruptionSpec:
        """A validated copy with another strength (one optimiser step)."""
        return type(self).model_validate({**self.model_dump(), "strength": strength})

    def apply(self, embeds: torch.Tensor, mask: torch.Tensor, *, keys: Sequence[SeedKey] | None = None) -> torch.Tensor:
        """Corrupt ``embeds`` deterministically.

        Args:
            embeds: floating ``(batch, seq, dim)`` prompt embeddings; not modified.
            mask: boolean ``(batch, seq)``; True marks the tokens to corrupt.
            keys: one prompt per row (text or token ids): each row's noise is seeded by
                ``derive_seed(seed, key)``, so a prompt gets the same corruption in any batch. Without keys,
                one generator seeded with ``seed`` serves the rows in order.

        Returns:
            A new tensor like ``embeds``.

        Raises:
            InputError: bad tensors, or ``len(keys)`` differs from the batch size.
            ConfigError: ``dims`` exceeds the embedding width.
        """
        import torch

        from eco_guard.corruption import Generators, request_generators

        generator: Generators
        generator = torch.Generator().manual_seed(self.seed) if keys is None else request_generators(self.seed, keys)
        return self.build()(embeds, mask, generator=generator)


# ---------------------------------------------------------------- classifier


def _settings_error(cls: type[BaseModel], exc: ValidationError, where: str, kind: str) -> ConfigError:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    at = f"{where}.{key}" if key else where
    if err["type"] == "extra_forbidden":
        if cls is TrainingSettings and key in DecisionSettings.model_fields:
            return ConfigError(f"{at} is a decision setting: pass it in DecisionSettings (classifier.decision.{key})")
        return ConfigError(f"{at}: unknown {kind} setting (known: {', '.join(cls.model_fields)})")
    msg = err["msg"].removeprefix("Value error, ")
    return ConfigError(f"{at}: {msg}" + (f" (got {err.get('input')!r})" if key else ""))


class TrainingSettings(BaseModel):
    """How the classifier is trained (``classifier.training`` in the YAML config).

    Every field is a training input: the saved classifier records them, and a change makes it
    stale (retrained on next use). How its scores are read is :class:`DecisionSettings`.

    Example:
        >>> TrainingSettings.parse({"epochs": 2}).epochs
        2
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    finetune_encoder: bool = Field(True, description="fine-tune the encoder; False trains only the head")
    freeze_embeddings: bool = Field(True, description="keep the token embedding table fixed while fine-tuning "
                                    "(a third of the cost; keeps rare and misspelt sub-words where pre-training put "
                                    "them)")
    frozen_layers: int = Field(0, ge=0, le=100, description=(
        "lowest transformer layers kept fixed while fine-tuning: no backward pass through them "
        "(2 of all-MiniLM-L6-v2's 6 layers: fine-tuning measured 28% faster)"))
    encoder_layers: int | None = Field(None, ge=1, le=100, description=(
        "keep only the lowest N transformer layers of the encoder (None: all); training and scoring "
        "cost fall in proportion, and fine-tuning adapts the shortened encoder (4 of all-MiniLM-L6-v2's 6: "
        "a third less compute)"))
    precision: Literal["auto", "float32", "bfloat16"] = Field("auto", description=(
        "arithmetic of fine-tuning's forward and backward passes (weights, optimiser and scoring stay float32): "
        "bfloat16 autocast was 1.5x faster on a CPU with native bf16 (AVX512-BF16, AMX) and is emulated, slowly, "
        "elsewhere; auto = bfloat16 where the CPU has it"))
    epochs: int = Field(3, ge=0, le=100, description="fine-tuning passes over the augmented training set")
    batch_size: int = Field(32, ge=1, le=1024)
    learning_rate: float = Field(5e-5, gt=0, le=1, description="encoder learning rate (AdamW)")
    head_learning_rate: float = Field(2e-3, gt=0, le=10, description="head learning rate")
    head_steps: int = Field(300, ge=0, le=100_000, description="full-batch steps fitting the head on frozen embeddings")
    weight_decay: float = Field(0.01, ge=0, le=1)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    augment: bool = Field(True, description="add evasive variants (typos, wrappers, burying, code, names)")
    augment_copies: int = Field(2, ge=0, le=50, description="variants per training prompt")
    term_prompts: int = Field(1, ge=0, le=20, description=(
        "training prompts built around each topic term (contrast terms get as many prompts in all as the topics)"))
    joined_negatives: int = Field(200, ge=0, le=100_000, description=(
        "negatives made of 3-8 negative prompts run together: a long prompt is scored window by window, "
        "and a window of unrelated text must not add up to a topic"))
    prose_negatives: int = Field(200, ge=0, le=100_000, description=(
        "negatives made of 4-15 sentences of everyday prose shipped with eco-guard (mail, manuals, news); "
        "long prompts are mostly documents, and the prompts alone would teach nothing about prose; the same "
        "sentences make half the text that buried variants are surrounded with (0 turns both off)"))
    calibration_fraction: float = Field(0.3, gt=0, lt=1, description="negatives held out to calibrate thresholds")
    positive_holdout_fraction: float = Field(0.15, ge=0, lt=1, description="positives held out to report the FNR")
    window_tokens: int = Field(128, ge=8, le=512, description=(
        "tokens per window (special tokens included): training reads a prompt's first window, the "
        "augmentation sizes buried variants to fit one, and scoring reads a long prompt window by window"))
    quantize: bool = Field(False, description="int8 dynamic quantisation of the encoder: 2-3x faster on CPU, but "
                           "activation scales are per batch, so a prompt's score depends on its batch-mates "
                           "(logit shifts up to ~1.6 measured); off by default")
    seed: int = 0

    @model_validator(mode="after")
    def _something_fine_tunes(self) -> TrainingSettings:
        if self.encoder_layers is not None and self.frozen_layers >= self.encoder_layers:
            raise ValueError(f"frozen_layers: {self.frozen_layers} would freeze all {self.encoder_layers} "
                             f"encoder_layers; nothing would fine-tune")
        return self

    @classmethod
    def parse(cls, values: Mapping[str, Any] | TrainingSettings | None, *,
              where: str = "classifier.training") -> TrainingSettings:
        """Validate a mapping; errors name the key (``ConfigError``)."""
        if isinstance(values, TrainingSettings):
            return values
        try:
            return cls.model_validate(dict(values or {}))
        except ValidationError as exc:
            raise _settings_error(cls, exc, where, "training") from None



class DecisionSettings(BaseModel):
    """How the trained classifier's probabilities become decisions (``classifier.decision`` in the YAML config).

    Nothing here is a training input: a change re-decides at once and never retrains (the
    saved model stays up to date). ``window_tokens`` is not here: it truncates training
    examples and sizes the augmentation's filler, so it is a training setting; only the stride
    between the scoring windows is read at inference.

    Example:
        >>> DecisionSettings.parse({"min_threshold": 0.7}).min_threshold
        0.7
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_threshold: float = Field(0.5, ge=0, le=1, description=(
        "floor under calibrated thresholds: a confident model puts every calibration negative near 0, "
        "so the conformal quantile can fall far below 0.5, where unseen text (a long prompt's many "
        "windows, typos) crosses it; 0.5 = flag only what the model finds more likely than not"))
    contrast_threshold: float | None = Field(None, ge=0, le=1, description=(
        "threshold for a prompt that names a contrast term and no term of the topic (None: the topic's own): "
        "a neighbouring work's name is evidence against the topic that the encoder alone cannot weigh"))
    weak_term_threshold: float = Field(0.6, ge=0, le=1, description=(
        "threshold for a prompt that names one of a topic's weak_terms (and no contrast term), when lower than "
        "the topic's own: an ambiguous name (Luke, Empire) is evidence for the topic the encoder alone cannot weigh"))
    window_stride: int = Field(64, ge=1, le=512, description=(
        "tokens between the starts of a long prompt's scoring windows (at most training.window_tokens); "
        "the stored calibration scores keep the stride they were computed with"))

    @classmethod
    def parse(cls, values: Mapping[str, Any] | DecisionSettings | None, *,
              where: str = "classifier.decision") -> DecisionSettings:
        """Validate a mapping; errors name the key (``ConfigError``)."""
        if isinstance(values, DecisionSettings):
            return values
        try:
            return cls.model_validate(dict(values or {}))
        except ValidationError as exc:
            raise _settings_error(cls, exc, where, "decision") from None

DEFAULT_REMOTE_TIMEOUT_S: Final = 60.0
DEFAULT_REMOTE_RETRIES: Final = 3
DEFAULT_REMOTE_BACKOFF_S: Final = 0.5
_REMOTE_ONLY: Final = ("url", "api_key_env", "served_model", "embedding_key", "timeout_s", "retries", "backoff_s")


class ModelConfig(_Strict):
    """The chat model that answers (corrupted or not): in this process (``backend: local``), or on a
    vLLM-style server that accepts ``prompt_embeds`` (``backend: remote``; ``path`` is then a local copy of
    the served model, read for its tokenizer, chat template and embedding matrix only).

    Example:
        >>> ModelConfig(backend="remote", url="http://127.0.0.1:8000").retries
        3
    """

    backend: Literal["local", "remote"] = Field("local", description=(
        "'local': generate in this process; 'remote': on the server at 'url' (integrations/vllm/README.md)"))
    path: str = Field("default", description="'default' (SmolLM2-135M-Instruct), an HF folder or a .gguf file; "
                      "with backend: remote, a local copy of the served model")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        "float32",
        description="weights' precision; 'auto': bfloat16 where the CPU has native bf16 kernels, else float32; "
                    "'int8': int8 linear weights (one scale per row), the rest as 'auto'")
    system_prompt: str | None = None
    max_input_tokens: int | None = Field(None, gt=0, description="reject longer prompts; default: the model's context")
    threads: int | None = Field(None, gt=0, description=(
        "backend: local: torch threads of the decoding worker (callers keep their own count); "
        "default: every core (OMP_NUM_THREADS if set)"))
    batch_invariant: bool = Field(False, description=(
        "backend: local: decode concurrent requests with the arithmetic of a lone one and prefill each alone, so "
        "that a greedy reply never depends on what else decodes (bfloat16 with the native kernels: float32 does "
        "not need it; slower at high concurrency)"))
    url: str | None = Field(None, validate_default=True, description=(
        "backend: remote: the generation server's base URL (http://host:8000; /v1/completions is appended)"))
    api_key_env: str | None = Field(None, description=(
        "backend: remote: environment variable holding the generation server's bearer token (unset: none sent)"))
    served_model: str | None = Field(None, description=(
        "backend: remote: the model name requests name (default: the only one the server's /v1/models lists)"))
    embedding_key: str | None = Field(None, description=(
        "backend: remote: the embedding tensor's name in the safetensors file (default: the one tensor of "
        "shape (vocab_size, hidden_size), preferring a name with 'embed')"))
    timeout_s: float = Field(DEFAULT_REMOTE_TIMEOUT_S, gt=0, description="backend: remote: seconds per request")
    retries: int = Field(DEFAULT_REMOTE_RETRIES, ge=0, le=20, description=(
        "backend: remote: retries after a connection error, 429 or 5xx (a stream only before its first token)"))
    backoff_s: float = Field(DEFAULT_REMOTE_BACKOFF_S, ge=0, description=(
        "backend: remote: the first retry's wait, doubled on each retry (or the server's Retry-After)"))

    @field_validator("url")
    @classmethod
    def _url_for_remote(cls, url: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("backend") != "remote":
            return url
        if not url:
            raise ValueError("backend 'remote' needs the generation server's base URL (url: http://host:8000)")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {url!r}")
        return url

    @field_validator("threads")
    @classmethod
    def _threads_for_local(cls, threads: int | None, info: ValidationInfo) -> int | None:
        if threads is not None and info.data.get("backend") == "remote":
            raise ValueError("read only with backend: local (a remote server decides its own threads)")
        return threads

    @model_validator(mode="after")
    def _remote_fields_need_remote(self) -> ModelConfig:
        stray = [k for k in _REMOTE_ONLY if getattr(self, k) != type(self).model_fields[k].default]
        if self.backend == "local" and stray:
            raise ValueError(f"{', '.join(stray)}: read only with backend: remote (set backend: remote, or drop them)")
        return self


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
    training: TrainingSettings = Field(default_factory=TrainingSettings, description=(
        "how the model is trained: recorded with the saved classifier, a change retrains it"))
    decision: DecisionSettings = Field(default_factory=DecisionSettings, description=(
        "how its probabilities become decisions: a change re-decides at once, never retrains"))
    threads: int | None = Field(1, gt=0, description=(
        "torch threads of the classifier's forward pass on the calling thread (null: the caller's own count); "
        "one leaves the cores to the decoder (eco_guard.threads)"))

    @field_validator("decision")
    @classmethod
    def _windows_overlap(cls, decision: DecisionSettings, info: ValidationInfo) -> DecisionSettings:
        training = info.data.get("training")  # validated first: it is declared first
        if training is not None and decision.window_stride > training.window_tokens:
            raise ValueError(f"window_stride: {decision.window_stride} exceeds training.window_tokens "
                             f"{training.window_tokens}; windows would skip text")
        return decision


class SelectionConfig(_Strict):
    """Which prompt tokens get corrupted: the user's content, only keyword spans in it, or the words that
    make the classifier fire (``salient``: found per prompt by occlusion; the whole content when none is)."""

    mode: Literal["content", "keywords", "salient"] = "content"
    keywords: list[str] = Field(default_factory=list, description=(
        "what mode 'keywords' corrupts (whole words, any case); empty: the topic's terms and weak terms"))


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
        "classifier.decision.weak_term_threshold for this topic; quote a name to match it only capitalised"))
    max_false_positive_rate: float = Field(0.01, gt=0, lt=1)
    threshold: float | None = Field(None, ge=0, le=1)
    corruption: CorruptionSpec | Literal["learned"] = Field(
        default_factory=lambda: CorruptionSpec(strength=DEFAULT_STRENGTH), description=(
            "the corruption of this topic's flagged prompts: {method, dims, strength, seed}, or 'learned' to use "
            "what `eco-guard optimize` stored in the corruption store (its token selection included)"))
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    evaluation: Path | None = Field(None, description=(
        "short-answer questions about the topic (JSONL: question, answers) that `eco-guard optimize` learns "
        "the corruption on"))

    @field_validator("selection")
    @classmethod
    def _keywords_needed(cls, selection: SelectionConfig, info: ValidationInfo) -> SelectionConfig:
        if selection.mode == "keywords" and not any(k.strip() for k in selection.keywords) \
                and not (info.data.get("terms") or info.data.get("weak_terms")):
            raise ValueError("mode 'keywords' needs a non-empty 'keywords' list, or topic 'terms' to use instead")
        return selection


_MIB: Final = 1 << 20


class ServerSettings(_Strict):
    """How ``eco-guard serve`` serves one guard (the config's ``server:`` block; the command's flags override it).

    Example:
        >>> settings = ServerSettings(max_tokens_cap=256)
        >>> settings.expose_decision, settings.max_tokens_cap
        (False, 256)
    """

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port)")
    model_id: str | None = Field(None, description="model name that /v1/models lists and requests must name "
                                 "(default: the guard's model name)")
    expose_decision: bool = Field(False, description="add the guard's decision to replies under 'eco_guard' "
                                  "(off: telling a caller a prompt was flagged is itself a leak)")
    api_key_env: str | None = Field(None, description="environment variable holding the bearer token "
                                    "required on /v1/* and /metrics (unset: no auth)")
    enable_prompt_embeds: bool = Field(False, description="accept vLLM-style prompt_embeds on /v1/completions "
                                       "(unclassified: for the guard's own remote backend only)")
    max_body_bytes: int = Field(16 * _MIB, gt=0, description="largest request body; larger gets 413")
    max_embed_tokens: int = Field(2048, gt=0, description="most rows a prompt_embeds tensor may have "
                                  "(also capped by the model's max_input_tokens)")
    max_tokens_cap: int = Field(512, gt=0, description="largest max_tokens a request may ask for")
    max_concurrency: int = Field(16, gt=0, description="generations running at once (worker threads; the local "
                                 "backend decodes them together in one batch)")
    max_queue: int = Field(64, gt=0, description="requests admitted at once, running or waiting; more get 429")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429 and 503")
    request_timeout_s: float = Field(120.0, gt=0, description="a completion still running after this stops: "
                                     "a 504, or an error event ending a stream")
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM/SIGINT, how long in-flight requests "
                                    "may take to finish while new ones get 503")

    def api_key(self) -> str | None:
        """The bearer token, read from ``api_key_env``; an unset or empty variable is a ``ConfigError``."""
        if self.api_key_env is None:
            return None
        token = os.environ.get(self.api_key_env, "")
        if not token:
            raise ConfigError(f"server.api_key_env names {self.api_key_env!r}, which is unset or empty: "
                              f"export the token there, or drop api_key_env to serve without auth")
        return token


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
    server: ServerSettings = Field(default_factory=ServerSettings, description=(
        "how `eco-guard serve` serves this guard; the command's flags override it"))
    store: Path | None = Field(None, description=(
        "the corruption store that `corruption: learned` topics read (default: <config name>.eco.json beside "
        "the config)"))
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
        raise ConfigError(f"{where}: environment variable ${{{name}}} is not set and has no default "
                          f"(use ${{{name}:-value}})")

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
    if isinstance(data.get("store"), str):
        data["store"] = fix(data["store"])
    for topic in data.get("topics") or []:
        if isinstance(topic, dict) and isinstance(topic.get("evaluation"), str):
            topic["evaluation"] = fix(topic["evaluation"])
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


def _check_moved_keys(data: dict[str, Any], file: str, lines: dict[tuple, int]) -> None:
    """Decision settings used to sit under ``classifier.training``: say where each one goes now."""
    training = data.get("classifier", {}).get("training") if isinstance(data.get("classifier"), dict) else None
    for key in training if isinstance(training, dict) else ():
        if key in DecisionSettings.model_fields:
            where = _line_for(("classifier", "training", key), lines)
            raise ConfigError(f"{file}:{where}: classifier.training.{key} moved: write it as classifier.decision.{key}")


def _union_tag(part: Any) -> bool:
    """A location part pydantic adds, not a key of the file: a validator, a union member's class or literal."""
    return isinstance(part, str) and (part.startswith(("function-", "literal[")) or part[:1].isupper())


def _relevant_errors(exc: ValidationError) -> list[Any]:
    """The errors worth reporting: for a value that fits one member of a union (``corruption: {...}`` or
    ``learned``), not the other member's complaint that it is not that literal."""
    def other_member(e: Any) -> bool:
        if not any(_union_tag(p) for p in e["loc"]):
            return False
        if e["type"] == "literal_error":  # a mapping was written: the literal member is not what was meant
            return isinstance(e["input"], dict)
        return e["type"] in ("model_type", "model_attributes_type", "dict_type") and isinstance(e["input"], str)

    errors = exc.errors()
    return [e for e in errors if not other_member(e)] or errors


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
    _check_moved_keys(data, file, lines)
    try:
        cfg = GuardConfig.model_validate(data)
    except ValidationError as exc:
        errors = _relevant_errors(exc)
        err = errors[0]
        loc = tuple(p for p in err["loc"] if not _union_tag(p))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
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
