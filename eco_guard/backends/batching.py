"""Continuous batching for the local backend: concurrent requests decode together, one forward per step.

A :class:`DecodeScheduler` owns one worker thread (started on demand, gone when idle) and a
:class:`SlotCache`, a preallocated KV cache whose rows are the requests being decoded. A request that
arrives while others decode is prefilled on its own (with its own small cache), its keys and values are
copied into a free row, and it joins the next step; a finished or abandoned request leaves its row. Every
request keeps its own sampling settings, random generator, stop strings and end-of-sequence rule, so under
greedy decoding it gets the tokens it would get alone, and under sampling the draws its seed gives.

The model is only read; the scheduler is the one mutable object shared by the requests it serves.

Example:
    >>> from eco_guard.backends.base import GenerationParams
    >>> DecodeRequest.__name__, GenerationParams().do_sample
    ('DecodeRequest', False)
"""

from __future__ import annotations

import atexit
import inspect
import queue
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from eco_guard.backends.base import GenerationParams, StreamEvent
from eco_guard.backends.decode_step import LlamaDecodeStep, NativeLlamaStep
from eco_guard.threads import default_decode_threads

__all__ = ["DEFAULT_MAX_BATCH", "DecodeRequest", "DecodeScheduler", "SlotCache", "pick_tokens"]

DEFAULT_MAX_BATCH: Final = 32  # rows decoded together; more requests wait for a free row
_MIN_COLUMNS: Final = 64  # first allocation of the cache's sequence axis (it doubles when full)


@dataclass(eq=False)
class DecodeRequest:
    """One request for the scheduler: prompt embeddings ``(seq, hidden)`` in the model's dtype, and its state.

    ``row`` is the request's incremental detokeniser (``push(token, eos) -> str``, ``finish() -> str``,
    ``done``, ``tokens``, ``finish_reason``); it is only touched by the worker until the last event is sent.
    """

    embeds: torch.Tensor
    params: GenerationParams
    row: Any
    generator: torch.Generator | None = None
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False
    produced: int = 0

    def results(self) -> Iterator[StreamEvent]:
        """The request's events as the worker sends them (one per decoded token, the last with
        ``finish_reason``); closing the iterator early abandons the request (its row is freed)."""
        try:
            while True:
                event = self.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if event.finish_reason is not None:
                    return
        finally:
            self.cancelled = True


