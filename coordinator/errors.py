"""Domain errors raised by the service layer; the API maps each to one HTTP status."""

from __future__ import annotations


class DomainError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class Invalid(DomainError):
    status = 422
    code = "validation_error"


class NotFound(DomainError):
    status = 404
    code = "not_found"

    def __init__(self, kind: str, ident: str) -> None:
        super().__init__(f"{kind} {ident!r} not found")


class UnknownReference(DomainError):
    status = 422
    code = "unknown_reference"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class Forbidden(DomainError):
    status = 403
    code = "forbidden"


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"


class RateLimited(DomainError):
    """Too many requests; `retry_after` (seconds) becomes the response's `Retry-After` header when set."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, field: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after = retry_after


class Unavailable(DomainError):
    """A dependency (e.g. Vault) cannot be reached; nothing was changed."""

    status = 503
    code = "unavailable"
