"""Learning a topic's corruption offline: objectives measured through the engine, and a zeroth-order optimiser.

ECO's claim is that a flagged prompt is answered *as if the model had never learned the topic*: neither
refused nor babbled. So a candidate corruption is judged on two things, each through :meth:`Guard.plan`
(routing, token selection and corruption exactly as served):

- **knowledge**: the hit rate (an accepted answer in the greedy reply) on the topic's questions that the
  plain model answers right, and, as a smooth surrogate the optimiser can follow, the mean per-token
  log-probability of those plain, correct replies under the corrupted prompt;
- **fluency**: the perplexity of the corrupted replies under the uncorrupted model, read as text after a
  neutral request (:data:`NEUTRAL_REQUEST`), as a ratio to the plain replies' own read the same way, and the
  share of repeated word bigrams. Not read as answers to their questions: the model that knows the topic finds
  any wrong answer unlikely there, so that ratio punishes exactly the confident "never learned" reply and
  rewards a deflection ("I'm sorry, as a chatbot I can't...") that states nothing. Read as text, natural
  replies sit near 1, babble far above, and templates and loops below (more predictable than the model's
  own answers): a candidate is fluent within a factor of the plain replies on either side.

The strength is searched by the paper's scalar zeroth-order step with two fixes: both sides of a step see
the same random numbers (a request's noise is seeded by its prompt, so f(σ+ε) and f(σ−ε) differ only by
σ), and the step divides by the true distance between the two points when the lower one is clipped. The
search runs in log σ, since useful strengths span orders of magnitude (3 to 1e6 in the paper).

Example:
    >>> result = zeroth_order_scalar(lambda x, seed: (x - 3.0) ** 2, 0.0, eps=0.1, lr=0.4, steps=50)
    >>> round(result.x, 2)
    3.0
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from eco_guard.errors import DataError

if TYPE_CHECKING:
    from eco_guard.config import SelectionConfig
    from eco_guard.corruption import CorruptionSpec
    from eco_guard.guard import Guard, GuardRequest

__all__ = [
    "Candidate",
    "KnowledgeObjective",
    "Measurement",
    "QAItem",
    "best_candidate",
    "SearchResult",
    "ZOResult",
    "optimize_config",
    "read_qa",
    "search_topic",
    "write_report",
    "zeroth_order_scalar",
    "zeroth_order_vector",
]

TINY = 1e-8  # the paper's lower clip of σ − ε
NEUTRAL_REQUEST = "Write one sentence."  # what a reply is read after when its fluency is measured


# ---------------------------------------------------------------- the optimiser

@dataclass
class ZOResult:
    """Where a zeroth-order run ended, and each step's point, value and gradient estimate."""

    x: Any
    value: float
    steps: int
    reached: bool
    history: list[dict[str, Any]] = field(default_factory=list)


def zeroth_order_scalar(f: Callable[[float, int], float], x0: float, *, eps: float, lr: float, steps: int,
                        x_min: float = -math.inf, clip_low: float | None = None, seed: int = 0,
                        plateau_step: float = 0.0, plateau_direction: float = 1.0, max_step: float = math.inf,
                        reached: Callable[[float, float], bool] | None = None,
                        progress: bool = False, desc: str = "zeroth-order") -> ZOResult:
    """Minimise ``f(x, seed)`` with the finite-difference step g = [f(x+ε) − f(lo)] / (x + ε − lo).

    ``lo = max(x − ε, clip_low)`` (the paper clips σ − ε at 1e-8 and still divides by 2ε; the true distance
    is used here). Both sides of a step get the same ``seed`` (common random numbers), so a noisy ``f``
    differs between them only through ``x``; ``x ← max(x − lr·g, x_min)``. ``reached(x, f(x))`` stops early.
    A step shorter than ``plateau_step`` is replaced by ``plateau_step`` in ``plateau_direction``: where the
    objective barely responds (too little noise to matter yet), the estimate's sign is noise, and a caller
    that knows which way the target lies (knowledge only falls as corruption grows) says so. A step longer
    than ``max_step`` is cut to it: a penalty that switches on between x−ε and x+ε makes the estimate huge,
    and following it whole throws x far past the region worth searching.
    """
    x, history = float(x0), []
    value = f(x, seed)
    bar = tqdm(total=steps, desc=desc, disable=not progress, leave=False)
    for step in range(steps):
        if reached is not None and reached(x, value):
            bar.close()
            return ZOResult(x, value, step, True, history)
        step_seed = seed + step + 1
        lo = x - eps if clip_low is None else max(x - eps, clip_low)
        hi = x + eps
        grad = (f(hi, step_seed) - f(lo, step_seed)) / (hi - lo)
        history.append({"x": x, "value": value, "grad": grad})
        move = -lr * grad
        if abs(move) < plateau_step:
            move = math.copysign(plateau_step, plateau_direction)
        move = max(-max_step, min(max_step, move))
        x = max(x + move, x_min)
        value = f(x, seed)
        bar.update(1)
        bar.set_postfix(x=f"{x:.3g}", f=f"{value:.4g}")
    bar.close()
    done = reached is not None and reached(x, value)
    return ZOResult(x, value, steps, done, history)


