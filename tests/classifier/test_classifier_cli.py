"""The classifier's CLI subcommands: train, classify, eval-classifier (tiny encoder, fast)."""

from __future__ import annotations

import json

import pytest
from tiny import NEG, POS, config

from eco_guard.cli import main
from eco_guard.eval.classifier_report import load_eval_rows


@pytest.fixture(scope="module")
def trained_config(tmp_path_factory, tiny_encoder):
    cfg = config(tmp_path_factory.mktemp("cli"), tiny_encoder)
    assert main(["train", str(cfg.source), "--quiet"]) == 0
    return cfg


def test_train_reports_thresholds(tmp_path, tiny_encoder, capsys):
    cfg = config(tmp_path, tiny_encoder)
    assert main(["train", str(cfg.source), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "wizards: threshold" in out and "space: threshold 0.5 (fixed" in out


def test_train_writes_the_classifier_where_the_config_says(trained_config):
    saved = json.loads((trained_config.classifier.path / "config.json").read_text())
    assert saved["topics"] == ["wizards", "space"]
    assert saved["thresholds"]["space"] == 0.5


def test_classify_writes_one_verdict_per_line(trained_config, tmp_path):
    inp = tmp_path / "in.jsonl"
    texts = POS["wizards"][:2] + NEG[:3]
    inp.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out.jsonl"
    assert main(["classify", str(trained_config.source), str(inp), "-o", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["text"] for x in lines] == texts
    for x in lines:
        assert isinstance(x["flagged"], bool) and set(x["scores"]) == set(x["thresholds"]) == {"wizards", "space"}
        assert (x["topic"] is None) == (not x["flagged"]) == (not x["flagged_topics"])
        if x["flagged"]:
            assert x["topic"] in x["flagged_topics"]
            assert x["score"] == x["scores"][x["topic"]]  # no term: the support is the model's probability
        assert x["terms"] == x["weak_terms"] == {} and x["contrast"] is None  # this config names no terms


def test_classify_shows_the_models_probability_beside_a_term_hit(tiny_encoder, tmp_path):
    cfg = config(tmp_path, tiny_encoder)
    fixed = "    threshold: 0.5\n"
    cfg.source.write_text(cfg.source.read_text().replace(fixed, f"{fixed}    terms: [Millennium Falcon]\n"))
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"text": "Dinner on the Millennium Falcon"}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["classify", str(cfg.source), str(inp), "-o", str(out)]) == 0
    [line] = [json.loads(x) for x in out.read_text().splitlines()]
    assert line["flagged"] and line["topic"] == "space" and line["terms"] == {"space": "millennium falcon"}
    assert line["score"] == 1.0 and line["scores"]["space"] < 1.0  # the term's support; the model's probability


def test_eval_classifier_writes_report_and_plot(trained_config, tmp_path, capsys):
    data = tmp_path / "eval.jsonl"
    rows = ([{"text": t, "topic": "wizards", "style": "question"} for t in POS["wizards"][:4]]
            + [{"text": t, "topic": "space", "style": "chat"} for t in POS["space"][:3]]
            + [{"text": t, "label": 0, "kind": "general"} for t in NEG[:5]])
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_dir = tmp_path / "report"
    assert main(["eval-classifier", str(trained_config.source), str(data), "--out", str(out_dir)]) == 0
    report = json.loads((out_dir / "classifier_report.json").read_text())
    assert (out_dir / "classifier_report.png").stat().st_size > 1000
    assert "| wizards |" in (out_dir / "classifier_report.md").read_text()
    assert report["topics"]["wizards"]["positives"] == 4 and report["topics"]["space"]["positives"] == 3
    assert report["overall"]["negatives"] == 5
    assert set(report["groups"]) == {"style", "kind"}
    counts = report["confusion"]["counts"]
    assert [sum(r) for r in counts] == [4, 3, 5]  # rows: wizards, space, none
    space = report["topics"]["space"]
    assert 0.0 <= space["fnr"] <= 1.0 and space["false_negatives"] == round(space["fnr"] * 3)
    assert "Confusion" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_file_and_line(trained_config, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    assert main(["classify", str(trained_config.source), str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # earlier lines: library progress bars
    assert err == f"error: {bad}:2: missing 'text' field"


def test_eval_rows_need_a_truth(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a", "topic": "space"}\n{"text": "b", "label": 1}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: label 1 but no 'topic' field"):
        load_eval_rows([path], ["space", "wizards"])
    assert [r.topic for r in load_eval_rows([path], ["space"])] == ["space", "space"]


def test_suggest_terms_lists_distinctive_names_only(tmp_path, capsys):
    (tmp_path / "sw.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [
        "Which rides at Galaxy's Edge are best?", "Is Galaxy's Edge worth it?", "Who flies the Razor Crest?",
        "Was Yoda ever in London?", "Is the Force real?", "Why did Rey's parents leave her?"]))
    (tmp_path / "neg.jsonl").write_text(json.dumps({"text": "Cheap hotels in London"}) + "\n")
    (tmp_path / "g.yaml").write_text("classifier: {negatives: [neg.jsonl]}\n"
                                     "topics: [{name: star_wars, data: [sw.jsonl], terms: [Yoda]}]\n")
    assert main(["suggest-terms", str(tmp_path / "g.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("star_wars: 3 candidate terms")
    assert [line.split(maxsplit=1) for line in out[1:]] == [["2", "Galaxy's Edge"], ["1", "Razor Crest"], ["1", "Rey"]]
    # not suggested: Yoda (a term already), London (in a negative), Force (an English word)
