"""Learning corruptions: the zeroth-order steps, the objectives through the engine, and the store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_guard import KeywordClassifier

from eco_guard.config import CorruptionSpec, SelectionConfig, parse_config
from eco_guard.errors import DataError
from eco_guard.guard import Guard
from eco_guard.optimize import (
    Candidate,
    KnowledgeObjective,
    Measurement,
    QAItem,
    best_candidate,
    read_qa,
    search_topic,
    zeroth_order_scalar,
    zeroth_order_vector,
)
from eco_guard.store import CorruptionStore, StoredTopic, StoreError


def noisy(x: float, seed: int) -> float:
    """A quadratic with seeded noise: the same seed adds the same offset wherever x is."""
    return (x - 3.0) ** 2 + float(np.random.default_rng(seed).normal(0, 5.0))


def test_scalar_step_drives_a_noisy_objective_to_its_target():
    result = zeroth_order_scalar(noisy, 0.0, eps=0.05, lr=0.3, steps=60, reached=lambda x, _: abs(x - 3.0) < 0.05)
    assert result.reached and abs(result.x - 3.0) < 0.05 and result.steps < 60


def test_common_random_numbers_make_a_step_deterministic():
    runs = [zeroth_order_scalar(noisy, 0.0, eps=0.05, lr=0.3, steps=5, seed=7) for _ in range(2)]
    assert runs[0].history == runs[1].history
    # both sides of a step share the noise, so the estimate is the noise-free central difference
    assert runs[0].history[0]["grad"] == pytest.approx(((0.05 - 3) ** 2 - (-0.05 - 3) ** 2) / 0.1)


def test_scalar_step_respects_the_floor_and_divides_by_the_true_distance():
    result = zeroth_order_scalar(lambda x, _: 2.0 * x, 1.0, eps=0.5, lr=1.0, steps=5, x_min=0.2, clip_low=0.8)
    assert result.x == 0.2  # pushed down, held at x_min
    first = result.history[0]  # lower point clipped at 0.8: (2*1.5 - 2*0.8) / (1.5 - 0.8) = 2, not 1.4/1.0
    assert first["grad"] == pytest.approx(2.0)


def test_vector_variant_minimises_a_quadratic_reproducibly():
    target = np.array([1.0, -2.0, 0.5])

    def f(x, seed):
        return float(((x - target) ** 2).sum())

    runs = [zeroth_order_vector(f, [0.0, 0.0, 0.0], eps=0.05, lr=0.1, steps=300, seed=3) for _ in range(2)]
    assert np.allclose(runs[0].x, target, atol=0.05)
    assert runs[0].history == runs[1].history


def test_read_qa_names_file_and_line(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text('{"question": "Who?", "answers": ["Ann"]}\n\n', encoding="utf-8")
    assert read_qa(good) == [QAItem("Who?", ("ann",))]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Who?", "answers": ["a"]}\n{"question": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object"):
        read_qa(bad)


# ---------------------------------------------------------------- through the engine (tiny model)

CONFIG = """
topics:
  - name: wizards
    corruption: {corruption}
    selection: {{mode: content}}
