"""Tests for eco_guard.config: broken YAML is a one-line ConfigError at the right file:line: field.path.

Every expected line number is computed from the YAML text itself (the line holding a marker string).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eco_guard.config import (
    BUILTIN_CORRUPTIONS,
    DecisionSettings,
    GuardConfig,
    SelectionConfig,
    TrainingSettings,
    load_config,
    parse_config,
)
from eco_guard.corruption import CorruptionSpec
from eco_guard.errors import ConfigError

VALID = """\
version: 1
model:
  path: default
  dtype: float32
classifier:
  encoder: default
  path: ./clf
  negatives: [neg/negatives.jsonl]
topics:
  - name: harry_potter
    description: The Harry Potter books.
    data: [hp.jsonl, {path: more/hp.csv, split: train}]
    terms: [Hogwarts, {path: terms/hp.txt}]
    max_false_positive_rate: 0.02
    corruption:
      method: rand_noise_first_n
      dims: 1
      strength: 5
      seed: 3
    selection:
      mode: content
  - name: star_wars
    threshold: 0.9
    corruption: {method: zero_out_top_k, dims: 2, strength: 0}
    selection: {mode: keywords, keywords: [Skywalker, Death Star]}
on_classifier_error: flag
rag: corrupt
generation:
  max_new_tokens: 64
  stop: ["###"]
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based number of the line holding the ``nth`` occurrence of ``needle``."""
    at = -1
    for _ in range(nth):
        at = text.index(needle, at + 1)
    return text.count("\n", 0, at) + 1


def edit(old: str, new: str, text: str = VALID) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def classifier_with(block: str) -> str:
    """VALID with ``block`` (YAML under ``classifier:``, two-space indented) added to the classifier."""
    anchor = "  negatives: [neg/negatives.jsonl]\n"
    return edit(anchor, f"{anchor}  {block}\n")


def config_error(text: str, tmp_path: Path) -> str:
    path = tmp_path / "guard.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{path}:"), msg
    return msg


# (case id, broken YAML, marker of the line to blame (nth occurrence), field path, words the message must hold)
BROKEN = [
    ("unknown-top-key", VALID + "colour: blue\n", ("colour:", 1), "colour", ["unknown key"]),
    ("unknown-nested-key", edit("      dims: 1\n", "      dims: 1\n      sigma: 3\n"), ("sigma:", 1),
     "topics[0].corruption.sigma", ["unknown key"]),
    ("unknown-key-in-flow-mapping", edit("{method: zero_out_top_k,", "{method: zero_out_top_k, sigma: 1,"),
     ("sigma", 1), "topics[1].corruption.sigma", ["unknown key"]),
    ("wrong-type", edit("max_new_tokens: 64", "max_new_tokens: lots"), ("max_new_tokens", 1),
     "generation.max_new_tokens", ["integer"]),
    ("wrong-type-bool", edit("      mode: content\n", "      mode: [content]\n"), ("mode: [content]", 1),
     "topics[0].selection.mode", []),
    ("negative-strength", edit("strength: 5", "strength: -1"), ("strength: -1", 1),
     "topics[0].corruption.strength", ["greater than or equal to 0"]),
    ("unknown-method", edit("method: rand_noise_first_n", "method: blur"), ("method: blur", 1),
     "topics[0].corruption.method", ["blur", "rand_noise_first_n", "shuffle"]),
    ("bad-enum", edit("on_classifier_error: flag", "on_classifier_error: maybe"), ("on_classifier_error", 1),
     "on_classifier_error", ["flag", "block", "pass"]),
    ("bad-enum-dtype", edit("dtype: float32", "dtype: float64"), ("dtype", 1), "model.dtype", ["float32"]),
    ("missing-topics", "model:\n  path: default\n", ("model:", 1), "topics", ["required"]),
    ("empty-topics", edit(VALID[VALID.index("topics:"):VALID.index("on_classifier_error")], "topics: []\n"),
     ("topics: []", 1), "topics", ["at least 1"]),
    ("topics-not-a-list", "topics: harry_potter\n", ("topics:", 1), "topics", ["list"]),
    ("duplicate-topic-name", edit("  - name: star_wars\n", "  - name: harry_potter\n"), ("name: harry_potter", 2),
     "topics[1].name", ["unique", "harry_potter"]),
    ("keywords-without-keywords", edit("keywords: [Skywalker, Death Star]", "keywords: []"),
     ("keywords: []", 1), "topics[1].selection", ["keywords"]),
    ("keywords-blank", edit("keywords: [Skywalker, Death Star]", "keywords: ['  ']"),
     ("keywords: ['  ']", 1), "topics[1].selection", ["keywords"]),
    ("missing-env-var", edit("path: ./clf", "path: ${ECO_TEST_UNSET_VAR}/clf"), ("ECO_TEST_UNSET_VAR", 1),
     "classifier.path", ["ECO_TEST_UNSET_VAR", "not set"]),
    ("duplicate-key", edit("  dtype: float32\n", "  dtype: float32\n  path: other\n"), ("path: other", 1),
     "model.path", ["duplicate"]),
    ("threshold-above-1", edit("threshold: 0.9", "threshold: 1.5"), ("threshold: 1.5", 1),
     "topics[1].threshold", ["less than or equal to 1"]),
    ("dims-zero", edit("dims: 2", "dims: 0"), ("dims: 0", 1), "topics[1].corruption.dims",
     ["greater than or equal to 1"]),
    ("fpr-zero", edit("max_false_positive_rate: 0.02", "max_false_positive_rate: 0"), ("max_false_positive_rate", 1),
     "topics[0].max_false_positive_rate", ["greater than 0"]),
    ("bad-topic-name", edit("name: star_wars", "name: star wars"), ("name: star wars", 1), "topics[1].name",
     ["pattern"]),
    ("nan-strength", edit("strength: 5", "strength: .nan"), ("strength: .nan", 1),
     "topics[0].corruption.strength", ["finite"]),
    ("bad-version", edit("version: 1", "version: 2"), ("version: 2", 1), "version", []),
    ("data-item-without-path", edit("{path: more/hp.csv, split: train}", "{file: more/hp.csv}"),
     ("{file: more/hp.csv}", 1), "topics[0].data[1]", []),
    ("terms-item-not-text-or-file", edit("terms: [Hogwarts, {path: terms/hp.txt}]", "terms: [Hogwarts, {file: x.txt}]"),
     ("{file: x.txt}", 1), "topics[0].terms[1]", []),
    ("zero-max-new-tokens", edit("max_new_tokens: 64", "max_new_tokens: 0"), ("max_new_tokens", 1),
     "generation.max_new_tokens", ["greater than 0"]),
    ("env-default-not-a-number", edit("strength: 5", "strength: ${ECO_TEST_UNSET_VAR:-lots}"),
     ("ECO_TEST_UNSET_VAR", 1),
     "topics[0].corruption.strength", ["number"]),
    ("corruption-neither-spec-nor-learned", edit("corruption: {method: zero_out_top_k, dims: 2, strength: 0}",
                                                 "corruption: learnt"), ("corruption: learnt", 1),
     "topics[1].corruption", ["'learned'"]),
    ("decision-key-under-training", classifier_with("training: {epochs: 2, min_threshold: 0.7}"), ("min_threshold", 1),
     "classifier.training.min_threshold", ["moved: write it as classifier.decision.min_threshold"]),
    ("stride-under-training", classifier_with("training:\n    epochs: 2\n    window_stride: 32"), ("window_stride", 1),
     "classifier.training.window_stride", ["moved: write it as classifier.decision.window_stride"]),
    ("unknown-decision-key", classifier_with("decision: {epochs: 2}"), ("epochs", 1),
     "classifier.decision.epochs", ["unknown key"]),
    ("decision-out-of-range", classifier_with("decision:\n    min_threshold: 2"), ("min_threshold", 1),
     "classifier.decision.min_threshold", ["less than or equal to 1"]),
    ("stride-over-window", classifier_with("training: {window_tokens: 32}\n  decision: {window_stride: 64}"),
     ("decision:", 1), "classifier.decision", ["window_stride: 64 exceeds training.window_tokens 32"]),
    ("nothing-left-to-fine-tune", classifier_with("training: {encoder_layers: 2, frozen_layers: 2}"), ("training:", 1),
     "classifier.training", ["frozen_layers: 2 would freeze all 2 encoder_layers"]),
]


@pytest.mark.parametrize(("text", "marker", "field", "words"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_config_names_file_line_and_field(tmp_path, monkeypatch, text, marker, field, words):
    monkeypatch.delenv("ECO_TEST_UNSET_VAR", raising=False)
    msg = config_error(text, tmp_path)
    line = line_of(text, *marker)
    assert msg.startswith(f"{tmp_path / 'guard.yaml'}:{line}: {field}"), msg
    assert f": {field}" in msg
    for word in words:
        assert word in msg, (word, msg)


@pytest.mark.parametrize(
    ("text", "line"),
    [("", 1), ("# only a comment\n\n", 1), ("\n\n", 1)],
    ids=["empty", "comment-only", "blank-lines"],
)
def test_empty_file(tmp_path, text, line):
    msg = config_error(text, tmp_path)
    assert f"guard.yaml:{line}:" in msg and "empty" in msg


@pytest.mark.parametrize(
    ("text", "marker"),
    [
        (edit("  dtype: float32\n", "\tdtype: float32\n"), "\tdtype"),
        (edit("rag: corrupt", "rag: corrupt: drop"), "rag: corrupt"),
        (edit("  - name: star_wars\n", "  - name: star_wars\n  threshold: 0.5\n"), "  threshold: 0.5"),
        (edit("    selection:\n      mode: content\n", "    selection: [\n      mode: content\n"), None),
        (edit("  stop: [\"###\"]\n", "  stop: [\"###\"\n"), None),
    ],
    ids=["tab-indent", "two-colons", "bad-indent", "unclosed-flow", "unclosed-at-eof"],
)
def test_invalid_yaml_syntax(tmp_path, text, marker):
    msg = config_error(text, tmp_path)
    assert "not valid YAML" in msg
    line = int(msg.split(":")[1])
    if marker is not None:
        assert line == line_of(text, marker), msg
    else:
        assert 1 <= line <= text.count("\n") + 1


def test_root_must_be_a_mapping(tmp_path):
    msg = config_error("- a\n- b\n", tmp_path)
    assert "guard.yaml:1:" in msg and "mapping" in msg


def test_missing_file_and_not_utf8(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value) and "\n" not in str(info.value)
    path = tmp_path / "latin1.yaml"
    path.write_bytes("topics:\n  - name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}:2:")


def test_only_first_error_is_reported_with_a_count(tmp_path):
    text = edit("dims: 2", "dims: 0", edit("strength: 5", "strength: -1"))
    msg = config_error(text, tmp_path)
    assert "(+1 more)" in msg


# ------------------------------------------------------------------ interpolation

def test_env_interpolation_with_types(tmp_path, monkeypatch):
    monkeypatch.setenv("ECO_T_STRENGTH", "7.5")
    monkeypatch.setenv("ECO_T_TOKENS", "32")
    monkeypatch.setenv("ECO_T_DIR", str(tmp_path / "models"))
    monkeypatch.delenv("ECO_T_UNSET", raising=False)
    text = (
        VALID.replace("strength: 5", "strength: ${ECO_T_STRENGTH}")
        .replace("max_new_tokens: 64", "max_new_tokens: ${ECO_T_TOKENS}")
        .replace("path: default", "path: ${ECO_T_DIR}/smol.gguf")
        .replace("dims: 1\n", "dims: ${ECO_T_UNSET:-3}\n")
        .replace("threshold: 0.9", "threshold: ${ECO_T_UNSET:-0.25}")
        .replace("on_classifier_error: flag", "on_classifier_error: ${ECO_T_UNSET:-block}")
        .replace('stop: ["###"]', 'stop: ["${ECO_T_UNSET:-END}", "${ECO_T_TOKENS}"]')
    )
    cfg = parse_config(text, base_dir=tmp_path)
    hp, sw = cfg.topics
    assert hp.corruption.strength == 7.5 and hp.corruption.dims == 3
    assert cfg.generation.max_new_tokens == 32 and isinstance(cfg.generation.max_new_tokens, int)
    assert sw.threshold == 0.25
    assert cfg.on_classifier_error == "block"
    assert cfg.model.path == str(tmp_path / "models" / "smol.gguf")
    assert cfg.generation.stop == ["END", "32"]  # a list of strings keeps the number as text


def test_env_default_used_when_variable_is_empty(monkeypatch):
    # like the shell: ${VAR:-x} replaces an unset *or empty* variable; ${VAR} keeps an empty one
    monkeypatch.setenv("ECO_T_EMPTY", "")
    text = VALID.replace("path: default", "path: ${ECO_T_EMPTY:-default}").replace(
        "description: The Harry Potter books.", "description: x${ECO_T_EMPTY}y"
    )
    cfg = parse_config(text)
    assert cfg.model.path == "default"
    assert cfg.topics[0].description == "xy"


def test_env_value_that_is_not_yaml_stays_text(monkeypatch):
    monkeypatch.setenv("ECO_T_PROMPT", "@bot: be nice, {really}")
    text = VALID.replace("  dtype: float32\n", "  dtype: float32\n  system_prompt: ${ECO_T_PROMPT}\n")
    assert parse_config(text).model.system_prompt == "@bot: be nice, {really}"


def test_env_var_with_mapping_value_stays_text(monkeypatch):
    monkeypatch.setenv("ECO_T_MAP", "a: b")
    text = VALID.replace("description: The Harry Potter books.", "description: ${ECO_T_MAP}")
    assert parse_config(text).topics[0].description == "a: b"


# ------------------------------------------------------------------ paths

def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    folder = tmp_path / "conf"
    folder.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    text = VALID.replace("path: default", "path: models/smol.gguf").replace(
        "description: The Harry Potter books.\n", "description: x\n"
    ) + ""
    (folder / "guard.yaml").write_text(text)
    cfg = load_config(folder / "guard.yaml")
    hp = cfg.topics[0]
    assert [d.path for d in hp.data] == [folder / "hp.jsonl", folder / "more" / "hp.csv"]
    assert hp.data[1].split == "train"
    assert cfg.classifier.path == folder / "clf"
    assert [n.path for n in cfg.classifier.negatives] == [folder / "neg" / "negatives.jsonl"]
    assert cfg.model.path == str(folder / "models" / "smol.gguf")
    assert hp.terms[0] == "Hogwarts" and hp.terms[1].path == folder / "terms" / "hp.txt"
    assert cfg.source == folder / "guard.yaml"


def test_default_and_absolute_paths_are_kept(tmp_path):
    absolute = tmp_path / "abs" / "x.jsonl"
    text = VALID.replace("data: [hp.jsonl, {path: more/hp.csv, split: train}]", f"data: ['{absolute}']")
    cfg = parse_config(text, base_dir=tmp_path / "somewhere")
    assert cfg.model.path == "default"
    assert cfg.topics[0].data[0].path == absolute
    # no classifier section: its default folder is still relative to the config
    cfg2 = parse_config("topics:\n  - name: a\n", base_dir=tmp_path)
    assert cfg2.classifier.path == tmp_path / "classifier"


# ------------------------------------------------------------------ valid configs

def test_valid_config_values_and_defaults():
    cfg = parse_config(VALID, base_dir=Path("/base"))
    hp, sw = cfg.topics
    assert hp.corruption == CorruptionSpec(method="rand_noise_first_n", dims=1, strength=5, seed=3)
    assert sw.selection == SelectionConfig(mode="keywords", keywords=["Skywalker", "Death Star"])
    assert sw.corruption.strength == 0 and sw.threshold == 0.9 and hp.threshold is None
    assert cfg.topic("star_wars") is sw
    with pytest.raises(KeyError):
        cfg.topic("nope")
    minimal = parse_config("topics:\n  - name: a\n")
    assert minimal.on_classifier_error == "flag"  # fail closed by default
    by_terms = parse_config("topics:\n  - name: a\n    terms: [Hogwarts]\n    selection: {mode: keywords}\n")
    assert by_terms.topics[0].selection.keywords == []  # the guard matches the topic's terms instead
    assert minimal.topics[0].selection.mode == "content"
    assert minimal.topics[0].corruption.method == "rand_noise_first_n"


def test_valid_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path / "a" / "guard.yaml", VALID))
    dumped = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    again = load_config(_write(tmp_path / "b" / "guard.yaml", dumped))  # absolute paths: the folder is irrelevant
    assert again.model_dump() == cfg.model_dump()
    assert again == cfg.model_copy(update={"source": again.source})
    # and through the pydantic model directly
    assert GuardConfig.model_validate(cfg.model_dump()) == cfg.model_copy(update={"source": None})


def test_embedded_default_config_loads(monkeypatch):
    monkeypatch.delenv("ECO_GUARD_CACHE", raising=False)
    cfg = load_config()
    corruption = cfg.topics[0].corruption  # stored by the optimiser, or written out
    assert corruption == "learned" or corruption.method == "rand_noise_first_n"
    assert all(d.path.is_absolute() for t in cfg.topics for d in t.data)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config", [None, "benchmarks/configs/dev_topics.yaml", "benchmarks/tofu_mini/eco.yaml"])
def test_loading_a_config_imports_no_model_code(config):
    """The schema is pure pydantic: validating a config loads neither torch nor the encoder libraries."""
    code = (f"import sys; from eco_guard.config import load_config; load_config({config!r}); "
            "print([m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_training_and_decision_settings_are_separate_blocks():
    cfg = parse_config("classifier:\n  training: {epochs: 2, window_tokens: 96}\n"
                       "  decision: {min_threshold: 0.7, contrast_threshold: 0.9, window_stride: 48}\n"
                       "topics: [{name: a}]\n")
    assert cfg.classifier.training == TrainingSettings(epochs=2, window_tokens=96)
    assert cfg.classifier.decision == DecisionSettings(min_threshold=0.7, contrast_threshold=0.9, window_stride=48)
    defaults = parse_config("topics: [{name: a}]\n").classifier
    assert defaults.decision == DecisionSettings() and defaults.decision.weak_term_threshold == 0.6
    assert not set(TrainingSettings.model_fields) & set(DecisionSettings.model_fields)
    assert "window_tokens" in TrainingSettings.model_fields and "window_stride" in DecisionSettings.model_fields


def test_shipped_configs_use_the_decision_block():
    dev = load_config(REPO / "benchmarks" / "configs" / "dev_topics.yaml").classifier
    decision = dev.decision
    assert (decision.min_threshold, decision.contrast_threshold, decision.weak_term_threshold) == (0.7, 0.9, 0.6)
    assert dev.training.encoder_layers == 4 and dev.training.seed == 0


def test_corruption_spec_is_config_schema_re_exported_by_the_corruptions():
    import doctest

    import eco_guard.config as config_module
    from eco_guard import corruption

    assert corruption.CorruptionSpec is config_module.CorruptionSpec
    assert set(BUILTIN_CORRUPTIONS) <= set(corruption.CORRUPTORS) and len(BUILTIN_CORRUPTIONS) == 14
    result = doctest.testmod(config_module)
    assert result.attempted > 0 and result.failed == 0


# ------------------------------------------------------------------ model backends and the server block

REMOTE = """\
model:
  backend: remote
  url: http://127.0.0.1:8000
  path: ./served-model-copy
  served_model: HuggingFaceTB/SmolLM2-135M-Instruct
  api_key_env: VLLM_TOKEN
  retries: 1
