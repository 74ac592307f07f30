"""One tree of errors, each rendering itself in OpenAI's error format.

The SDKs pick their exception class by status alone, so every leaf fixes its
status; `type` and `code` follow what api.openai.com sends for the same event.
"""

from __future__ import annotations

import email.utils
import math
import time

import orjson

from proxy.redact import scrub


class GatewayError(Exception):
    """Base of every error the gateway answers with."""

    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def payload(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        if len(model) > 256:  # a path's model id has no other bound: echo its start only
            model = model[:255] + "…"
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )


class RouteNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"

    def __init__(self, message: str, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("connection", "close")


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s
        self.headers.setdefault("retry-after", str(max(1, math.ceil(retry_after_s))))


class QuotaExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("x-should-retry", "false")


class InternalError(GatewayError):
    status = 500
    type = "api_error"
    code = "internal_error"


class ShuttingDown(GatewayError):
    """The worker is stopping and its graceful timeout is over: the answer is cut."""

    status = 503
    type = "api_error"
    code = "server_shutting_down"


class StateError(GatewayError):
    """The shared state (Redis) did not answer an admin request."""

    status = 503
    type = "api_error"
    code = "state_unavailable"


class UpstreamUnavailable(GatewayError):
    """The upstream could not be reached or broke the connection."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTooLarge(UpstreamUnavailable):
    """The upstream's answer (a body, or one event of a stream) passed the provider's
    `max_response_bytes`: it is cut off there rather than held in memory."""

    code = "upstream_response_too_large"


class ProviderNotConfigured(GatewayError):
    """The provider lacks a setting (usually a secret) it needs to be called."""

    status = 503
    type = "upstream_error"
    code = "provider_not_configured"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class UpstreamPoolExhausted(GatewayError):
    """Every connection to the provider stayed in use for pool_timeout_s."""

    status = 503
    type = "upstream_error"
    code = "upstream_pool_exhausted"


class UpstreamStatus(GatewayError):
    """The upstream answered with an error status (or a success status with an
    error in place of an answer): what it said, in OpenAI's format."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "upstream_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        # an error status HTTP does not define (600, 999) is no status to send a client
        self.status = status if 400 <= status <= 599 else 502
        self.type = type


MAX_RETRY_AFTER_S = 86400.0  # an upstream asking for longer says nothing usable


def retry_after_s(value: str | None) -> float | None:
    """The seconds an upstream's Retry-After asks for, a number of them or an HTTP
    date; None for anything else (negative, not finite, past a day, not one of
    the two forms): an upstream's header is passed to clients only as this."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None
        seconds = max(0.0, when.timestamp() - time.time())
    if not 0 <= seconds <= MAX_RETRY_AFTER_S:  # NaN fails too
        return None
    return seconds


def retry_after_header(value: str | None) -> dict[str, str]:
    """An upstream's Retry-After as the gateway passes it on: whole seconds."""
    seconds = retry_after_s(value)
    return {} if seconds is None else {"retry-after": str(math.ceil(seconds))}


def from_upstream_body(status: int, raw: bytes, headers: dict[str, str]) -> UpstreamStatus:
    """The error for an upstream's error response: the message, type, param and code
    of an OpenAI-format body (anything else it holds is left out, and a traceback in
    the message cut off), else the start of its text."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        code = error.get("code")
        if isinstance(code, int) and not isinstance(code, bool):
            code = str(code)  # some providers send a number
        return UpstreamStatus(
            status,
            scrub(error["message"], MAX_UPSTREAM_MESSAGE) or f"status {status}",
            type=_word(error.get("type")) or "upstream_error",
            code=_word(code),
            param=_word(error.get("param")),
            headers=headers,
        )
    text = scrub(raw.decode("utf-8", "replace")) or f"status {status}"  # cut, then bounded
    if isinstance(error, str):
        text = scrub(error)
    return UpstreamStatus(status, f"upstream error: {text}", headers=headers)


MAX_UPSTREAM_MESSAGE = 2000


def _word(value: object) -> str | None:
    """A short string field of an upstream's error (type, param); else None."""
    return value[:200] if isinstance(value, str) and value else None