generation: {{max_new_tokens: 6}}
"""


def tiny_guard(backend, corruption="{method: rand_noise_first_n, dims: 1, strength: 1, seed: 3}", store=None):
    text = CONFIG.format(corruption=corruption) + (f"store: {store}\n" if store else "")
    return Guard(parse_config(text), backend, KeywordClassifier())


@pytest.fixture(scope="module")
def known(tiny_backend):
    """Questions whose 'answer' is what the tiny random model says to them plainly: knowledge to remove."""
    guard = tiny_guard(tiny_backend)
    items = []
    for q in ("Which wizard lives here?", "Name the wizard school.", "Who taught the wizard?"):
        reply = guard.unguarded(q, max_new_tokens=6).generate().text
        items.append(QAItem(q, (reply.strip().lower()[:12],)))
    return items


def test_objective_measures_knowledge_and_fluency_through_the_engine(tiny_backend, known):
    objective = KnowledgeObjective(tiny_guard(tiny_backend), "wizards", known, max_new_tokens=6)
    assert len(objective.known) == 3 and objective.baseline.hit_rate == 1.0
    weak = objective.measure(CorruptionSpec(strength=1e-4), SelectionConfig())
    strong = objective.measure(CorruptionSpec(strength=1e4), SelectionConfig())
    assert weak.corrupted == strong.corrupted == 1.0  # every question went the corrupted route
    assert weak.hit_rate == 1.0 and weak.logprob == pytest.approx(objective.baseline.logprob, abs=1e-3)
    assert strong.hit_rate < 1.0 and strong.logprob < weak.logprob
    assert strong == objective.measure(CorruptionSpec(strength=1e4), SelectionConfig())  # seeded: reproducible
    # fluency reads the replies as text: the plain replies themselves (a corruption too weak to change a token)
    # are the reference, 1; babble from σ = 1e4 is far from it
    assert weak.replies == objective.baseline.replies and weak.fluency_ratio == pytest.approx(1.0)
    assert strong.unnaturalness > weak.unnaturalness


def test_search_learns_a_strength_that_removes_the_knowledge(tiny_backend, known):
    objective = KnowledgeObjective(tiny_guard(tiny_backend), "wizards", known, max_new_tokens=6)
    result = search_topic(objective, methods=("rand_noise_first_n", "zero_out_top_k"), dims=(8,), steps=12,
                          strength0=0.02, lr=3.0, plateau_step=0.7, target_hit_rate=0.34, max_fluency_ratio=100.0,
                          max_repetition=1.0, progress=False)
    learned = next(c for c in result.candidates if c.method == "rand_noise_first_n")
    assert learned.strength > 0.02 and learned.evaluations > 1  # the step moved the strength up
    assert result.best.reached and result.best.measurement.hit_rate <= 0.34
    assert {c.method for c in result.candidates} == {"rand_noise_first_n", "zero_out_top_k"}
    # what the store keeps of each candidate is enough to apply the search's rule again
    again = [Candidate.from_row(c.row()) for c in result.candidates]
    assert [(c.method, c.dims, c.strength, c.mode, c.reached) for c in again] == [
        (c.method, c.dims, c.strength, c.mode, c.reached) for c in result.candidates]
    chosen = best_candidate(again, result.max_fluency_ratio, result.repetition_bound)
    assert (chosen.method, chosen.strength) == (result.best.method, result.best.strength)


def test_unknown_knowledge_is_a_clear_error(tiny_backend):
    with pytest.raises(DataError, match="answers none of the 1 questions"):
        KnowledgeObjective(tiny_guard(tiny_backend), "wizards", [QAItem("Who?", ("zzzzqqq",))])


# ---------------------------------------------------------------- the store

def test_store_round_trip_and_learned_topics_use_it(tiny_backend, tmp_path):
    spec = CorruptionSpec(method="flip_sign_top_k", dims=4, strength=0.0, seed=9)
    store = CorruptionStore("tiny", tiny_backend.fingerprint())
    store.topics["wizards"] = StoredTopic(spec, SelectionConfig(mode="content"), {"name": "knowledge"}, [{"x": 1}])
    path = store.save(tmp_path / "guard.eco.json")
    again = CorruptionStore.load(path)
    assert again.topics["wizards"].corruption == spec and again.topics["wizards"].candidates == [{"x": 1}]
    guard = tiny_guard(tiny_backend, corruption="learned", store=path)
    assert guard.corruption_of("wizards")[0] == spec
    assert guard.plan("a wizard").corruption.spec == spec


@pytest.mark.parametrize(("content", "reason"), [
    (None, "no corruption store"),
    ("{not json", "not valid JSON"),
    (json.dumps({"format_version": 99}), "format_version 99"),
    ("FOREIGN", "learned for another model"),
    ("EMPTY", "no learned corruption for topic 'wizards'"),
    (json.dumps({"format_version": 1, "model": {"fingerprint": "F"},
                 "topics": {"wizards": {"corruption": {"dims": 0}}}}),
     "topics.wizards: malformed entry"),
])
def test_store_problems_are_one_line_errors_naming_the_file_and_the_command(tiny_backend, tmp_path, content, reason):
    path = tmp_path / "guard.eco.json"
    if content == "FOREIGN":
        foreign = {"wizards": StoredTopic(CorruptionSpec(), SelectionConfig())}
        CorruptionStore("other", "sha256:" + "0" * 64, foreign).save(path)
    elif content == "EMPTY":
        CorruptionStore("tiny", tiny_backend.fingerprint()).save(path)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(StoreError) as err:
        tiny_guard(tiny_backend, corruption="learned", store=path)
    message = str(err.value)
    assert reason in message and str(path) in message and "eco-guard optimize" in message and "\n" not in message


def test_fingerprint_is_the_embedding_matrix(tiny_backend, real_tokenizer):
    from tiny_llama import build_tiny_model

    from eco_guard.backends.local import LocalBackend

    assert tiny_backend.fingerprint() == LocalBackend(build_tiny_model(real_tokenizer), real_tokenizer).fingerprint()
    other = LocalBackend(build_tiny_model(real_tokenizer, seed=1), real_tokenizer)
    assert other.fingerprint() != tiny_backend.fingerprint() and other.fingerprint().startswith("sha256:")
    assert math.isfinite(len(other.fingerprint()))
    # the weights in bfloat16 corrupt the same float32 embeddings: a store learned in float32 fits them
    half = build_tiny_model(real_tokenizer).to(torch.bfloat16)
    weight = build_tiny_model(real_tokenizer).get_input_embeddings().weight.detach()
    assert LocalBackend(half, real_tokenizer, embedding=weight).fingerprint() == tiny_backend.fingerprint()


def test_questions_with_context_are_learned_as_rag_requests(tiny_backend, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "Which wizard?", "answers": ["x"], "context": ["A wizard called X."]}\n'
                    '{"question": "Who?", "answers": ["y"], "context": "not a list"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"qa.jsonl:2: 'context' must be a list"):
        read_qa(path)
    item = QAItem("Which wizard?", ("x",), ("A wizard called X.",))
    answer = tiny_guard(tiny_backend).plan(item.request())
    assert "A wizard called X." in answer.prompt.text and answer.decision.passages_flagged == 1


def test_a_step_is_cut_to_max_step():
    # a cliff between x-eps and x+eps gives a huge estimate; the step still moves at most max_step
    def cliff(x: float, _seed: int) -> float:
        return 0.0 if x < 0.05 else 1000.0
    run = zeroth_order_scalar(cliff, 0.0, eps=0.1, lr=1.0, steps=1, max_step=0.5)
    assert run.history[0]["grad"] > 1000
    assert run.x == pytest.approx(-0.5)


def _candidate(ratio: float, repetition: float = 0.1, reached: bool = True) -> Candidate:
    return Candidate("flip_sign_top_k", 8, 0.0, "content", Measurement(0.0, -1.0, ratio, repetition, 1.0), reached, 1)


def test_fluency_is_two_sided_and_the_most_natural_candidate_wins():
    template, natural, babble = _candidate(0.25), _candidate(1.2), _candidate(3.0)
    assert not template.measurement.fluent(2.0) and natural.measurement.fluent(2.0)
    assert not babble.measurement.fluent(2.0)
    # a deflection template reads more predictably than the model's own answers: not "the most fluent"
    assert best_candidate([template, babble, natural], 2.0, 0.5) is natural
    assert best_candidate([template, babble], 2.0, 0.5) is babble  # 3x from the plain replies, against 4x
    assert best_candidate([_candidate(1.5), _candidate(0.8)], 2.0, 0.5).measurement.fluency_ratio == 0.8
    assert best_candidate([natural, _candidate(1.0, reached=False)], 2.0, 0.5) is natural


def test_the_narrowest_selection_wins_among_fluent_candidates():
    content, keywords = _candidate(1.0), _candidate(1.4)
    keywords.mode = "keywords"
    assert best_candidate([content, keywords], 2.0, 0.5) is keywords
    keywords.measurement = Measurement(0.0, -1.0, 1.4, 0.9, 1.0)  # over the repetition bound: not fluent
    assert best_candidate([content, keywords], 2.0, 0.5) is content
