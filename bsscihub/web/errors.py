"""Errors of the web layer and the one place that maps any exception to an HTTP status and body.

API responses carry `{"error": {"code", "message"}}` (plus `field` when one field is at fault).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
from twisted.logger import Logger
from twisted.python.failure import Failure

from bsscihub.errors import CommandError, UserFacingError
from bsscihub.users import LastAdmin, UserError, UserExists

if TYPE_CHECKING:
    from bsscihub.hub import Hub

log = Logger()


class ApiError(Exception):
    """A request the hub refuses, with its status, a stable code and a sentence for people."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field = field
        self.headers = dict(headers or {})


def bad_field(field: str, message: str) -> ApiError:
    return ApiError(400, "invalid_field", f"{field}: {message}", field=field)


def not_found(what: str) -> ApiError:
    return ApiError(404, "not_found", f"{what} not found")


def conflict(message: str) -> ApiError:
    return ApiError(409, "conflict", message)


def unauthorized(message: str = "authentication required") -> ApiError:
    # The challenge tells scripts which scheme the API takes.
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": 'Bearer realm="bsscihub"'})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def rate_limited(retry_after: float, what: str = "too many attempts") -> ApiError:
    seconds = max(1, int(retry_after + 0.999))
    return ApiError(429, "rate_limited", f"{what}; retry in {seconds} s", headers={"Retry-After": str(seconds)})


def unavailable(message: str) -> ApiError:
    return ApiError(503, "unavailable", message)


def running_service(hub: Hub, family: str) -> Any:
    """A family's service for its routes, or 503 while it is not running (stopping, failed start)."""
    service = hub.services.get(family)
    if service is None or not getattr(service, "running", True):
        raise unavailable(f"the {family} family is not running")
    return service


@attrs.frozen
class ErrorResponse:
    status: int
    code: str
    message: str
    field: str | None = None
    headers: Mapping[str, str] = attrs.field(factory=dict)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            error["field"] = self.field
        return {"error": error}


def map_exception(exc: BaseException) -> ErrorResponse:
    """The status and body for any exception a route let through (unknown ones are logged, 500)."""
    if isinstance(exc, ApiError):
        return ErrorResponse(exc.status, exc.code, exc.message, exc.field, exc.headers)
    if isinstance(exc, (UserExists, LastAdmin)):
        return ErrorResponse(409, "conflict", str(exc))
    if isinstance(exc, UserError):
        return ErrorResponse(400, "invalid", str(exc))
    if isinstance(exc, CommandError):
        # A family may say more precisely what went wrong (e.g. 404 for an unknown device).
        status = getattr(exc, "http_status", 409)
        code = getattr(exc, "code", "rejected" if status == 409 else "invalid")
        return ErrorResponse(int(status), str(code), str(exc))
    if isinstance(exc, UserFacingError):
        return ErrorResponse(400, "invalid", str(exc))
    log.failure("unhandled error in a web route", Failure(exc, type(exc), exc.__traceback__))
    return ErrorResponse(500, "internal", "internal error; the hub log has the details")
