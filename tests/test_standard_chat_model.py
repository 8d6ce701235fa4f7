"""LangChain's own standard test suites for ECOChatModel (the embedded demo config, real models).

Only tool calling, structured output, JSON mode and multimodal inputs are switched off:
a 135M local chat model offers none of them. The per-call ``model=`` override is exercised
with a second local model (a tiny random Llama saved as an HF folder); the VCR timing test
runs without cassettes because nothing here goes over HTTP.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from langchain_core.load import dumpd, load
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from eco_guard.config import default_config_path
from eco_guard.langchain import ECOChatModel

MAX_TOKENS = 12  # short replies keep the real-model suite to a few minutes on 2 cores


@functools.cache
def tiny_model_folder() -> str:
    """A second local model for the ``model=`` override: a random 2-layer Llama with the real tokenizer."""
    from tiny_llama import build_tiny_model
    from transformers import AutoTokenizer

    from eco_guard.backends.local import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir("default"))
    root = tempfile.mkdtemp(prefix="eco-guard-test-")  # a property cannot take tmp_path_factory
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    folder = Path(root) / "tiny-random-llama"
    build_tiny_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@functools.cache
def fixed_corruption_config() -> str:
    """The demo config with its learned corruption written out as a fixed spec. The per-call ``model=`` override
    answers with another model, and a learned corruption belongs to the model it was learned on (another
    model's fingerprint is refused), so the suite runs on the corruption the store holds, stated in the YAML."""
    source = default_config_path()
    stored = json.loads(source.with_name("default.eco.json").read_text())["topics"]["harry_potter"]
    spec = ", ".join(f"{k}: {v}" for k, v in stored["corruption"].items())
    text = re.sub(r"selection: \{[^}]*\}", f"selection: {json.dumps(stored['selection'])}", source.read_text())
    text = text.replace("corruption: learned", f"corruption: {{{spec}}}")
    assert "corruption: learned" not in text
    root = Path(tempfile.mkdtemp(prefix="eco-guard-test-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    (root / "guard.yaml").write_text(text.replace("demo/", f"{source.parent}/demo/"))
    return str(root / "guard.yaml")


class _Capabilities:
    @property
    def chat_model_class(self) -> type[ECOChatModel]:
        return ECOChatModel

    @property
    def chat_model_params(self) -> dict:
        return {}

    @property
    def standard_chat_model_params(self) -> dict:
        return {**super().standard_chat_model_params, "max_tokens": MAX_TOKENS}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": [], "stream": []}


class TestECOChatModelUnit(_Capabilities, ChatModelUnitTests):
    @property
    def init_from_env_params(self) -> tuple[dict, dict, dict]:
        path = str(default_config_path())
        return {"ECO_GUARD_CONFIG": path}, {}, {"config": path}

    @pytest.mark.xfail(strict=True, reason=(
        "langchain-core's load(allowed_objects='all') admits only classes listed in its own "
        "serialization mapping, so no third-party model can pass the stock round trip; "
        "test_serdes_explicit_allow_list runs the same assertions with ECOChatModel allowed by name"))
    def test_serdes(self, model, snapshot) -> None:
        super().test_serdes(model, snapshot)

    def test_serdes_explicit_allow_list(self, model, snapshot) -> None:
        env_params, _, _ = self.init_from_env_params
        with mock.patch.dict(os.environ, env_params):
            ser = dumpd(model)
            assert ser == snapshot(name="serialized")
            loaded = load(ser, valid_namespaces=["eco_guard"], allowed_objects=[ECOChatModel], secrets_from_env=True)
            assert isinstance(loaded, ECOChatModel)
            assert model.dict() == loaded.dict()


@pytest.mark.integration
class TestECOChatModelIntegration(_Capabilities, ChatModelIntegrationTests):
    @property
    def chat_model_params(self) -> dict:
        return {"config": fixed_corruption_config()}

    @property
    def model_override_value(self) -> str:
        return tiny_model_folder()

    @property
    def enable_vcr_tests(self) -> bool:
        return True
