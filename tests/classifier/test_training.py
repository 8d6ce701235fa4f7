"""Fitting the classifier: settings, layers, precision, seeds, data splits (eco_guard.classifier.training)."""

from __future__ import annotations

import json

import pytest
from tiny import FAST, NEG, POS, build_tiny_encoder

from eco_guard.classifier import PromptClassifier, TrainingSettings
from eco_guard.errors import ConfigError


def test_training_settings_reject_unknown_and_bad_values():
    with pytest.raises(ConfigError, match=r"classifier\.training\.epoch: unknown training setting"):
        TrainingSettings.parse({"epoch": 3})
    with pytest.raises(ConfigError, match=r"cfg.yaml: classifier\.training\.batch_size"):
        TrainingSettings.parse({"batch_size": 0}, where="cfg.yaml: classifier.training")
    assert TrainingSettings.parse({"epochs": 2, "seed": 5}).seed == 5
    # a decision setting is not a training input: it says where it goes
    with pytest.raises(ConfigError, match=r"classifier\.training\.min_threshold is a decision setting.*"
                                          r"classifier\.decision\.min_threshold"):
        TrainingSettings.parse({"min_threshold": 0.7})


def test_a_stride_longer_than_the_window_is_refused(tiny_encoder):
    from eco_guard.config import DecisionSettings, parse_config

    text = "classifier: {training: {window_tokens: 32}, decision: {window_stride: 64}}\ntopics: [{name: a}]\n"
    with pytest.raises(ConfigError, match=r"y.yaml:1: classifier.decision: window_stride: 64 exceeds "
                                          r"training.window_tokens 32; windows would skip text"):
        parse_config(text, file="y.yaml")
    with pytest.raises(ConfigError, match="window_stride: 64 exceeds the classifier's window_tokens 32"):
        PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), progress=False,
                               settings={**FAST, "window_tokens": 32}, decision=DecisionSettings(window_stride=64))


def test_frozen_layers_stay_fixed_while_the_rest_trains(tiny_encoder):
    import torch

    from eco_guard.classifier.encoder import load_encoder

    original = load_encoder(str(tiny_encoder), 2)[1].transformer.encoder.layer[0].state_dict()

    def layer_changed(frozen_layers: int) -> bool:
        clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), progress=False, max_false_positive_rate=0.1,
                                     settings={**FAST, "frozen_layers": frozen_layers, "learning_rate": 1e-3})
        trained = clf.encoder.net.transformer.encoder.layer[0].state_dict()
        return any(not torch.equal(original[k], trained[k]) for k in original)

    assert layer_changed(0) and not layer_changed(1)
    with pytest.raises(ConfigError, match="frozen_layers: 2 exceeds the encoder's 1 layers"):
        PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), progress=False,
                               settings={**FAST, "frozen_layers": 2})


def test_encoder_layers_keep_the_lowest_layers_and_save_as_such(tmp_path):
    encoder = build_tiny_encoder(tmp_path / "enc", layers=2)
    clf = PromptClassifier.train(POS, NEG, encoder=str(encoder), progress=False, max_false_positive_rate=0.1,
                                 settings={**FAST, "encoder_layers": 1})
    assert len(clf.encoder.net.transformer.encoder.layer) == 1
    clf.save_pretrained(tmp_path / "clf")
    loaded = PromptClassifier.from_pretrained(tmp_path / "clf")
    assert len(loaded.encoder.net.transformer.encoder.layer) == 1
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


def test_training_is_seeded_and_bfloat16_leaves_float32_weights(tiny_encoder):
    import torch

    from eco_guard.classifier.training import resolved_precision

    def train(precision: str) -> PromptClassifier:
        return PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), progress=False, max_false_positive_rate=0.1,
                                      settings={**FAST, "precision": precision, "learning_rate": 1e-3})

    texts = [*POS["wizards"][:3], *POS["space"][:3], *NEG[:3]]
    bf16 = train("bfloat16")
    torch.manual_seed(1234)  # whatever the caller did to the global RNG, the seed decides
    again, fp32 = train("bfloat16"), train("float32")
    assert bf16.metadata["training_precision"] == "bfloat16" and fp32.metadata["training_precision"] == "float32"
    assert all(p.dtype == torch.float32 for p in bf16.encoder.net.parameters())
    assert bf16.score(texts) == again.score(texts)  # seeded: the same model twice
    assert bf16.score(texts) != fp32.score(texts)  # the arithmetic did change
    assert resolved_precision("auto") in {"bfloat16", "float32"}
    with pytest.raises(ConfigError, match=r"classifier\.training\.precision"):
        TrainingSettings.parse({"precision": "fp16"})


def test_prose_negatives_join_the_training_set(tiny_encoder):
    def n_examples(prose: int) -> int:
        clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), progress=False, max_false_positive_rate=0.1,
                                     settings={**FAST, "epochs": 0, "head_steps": 1, "prose_negatives": prose})
        return clf.metadata["n_train_examples"]

    assert n_examples(7) - n_examples(0) == 7


def test_a_term_in_the_negatives_is_reported(tiny_encoder):
    with pytest.warns(UserWarning, match="1 negative prompt.*contain a topic term.*beans"):
        clf = PromptClassifier.train(POS, NEG, encoder=str(tiny_encoder), settings=FAST, progress=False,
                                     max_false_positive_rate=0.1, terms={"wizards": ["recipe 3"]})
    assert [h["text"] for h in clf.metadata["term_hits_in_negatives"]] == [NEG[3]]


def test_training_doctests():
    import doctest

    from eco_guard.classifier import training

    result = doctest.testmod(training)
    assert result.attempted > 0 and result.failed == 0
