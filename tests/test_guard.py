"""The engine's routing on a tiny random Llama with a keyword classifier double; then on the real models."""

from __future__ import annotations

import pytest

from eco_guard.backends.base import Backend, Generation, GenerationParams, PreparedPrompt, StreamEvent
from eco_guard.classifier import Classification
from eco_guard.config import parse_config
from eco_guard.errors import EcoGuardError, InputError
from eco_guard.guard import BLOCKED_REPLY, Guard, GuardRequest
from eco_guard.selection import token_mask

CONFIG = """
topics:
  - name: wizards
    corruption: {{method: rand_noise_first_n, dims: 1, strength: 50, seed: 3}}
    selection: {selection}
  - name: space
    corruption: {{method: zero_out_first_n, dims: 4}}
on_classifier_error: {policy}
rag: {rag}
generation: {{max_new_tokens: 6}}
"""


class KeywordClassifier:
    """A stand-in for the trained classifier: flags a topic when one of its words appears."""

    words = {"wizards": ("wizard", "hogwarts"), "space": ("rocket", "jedi")}

    def classify(self, texts):
        out = []
        for text in texts:
            scores = {t: float(any(w in text.lower() for w in ws)) for t, ws in self.words.items()}
            top = max(scores, key=scores.get)
            flagged = scores[top] >= 0.5
            out.append(Classification(flagged, top if flagged else None, scores[top], scores))
        return out

    def score(self, texts):
        return [{t: 0.99 if any(w in text.lower() for w in ws) else 0.01 for t, ws in self.words.items()}
                for text in texts]


class BrokenClassifier:
    def classify(self, texts):
        raise RuntimeError("encoder exploded")


def make_guard(backend, *, classifier=None, policy="flag", rag="corrupt", selection="{mode: content}"):
    cfg = parse_config(CONFIG.format(policy=policy, rag=rag, selection=selection))
    return Guard(cfg, backend, classifier or KeywordClassifier())


def test_flagged_prompt_is_corrupted_on_its_content_tokens(tiny_backend):
    guard = make_guard(tiny_backend)
    answer = guard.plan("Tell me about the wizard school")
    assert answer.decision.flagged and answer.decision.topic == "wizards"
    assert answer.decision.route == "corrupted"
    content = token_mask(answer.prompt.offsets, answer.prompt.user_spans)
    assert list(answer.corruption.mask) == content
    assert answer.decision.corrupted_tokens == sum(content) > 0
    assert answer.corruption.spec == guard.config.topic("wizards").corruption


def test_flagged_answer_differs_and_unflagged_equals_plain_generation(tiny_backend):
    guard = make_guard(tiny_backend)
    params = GenerationParams(max_new_tokens=6)
    for text, flagged in [("A wizard walks into a bar", True), ("What is the capital of France?", False)]:
        result = guard.invoke(text)
        plain = tiny_backend.generate([tiny_backend.prepare([{"role": "user", "content": text}])], None, params)[0]
        assert result.decision.flagged is flagged
        assert (result.generation.token_ids == plain.token_ids) is (not flagged)


def test_topic_specific_corruption_is_used(tiny_backend):
    guard = make_guard(tiny_backend)
    answer = guard.plan("How fast is a rocket?")
    assert answer.decision.topic == "space"
    assert answer.corruption.spec.method == "zero_out_first_n"


def test_keyword_selection_corrupts_only_the_keyword(tiny_backend):
    guard = make_guard(tiny_backend, selection="{mode: keywords, keywords: [Hogwarts]}")
    answer = guard.plan("Where is HOGWARTS located?")
    picked = [tiny_backend.tokenizer.decode([t]) for t, m in zip(answer.prompt.input_ids, answer.corruption.mask) if m]
    assert "".join(picked).strip().lower() == "hogwarts"


def test_keyword_selection_without_keywords_corrupts_the_topic_terms(tiny_backend):
    config = CONFIG.replace("  - name: wizards\n", '  - name: wizards\n    terms: [Hogwarts]\n'
                            '    weak_terms: ["Potter"]\n')
    cfg = parse_config(config.format(policy="flag", rag="corrupt", selection="{mode: keywords}"))
    guard = Guard(cfg, tiny_backend, KeywordClassifier())
    assert guard.corruption_of("wizards")[1].keywords == ["Hogwarts", "Potter"]
    answer = guard.plan("Did the wizard Potter like hogwarts food?")
    picked = [tiny_backend.tokenizer.decode([t]) for t, m in zip(answer.prompt.input_ids, answer.corruption.mask) if m]
    assert "".join(picked).replace(" ", "").lower() == "potterhogwarts"
    other = guard.with_corruption("wizards", guard.corruption_of("wizards")[0], cfg.topic("space").selection)
    assert other.corruption_of("wizards")[1].mode == "content"