def zeroth_order_vector(f: Callable[[np.ndarray, int], float], x0: Sequence[float], *, eps: float, lr: float,
                        steps: int, seed: int = 0, x_min: Sequence[float] | float = -math.inf,
                        reached: Callable[[np.ndarray, float], bool] | None = None) -> ZOResult:
    """The random-direction variant (SPSA): g = [f(x+εu) − f(x−εu)] / (2ε) · u with Rademacher ``u``.

    One pair of evaluations per step whatever the dimension; ``u`` and both sides' seed come from ``seed``
    and the step, so a run is reproducible.
    """
    x = np.asarray(x0, dtype=np.float64).copy()
    rng = np.random.default_rng(seed)
    history: list[dict[str, Any]] = []
    value = f(x, seed)
    for step in range(steps):
        if reached is not None and reached(x, value):
            return ZOResult(x, value, step, True, history)
        u = rng.choice([-1.0, 1.0], size=x.shape)
        step_seed = seed + step + 1
        grad = (f(x + eps * u, step_seed) - f(x - eps * u, step_seed)) / (2 * eps) * u
        history.append({"x": x.tolist(), "value": value, "grad": grad.tolist()})
        x = np.maximum(x - lr * grad, x_min)
        value = f(x, seed)
    done = reached is not None and reached(x, value)
    return ZOResult(x, value, steps, done, history)


# ---------------------------------------------------------------- what is measured

@dataclass(frozen=True)
class QAItem:
    """A short-answer question and the answers that count as knowing it (lower case substrings).

    ``context``: retrieved passages served with the question (a RAG app's request), so a corruption is
    also learned where the answer stands in the prompt itself.
    """

    question: str
    answers: tuple[str, ...]
    context: tuple[str, ...] = ()

    def request(self) -> GuardRequest:
        from eco_guard.guard import GuardRequest

        return GuardRequest.of(self.question, self.context)


def read_qa(path: str | Path) -> list[QAItem]:
    """Questions of a JSONL file with ``question``, ``answers`` and optional ``context`` (a list of passages);
    errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: question file not found")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, answers = row["question"], row["answers"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{n}: expected a JSON object with 'question' and 'answers' ({exc})") from None
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{path}:{n}: 'question' must be non-empty text")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            raise DataError(f"{path}:{n}: 'answers' must be a non-empty list of strings")
        context = row.get("context", [])
        if not isinstance(context, list) or not all(isinstance(c, str) for c in context):
            raise DataError(f"{path}:{n}: 'context' must be a list of passages (strings)")
        items.append(QAItem(question, tuple(a.lower() for a in answers), tuple(context)))
    if not items:
        raise DataError(f"{path}: no questions")
    return items


@dataclass(frozen=True)
class Measurement:
    """Knowledge and fluency of a topic's answers under one corruption."""

    hit_rate: float  # share of the known questions still answered right
    logprob: float  # mean per-token log-probability of the plain correct replies, under the corrupted prompt
    fluency_ratio: float  # perplexity of the replies as text under the clean model / the plain replies' (1: as natural)
    repetition: float  # share of repeated word bigrams in the replies
    corrupted: float  # share of the questions the guard corrupted (the others leak whatever the strength)
    replies: tuple[str, ...] = ()

    def summary(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items() if k != "replies"}

    @property
    def unnaturalness(self) -> float:
        """How far the replies' perplexity is from the plain replies', either way (0: as natural)."""
        return abs(math.log(max(self.fluency_ratio, 1e-12)))

    def fluent(self, max_fluency_ratio: float) -> bool:
        return self.unnaturalness <= math.log(max_fluency_ratio)


