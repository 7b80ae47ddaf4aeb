"""The one error tree of the appliance; every failure a client can see is one of these.

```
ApplianceError                      500 server_error
├── InvalidRequestError             400 invalid_request_error
│   └── ContextLengthExceededError  400 invalid_request_error / context_length_exceeded
├── AuthenticationError             401 authentication_error / invalid_api_key
├── PermissionDeniedError           403 permission_error / model_not_allowed
├── ModelNotFoundError              404 invalid_request_error / model_not_found
├── NotFoundError                   404 invalid_request_error / not_found
├── RequestTooLargeError            413 invalid_request_error / request_too_large
├── RateLimitError                  429 rate_limit_exceeded (+ Retry-After)
├── InsufficientQuotaError          429 insufficient_quota
└── OverloadedError                 503 server_error / overloaded (+ Retry-After)
```

Serving code raises these; ``appliance.api.errors`` maps them to HTTP once.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "ApplianceError",
    "AuthenticationError",
    "ContextLengthExceededError",
    "ErrorBody",
    "ErrorDetail",
    "InsufficientQuotaError",
    "InvalidRequestError",
    "ModelNotFoundError",
    "NotFoundError",
    "OverloadedError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
]


class ErrorDetail(msgspec.Struct):
    """OpenAI's error object: all four keys are always present."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    """The body of every error response: ``{"error": {...}}``."""

    error: ErrorDetail


class ApplianceError(Exception):
    """Base of all errors shown to clients."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> ErrorBody:
        return ErrorBody(ErrorDetail(self.message, self.error_type, self.param, self.code))

    def headers(self) -> dict[str, str]:
        return {} if self.retry_after is None else {"Retry-After": str(self.retry_after)}


class InvalidRequestError(ApplianceError):
    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(ApplianceError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(ApplianceError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_allowed"


class ModelNotFoundError(ApplianceError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(ApplianceError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class RequestTooLargeError(ApplianceError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RateLimitError(ApplianceError):
    status_code = 429
    error_type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"


class InsufficientQuotaError(ApplianceError):
    status_code = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class OverloadedError(ApplianceError):
    status_code = 503
    error_type = "server_error"
    code = "overloaded"