def test_same_prompt_gets_the_same_noise_and_output(tiny_backend):
    guard = make_guard(tiny_backend)
    first, second = guard.invoke("wizard duel tips"), guard.invoke("wizard duel tips")
    assert first.generation.token_ids == second.generation.token_ids


@pytest.mark.parametrize(
    ("policy", "route", "flagged"),
    [("flag", "corrupted", True), ("block", "blocked", True), ("pass", "fallback", False)],
)
def test_classifier_failure_follows_policy(tiny_backend, policy, route, flagged):
    guard = make_guard(tiny_backend, classifier=BrokenClassifier(), policy=policy)
    result = guard.invoke("What is the capital of France?")
    assert result.decision.route == route
    assert result.decision.flagged is flagged
    assert "encoder exploded" in result.decision.error
    if policy == "block":
        assert result.text == BLOCKED_REPLY


def test_rag_corrupts_flagged_passages_only(tiny_backend):
    guard = make_guard(tiny_backend)
    passage_ok, passage_bad = "Paris is the capital of France.", "The wizard school has four houses."
    answer = guard.plan(GuardRequest.of("Tell me something.", [passage_ok, passage_bad]))
    assert answer.decision.route == "corrupted" and answer.decision.passages_flagged == 1
    text = answer.prompt.text
    bad_at = text.index(passage_bad)
    picked = {i for i, (s, e) in enumerate(answer.prompt.offsets) if answer.corruption.mask[i]}
    assert picked, "the flagged passage should be corrupted"
    for i in picked:  # every corrupted token lies inside the flagged passage
        s, e = answer.prompt.offsets[i]
        assert bad_at <= s and e <= bad_at + len(passage_bad) + 1


def test_keyword_selection_still_corrupts_a_flagged_passage_whole(tiny_backend):
    guard = make_guard(tiny_backend, selection="{mode: keywords, keywords: [Hogwarts]}")
    question, passage_ok, passage_bad = "Where is Hogwarts?", "Paris is in France.", "The wizard school has a lake."
    answer = guard.plan(GuardRequest.of(question, [passage_ok, passage_bad]))
    assert answer.decision.flagged and answer.decision.passages_flagged == 1
    text, offsets, mask = answer.prompt.text, answer.prompt.offsets, answer.corruption.mask
    bad = (text.index(passage_bad), text.index(passage_bad) + len(passage_bad))
    in_bad = token_mask(offsets, [bad])
    assert all(m for m, b in zip(mask, in_bad) if b)  # every token of the flagged passage, not only names
    others = "".join(text[s:e] for (s, e), m, b in zip(offsets, mask, in_bad) if m and not b)
    assert others.strip().lower() == "hogwarts"  # elsewhere the keyword selection: only the keyword


def test_rag_drop_removes_flagged_passages(tiny_backend):
    guard = make_guard(tiny_backend, rag="drop")
    answer = guard.plan(GuardRequest.of("Tell me something.", ["Paris is in France.", "A wizard lives here."]))
    assert answer.decision.route == "fallback"
    assert answer.decision.passages_dropped == 1
    assert "wizard" not in answer.prompt.text and "Paris is in France." in answer.prompt.text


def test_batch_equals_sequential(tiny_backend):
    guard = make_guard(tiny_backend)
    prompts = ["wizard spells", "bake bread", "rocket fuel", "capital of Peru", "hogwarts", "why is the sky blue"]
    batched = guard.batch(prompts)
    sequential = [guard.invoke(p) for p in prompts]
    assert [r.generation.token_ids for r in batched] == [r.generation.token_ids for r in sequential]
    assert [r.decision for r in batched] == [r.decision for r in sequential]


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        (42, "must be text"),
        ([{"role": "user", "content": ["x"]}], "has no user message with text"),
        ("word " * 5000, "tokens long"),
    ],
)
def test_bad_prompts_get_a_one_line_reason(tiny_backend, prompt, reason):
    guard = make_guard(tiny_backend)
    with pytest.raises(InputError) as err:
        guard.invoke(prompt)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_bad_generation_settings_are_rejected(tiny_backend):
    guard = make_guard(tiny_backend)
    with pytest.raises(InputError, match="unknown generation setting"):
        guard.invoke("hello", max_tokens_typo=3)
    with pytest.raises(InputError, match="max_new_tokens"):
        guard.invoke("hello", max_new_tokens=0)