def _hit(reply: str, answers: Sequence[str]) -> bool:
    text = reply.lower()
    return any(a in text for a in answers)


def _repetition(replies: Sequence[str]) -> float:
    pairs = [tuple(w[i:i + 2]) for w in (r.lower().split() for r in replies) for i in range(len(w) - 1)]
    return 1.0 - len(set(pairs)) / len(pairs) if pairs else 0.0


class KnowledgeObjective:
    """Measures one topic's candidate corruptions through the engine, on the questions the plain model knows.

    The plain replies are generated once: they define which questions are known, the correct replies whose
    log-probability the optimiser drives down, and (read as text) the fluency reference.

    Example:
        >>> objective = KnowledgeObjective(guard, "harry_potter", read_qa("hp_qa.jsonl"))  # doctest: +SKIP
        >>> objective.measure(CorruptionSpec(strength=5.0), SelectionConfig()).hit_rate     # doctest: +SKIP
        0.0
    """

    def __init__(self, guard: Guard, topic: str, items: Sequence[QAItem], *, max_new_tokens: int = 24) -> None:
        self.guard, self.topic, self.max_new_tokens = guard, topic, max_new_tokens
        guard.config.topic(topic)  # a KeyError names an unknown topic now, not mid-search
        plain = [guard.unguarded(item.request(), max_new_tokens=max_new_tokens) for item in items]
        results = guard.generate_all(plain)
        self.known = [(item, r.text) for item, r in zip(items, results) if _hit(r.text, item.answers)]
        self.n_questions = len(items)
        if not self.known:
            raise DataError(f"topic {topic!r}: the plain model answers none of the {len(items)} questions right; "
                            "there is no knowledge to remove")
        self._neutral = guard.unguarded(NEUTRAL_REQUEST)
        self._plain_ppl = self._text_perplexity([t for _, t in self.known])
        prompts = [p for p, r, i in zip(plain, results, items) if _hit(r.text, i.answers)]
        self.baseline = Measurement(1.0, _mean(self._logprobs(prompts, [t for _, t in self.known])), 1.0,
                                    _repetition([t for _, t in self.known]), 0.0, tuple(t for _, t in self.known))

    def measure(self, spec: CorruptionSpec, selection: SelectionConfig) -> Measurement:
        """Knowledge and fluency with ``spec`` and ``selection`` in place of the topic's own."""
        guard = self.guard.with_corruption(self.topic, spec, selection)
        answers = [guard.plan(item.request(), max_new_tokens=self.max_new_tokens) for item, _ in self.known]
        replies = [r.text for r in guard.generate_all(answers)]
        hits = [_hit(reply, item.answers) for reply, (item, _) in zip(replies, self.known)]
        return Measurement(
            hit_rate=_mean(hits),
            logprob=_mean(self._logprobs(answers, [t for _, t in self.known])),
            fluency_ratio=self._text_perplexity(replies) / self._plain_ppl,
            repetition=_repetition(replies),
            corrupted=_mean([a.route == "corrupted" for a in answers]),
            replies=tuple(replies),
        )

    def _logprobs(self, answers: Sequence[Any], texts: Sequence[str]) -> list[float]:
        return [lp for lp, _ in self.guard.score_replies(answers, texts)]

    def _text_perplexity(self, texts: Sequence[str]) -> float:
        """Perplexity of ``texts`` under the clean model, each read after :data:`NEUTRAL_REQUEST`."""
        scored = [(lp, n) for lp, n in self.guard.score_replies([self._neutral] * len(texts), texts) if n]
        tokens = sum(n for _, n in scored)
        return math.exp(-sum(lp * n for lp, n in scored) / tokens) if tokens else 1.0


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


# ---------------------------------------------------------------- the search

@dataclass
class Candidate:
    """One corruption tried for a topic, and how it measured."""

    method: str
    dims: int
    strength: float
    mode: str
    measurement: Measurement
    reached: bool
    evaluations: int

    def row(self) -> dict[str, Any]:
        return {"method": self.method, "dims": self.dims, "strength": self.strength, "mode": self.mode,
                "reached": self.reached, "evaluations": self.evaluations, **self.measurement.summary()}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Candidate:
        """The candidate a store's ``candidates`` entry describes (its measurement as rounded there)."""
        fields = ("hit_rate", "logprob", "fluency_ratio", "repetition", "corrupted")
        return cls(row["method"], int(row["dims"]), float(row["strength"]), row["mode"],
                   Measurement(**{k: float(row[k]) for k in fields}), bool(row["reached"]), int(row["evaluations"]))


