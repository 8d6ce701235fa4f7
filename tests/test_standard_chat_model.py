"""LangChain's own standard test suites for ECOChatModel (the embedded demo config, real models).

Only tool calling, structured output, JSON mode and multimodal inputs are switched off:
a 135M local chat model offers none of them.
"""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from eco_guard.config import default_config_path
from eco_guard.langchain import ECOChatModel

MAX_TOKENS = 12  # short replies keep the real-model suite to a few minutes on 2 cores


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


@pytest.mark.integration
class TestECOChatModelIntegration(_Capabilities, ChatModelIntegrationTests):
    pass