def test_dims_wider_than_the_model_fail_at_construction(tiny_backend):
    cfg = parse_config("topics: [{name: t, corruption: {dims: 100000, strength: 1}}]")
    with pytest.raises(EcoGuardError, match="exceeds the model's embedding width"):
        Guard(cfg, tiny_backend, KeywordClassifier())


# ---------------------------------------------------------------- real models

@pytest.fixture(scope="module")
def demo_guard():
    from eco_guard.langchain import shared_guard

    return shared_guard(None)


@pytest.mark.integration
def test_real_guard_routes_demo_prompts(demo_guard):
    flagged = demo_guard.invoke("Who wrote the Harry Potter books?", max_new_tokens=24)
    plain = demo_guard.invoke("What is the capital of France?", max_new_tokens=24)
    assert flagged.decision.route == "corrupted" and flagged.decision.topic == "harry_potter"
    assert "rowling" not in flagged.text.lower()
    assert plain.decision.route == "fallback"
    assert "paris" in plain.text.lower()
    unguarded = demo_guard.unguarded("Who wrote the Harry Potter books?", max_new_tokens=24).generate()
    assert "rowling" in unguarded.text.lower()  # the model knows it: the guard made the difference


def test_flagged_prompt_without_the_keyword_is_still_corrupted(tiny_backend):
    guard = make_guard(tiny_backend, selection="{mode: keywords, keywords: [Hogwarts]}")
    answer = guard.plan("Which wizard founded the school?")  # flagged, but no keyword
    assert answer.decision.flagged
    assert list(answer.corruption.mask) == token_mask(answer.prompt.offsets, answer.prompt.user_spans)


@pytest.mark.integration
def test_real_demo_classifier_uses_terms_typos_and_contrast(demo_guard):
    clf = demo_guard.classifier
    prompts = ["Is Dumbeldore really dead?",                          # term, one typo
               "tell me about nagini",                                 # term, lower case
               "Who was Harry Houdini?",                               # contrast: a namesake
               "How do I center clay on a pottery wheel?",             # contrast: the craft
               "Why do I feel so pensive after long runs?"]            # a real word one letter from Pensieve
    matched = clf.matched_terms(prompts)
    assert matched[0] == {"harry_potter": "dumbeldore"} and matched[1] == {"harry_potter": "nagini"}
    assert matched[2] == matched[3] == matched[4] == {}
    verdicts = clf.classify(prompts)
    assert [v.flagged for v in verdicts] == [True, True, False, False, False]
    assert [v.terms for v in verdicts] == matched
    decision = demo_guard.plan(prompts[0]).decision
    assert decision.route == "corrupted" and decision.terms == {"harry_potter": "dumbeldore"}
    assert decision.to_dict()["terms"] == {"harry_potter": "dumbeldore"}  # what response_metadata carries


# ---------------------------------------------------------------- the one answering path

class CountingClassifier(KeywordClassifier):
    """Records how many texts it was asked to score."""

    def __init__(self):
        self.calls = 0

    def classify(self, texts):
        self.calls += 1
        return super().classify(texts)


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [("word " * 200_000, "bytes long"),                 # 1 MB: refused before tokenising
     ("Who is \ud800 Harry?", "unpaired surrogate"),
     ([{"role": "system", "content": "be \udfff brief"}, {"role": "user", "content": "hi"}], "unpaired surrogate")],
)
def test_bad_input_is_refused_before_any_model_runs(tiny_backend, prompt, reason):
    import time

    clf = CountingClassifier()
    guard = make_guard(tiny_backend, classifier=clf)
    started = time.perf_counter()
    with pytest.raises(InputError, match=reason) as err:
        guard.plan(prompt)
    assert time.perf_counter() - started < 0.5 and clf.calls == 0
    assert "\n" not in str(err.value)


def test_passages_with_invalid_unicode_are_refused(tiny_backend):
    guard = make_guard(tiny_backend)
    with pytest.raises(InputError, match="retrieved passage contains an unpaired surrogate"):
        guard.plan(GuardRequest.of("Tell me something.", ["ok", "bad \ud83d here"]))
    with pytest.raises(InputError, match="unpaired surrogate"):
        guard.screen(["bad \ud83d here"])