@dataclass
class SearchResult:
    """The best corruption for a topic, with every candidate and the plain model's baseline."""

    topic: str
    best: Candidate
    candidates: list[Candidate]
    baseline: Measurement
    target_hit_rate: float
    max_fluency_ratio: float
    repetition_bound: float
    n_known: int
    n_questions: int
    curves: list[dict[str, Any]] = field(default_factory=list)  # every evaluation: what the report plots


def search_topic(objective: KnowledgeObjective, *, methods: Sequence[str] = ("rand_noise_first_n",
                 "zero_out_top_k", "flip_sign_top_k"), modes: Sequence[str] = ("content",),
                 dims: Sequence[int] = (1,), keywords: Sequence[str] = (), target_hit_rate: float = 0.1,
                 max_fluency_ratio: float = 2.0, max_repetition: float = 0.1, strength0: float = 1.0,
                 steps: int = 12, eps: float = 0.3, lr: float = 4.0, plateau_step: float = 0.5,
                 max_step: float = 1.0, seed: int = 0, progress: bool = True) -> SearchResult:
    """Try each method × dims × selection mode; for methods with a strength, learn it (log σ) by the
    zeroth-order step until the hit rate reaches ``target_hit_rate``; pick the candidate that reaches it
    with the most natural replies (fluency ratio within ``max_fluency_ratio`` either way, if any does), else the
    one with the least knowledge.
    A candidate's strength is the best point the search measured, by the same rule, not merely its last.

    The loss is the drop of the surrogate log-probability below the plain model's (never above zero) plus a
    penalty once fluency or repetition passes its bound, so the step does not push the strength past the
    point where replies turn to babble or loops.
    """
    from eco_guard.config import SelectionConfig
    from eco_guard.corruption import CorruptionSpec, get_corruptor

    curves: list[dict[str, Any]] = []
    candidates = []
    # the plain replies repeat themselves too (short answers restate the question): the bound is above theirs
    repetition_bound = objective.baseline.repetition + max_repetition
    plan = [(m, d, mode) for m in methods for d in dims for mode in modes if mode != "keywords" or keywords]
    for method, d, mode in tqdm(plan, desc=f"searching {objective.topic}", disable=not progress):
        selection = SelectionConfig(mode=mode, keywords=list(keywords) if mode == "keywords" else [])
        cache: dict[float, Measurement] = {}

        def measure(strength: float, method: str = method, d: int = d, mode: str = mode,
                    selection: Any = selection, cache: dict = cache) -> Measurement:
            key = round(strength, 6)
            if key not in cache:
                spec = CorruptionSpec(method=method, dims=d, strength=strength, seed=seed)
                cache[key] = objective.measure(spec, selection)
                curves.append({"method": method, "dims": d, "mode": mode, "strength": strength,
                               **cache[key].summary()})
            return cache[key]

        def loss(x: float, _seed: int) -> float:
            # Knowledge removed is never negative: a little noise that makes the known replies slightly more
            # likely is a plateau to step across (upwards), not a direction to follow.
            m = measure(math.exp(x))
            removed = min(m.logprob - objective.baseline.logprob, 0.0)
            return (removed + 10.0 * max(0.0, m.unnaturalness - math.log(max_fluency_ratio))
                    + 10.0 * max(0.0, m.repetition - repetition_bound))

        def reached(x: float, _value: float) -> bool:
            return measure(math.exp(x)).hit_rate <= target_hit_rate

        if get_corruptor(method).uses_strength:
            zeroth_order_scalar(loss, math.log(strength0), eps=eps, lr=lr, steps=steps, seed=seed,
                                x_min=math.log(1e-4), plateau_step=plateau_step, max_step=max_step,
                                reached=reached, progress=progress, desc=f"{method} d{d} {mode}")
        else:
            measure(0.0)
        tried = [Candidate(method, d, strength, mode, m, m.hit_rate <= target_hit_rate, len(cache))
                 for strength, m in cache.items()]
        candidates.append(best_candidate(tried, max_fluency_ratio, repetition_bound))
    best = best_candidate(candidates, max_fluency_ratio, repetition_bound)
    return SearchResult(objective.topic, best, candidates, objective.baseline, target_hit_rate, max_fluency_ratio,
                        repetition_bound,
                        len(objective.known), objective.n_questions, curves)


