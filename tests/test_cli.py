"""The ``eco-guard demo`` command on the real default models (the embedded demo config)."""

from __future__ import annotations

import pytest

from eco_guard.cli import main


@pytest.mark.integration
def test_demo_shows_plain_and_eco_answers_side_by_side(capsys):
    prompts = ["Who wrote the Harry Potter books?", "What is the capital of France?"]
    assert main(["demo", "--max-new-tokens", "20", *prompts]) == 0
    out = capsys.readouterr().out
    assert "plain answer" in out and "ECO answer" in out
    assert "[harry_potter p=" in out and "corrupted" in out  # the flagged prompt names its corrupted tokens
    assert "[not flagged" in out                              # the other falls through to plain generation
    assert "rowling" in out.lower()                           # the unguarded model knows the author


def test_demo_refuses_bad_input_with_one_line(capsys):
    assert main(["demo", "--config", "/nonexistent/guard.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "cannot read config" in err and err.count("\n") == 1
