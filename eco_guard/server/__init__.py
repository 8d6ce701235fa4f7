"""OpenAI-compatible HTTP face of the guard (FastAPI + uvicorn), with Prometheus metrics.

Every chat and text completion goes through :meth:`Guard.plan`: the route is decided before the first
token, so a flagged request streams only corrupted generation. A text ``prompt`` on ``/v1/completions`` is
the user's message (classified, and rendered through the chat template like a one-message chat).

With ``enable_prompt_embeds`` on, ``/v1/completions`` also takes what vLLM takes from a caller that rendered
the prompt itself: ``prompt_embeds`` (base64 of a ``torch.save``d dense ``(seq_len, hidden)`` tensor) and
token-id prompts. No template is applied and nothing is classified (there may be no text at all): that is a
guard's remote backend talking to its generation server, so keep it off wherever untrusted callers can reach.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /healthz``,
``GET /metrics``. Every failure is a JSON error in OpenAI's shape ``{"error": {message, type, param, code}}``.
Replies carry no decision unless ``expose_decision`` is on. ``/metrics`` counts routes per topic, so a caller
who can read it before and after a request learns whether that request was flagged: with ``api_key_env`` set it
needs the token like ``/v1/*``; without auth, keep the port away from callers (only ``/healthz`` is always open).

The package: ``schemas`` (request bodies, their checks, the error shape), ``runtime`` (admission, the
generation pool, metrics, reply and chunk shapes), ``app`` (routes, error handlers, ``serve``); settings are
the config's ``server:`` block (:class:`eco_guard.config.ServerSettings`).

Example:
    >>> settings = ServerSettings(max_tokens_cap=256)    # the config's ``server:`` block (eco_guard.config)
    >>> settings.expose_decision, settings.max_tokens_cap
    (False, 256)
    >>> app = create_app(Guard.from_config(), settings)          # doctest: +SKIP
    >>> serve(Guard.from_config(), settings)                     # doctest: +SKIP
"""

from eco_guard.config import ServerSettings
from eco_guard.server.app import _DrainingServer, create_app, serve  # noqa: F401 - _DrainingServer: tests run it
from eco_guard.server.schemas import ApiError, load_prompt_embeds  # noqa: F401 - for callers checking tensors

__all__ = ["ServerSettings", "create_app", "serve"]