def test_answer_stream_and_generate_agree_on_every_route(tiny_backend):
    guards = {"corrupted": make_guard(tiny_backend), "fallback": make_guard(tiny_backend),
              "blocked": make_guard(tiny_backend, classifier=BrokenClassifier(), policy="block")}
    prompts = {"corrupted": "A wizard walks into a bar", "fallback": "Bake bread", "blocked": "Bake bread"}
    for route, guard in guards.items():
        answer = guard.plan(prompts[route], max_new_tokens=5)
        assert answer.route == route
        events = list(answer.stream())
        assert "".join(e.text for e in events) == answer.generate().text
        assert events[-1].finish_reason in ("stop", "length")
    blocked = guards["blocked"].plan("Bake bread")
    assert blocked.prompt is None and blocked.corruption is None and blocked.generate().text == BLOCKED_REPLY


async def test_async_twins_equal_the_sync_answer(tiny_backend):
    guard = make_guard(tiny_backend)
    answer = await guard.aplan("A wizard walks into a bar", max_new_tokens=5)
    assert answer.decision == guard.plan("A wizard walks into a bar").decision
    text = "".join([e.text async for e in answer.astream()])
    assert text == (await answer.agenerate()).text == answer.generate().text
    plain = guard.invoke("Bake bread", max_new_tokens=5).text
    assert (await guard.ainvoke("Bake bread", max_new_tokens=5)).text == plain


def test_unguarded_answer_skips_classifier_and_corruption(tiny_backend):
    clf = CountingClassifier()
    guard = make_guard(tiny_backend, classifier=clf)
    plain = guard.unguarded("A wizard walks into a bar", max_new_tokens=5)
    assert clf.calls == 0 and plain.route == "fallback" and plain.corruption is None
    guarded = guard.plan("A wizard walks into a bar", max_new_tokens=5)
    assert guarded.prompt == plain.prompt and guarded.route == "corrupted"
    assert guarded.corrupted_pieces() and plain.corrupted_pieces() == []
    assert "".join(guarded.corrupted_pieces()).strip() == "A wizard walks into a bar"


@pytest.mark.parametrize(("policy", "flagged"), [("flag", True), ("block", True), ("pass", False)])
def test_screen_follows_the_error_policy(tiny_backend, policy, flagged):
    verdicts = make_guard(tiny_backend, classifier=BrokenClassifier(), policy=policy).screen(["a", "b"])
    assert [v.flagged for v in verdicts] == [flagged, flagged]
    assert all("encoder exploded" in v.error for v in verdicts)
    ok = make_guard(tiny_backend).screen(["the wizard school", "bread"])
    assert [(v.flagged, v.topic) for v in ok] == [(True, "wizards"), (False, None)]


class ScriptedBackend(Backend):
    """A backend with no model at all: the engine must need nothing beyond the interface."""

    name, max_input_tokens = "scripted", 64

    def __init__(self):
        self.plans = []

    hidden_size = property(lambda self: 8)
    special_token_ids = property(lambda self: frozenset({0}))

    def prepare(self, messages):
        text = "<s>" + "".join(m["content"] for m in messages)
        offsets = ((0, 3),) + tuple((i, i + 1) for i in range(3, len(text)))
        ids = (0,) + tuple(ord(c) for c in text[3:])
        if len(ids) > self.max_input_tokens:
            raise InputError(f"the prompt is {len(ids)} tokens long")
        return PreparedPrompt(text, ids, offsets, ((3, len(text)),))

    def embed(self, prompts):
        raise NotImplementedError

    def decode(self, token_ids):
        return "".join(chr(t) for t in token_ids if t)

    def generate(self, prompts, plans=None, params=None):
        self.plans.extend(plans or [None] * len(prompts))
        return [Generation(p.text[::-1], [1, 2], len(p), "stop", 0) for p in prompts]

    def stream(self, prompt, plan=None, params=None):
        text = self.generate([prompt], [plan], params)[0].text
        yield StreamEvent(text[:2], [1])
        yield StreamEvent(text[2:], [2], "stop")


async def test_any_backend_implementing_the_interface_slots_in():
    backend = ScriptedBackend()
    guard = make_guard(backend)
    flagged = guard.invoke("wizard")
    assert flagged.decision.route == "corrupted" and flagged.text == "draziw>s<"
    assert backend.plans[-1].n_tokens == len("wizard") and backend.plans[-1].mask[0] is False
    assert guard.invoke("bread").decision.route == "fallback" and backend.plans[-1] is None
    answer = guard.plan("wizard")
    assert [e.text async for e in answer.astream()] == ["dr", "aziw>s<"]  # derived async twin
    assert (await answer.agenerate()).text == "draziw>s<"