server: {port: 9000, expose_decision: true, max_queue: 4}
topics: [{name: a}]
"""


def test_remote_model_block_and_server_block(tmp_path):
    cfg = load_config(_write(tmp_path / "guard.yaml", REMOTE))
    m = cfg.model
    assert (m.backend, m.url, m.served_model, m.api_key_env, m.retries) == (
        "remote", "http://127.0.0.1:8000", "HuggingFaceTB/SmolLM2-135M-Instruct", "VLLM_TOKEN", 1)
    assert m.path == str(tmp_path / "served-model-copy")  # the local copy resolves against the YAML like any path
    assert (cfg.server.port, cfg.server.expose_decision, cfg.server.max_queue) == (9000, True, 4)
    defaults = parse_config("topics: [{name: a}]\n")
    assert defaults.model.backend == "local" and defaults.server.expose_decision is False  # hidden by default


BROKEN_BLOCKS = [
    ("remote-without-url", edit("  url: http://127.0.0.1:8000\n", "", REMOTE), ("backend: remote", 1), "model.url",
     ["backend 'remote' needs", "url: http://host:8000"]),
    ("remote-url-not-http", edit("http://127.0.0.1:8000", "127.0.0.1:8000", REMOTE), ("url:", 1), "model.url",
     ["http://"]),
    ("local-with-remote-fields", edit("  backend: remote\n", "", REMOTE), ("url:", 1), "model",
     ["url, api_key_env, served_model, retries", "backend: remote"]),
    ("remote-with-threads", edit("  retries: 1\n", "  retries: 1\n  threads: 2\n", REMOTE), ("threads:", 1),
     "model.threads", ["backend: local"]),
    ("local-threads-zero", "model:\n  dtype: auto\n  threads: 0\ntopics: [{name: a}]\n", ("threads:", 1),
     "model.threads", ["greater than 0"]),
    ("unknown-backend", edit("backend: remote", "backend: vllm", REMOTE), ("backend: vllm", 1), "model.backend",
     ["'local'", "'remote'"]),
    ("unknown-server-key", edit("max_queue: 4}", "max_queue: 4, workers: 2}", REMOTE), ("server:", 1),
     "server.workers", ["unknown key"]),
    ("server-port-out-of-range", edit("port: 9000", "port: 70000", REMOTE), ("server:", 1), "server.port",
     ["65535"]),
]


@pytest.mark.parametrize(("text", "marker", "field", "words"), [c[1:] for c in BROKEN_BLOCKS],
                         ids=[c[0] for c in BROKEN_BLOCKS])
def test_broken_model_and_server_blocks_name_the_field(tmp_path, text, marker, field, words):
    msg = config_error(text, tmp_path)
    assert msg.startswith(f"{tmp_path / 'guard.yaml'}:{line_of(text, *marker)}: {field}: "), msg
    for word in words:
        assert word in msg, msg


def test_loading_a_remote_config_imports_no_model_code(tmp_path):
    path = _write(tmp_path / "guard.yaml", REMOTE)
    code = (f"import sys; from eco_guard.config import load_config; load_config({str(path)!r}); "
            "print([m for m in ('torch', 'transformers', 'httpx', 'fastapi') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_every_yaml_config_in_the_readme_is_valid(tmp_path):
    """The README's config examples are what a newcomer copies: each must load as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    assert len(blocks) >= 2
    for block in blocks:
        cfg = parse_config(block, base_dir=tmp_path)
        assert cfg.topics