_NARROWNESS = {"keywords": 0, "salient": 1, "content": 2}


def best_candidate(candidates: Sequence[Candidate], max_fluency_ratio: float, max_repetition: float) -> Candidate:
    """The search's choice: among candidates that reach the target within both bounds, the narrowest token
    selection (keywords, then salient spans, then all content), and of those the most natural; else the most
    natural that reaches the target; else the one with the least knowledge left. Most natural: perplexity
    closest to the plain replies', either way (:attr:`Measurement.unnaturalness`)."""
    # Perplexity alone misses loops ("by The End of the World series by The End of ..." is likely text):
    # a fluent candidate also repeats itself no more than max_repetition.
    fluent = [c for c in candidates if c.reached and c.measurement.fluent(max_fluency_ratio)
              and c.measurement.repetition <= max_repetition]
    if fluent:
        # Narrowest first: with only the names corrupted the rest of the question stays readable, so the
        # reply answers it, wrongly, as a model that never learned the names would; corrupting all of it
        # loses the question (fluent text that answers nothing reads as natural as an answer).
        return min(fluent, key=lambda c: (_NARROWNESS.get(c.mode, len(_NARROWNESS)), c.measurement.unnaturalness,
                                          c.measurement.repetition))
    reached = [c for c in candidates if c.reached]
    if reached:  # all forget enough: the least babble
        return min(reached, key=lambda c: (c.measurement.unnaturalness, c.measurement.repetition))
    return min(candidates, key=lambda c: (c.measurement.hit_rate, c.measurement.unnaturalness))


# ---------------------------------------------------------------- one config, end to end

def optimize_config(config: str | Path, *, topics: Sequence[str] | None = None, steps: int = 12,
                    methods: Sequence[str] = ("rand_noise_first_n", "zero_out_top_k", "flip_sign_top_k"),
                    modes: Sequence[str] = ("content", "keywords"), dims: Sequence[int] = (1,),
                    target_hit_rate: float = 0.1, max_fluency_ratio: float = 2.0, max_repetition: float = 0.1,
                    max_new_tokens: int = 24,
                    report_dir: str | Path | None = None,
                    progress: bool = True) -> tuple[Path, dict[str, SearchResult]]:
    """Learn the corruption of each ``corruption: learned`` topic (or of ``topics``), write the store and a
    report (markdown + PNG). Returns the store's path and each topic's search."""
    from eco_guard.config import load_config
    from eco_guard.errors import ConfigError
    from eco_guard.guard import Guard
    from eco_guard.selection import topic_keywords
    from eco_guard.store import CorruptionStore, StoredTopic, StoreError, default_store_path

    cfg = load_config(config)
    chosen = list(topics) if topics else [t.name for t in cfg.topics if t.corruption == "learned"]
    if not chosen:
        raise ConfigError(f"{config}: no topic says 'corruption: learned'; name one with --topic")
    path = cfg.store or default_store_path(cfg.source)
    guard = Guard.from_config(cfg, use_store=False, progress=progress)
    fingerprint = guard.backend.fingerprint()
    store = CorruptionStore(guard.model_name, fingerprint)
    if path.exists():
        try:
            old = CorruptionStore.load(path)
            store.topics = dict(old.topics) if old.fingerprint == fingerprint else {}
        except StoreError:
            pass  # a malformed store is replaced whole
    results = {}
    for name in chosen:
        topic = cfg.topic(name)
        if topic.evaluation is None:
            raise ConfigError(f"{cfg.source}: topics.{name}.evaluation: optimize needs the topic's questions "
                              "(JSONL with question and answers)")
        objective = KnowledgeObjective(guard, name, read_qa(topic.evaluation), max_new_tokens=max_new_tokens)
        seed = topic.corruption.seed if topic.corruption != "learned" else 0
        started = time.perf_counter()
        result = search_topic(objective, methods=methods, modes=modes, dims=dims, keywords=topic_keywords(topic),
                              target_hit_rate=target_hit_rate, max_fluency_ratio=max_fluency_ratio,
                              max_repetition=max_repetition, steps=steps,
                              seed=seed, progress=progress)
        results[name] = result
        best = result.best
        spec, selection = _spec(best, seed), topic.selection.model_copy(update={"mode": best.mode})
        summary = {**_objective(result), "seconds": round(time.perf_counter() - started, 1)}
        store.topics[name] = StoredTopic(spec, selection, summary, [c.row() for c in result.candidates])
    store.save(path)
    write_report(results, Path(report_dir) if report_dir else path.with_name(f"{path.stem}-report"))
    return path, results


