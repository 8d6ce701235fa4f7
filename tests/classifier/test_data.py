"""Reading prompt and term files, and the training data a config names (eco_guard.classifier.data)."""

from __future__ import annotations

import pytest
from tiny import write

from eco_guard.classifier import TrainingData, data_hash, read_prompts, read_rows, read_terms, suggest_terms
from eco_guard.config import DataSource, TermsFile, load_config
from eco_guard.errors import DataError


def test_read_prompts_jsonl_and_csv_with_split(tmp_path):
    jsonl = write(tmp_path, "p.jsonl", '{"text": "a?", "split": "train"}\n\n{"text": "b?", "split": "dev"}\n')
    csv_file = write(tmp_path, "p.csv", 'text,split\n"x, with comma",train\ny,dev\n')
    assert read_prompts(jsonl) == ["a?", "b?"]
    assert read_prompts(jsonl, split="dev") == ["b?"]
    assert read_prompts(csv_file, split="train") == ["x, with comma"]


def test_read_prompts_honours_datasource_split(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"text": "a", "split": "train"}\n{"text": "b", "split": "dev"}\n')
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
    path = write(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        read_prompts(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}:"), message
    assert needle in message
    assert "\n" not in message


def test_data_errors_for_missing_split_field_type_and_file(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"text": "a", "split": "train"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: no 'split' field"):
        read_prompts(path, split="train")
    with pytest.raises(DataError, match="unsupported data file type '.txt'"):
        read_prompts(write(tmp_path, "p.txt", "hello\n"))
    with pytest.raises(DataError, match="not found"):
        read_prompts(tmp_path / "missing.jsonl")
    bad_utf8 = tmp_path / "latin1.jsonl"
    bad_utf8.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{bad_utf8}:2: not valid UTF-8"):
        read_prompts(bad_utf8)


def test_read_rows_keeps_other_fields(tmp_path):
    path = write(tmp_path, "p.jsonl", '{"text": "a", "style": "chat"}\n')
    [row] = read_rows(path)
    assert row["style"] == "chat" and row["_line"] == 1


def test_read_terms_inline_and_files_with_comments(tmp_path):
    f = write(tmp_path, "t.txt", "# names\nHogwarts\n\nDumbledore  # headmaster\nHogwarts\n")
    assert read_terms(["Quidditch", TermsFile(path=f)]) == ["Quidditch", "Hogwarts", "Dumbledore"]
    with pytest.raises(DataError, match="missing.txt: terms file not found"):
        read_terms([TermsFile(path=tmp_path / "missing.txt")])
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"bad.txt:2: not valid UTF-8"):
        read_terms([TermsFile(path=tmp_path / "bad.txt")])


def test_weak_terms_come_from_the_config_and_a_missing_file_is_named(tmp_path):
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


def test_data_hash_follows_prompts_terms_and_order():
    base = data_hash({"a": ["x", "y"]}, ["n"])
    assert base == data_hash({"a": ["x", "y"]}, ["n"])
    assert base != data_hash({"a": ["y", "x"]}, ["n"])
    assert base != data_hash({"a": ["x", "y"]}, ["n"], {"a": ["Yoda"]})
    assert base != data_hash({"a": ["x", "y"]}, ["n"], weak_terms={"a": ["Luke"]})
    assert base == data_hash({"a": ["x", "y"]}, ["n"], {"a": []}, weak_terms={"a": []})  # empty lists: no change


def test_suggest_terms_skips_covered_shared_and_everyday_names():
    positives = {"sw": ["Rides at Galaxy's Edge?", "Is Galaxy's Edge fun?", "Who is Yoda?", "Is the Force real?"]}
    assert suggest_terms(positives, ["Trip to London"], {"sw": ["Yoda"]}) == {"sw": [("Galaxy's Edge", 2)]}


def test_data_doctests():
    import doctest

    from eco_guard.classifier import data

    result = doctest.testmod(data)
    assert result.attempted > 0 and result.failed == 0
