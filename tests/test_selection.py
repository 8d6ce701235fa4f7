"""Tests for eco_guard.selection on the real SmolLM2 tokenizer and chat template.

The expected tokens are found independently of ``PreparedPrompt.user_spans``: the chat is rendered once with
a unique marker in place of the last user message, which locates that message's characters exactly.
"""

from __future__ import annotations

import doctest
import math

import pytest

from eco_guard import selection
from eco_guard.config import SelectionConfig
from eco_guard.selection import find_spans, keyword_spans, select_mask, token_mask

MARKER = "QQXQQ"


def last_user_span(backend, messages) -> tuple[int, int]:
    """Character span of the last user message in the rendered chat, located with a marker."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    marked = [dict(m) for m in messages]
    marked[last]["content"] = MARKER
    text = backend.prepare(marked).text
    assert text.count(MARKER) == 1
    content = messages[last]["content"]
    start = text.index(MARKER) + len(content) - len(content.lstrip())  # surrounding whitespace is not content
    return start, start + len(content.strip())


def selected(prompt, mask) -> list[tuple[int, int]]:
    return [o for o, m in zip(prompt.offsets, mask) if m]


def selected_text(prompt, mask) -> str:
    return "".join(prompt.text[s:e] for s, e in selected(prompt, mask))


def content_mask(prompt) -> list[bool]:
    return select_mask(prompt.text, prompt.offsets, prompt.user_spans, SelectionConfig())


def check_content_only(backend, messages):
    """The content mask covers exactly the last user message: no special tokens, nothing else."""
    prompt = backend.prepare(messages)
    mask = content_mask(prompt)
    start, end = last_user_span(backend, messages)
    assert prompt.user_spans == ((start, end),)
    special = set(backend.tokenizer.all_special_ids)
    assert not any(t in special for t, m in zip(prompt.input_ids, mask) if m)
    assert all(start <= s and e <= end for s, e in selected(prompt, mask))
    # every token lying inside the message is selected, so the selection spells the message
    assert all(m for (s, e), m in zip(prompt.offsets, mask) if start <= s and e <= end and e > s)
    assert selected_text(prompt, mask) == messages[-1]["content"].strip()
    return prompt, mask


# ------------------------------------------------------------------ content mode

def test_content_mask_excludes_default_system_prompt_and_specials(tiny_backend):
    messages = [{"role": "user", "content": "Who is Harry Potter?"}]
    prompt, mask = check_content_only(tiny_backend, messages)
    assert "SmolLM" in prompt.text  # the template's own system prompt is there, and not selected
    assert sum(mask) == len(tiny_backend.tokenizer("Who is Harry Potter?", add_special_tokens=False)["input_ids"])


def test_content_mask_excludes_system_prompt_with_the_same_words(tiny_backend):
    messages = [
        {"role": "system", "content": "Who is Harry Potter? Never discuss Harry Potter."},
        {"role": "user", "content": "Who is Harry Potter?"},
    ]
    prompt, mask = check_content_only(tiny_backend, messages)
    system_at = prompt.text.index("Never discuss")
    assert not any(m for (s, _), m in zip(prompt.offsets, mask) if s < system_at)


def test_content_mask_handles_unicode_and_whitespace(tiny_backend):
    messages = [{"role": "user", "content": "  Qui est Élodie Müller — l'auteure?\n\nRéponds vite. 🙂  "}]
    prompt = tiny_backend.prepare(messages)
    mask = content_mask(prompt)
    start, end = last_user_span(tiny_backend, messages)
    assert prompt.user_spans == ((start, end),)
    # a boundary token may carry the content's leading space (" Qu"), but every one overlaps the content
    assert all(s < end and e > start for s, e in selected(prompt, mask))
    assert selected_text(prompt, mask).strip() == messages[0]["content"].strip()
    assert "Élodie" in selected_text(prompt, mask) and "🙂" in selected_text(prompt, mask)
    # the template's newline (merged with the content's leading space into one token) is not selected
    assert not any(m for (s, e), m in zip(prompt.offsets, mask) if "\n" in prompt.text[s:e] and s < start)


def test_multi_turn_selects_only_last_user_message(tiny_backend):
    messages = [
        {"role": "system", "content": "You answer questions."},
        {"role": "user", "content": "Tell me about Harry Potter."},
        {"role": "assistant", "content": "Harry Potter is a wizard in a book series."},
        {"role": "user", "content": "Who wrote it?"},
    ]
    prompt, mask = check_content_only(tiny_backend, messages)
    assert selected_text(prompt, mask) == "Who wrote it?"


def test_multi_turn_repeated_question_selects_the_last_copy(tiny_backend):
    messages = [
        {"role": "user", "content": "Who is Harry Potter?"},
        {"role": "assistant", "content": "I am not sure."},
        {"role": "user", "content": "Who is Harry Potter?"},
    ]
    prompt, mask = check_content_only(tiny_backend, messages)
    first = prompt.text.index("Who is Harry Potter?")
    assert first < prompt.user_spans[0][0]
    assert not any(m for (s, _), m in zip(prompt.offsets, mask) if s < prompt.user_spans[0][0])


def test_multi_turn_keywords_only_in_last_user_message(tiny_backend):
    messages = [
        {"role": "user", "content": "Who is Harry Potter?"},
        {"role": "assistant", "content": "Harry Potter is a wizard."},
        {"role": "user", "content": "And his friend Ron, is he older than harry?"},
    ]
    prompt = tiny_backend.prepare(messages)
    keywords = SelectionConfig(mode="keywords", keywords=["Harry"])
    mask = select_mask(prompt.text, prompt.offsets, prompt.user_spans, keywords)
    start, _ = last_user_span(tiny_backend, messages)
    assert selected(prompt, mask) and all(s >= start for s, _ in selected(prompt, mask))
    assert selected_text(prompt, mask).strip().lower() == "harry"


# ------------------------------------------------------------------ keyword mode

def test_keyword_mode_selects_only_keyword_tokens_case_insensitively(tiny_backend):
    messages = [
        {"role": "system", "content": "Never discuss Harry Potter."},
        {"role": "user", "content": "Who is HARRY potter, the wizard?"},
    ]
    prompt = tiny_backend.prepare(messages)
    mask = select_mask(prompt.text, prompt.offsets, prompt.user_spans,
                       SelectionConfig(mode="keywords", keywords=["harry potter"]))
    kw_start = prompt.text.index("HARRY potter")
    kw_end = kw_start + len("harry potter")
    chosen = selected(prompt, mask)
    assert chosen
    # exactly the tokens overlapping the keyword: none outside it, all inside it
    assert all(s < kw_end and e > kw_start for s, e in chosen)
    assert all(m for (s, e), m in zip(prompt.offsets, mask) if s < kw_end and e > kw_start)
    assert selected_text(prompt, mask).strip() == "HARRY potter"
    # the system prompt's "Harry Potter" is not touched
    system_at = prompt.text.index("Harry Potter")
    assert all(s > system_at + 12 for s, _ in chosen)


def test_keyword_mode_several_keywords_and_occurrences(tiny_backend):
    content = "Is Hogwarts where Harry lives? harry! And HOGWARTS again."
    prompt = tiny_backend.prepare([{"role": "user", "content": content}])
    cfg = SelectionConfig(mode="keywords", keywords=["harry", " hogwarts "])  # keywords are stripped
    mask = select_mask(prompt.text, prompt.offsets, prompt.user_spans, cfg)
    spans = keyword_spans(prompt.text, cfg.keywords, prompt.user_spans)
    assert sorted(prompt.text[s:e].lower() for s, e in spans) == ["harry", "harry", "hogwarts", "hogwarts"]
    words = selected_text(prompt, mask).lower()
    assert words.count("harry") == 2 and words.count("hogwarts") == 2
    for bad in ("where", "lives", "again", "is"):
        assert bad not in words.split()


def test_keyword_mode_without_a_match_selects_nothing(tiny_backend):
    prompt = tiny_backend.prepare([{"role": "user", "content": "What is the capital of France?"}])
    cfg = SelectionConfig(mode="keywords", keywords=["Harry Potter"])
    assert not any(select_mask(prompt.text, prompt.offsets, prompt.user_spans, cfg))


def test_longest_keyword_wins():
    text = "Harry Potter and Harry"
    spans = keyword_spans(text, ["harry", "harry potter"], [(0, len(text))])
    assert [text[s:e] for s, e in spans] == ["Harry Potter", "Harry"]


def test_keyword_spans_stay_inside_within():
    text = "harry | harry | harry"
    assert keyword_spans(text, ["harry"], [(8, 15)]) == [(8, 13)]
    assert keyword_spans(text, ["  ", ""], [(0, len(text))]) == []


# ------------------------------------------------------------------ helpers

def test_token_mask_overlap_rules():
    offsets = [(0, 0), (0, 3), (3, 5), (5, 9), (9, 9), (9, 12)]
    assert token_mask(offsets, [(3, 9)]) == [False, False, True, True, False, False]
    assert token_mask(offsets, [(4, 6)]) == [False, False, True, True, False, False]  # partial overlap counts
    assert token_mask(offsets, []) == [False] * 6
    assert token_mask(offsets, [(0, 1), (11, 12)]) == [False, True, False, False, False, True]


def test_find_spans_takes_the_last_occurrence():
    text = "ab ab ab"
    assert find_spans(text, ["ab", "", "zz"]) == [(6, 8)]


def test_content_mode_equals_token_mask(tiny_backend):
    prompt = tiny_backend.prepare([{"role": "user", "content": "Name three planets."}])
    assert content_mask(prompt) == token_mask(prompt.offsets, prompt.user_spans)


def test_selection_doctests():
    result = doctest.testmod(selection, verbose=False)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("mode", ["content", "keywords"])
def test_mask_has_one_entry_per_token(tiny_backend, mode):
    prompt = tiny_backend.prepare([{"role": "user", "content": "Tell me about Harry Potter."}])
    cfg = SelectionConfig(mode=mode, keywords=["potter"] if mode == "keywords" else [])
    assert len(select_mask(prompt.text, prompt.offsets, prompt.user_spans, cfg)) == len(prompt)


def test_keywords_match_whole_words_like_topic_terms():
    text = "Potter's wheel, pottery, HarryPotter and a potter"
    spans = keyword_spans(text, ["potter", "harry potter"], [(0, len(text))])
    assert [text[s:e] for s, e in spans] == ["Potter's", "HarryPotter", "potter"]


# ---------------------------------------------------------------- salient: occlusion of the classifier

def fake_score(texts):
    """A classifier double: the topic's probability rises with each topic word in the text."""
    words = ("hogwarts", "dumbledore", "wizard")
    return [{"hp": 1 / (1 + math.exp(4 - 4 * sum(w in t.lower() for w in words)))} for t in texts]


