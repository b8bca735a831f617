"""CSRF protection: a synchronizer token per session, required on every state-changing request it makes.

Forms carry it as `_csrf`, scripts as the `X-CSRF-Token` header; the login form uses a double-submit cookie.
"""

from __future__ import annotations

import hmac
import secrets
from typing import Any

from bsscihub.web.errors import ApiError

FIELD = "_csrf"
HEADER = b"x-csrf-token"
LOGIN_COOKIE = "bsscihub_login"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value or ""


def submitted_token(request: Any) -> str:
    """The token the request carries, from the header or else the form field."""
    header = request.getHeader(HEADER)
    if header:
        return _text(header)
    values = (request.args or {}).get(FIELD.encode()) or []
    return _text(values[0]) if values else ""


def check(request: Any, expected: str) -> None:
    """Refuse (403) unless the request carries the session's token."""
    given = submitted_token(request)
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(403, "csrf_failed", "missing or wrong CSRF token; reload the page and try again")


def issue_login_token(request: Any, secure: bool) -> str:
    """Before log-in there is no session: the form's token must match a cookie set with the form."""
    token = secrets.token_urlsafe(24)
    request.addCookie(
        LOGIN_COOKIE, token, path="/", httpOnly=True, secure=secure, sameSite="strict", max_age="3600"
    )
    return token


def check_login_token(request: Any) -> None:
    cookie = _text(request.getCookie(LOGIN_COOKIE.encode()))
    given = submitted_token(request)
    if not cookie or not given or not hmac.compare_digest(cookie.encode(), given.encode()):
        raise ApiError(403, "csrf_failed", "the log-in form expired; reload the page and try again")
