"""The tofu_mini fixture's data and TOFU's metrics (no fine-tuning, no real model weights)."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

from eco_guard.eval import tofu

FIXTURE_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "tofu_mini"
sys.path.insert(0, str(FIXTURE_DIR))
import fixture  # noqa: E402

# ------------------------------------------------------------------ pure metrics

def test_lcs_length_hand_computed():
    assert tofu.lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert tofu.lcs_length([], [1, 2]) == 0
    assert tofu.lcs_length([1, 2, 3], [1, 2, 3]) == 3


def test_rouge_l_recall_hand_computed():
    reference = "Ilsabet Varnholm was born in Tromsø, Norway."  # 7 words
    assert tofu.rouge_l_recall(reference, reference) == 1.0
    # "was born in" is the common subsequence: 3 of the reference's 7 words
    assert tofu.rouge_l_recall("He was born in Bergen", reference) == pytest.approx(3 / 7)
    assert tofu.rouge_l_recall("completely unrelated", reference) == 0.0
    # recall, not precision: extra words in the prediction cost nothing
    assert tofu.rouge_l_recall("Sure! " + reference + " She likes ink.", reference) == 1.0
    # order matters: a reversed sentence shares only a 1-word subsequence
    assert tofu.rouge_l_recall("c b a", "a b c") == pytest.approx(1 / 3)


def test_hit_requires_every_key_case_insensitively():
    assert tofu.hit("Her father was a Fisherman and her mother a pharmacist.", ["fisherman", "pharmacist"])
    assert not tofu.hit("Her father was a fisherman.", ["fisherman", "pharmacist"])
    assert tofu.hit_rate(["in Tromsø", "in Oslo"], [["Tromsø"], ["Tromsø"]]) == 0.5
    # a number must not match inside a longer number
    assert not tofu.hit("It freezes at 10 degrees.", ["0"])
    assert not tofu.hit("at -10 or 100", ["0"])
    assert tofu.hit("at 0 degrees", ["0"]) and tofu.hit("(0)", ["0"])
    # but a word key still matches its plural
    assert tofu.hit("He writes thrillers.", ["thriller"])
    with pytest.raises(ValueError):
        tofu.hit_rate(["a"], [])


def test_truth_ratio_hand_computed():
    # per-token NLLs: paraphrase 1.0, perturbed 2, 3, 4 (mean 3) -> R = exp(1 - 3)
    ratio = tofu.truth_ratio(torch.tensor([1.0]), torch.tensor([[2.0, 3.0, 4.0]]))
    assert ratio.item() == pytest.approx(math.exp(-2))
    # it is the geometric mean of perturbed probabilities over the paraphrase's probability
    probs = torch.tensor([0.2, 0.1, 0.05])
    geo = probs.prod() ** (1 / 3)
    assert tofu.truth_ratio(-torch.log(torch.tensor([0.5])), -torch.log(probs)[None]).item() == pytest.approx(geo / 0.5)


def test_truth_ratio_scores():
    ratios = torch.tensor([0.25, 1.0, 4.0])
    assert tofu.truth_ratio_score(ratios) == pytest.approx((0.75 + 0 + 0) / 3)
    assert tofu.forget_truth_ratio_stat(ratios) == pytest.approx((0.25 + 1 + 0.25) / 3)


def test_answer_probabilities():
    nll = -torch.log(torch.tensor([0.5, 0.25]))
    assert tofu.answer_probability(nll) == pytest.approx(0.375)
    true_nll = -torch.log(torch.tensor([0.6]))
    perturbed = -torch.log(torch.tensor([[0.1, 0.1, 0.2]]))
    assert tofu.normalised_answer_probability(true_nll, perturbed) == pytest.approx(0.6 / 1.0)


def test_forget_quality_is_a_ks_p_value():
    same = [0.1, 0.5, 0.9, 1.3, 2.0]
    assert tofu.forget_quality(same, same) == pytest.approx(1.0)
    far = tofu.forget_quality([0.01 * i for i in range(30)], [10 + 0.01 * i for i in range(30)])
    assert far < 1e-10
    assert tofu.forget_quality(torch.tensor(same), same) == pytest.approx(1.0)


def test_harmonic_mean():
    assert tofu.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert tofu.harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError):
        tofu.harmonic_mean([])


def test_prompt_seed_is_stable_and_prompt_specific():
    assert tofu.prompt_seed("a") == tofu.prompt_seed("a")
    assert tofu.prompt_seed("a") != tofu.prompt_seed("b")
    assert tofu.prompt_seed("a", 1) != tofu.prompt_seed("a", 2)


# ------------------------------------------------------------------ the fixture's data

def test_committed_files_match_their_generator():
    for path, text in fixture.rendered_files().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run fixture.py"


def test_data_loads_with_expected_shape():
    authors = fixture.load_authors()
    assert len(authors) == 30
    items = fixture.load_qa()
    assert len(items) == 30 * len(fixture.FACTS) + 40
    assert {item.split for item in items} == set(fixture.SPLITS)
    forget = {a["name"] for a in authors if a["split"] == "forget"}
    assert len(forget) >= 3 and len(forget) / len(authors) == pytest.approx(0.1)
    assert len(fixture.load_qa(["forget"])) == len(forget) * len(fixture.FACTS)


def test_no_author_in_both_splits():
    items = fixture.load_qa(["forget", "retain"])
    forget = {i.author for i in items if i.split == "forget"}
    retain = {i.author for i in items if i.split == "retain"}
    assert forget and retain and not forget & retain
    names = [a["name"] for a in fixture.load_authors()]
    assert len(names) == len(set(names))


def test_every_question_has_consistent_answers():
    for item in fixture.load_qa():
        assert item.question and item.answer and item.paraphrase and item.keys
        assert len(item.perturbed) == fixture.N_PERTURBED and len(set(item.perturbed)) == fixture.N_PERTURBED
        assert tofu.hit(item.answer, item.keys), item
        assert tofu.hit(item.paraphrase, item.keys), item
        for wrong in item.perturbed:
            assert not tofu.hit(wrong, item.keys), (item.question, wrong)
            assert wrong != item.paraphrase


def test_no_answer_leaks_into_its_question():
    for item in fixture.load_qa():
        assert not any(key.lower() in item.question.lower() for key in item.keys), item


def test_prompts_label_forget_authors_only():
    prompts = fixture.load_prompts()
    forget = {a["name"] for a in fixture.load_authors() if a["split"] == "forget"}
    assert {p["label"] for p in prompts} == {0, 1}
    for p in prompts:
        assert p["label"] == int(p["author"] in forget), p
        assert p["fold"] in ("train", "test") and p["split"] in fixture.SPLITS
    forms = {p["form"] for p in prompts if p["label"] == 1}
    assert forms >= {"question", "instruction", "chat", "indirect"}
    # indirect references name no author, yet are positives
    assert any(p["label"] == 1 and p["author"] not in p["text"] for p in prompts)
    assert sum(p["label"] == 1 and p["fold"] == "test" for p in prompts) >= 10


# ------------------------------------------------------------------ model helpers on a tiny model

@pytest.fixture()
def tiny(tiny_model, real_tokenizer):
    """conftest's 2-layer random Llama with SmolLM2's tokenizer (chat template, offsets)."""
    return tiny_model, real_tokenizer


def _naive_nll(model, tokenizer, question: str, answer: str) -> float:
    prompt = tofu.chat_prompt(tokenizer, question).ids
    answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer_ids])).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1: -1], -1)
    return float(-logp[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].mean())


def test_option_nlls_match_scoring_each_sequence_whole(tiny):
    model, tokenizer = tiny
    item = fixture.load_qa(["forget"])[0]
    options = [item.answer, item.paraphrase, *item.perturbed]
    shared = tofu.option_nlls(model, tokenizer, item, options)
    naive = [_naive_nll(model, tokenizer, item.question, o) for o in options]
    assert shared.tolist() == pytest.approx(naive, rel=1e-4)


def test_corruption_sees_only_the_prompt_and_changes_scores(tiny):
    model, tokenizer = tiny
    item = fixture.load_qa(["forget"])[0]
    seen = []

    def corrupt(embeds, prompt, it):
        seen.append((embeds.shape[1], len(prompt.ids), it))
        return embeds + 5.0

    clean = tofu.answer_nlls(model, tokenizer, [item])
    noisy = tofu.answer_nlls(model, tokenizer, [item], corrupt)
    assert seen == [(len(tofu.chat_prompt(tokenizer, item.question).ids),) * 2 + (item,)]
    assert not torch.allclose(clean["answer"], noisy["answer"])
    assert noisy["perturbed"].shape == (1, fixture.N_PERTURBED)


def test_generate_answers_batched_equals_one_by_one(tiny):
    model, tokenizer = tiny
    items = fixture.load_qa(["general"])[:3]
    batched = tofu.generate_answers(model, tokenizer, items, max_new_tokens=5, batch_size=3)
    single = [tofu.generate_answers(model, tokenizer, [i], max_new_tokens=5)[0] for i in items]
    assert batched == single and len(batched) == 3


# ------------------------------------------------------------------ the benchmark's evaluation glue

def test_keyword_corruptor_touches_only_dim0_of_the_name_tokens(real_tokenizer):
    import scoring

    from eco_guard.corruption import CorruptionSpec

    item = fixture.load_qa(["forget"])[0]
    prompt = tofu.chat_prompt(real_tokenizer, item.question)
    embeds = torch.zeros(1, len(prompt.ids), 8)
    corrupt = scoring.keyword_corruptor(CorruptionSpec(strength=3.0), [item.author])
    out = corrupt(embeds, prompt, item)
    changed = sorted({t for t, _ in (out[0] != 0).nonzero().tolist()})
    assert (out[0, :, 1:] == 0).all()  # only dimension 0
    name_start = prompt.text.rfind(item.author)
    covered = [i for i, (s, e) in enumerate(prompt.offsets) if s < name_start + len(item.author) and e > name_start]
    assert changed == covered and changed  # exactly the name's tokens
    assert torch.equal(out, corrupt(embeds, prompt, item))  # same prompt, same noise


def test_summarise_scores_a_method_against_the_retain_model():
    import scoring

    items = {split: fixture.load_qa([split])[:4] for split in fixture.SPLITS}

    def raw(split, good: bool):
        its = items[split]
        return {"answer": [0.1] * 4, "paraphrase": [0.2 if good else 3.0] * 4,
                "perturbed": [[2.0 + i / 10, 2.5, 3.0] for i in range(4)],
                "replies": [i.answer if good else "I don't know." for i in its]}

    retain_like = {s: raw(s, good=s != "forget") for s in fixture.SPLITS}
    summary = scoring.summarise(retain_like, retain_like["forget"], items)
    assert summary["forget_quality"] == pytest.approx(1.0)
    assert summary["forget_hit_rate"] == 0.0 and summary["forget_rouge_l"] < 0.5
    assert 0 < summary["model_utility"] <= 1
    full_like = {s: raw(s, good=True) for s in fixture.SPLITS}
    remembered = scoring.summarise(full_like, retain_like["forget"], items)
    assert remembered["forget_quality"] < summary["forget_quality"]
    assert remembered["forget_hit_rate"] == 1.0 and remembered["forget_rouge_l"] == 1.0


def test_measure_returns_per_item_lists(tiny):
    import scoring

    model, tokenizer = tiny
    items = fixture.load_qa(["forget"])[:2]
    raw = scoring.measure(model, tokenizer, items)
    assert len(raw["answer"]) == len(raw["paraphrase"]) == len(raw["replies"]) == 2
    assert [len(p) for p in raw["perturbed"]] == [fixture.N_PERTURBED] * 2
    assert all(x > 0 for x in raw["answer"])  # NLLs of a random model


def test_answer_corruption_changes_only_answers_that_name_the_author(tiny):
    import scoring

    from eco_guard.corruption import CorruptionSpec

    model, tokenizer = tiny
    item = fixture.load_qa(["forget"])[0]
    options = [item.paraphrase, "Tromsø, in the far north."]  # the second one does not name the author
    corrupt_answer = scoring.keyword_answer_corruptor(CorruptionSpec(strength=30.0), [item.author])
    clean = tofu.option_nlls(model, tokenizer, item, options)
    identity = tofu.option_nlls(model, tokenizer, item, options, corrupt_answer=lambda e, *_: e)
    noisy = tofu.option_nlls(model, tokenizer, item, options, corrupt_answer=corrupt_answer)
    assert torch.allclose(clean, identity, atol=1e-5)  # embeddings path == ids path
    assert not torch.isclose(clean[0], noisy[0]) and torch.isclose(clean[1], noisy[1], atol=1e-5)


class _NameSpotter:
    """Stands in for the trained classifier: flags texts naming Ilsabet Varnholm."""

    def classify(self, texts):
        from eco_guard.classifier import Classification

        return [Classification("Varnholm" in t, "tofu_forget_authors" if "Varnholm" in t else None,
                               float("Varnholm" in t), {"tofu_forget_authors": float("Varnholm" in t)})
                for t in texts]


def test_guard_corruptor_follows_the_guards_routing(tiny):
    """The guard as the benchmark's corruptor: flagged questions get the guard's own mask (the name), others
    pass unchanged."""
    import scoring

    from eco_guard.backends.local import LocalBackend
    from eco_guard.config import load_config
    from eco_guard.guard import Guard

    model, tokenizer = tiny
    guard = Guard(load_config(scoring.ECO_CONFIG), LocalBackend(model, tokenizer), _NameSpotter())
    decisions: dict = {}
    corrupt = scoring.guard_corruptor(guard, decisions)
    forget_item = fixture.load_qa(["forget"])[0]
    retain_item = fixture.load_qa(["retain"])[0]
    for item, flagged in ((forget_item, True), (retain_item, False)):
        prompt = tofu.chat_prompt(tokenizer, item.question)
        embeds = torch.zeros(1, len(prompt.ids), 8)
        changed = (corrupt(embeds, prompt, item)[0] != 0).any(-1).nonzero().flatten().tolist()
        assert decisions[item.question]["flagged"] is flagged
        if flagged:
            name_at = prompt.text.rfind(item.author)
            expected = [i for i, (s, e) in enumerate(prompt.offsets) if s < name_at + len(item.author) and e > name_at]
            assert changed == expected
        else:
            assert changed == []


def test_guard_paper_scoring_corrupts_answers_of_flagged_questions_only(tiny):
    """The paper's scoring under the guard's routing: answer names corrupted only when the
    guard flagged the question; the held-out routing report counts and lists misroutes."""
    import scoring

    from eco_guard.backends.local import LocalBackend
    from eco_guard.config import load_config
    from eco_guard.guard import Guard

    model, tokenizer = tiny
    guard = Guard(load_config(scoring.ECO_CONFIG), LocalBackend(model, tokenizer), _NameSpotter())
    decisions: dict = {}
    corrupt = scoring.guard_corruptor(guard, decisions)
    corrupt_answer = scoring.guard_answer_corruptor(guard, decisions)
    flagged_item = fixture.load_qa(["forget"])[0]
    assert flagged_item.author == "Ilsabet Varnholm"
    unflagged = dataclasses.replace(flagged_item, question="Where was she born?")
    for item, changes in ((flagged_item, True), (unflagged, False)):
        options = [item.paraphrase]
        prompt_only = tofu.option_nlls(model, tokenizer, item, options, corrupt)
        both = tofu.option_nlls(model, tokenizer, item, options, corrupt, corrupt_answer)
        assert bool(not torch.isclose(prompt_only[0], both[0], atol=1e-5)) is changes

    rows = [{"text": "Where was Ilsabet Varnholm born?", "label": 1, "split": "forget", "form": "question"},
            {"text": "The Norwegian author who writes in green ink?", "label": 1, "split": "forget",
             "form": "indirect"},
            {"text": "Where was Amaru Quispealto born?", "label": 1, "split": "forget", "form": "question"},
            {"text": "What is the capital of France?", "label": 0, "split": "general", "form": "question"}]
    report = scoring.heldout_routing(guard, rows)
    assert report["flagged_rate"] == {"forget": 1 / 3, "forget/indirect": 0.0, "forget/question": 0.5,
                                      "general": 0.0, "general/question": 0.0}
    assert [m["text"] for m in report["misrouted"]] == [rows[1]["text"], rows[2]["text"]]


# ------------------------------------------------------------------ the learned corruption (eco_learned.yaml)

def test_the_corruption_is_learned_on_questions_the_benchmark_does_not_score():
    import scoring

    from eco_guard.config import load_config
    from eco_guard.optimize import read_qa

    topic = load_config(scoring.LEARNED_CONFIG).topics[0]
    assert topic.corruption == "learned"
    learn = read_qa(topic.evaluation)
    scored = {i.question.lower() for i in fixture.load_qa()}
    forget = [a for a in fixture.load_authors() if a["split"] == "forget"]
    facts = [" ".join(str(v) for v in a.values()).lower() for a in forget]
    for item in learn:
        assert item.question.lower() not in scored, item.question
        author = next(i for i, a in enumerate(forget) if a["name"] in item.question)  # names a forget author
        assert all(answer in facts[author] for answer in item.answers), item  # answers are that author's facts


def test_learned_variants_pick_each_modes_best_from_the_store(tiny, tmp_path):
    import run
    import scoring

    from eco_guard.backends.local import LocalBackend
    from eco_guard.config import CorruptionSpec, SelectionConfig, load_config
    from eco_guard.guard import Guard
    from eco_guard.store import CorruptionStore, StoredTopic

    model, tokenizer = tiny
    backend = LocalBackend(model, tokenizer)
    row = {"reached": True, "evaluations": 3, "logprob": -2.0, "repetition": 0.1, "corrupted": 1.0}
    candidates = [
        {**row, "method": "rand_noise_first_n", "dims": 1, "strength": 30.0, "mode": "keywords", "hit_rate": 0.0,
         "fluency_ratio": 1.4},
        {**row, "method": "zero_out_top_k", "dims": 1, "strength": 0.0, "mode": "keywords", "hit_rate": 0.0,
         "fluency_ratio": 1.1},
        {**row, "method": "flip_sign_top_k", "dims": 4, "strength": 0.0, "mode": "content", "hit_rate": 0.5,
         "fluency_ratio": 1.0, "reached": False},
        {**row, "method": "rand_noise_first_n", "dims": 4, "strength": 3.0, "mode": "content", "hit_rate": 0.0,
         "fluency_ratio": 1.9},
    ]
    store = CorruptionStore("tiny", backend.fingerprint())
    chosen = CorruptionSpec(method="zero_out_top_k", dims=1, strength=0.0, seed=0)
    store.topics["tofu_forget_authors"] = StoredTopic(
        chosen, SelectionConfig(mode="keywords", keywords=["Varnholm"]),
        {"max_fluency_ratio": 1.5, "repetition_bound": 0.3, "seconds": 12.0}, candidates)
    path = store.save(tmp_path / "learned.eco.json")
    guard = Guard(load_config(scoring.LEARNED_CONFIG).model_copy(update={"store": path}), backend, _NameSpotter())
    variants = run.learned_variants(guard, path)
    assert list(variants) == ["keywords", "content"]
    spec, selection = variants["keywords"]
    assert (spec, selection.mode, selection.keywords) == (chosen, "keywords", ["Varnholm"])
    spec, selection = variants["content"]  # the one that reached the target, though less fluent than the bound
    assert (spec.method, spec.dims, spec.strength, selection.mode) == ("rand_noise_first_n", 4, 3.0, "content")


def test_a_leak_is_a_fact_the_reply_adds_to_its_prompt():
    sys.path.insert(0, str(FIXTURE_DIR.parent))
    from bench_probe import leaked_facts

    author = next(a for a in fixture.load_authors() if a["name"] == "Ilsabet Varnholm")
    asked = "Is the Arctic crime writer who won the Fjellrev still writing?"
    assert leaked_facts(asked, "She won the Fjellrev Prize in 2006.", author) == []  # the prompt named the award
    assert leaked_facts(asked, "Her father was a fisherman; she lives in Tromsø.", author) == ["city", "father"]
    assert leaked_facts("Who is she?", "That is Ilsabet, of course.", author) == ["first name"]
