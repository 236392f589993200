"""Typed errors of the server; each carries its HTTP status and OpenAI error fields.

All derive from :class:`lorakit.errors.LoraError`. The web layer (:mod:`lorakit.serve.api`) turns
them into OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``; the engine and
the adapter pool raise them without importing anything web-related.
"""

from __future__ import annotations

from lorakit.errors import LoraError


class ServeError(LoraError):
    """Base class: ``status`` (HTTP), ``type`` / ``code`` (OpenAI), ``param`` (the field at fault)."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidRequestError(ServeError, ValueError):
    """A request field has a bad value (too long a prompt, ``max_tokens`` over the cap, ``n`` != 1...)."""

    status = 400
    type = "invalid_request_error"


class ModelNotFoundError(ServeError, LookupError):
    """The request's ``model`` is neither the base model nor a known or loadable adapter."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class AdapterPathError(ServeError, PermissionError):
    """An adapter path escapes ``--adapter-dir`` (``..``, an absolute path elsewhere, a symlink out)."""

    status = 403
    type = "permission_error"
    code = "adapter_path_forbidden"


class AdapterExistsError(ServeError, ValueError):
    """``load_lora_adapter`` names an adapter that is already known."""

    status = 400
    type = "invalid_request_error"
    code = "adapter_exists"


class AdapterInUseError(ServeError):
    """``unload_lora_adapter`` names an adapter that queued or running requests use (retry later)."""

    status = 409
    type = "invalid_request_error"
    code = "adapter_in_use"


class AdapterLoadError(ServeError, ValueError):
    """An adapter directory could not be loaded (format, shapes, NaN...): lorakit's load error inside."""

    status = 400
    type = "invalid_request_error"
    code = "adapter_load_failed"


class QueueFullError(ServeError):
    """Too many requests queued and running; the client should retry after ``retry_after`` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_requests"


class ShuttingDownError(ServeError):
    """The server is draining after SIGTERM: no new requests; in-flight ones past the drain are cancelled."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class AuthError(ServeError):
    """Missing or wrong ``Authorization: Bearer`` key."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