class SlotCache:
    """A preallocated KV cache for a changing set of rows (the transformers ``Cache`` calls a model makes).

    Row ``r`` holds its keys and values at the columns where ``mask[r]`` is true, all before column ``t``,
    the column every row writes its next token to. Buffers grow by doubling and are compacted (columns no
    row uses are dropped) before they grow, so a step costs no allocation and no copy of the cache.
    """

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor] = [torch.empty(0)] * n_layers
        self.values: list[torch.Tensor] = [torch.empty(0)] * n_layers
        self.mask = torch.zeros((0, 0), dtype=torch.bool)
        self.rows = 0
        self.t = 0
        self._like = torch.empty(0)  # a prefill's keys: the buffers' dtype, heads and head size

    # -- what the model calls
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        end = self.t + key.shape[-2]
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k[: self.rows, :, self.t : end] = key
        v[: self.rows, :, self.t : end] = value
        return k[: self.rows, :, :end], v[: self.rows, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.t

    # -- what the scheduler calls
    def step_mask(self) -> torch.Tensor:
        """Reserve column ``t`` for every row and return the 4-D boolean attention mask of the step."""
        self._room(self.rows, 1)
        self.mask[: self.rows, self.t] = True
        return self.mask[: self.rows, None, None, : self.t + 1]

    def advance(self) -> None:
        self.t += 1

    def admit(self, layers: list[tuple[torch.Tensor, torch.Tensor]], attn: torch.Tensor) -> None:
        """Add rows from a prefill: per layer ``(keys, values)`` of shape ``(n, heads, w, dim)``, mask ``(n, w)``."""
        n, w = attn.shape
        self._like = layers[0][0]
        if self.rows == 0:
            self.t = 0
        if w > self.t:  # the new rows are longer than the running ones: shift those right
            self._shift_to(w)
        self._room(self.rows + n, 1)
        r, t = self.rows, self.t
        for (k, v), kb, vb in zip(layers, self.keys, self.values):
            kb[r : r + n, :, t - w : t] = k
            vb[r : r + n, :, t - w : t] = v
        self.mask[r : r + n] = False
        self.mask[r : r + n, t - w : t] = attn.bool()
        self.rows += n

    def drop(self, row: int) -> None:
        """Free ``row``: the last row moves into it."""
        last = self.rows - 1
        if row != last:
            for kb, vb in zip(self.keys, self.values):
                kb[row] = kb[last]
                vb[row] = vb[last]
            self.mask[row] = self.mask[last]
        self.rows -= 1
        if self.rows == 0:
            self.t = 0

    def _shift_to(self, width: int) -> None:
        """Move the running rows right so that ``t`` is at least ``width``."""
        if self.rows:
            self._compact()
        by = width - self.t
        if by <= 0:
            return
        self._room(self.rows, by + 1)
        rows, t = self.rows, self.t
        for kb, vb in zip(self.keys, self.values):
            kb[:rows, :, by : by + t] = kb[:rows, :, :t].clone()
            vb[:rows, :, by : by + t] = vb[:rows, :, :t].clone()
        self.mask[:rows, by : by + t] = self.mask[:rows, :t].clone()
        self.mask[:rows, :by] = False
        self.t += by

    def _compact(self) -> None:
        used = self.mask[: self.rows, : self.t].any(0)
        lo = int(used.int().argmax()) if bool(used.any()) else self.t
        if lo == 0:
            return
        rows, keep = self.rows, self.t - lo
        for kb, vb in zip(self.keys, self.values):
            kb[:rows, :, :keep] = kb[:rows, :, lo : self.t].clone()
            vb[:rows, :, :keep] = vb[:rows, :, lo : self.t].clone()
        self.mask[:rows, :keep] = self.mask[:rows, lo : self.t].clone()
        self.mask[:rows, keep:] = False
        self.t = keep

    def _room(self, rows: int, extra: int) -> None:
        """Make room for ``rows`` rows and ``extra`` columns past ``t`` (compacting first, then growing)."""
        cap_rows, cap_cols = self.mask.shape
        if self.t + extra > cap_cols and self.rows:
            self._compact()
        columns = self.t + extra
        if rows <= cap_rows and columns <= cap_cols:
            return
        new_rows = max(rows, min(2 * cap_rows, DEFAULT_MAX_BATCH) if cap_rows else rows)
        new_cols = max(columns, 2 * cap_cols, _MIN_COLUMNS)
        ref = self._like
        _, heads, _, dim = ref.shape
        for i, (kb, vb) in enumerate(zip(self.keys, self.values)):
            nk = ref.new_zeros((new_rows, heads, new_cols, dim))
            nv = ref.new_zeros((new_rows, heads, new_cols, dim))
            if self.rows:
                nk[: self.rows, :, : self.t] = kb[: self.rows, :, : self.t]
                nv[: self.rows, :, : self.t] = vb[: self.rows, :, : self.t]
            self.keys[i], self.values[i] = nk, nv
        mask = torch.zeros((new_rows, new_cols), dtype=torch.bool)
        mask[: self.rows, : self.t] = self.mask[: self.rows, : self.t]
        self.mask = mask


def pick_tokens(logits: torch.Tensor, requests: list[DecodeRequest]) -> list[int]:
    """The next token of each row: argmax for greedy rows, a draw from each row's own generator otherwise."""
    tokens = logits.argmax(-1).tolist()
    for i, req in enumerate(requests):
        if req.generator is None:
            continue
        p = req.params
        probs = torch.softmax(logits[i].float() / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            drop = sorted_probs.cumsum(-1) - sorted_probs > p.top_p
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        tokens[i] = int(torch.multinomial(probs, 1, generator=req.generator))
    return tokens


_SCHEDULERS: weakref.WeakSet[DecodeScheduler] = weakref.WeakSet()


@atexit.register
def _stop_workers() -> None:
    """Let decode workers leave torch before the interpreter tears it down: a daemon thread still inside a
    torch operation at exit aborts the process ("terminate called without an active exception")."""
    for scheduler in list(_SCHEDULERS):
        scheduler.close()


class DecodeScheduler:
    """Decodes every submitted request in one running batch, on one worker thread.

    Args:
        model: a transformers causal LM (read only).
        pad_id: the token fed for rows that finished in the step they leave.
        eos_ids: end-of-sequence token ids (a request with ``ignore_eos`` decodes past them).
        max_batch: rows decoded together; further requests wait for a free row.
        threads: torch intra-op threads of the worker (default: every core; :mod:`eco_guard.threads`).
        batch_invariant: decode batches with the arithmetic of a lone request, and prefill each request alone,
            so that a greedy reply does not depend on what else decodes (bfloat16 with the native kernels;
            elsewhere it changes nothing).
    """

    def __init__(self, model: Any, *, pad_id: int, eos_ids: set[int], max_batch: int = DEFAULT_MAX_BATCH,
                 threads: int | None = None, batch_invariant: bool = False):
        self.model, self.pad_id, self.eos_ids, self.max_batch = model, pad_id, frozenset(eos_ids), max_batch
        self.threads = threads or default_decode_threads()
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renames forward's `past_key_values` to `cache`; accept both.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        if NativeLlamaStep.supports(model):
            self._lean = NativeLlamaStep(model, batch_invariant=batch_invariant)
        else:
            self._lean = LlamaDecodeStep(model) if LlamaDecodeStep.supports(model) else None
        # a batch-invariant step also needs each request prefilled alone: a padded batch multiplies other shapes
        self._alone = isinstance(self._lean, NativeLlamaStep) and self._lean.batch_invariant
        self._lock = threading.Lock()
        self._pending: list[DecodeRequest] = []
        self._worker: threading.Thread | None = None
        self._closing = False
        _SCHEDULERS.add(self)
        # worker-only state
        self._active: list[DecodeRequest] = []
        self._cache: SlotCache | None = None
        self._positions = torch.zeros(0, dtype=torch.long)
        self._last: list[int] = []

    def submit(self, requests: list[DecodeRequest]) -> None:
        """Queue requests; they are prefilled together and join the running batch at the next step."""
        with self._lock:
            self._pending.extend(requests)
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="eco-guard-decode", daemon=True)
                self._worker.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop decoding after the current step and wait for the worker; requests still queued or running get
        a ``RuntimeError`` instead of more tokens. A later :meth:`submit` starts a new worker."""
        with self._lock:
            worker, self._closing = self._worker, True
        if worker is not None:
            worker.join(timeout)
        with self._lock:
            self._closing = False

    # ------------------------------------------------------------ worker

    def _run(self) -> None:
        torch.set_num_threads(self.threads)  # this thread's own count: callers keep theirs (eco_guard.threads)
        with torch.inference_mode():
            while True:
                with self._lock:
                    if self._closing:  # every request still here gets an answer: that it was stopped
                        pending, self._pending = self._pending, []
                        self._fail(pending, RuntimeError("the local model's decoder was closed while this request ran"))
                        self._worker = None
                        return
                    if not self._pending and not self._active:
                        self._worker = None
                        return
                    room = self.max_batch - len(self._active)
                    new, self._pending[:room] = self._pending[:room], []
                try:
                    if new:
                        self._admit(new)
                    if self._active:
                        self._step()
                except Exception as exc:  # noqa: BLE001 - deliver the failure to every request it touched, then start afresh
                    self._fail(new, exc)

    def _fail(self, others: list[DecodeRequest], exc: BaseException) -> None:
        """Send ``exc`` to every running request and to ``others``, and start afresh with an empty batch."""
        for req in {id(r): r for r in self._active + others}.values():
            req.events.put(exc)
        self._active, self._cache, self._last = [], None, []
        self._positions = torch.zeros(0, dtype=torch.long)

    def _admit(self, new: list[DecodeRequest]) -> None:
        from transformers import DynamicCache

        new = [r for r in new if not r.cancelled]
        for r in [r for r in new if r.params.max_new_tokens <= 0]:
            r.events.put(StreamEvent(r.row.finish(), [], r.row.finish_reason))
        new = [r for r in new if r.params.max_new_tokens > 0]
        if not new:
            return
        if self._alone and len(new) > 1:
            for r in new:
                self._admit([r])
            return
        width = max(r.embeds.shape[0] for r in new)
        embeds = new[0].embeds.new_zeros((len(new), width, new[0].embeds.shape[-1]))
        attn = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):  # left padding, as transformers' own batched generation
            embeds[i, width - r.embeds.shape[0]:] = r.embeds
            attn[i, width - r.embeds.shape[0]:] = 1
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        prefill = DynamicCache(config=self.model.config)
        out = self.model(inputs_embeds=embeds, attention_mask=attn, position_ids=positions, use_cache=True,
                         **{self._cache_arg: prefill}, **self._keep)
        if self._cache is None:
            self._cache = SlotCache(len(prefill.layers))
        self._cache.admit([(layer.keys, layer.values) for layer in prefill.layers], attn)
        self._active += new
        self._positions = torch.cat([self._positions, attn.sum(-1)])
        self._last += [self.pad_id] * len(new)
        self._emit(out.logits[:, -1, :], first=len(self._active) - len(new))

    def _step(self) -> None:
        cache = self._cache
        assert cache is not None
        mask = cache.step_mask()
        ids = torch.tensor(self._last, dtype=torch.long)[:, None]
        positions = self._positions[:, None]
        if self._lean is not None:
            logits = self._lean(ids, positions, mask, cache)
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                **{self._cache_arg: cache}).logits[:, -1, :]
        cache.advance()
        self._positions += 1
        self._emit(logits, first=0)

    def _emit(self, logits: torch.Tensor, first: int) -> None:
        """Pick and send the next token of rows ``first:``; free the rows that are done or abandoned."""
        rows = self._active[first:]
        tokens = pick_tokens(logits, rows)
        for i, (req, token) in enumerate(zip(rows, tokens), start=first):
            self._last[i] = token
            if req.cancelled:
                continue
            before = len(req.row.tokens)
            piece = req.row.push(token, set() if req.params.ignore_eos else self.eos_ids)
            req.produced += 1
            req.events.put(StreamEvent(piece, req.row.tokens[before:]))
            if req.row.done or req.produced >= req.params.max_new_tokens:
                req.events.put(StreamEvent(req.row.finish(), [], req.row.finish_reason))
                req.cancelled = True
        self._free()

    def _free(self) -> None:
        cache = self._cache
        assert cache is not None
        for i in range(len(self._active) - 1, -1, -1):
            if not self._active[i].cancelled:
                continue
            last = len(self._active) - 1
            cache.drop(i)
            self._active[i], self._last[i] = self._active[last], self._last[last]
            self._positions[i] = self._positions[last]
            self._active.pop()
            self._last.pop()
            self._positions = self._positions[:last]