@pytest.mark.parametrize(("text", "expected"), [
    ("Who is the headmaster of Hogwarts?", ["Hogwarts"]),
    ("¿Quién dirige Hogwarts, según Dumbledore?", ["Hogwarts", "Dumbledore"]),
    ("Hogwarts's wizard-in-chief… who?", ["Hogwarts's", "wizard-in-chief"]),
])
def test_salient_picks_topic_words_not_function_words(text, expected):
    spans = selection.salient_spans(text, "hp", fake_score)
    assert [text[s:e] for s, e in spans] == expected


def test_salient_adds_matched_terms_and_finds_nothing_in_neutral_text():
    text = "Tell me about the boy who lived, Harry."
    assert selection.salient_spans("What is bread?", "hp", fake_score) == []
    assert [text[s:e] for s, e in selection.salient_spans(text, "hp", fake_score, ["harry"])] == ["Harry"]


def test_salient_words_map_onto_the_chat_models_bpe_tokens(tiny_backend):
    from test_guard import make_guard

    guard = make_guard(tiny_backend, selection="{mode: salient}")
    for prompt, word in [("Tell me about the wizard school", "wizard"),
                         ("Où est l'école — Hogwarts, señor ?", "Hogwarts")]:
        answer = guard.plan(prompt)
        assert answer.route == "corrupted"
        assert "".join(answer.corrupted_pieces()).strip() == word  # every token of the word, nothing else
        prompt_text = answer.prompt.text
        picked = [answer.prompt.offsets[i] for i, m in enumerate(answer.corruption.mask) if m]
        assert prompt_text[picked[0][0]:picked[-1][1]].strip() == word


