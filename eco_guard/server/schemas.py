"""Request bodies of the OpenAI-compatible endpoints, their checks, and the OpenAI error shape.

Bodies ignore unknown fields (as OpenAI's server does) but refuse what the engine cannot honour (``n`` > 1,
logprobs, tools, sampling penalties); ``prompt_embeds`` tensors are loaded with ``weights_only=True`` and must
be dense, finite and of bounded shape (:func:`load_prompt_embeds`).
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import TYPE_CHECKING, Any, Final, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from eco_guard.config import ServerSettings

if TYPE_CHECKING:
    import torch

__all__ = ["ApiError", "ChatMessage", "ChatRequest", "CompletionRequest", "load_prompt_embeds"]

_EMBED_DTYPES: Final = ("float32", "float16", "bfloat16")
_REFUSED_PENALTIES: Final = ("presence_penalty", "frequency_penalty", "repetition_penalty")
_MAX_STOP: Final = 4


# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """A failure reported to the caller as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @property
    def kind(self) -> str:
        return self.code or self.type


def _json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ---------------------------------------------------------------- request bodies


class _Sampling(BaseModel):
    """Fields both completion endpoints share; unknown fields are ignored, as OpenAI's server does."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    ignore_eos: bool = False  # vLLM's field: decode past end-of-sequence, always max_tokens


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | None = None
    prompt_embeds: str | list[str] | None = None
    echo: bool = False
    return_token_ids: bool = False  # vLLM's field: the completion's token ids in each choice


def _text_content(i: int, m: ChatMessage) -> str:
    if m.content is None:
        if m.role == "assistant":
            return ""
        raise ApiError(400, f"messages[{i}] has no content", param=f"messages.{i}.content")
    if isinstance(m.content, str):
        return m.content
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}]: only text content parts are supported, got {part.get('type')!r}",
                           param=f"messages.{i}.content")
        parts.append(part["text"])
    return "".join(parts)


def _messages(body: ChatRequest) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": _text_content(i, m)}
            for i, m in enumerate(body.messages)]


def _overrides(body: _Sampling, settings: ServerSettings, default_max: int) -> dict[str, Any]:
    """The request's sampling fields as guard generation settings, refusing what the engine cannot do."""
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    if getattr(body, "tools", None):
        raise ApiError(400, "tools are not supported", param="tools")
    extra = body.model_extra or {}
    for name in _REFUSED_PENALTIES:  # with prompt embeddings they crash vLLM (vllm#57719); never pass them on
        value = getattr(body, name, None) if name in type(body).model_fields else extra.get(name)
        if value not in (None, 0, 0.0, 1.0 if name == "repetition_penalty" else 0):
            raise ApiError(400, f"{name} is not supported", param=name)
    asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
    if asked is not None and asked > settings.max_tokens_cap:
        raise ApiError(400, f"max_tokens is {asked}; this server allows at most {settings.max_tokens_cap}",
                       param="max_tokens")
    out: dict[str, Any] = {"max_new_tokens": asked or min(default_max, settings.max_tokens_cap)}
    if body.temperature is not None:
        out["do_sample"] = body.temperature > 0
        if body.temperature > 0:
            out["temperature"] = body.temperature
    if body.top_p is not None:
        out["top_p"] = body.top_p
    if body.seed is not None:
        out["seed"] = body.seed
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stop) > _MAX_STOP:
        raise ApiError(400, f"at most {_MAX_STOP} stop sequences are allowed, got {len(stop)}", param="stop")
    if stop:
        out["stop"] = stop
    if body.ignore_eos:
        out["ignore_eos"] = True
    return out


def load_prompt_embeds(data: str, hidden_size: int, max_rows: int) -> torch.Tensor:
    """A caller's ``prompt_embeds``, checked: a dense 2-D float tensor ``(rows, hidden_size)``, finite.

    Loaded with ``weights_only=True`` under sparse-invariant checks, and refused before any use unless it
    is strided (no sparse or quantised layouts: a tiny sparse tensor can densify to terabytes).

    Raises:
        ApiError: 400 naming what is wrong.
    """
    import torch

    def bad(why: str) -> ApiError:
        return ApiError(400, f"prompt_embeds {why}", param="prompt_embeds", code="invalid_prompt_embeds")

    limit = max_rows * hidden_size * 4 + 64 * 1024
    if len(data) > limit * 4 // 3 + 4:
        raise bad(f"is {len(data)} base64 characters; at most {max_rows} rows of {hidden_size} floats are allowed")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise bad("is not valid base64") from None
    try:
        with torch.sparse.check_sparse_tensor_invariants():
            tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the caller's bad data
        raise bad(f"could not be loaded as a torch.save'd tensor ({type(exc).__name__})") from None
    if not isinstance(tensor, torch.Tensor):
        raise bad(f"must be a tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise bad(f"must be a dense tensor, got layout {tensor.layout}")
    if str(tensor.dtype).removeprefix("torch.") not in _EMBED_DTYPES:
        raise bad(f"must be one of {', '.join(_EMBED_DTYPES)}, got {tensor.dtype}")
    if tensor.dim() != 2 or tensor.shape[1] != hidden_size:
        raise bad(f"must have shape (seq_len, {hidden_size}), got {tuple(tensor.shape)}")
    if not 0 < tensor.shape[0] <= max_rows:
        raise bad(f"has {tensor.shape[0]} rows; 1 to {max_rows} are allowed")
    if not bool(torch.isfinite(tensor).all()):
        raise bad("contains NaN or infinite values")
    return tensor.contiguous()
