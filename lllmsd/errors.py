"""Errors every layer below the HTTP API raises.

Each error carries the HTTP status, the OpenAI error ``type`` and ``code`` it is rendered with; the API
middleware is the only place that turns them into responses. Code below ``lllmsd/api`` raises these and
never an aiohttp ``web.HTTP*`` exception.
"""

from __future__ import annotations

from typing import Any


class LllmsdError(Exception):
    """Base of every error that reaches a client as an OpenAI error envelope."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        """Extra response headers (e.g. Retry-After)."""
        return {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other constructor arguments; rebuild from the state instead, so an error an
        # engine raises in its worker process reaches the daemon as the same class with the same fields.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[LllmsdError], message: str, state: dict[str, Any]) -> LllmsdError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidRequest(LllmsdError):
    status = 400
    type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    """A request parameter the model's engine cannot honour: rejected, never silently ignored."""

    code = "unsupported_parameter"

    def __init__(self, param: str, engine: str, detail: str = "") -> None:
        suffix = f": {detail}" if detail else ""
        super().__init__(f"'{param}' is not supported by the {engine} engine{suffix}", param=param)


class UnsupportedTask(InvalidRequest):
    code = "unsupported_task"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, context_size: int, *, param: str | None = "messages") -> None:
        super().__init__(
            f"This model's maximum context length is {context_size} tokens, "
            f"but the request needs {prompt_tokens} tokens.",
            param=param,
        )
        self.prompt_tokens = prompt_tokens
        self.context_size = context_size


class Unauthorized(LllmsdError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(LllmsdError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        shown = model if len(model) <= 200 else f"{model[:200]}..."  # an absurd id is not echoed whole
        super().__init__(f"The model '{shown}' does not exist", param="model")
        self.model = model


class PayloadTooLarge(LllmsdError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class TooManyRequests(LllmsdError):
    """The model's wait queue is full."""

    status = 429
    type = "rate_limit_exceeded"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class ServiceUnavailable(LllmsdError):
    status = 503
    type = "server_error"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


class QueueTimeout(ServiceUnavailable):
    code = "queue_timeout"


class ModelUnavailable(ServiceUnavailable):
    """The model's weights could not be downloaded, verified or loaded."""

    code = "model_unavailable"


class TimeBudgetExceeded(ServiceUnavailable):
    """A request's engine work ran past the model's ``max_request_seconds`` (text generation ends with
    finish_reason "length" instead; this is for work that cannot end early, or did not)."""

    code = "time_budget_exceeded"


class ShuttingDown(ServiceUnavailable):
    code = "shutting_down"


class EngineError(LllmsdError):
    """The engine raised while serving a request; the instance that ran it is replaced."""

    status = 500
    type = "server_error"
    code = "engine_error"


class ResponseNotFound(LllmsdError):
    """No stored response with this id: never stored (``store: false``), deleted, or past retention."""

    status = 404
    type = "invalid_request_error"
    code = "response_not_found"

    def __init__(self, response_id: str, *, param: str | None = None) -> None:
        shown = response_id if len(response_id) <= 200 else f"{response_id[:200]}..."
        super().__init__(
            f"No response with id '{shown}' is stored (never stored with store: true, deleted, or past retention)",
            param=param,
        )
