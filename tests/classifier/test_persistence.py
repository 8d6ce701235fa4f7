"""Saved classifiers: round trips, staleness, the lock and the swap (eco_guard.classifier.persistence)."""

from __future__ import annotations

import json
import math
import threading

import pytest
from tiny import FAST, NEG, POS, config, config_yaml

from eco_guard.classifier import PromptClassifier
from eco_guard.config import load_config
from eco_guard.errors import ClassifierError


def test_save_load_round_trip_gives_identical_scores(tiny_classifier, tmp_path):
    texts = POS["wizards"][:4] + NEG[:4] + ["Ｈ\u200bello", " ".join(NEG * 5)]
    tiny_classifier.save_pretrained(tmp_path / "clf")
    loaded = PromptClassifier.from_pretrained(tmp_path / "clf")
    assert loaded.topics == tiny_classifier.topics
    assert loaded.thresholds == tiny_classifier.thresholds
    assert loaded.score(texts) == tiny_classifier.score(texts)
    meta = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert {"encoder", "topics", "thresholds", "data_hash", "settings", "decision", "calibration"} <= set(meta)
    assert "min_threshold" not in meta["settings"] and meta["decision"]["min_threshold"] == 0.5


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


def test_from_config_trains_once_then_loads_and_recalibrates(tiny_encoder, tmp_path, monkeypatch):
    cfg = config(tmp_path, tiny_encoder)
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
    looser = PromptClassifier.from_config(config(tmp_path, tiny_encoder, fpr=0.5), progress=False)
    assert looser.thresholds["wizards"] <= first.thresholds["wizards"]


def test_from_config_retrains_when_data_changes(tiny_encoder, tmp_path, monkeypatch):
    PromptClassifier.from_config(config(tmp_path, tiny_encoder), progress=False)
    calls = []
    real_train = PromptClassifier.train.__func__

    def counting_train(cls, *args, **kwargs):
        calls.append(kwargs)
        return real_train(cls, *args, **kwargs)

    monkeypatch.setattr(PromptClassifier, "train", classmethod(counting_train))
    stale = config(tmp_path, tiny_encoder, extra_pos="Which starship docked at the orbital ring?")
    with pytest.warns(UserWarning, match="stale"):
        PromptClassifier.from_config(stale, train_if_missing=False)  # serves the stale model, says so
    assert not calls
    PromptClassifier.from_config(stale, progress=False)
    assert len(calls) == 1
    assert math.isfinite(calls[0]["max_false_positive_rate"]["wizards"])


def test_concurrent_first_use_trains_once(tiny_encoder, tmp_path, monkeypatch):
    cfg = config(tmp_path, tiny_encoder)
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
    assert list(tmp_path.glob("*.lock")) == []  # nor lock files


def test_a_decision_setting_changes_decisions_without_retraining(tiny_encoder, tmp_path, monkeypatch):
    yaml_path = config_yaml(tmp_path, tiny_encoder, fpr=0.5, decision="{min_threshold: 0.0}")
    first = PromptClassifier.from_config(load_config(yaml_path), progress=False)
    saved = tmp_path / "clf"
    before = {p.name: p.stat().st_mtime_ns for p in saved.rglob("*")}
    meta_before = (saved / "config.json").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a decision setting retrained the classifier")

    monkeypatch.setattr(PromptClassifier, "train", classmethod(no_training))
    texts = POS["wizards"] + NEG
    # a floor over every probability: nothing the model alone supports is flagged any more
    yaml_path.write_text(yaml_path.read_text().replace("{min_threshold: 0.0}", "{min_threshold: 0.999999}"))
    strict = PromptClassifier.from_config(load_config(yaml_path), progress=False)
    assert strict.thresholds["wizards"] == 0.999999 and strict.thresholds["space"] == 0.5  # a fixed one stays
    assert strict.decision.min_threshold == 0.999999
    before_flags = [v.flagged_topics for v in first.classify(texts)]
    assert sum("wizards" in f for f in before_flags) > 0  # the trained model did flag some
    assert not any("wizards" in v.flagged_topics for v in strict.classify(texts))
    assert strict.score(texts) == first.score(texts)  # the same model: only the reading changed
    assert {p.name: p.stat().st_mtime_ns for p in saved.rglob("*")} == before
    assert (saved / "config.json").read_text() == meta_before
    assert list(tmp_path.glob("*.lock")) == []


def test_a_folder_saved_with_decision_settings_among_training_ones_is_up_to_date(tiny_encoder, tmp_path, monkeypatch):
    cfg = config(tmp_path, tiny_encoder)
    clf = PromptClassifier.from_config(cfg, progress=False)
    meta_file = tmp_path / "clf" / "config.json"
    meta = json.loads(meta_file.read_text())
    decision = meta.pop("decision")
    meta["settings"].update(decision)  # the layout before classifier.decision existed
    meta["window_stride"] = decision.pop("window_stride")
    meta_file.write_text(json.dumps(meta))
    monkeypatch.setattr(PromptClassifier, "train", classmethod(lambda *a, **k: pytest.fail("retrained")))
    again = PromptClassifier.from_config(cfg, progress=False, train_if_missing=False)
    assert again.thresholds == clf.thresholds and again.decision == clf.decision
    assert PromptClassifier.from_pretrained(tmp_path / "clf").decision == clf.decision
