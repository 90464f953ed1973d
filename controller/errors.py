"""The controller's error tree; ``api/middleware.py`` maps each class to its HTTP status."""

from __future__ import annotations

from shoal.errors import NotFound, ShoalError, ValidationError


class ApiError(ShoalError):
    status = 500
    code = "internal"


class BadRequest(ApiError, ValidationError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    """No token, or not the right one (HTTP 401 with ``WWW-Authenticate: Bearer``)."""

    status = 401
    code = "unauthorized"


class RequestTimeout(ApiError):
    """A request body whose client stopped sending it (HTTP 408)."""

    status = 408
    code = "request_timeout"


class Missing(ApiError, NotFound):
    status = 404
    code = "not_found"


class Conflict(ApiError):
    status = 409
    code = "conflict"


class TooLarge(ApiError):
    status = 413
    code = "too_large"


class UnsupportedMedia(ApiError):
    status = 415
    code = "unsupported_media_type"


class Busy(ApiError):
    """The cluster's queue is full: retry later (HTTP 429 with Retry-After)."""

    status = 429
    code = "queue_full"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after



class InsufficientStorage(ApiError):
    """The controller's disk cannot take the archive now (full, or failing): nothing was kept (HTTP 507)."""

    status = 507
    code = "insufficient_storage"


class CorruptRecord(ApiError):
    """A record the controller wrote cannot be read back (damaged in Redis): a server-side fault, named (HTTP 500
    with which record)."""

    status = 500
    code = "corrupt_record"


class StoreError(ApiError):
    """Redis refused or lost a write: the request is not accepted (HTTP 503); nothing was given an id."""

    status = 503
    code = "store_unavailable"