def _spec(c: Candidate, seed: int) -> CorruptionSpec:
    from eco_guard.config import CorruptionSpec

    return CorruptionSpec(method=c.method, dims=c.dims, strength=c.strength, seed=seed)


def _objective(r: SearchResult) -> dict[str, Any]:
    return {"name": "knowledge", "target_hit_rate": r.target_hit_rate, "max_fluency_ratio": r.max_fluency_ratio,
            "fluency": f"replies read after {NEUTRAL_REQUEST!r}, perplexity over the plain replies'",
            "repetition_bound": round(r.repetition_bound, 4),
            "known_questions": r.n_known, "questions": r.n_questions, "baseline": r.baseline.summary(),
            "achieved": r.best.measurement.summary(), "reached": r.best.reached}


def write_report(results: dict[str, SearchResult], folder: Path) -> dict[str, Path]:
    """``optimize.md`` (best and every candidate per topic) and ``optimize.png`` (knowledge and fluency
    against strength per method and mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    lines = ["# Learned corruptions", ""]
    for name, r in results.items():
        b = r.best
        lines += [f"## {name}", "",
                  (f"Known questions: {r.n_known} of {r.n_questions} (the plain model's correct answers). "
                   f"Target: hit rate <= {r.target_hit_rate:.0%}, fluency ratio (replies read as text) within "
                   f"1/{r.max_fluency_ratio:g} to {r.max_fluency_ratio:g}."), "",
                  (f"**Best**: {b.method}, dims {b.dims}, strength {b.strength:g}, selection {b.mode}: hit rate "
                   f"{b.measurement.hit_rate:.0%}, log-prob {b.measurement.logprob:.3f} (plain "
                   f"{r.baseline.logprob:.3f}), fluency ratio {b.measurement.fluency_ratio:.2f}, repetition "
                   f"{b.measurement.repetition:.2f}."), "",
                  "| method | dims | strength | mode | hit rate | log-prob | fluency | repetition | reached | evals |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for c in r.candidates:
            m = c.measurement
            reached = "yes" if c.reached else "no"
            lines.append(f"| {c.method} | {c.dims} | {c.strength:g} | {c.mode} | {m.hit_rate:.0%} | {m.logprob:.3f} | "
                         f"{m.fluency_ratio:.2f} | {m.repetition:.2f} | {reached} | {c.evaluations} |")
        lines += ["", "Replies under the best corruption:", ""]
        lines += [f"- {reply!r}" for reply in b.measurement.replies]
        lines.append("")
    md = folder / "optimize.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.5 * len(results)), squeeze=False)
    for row, (name, r) in enumerate(results.items()):
        series: dict[str, list[dict[str, Any]]] = {}
        for point in r.curves:
            if point["strength"] > 0:
                series.setdefault(f"{point['method']} d{point['dims']} {point['mode']}", []).append(point)
        for label, points in series.items():
            points.sort(key=lambda p: p["strength"])
            xs = [p["strength"] for p in points]
            axes[row][0].plot(xs, [p["logprob"] for p in points], marker="o", label=label)
            axes[row][1].plot(xs, [p["fluency_ratio"] for p in points], marker="o", label=label)
        axes[row][0].set(xscale="log", xlabel="strength", ylabel="log-prob of known answers",
                         title=f"{name}: knowledge")
        for bound in (r.max_fluency_ratio, 1 / r.max_fluency_ratio):
            axes[row][1].axhline(bound, color="grey", linestyle="--")
        axes[row][1].set(xscale="log", yscale="log", xlabel="strength", ylabel="perplexity ratio (text)",
                         title=f"{name}: fluency")
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    png = folder / "optimize.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"markdown": md, "png": png}
