"""The one mapping from exceptions to OpenAI-style HTTP error responses."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException

from appliance.errors import ApplianceError, ErrorBody, ErrorDetail

__all__ = ["exception_handlers", "validation_error"]

_log = logging.getLogger(__name__)

_HTTP_CODES: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_exceeded", "rate_limit_exceeded"),
}


def _json(body: ErrorBody, status: int, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        msgspec.json.encode(body), status_code=status, media_type=MediaType.JSON, headers=headers
    )


def validation_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> ApplianceError:
    """A msgspec decode failure -> a 400 naming the offending field."""
    from appliance.errors import InvalidRequestError

    text = str(exc)
    param = None
    if " - at `$." in text:
        text, _, path = text.partition(" - at `$.")
        param = path.rstrip("`")
        text = f"Invalid value for '{param}': {text}"
    elif isinstance(exc, msgspec.DecodeError):
        text = f"The request body is not valid JSON: {text}"
    else:
        text = f"Invalid request: {text}"
    return InvalidRequestError(text, param=param)


def _appliance_error(_: Request[Any, Any, Any], exc: ApplianceError) -> Response[bytes]:
    return _json(exc.body(), exc.status_code, exc.headers())


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    error_type, code = _HTTP_CODES.get(status, ("server_error", None))
    detail = exc.detail or "Error"
    if status == 413:
        detail = "The request body is larger than this server accepts"
    body = ErrorBody(ErrorDetail(detail, error_type, None, code))
    return _json(body, status, dict(exc.headers or {}))


def _unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    _log.exception("unhandled error", exc_info=exc)
    body = ErrorBody(ErrorDetail("The server had an internal error", "server_error", None, None))
    return _json(body, 500)


exception_handlers = {
    ApplianceError: _appliance_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}