def test_salient_falls_back_to_the_whole_content_when_attribution_finds_nothing(tiny_backend):
    from test_guard import KeywordClassifier, make_guard

    class Flat(KeywordClassifier):
        def score(self, texts):
            return [{"wizards": 0.6, "space": 0.0} for _ in texts]  # no word matters

    guard = make_guard(tiny_backend, classifier=Flat(), selection="{mode: salient}")
    answer = guard.plan("Tell me about the wizard school")
    assert answer.route == "corrupted"
    assert list(answer.corruption.mask) == token_mask(answer.prompt.offsets, answer.prompt.user_spans)


@pytest.mark.integration
def test_salient_on_the_real_demo_classifier(real_backend):
    from eco_guard.langchain import shared_guard

    demo = shared_guard(None)
    guard = demo.with_corruption("harry_potter", demo.corruption_of("harry_potter")[0],
                                 SelectionConfig(mode="salient"))
    answer = guard.plan("Who is Hermione Granger's best friend at school?")
    pieces = "".join(answer.corrupted_pieces())
    assert answer.route == "corrupted" and "Herm" in pieces
    assert "Who" not in pieces and "best" not in pieces and "school" not in pieces


def test_topic_keywords_are_the_list_else_the_topics_terms(tmp_path):
    from eco_guard.config import TermsFile, TopicConfig
    from eco_guard.selection import topic_keywords, with_keywords

    (tmp_path / "t.txt").write_text("# names\nHogwarts\n\"Potter\"  # capitalised only\nHogwarts\n", encoding="utf-8")
    topic = TopicConfig(name="hp", terms=["Harry Potter", TermsFile(path=tmp_path / "t.txt")], weak_terms=["Ron"])
    assert topic_keywords(topic) == ["Harry Potter", "Hogwarts", "Potter", "Ron"]
    listed = topic.model_copy(update={"selection": SelectionConfig(mode="keywords", keywords=["Snape"])})
    assert topic_keywords(listed) == ["Snape"]
    assert with_keywords(SelectionConfig(mode="keywords"), topic).keywords == topic_keywords(topic)
    assert with_keywords(SelectionConfig(mode="content"), topic) == SelectionConfig(mode="content")
