"""The OpenAPI 3 document of /api/v1, generated from the route table so it cannot drift from the routes.

Every operation lists the role it needs (`x-required-role`) and every error status it can answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bsscihub.web.routing import Route

_ERROR_TEXT = {
    400: "Bad request: unparseable JSON or a missing or invalid field (named in error.field)",
    401: "Not authenticated, or bad credentials",
    403: "Authenticated, but the role is too low (or the CSRF token is missing)",
    404: "No such resource",
    405: "Method not allowed",
    409: "Conflicts with the current state",
    413: "Request body too large",
    415: "Content-Type is not application/json",
    426: "Not a WebSocket upgrade request",
    429: "Too many requests (web.rate_limit) or log-in attempts; see Retry-After",
    503: "A component this needs is not running",
}

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "stable, machine-readable"},
                "message": {"type": "string", "description": "for people"},
                "field": {"type": "string", "description": "the request field at fault"},
            },
        }
    },
}


def _clean(schema: Any) -> Any:
    """Our validator's hints (x-expected) are fine in OpenAPI; Python tuples are not JSON."""
    if isinstance(schema, dict):
        return {k: _clean(v) for k, v in schema.items()}
    if isinstance(schema, (list, tuple)):
        return [_clean(v) for v in schema]
    return schema


def _error_statuses(route: Route) -> list[int]:
    statuses = set(route.errors) | {429}  # web.rate_limit (and web.anonymous_rate_limit) apply everywhere
    if route.role is not None:
        statuses |= {401, 403}
    else:
        statuses.add(401)  # a bad Authorization header is refused even where none is needed
    if route.params or route.query:
        statuses.add(400)
    if route.changes_state:
        statuses |= {400, 413}
        if route.body is not None:
            statuses.add(415)
    return sorted(statuses)


def _operation(route: Route, api_prefix: str) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.name,
        "summary": route.summary,
        "tags": [route.tag] if route.tag else [],
        "x-required-role": route.role or "none",
    }
    role_text = f"Requires the {route.role} role (or higher)." if route.role else "No authentication needed."
    op["description"] = (route.description + "\n\n" if route.description else "") + role_text
    if route.role is None:
        op["security"] = []
    parameters = []
    for param in route.params:
        parameters.append({"name": param.name, "in": "path", "required": True, "schema": _clean(param.schema),
                           **({"description": param.description} if param.description else {}),
                           **({"example": param.example} if param.example is not None else {})})
    for param in route.query:
        parameters.append({"name": param.name, "in": "query", "required": param.required,
                           "schema": _clean(param.schema),
                           **({"description": param.description} if param.description else {})})
    if parameters:
        op["parameters"] = parameters
    if route.body is not None:
        media: dict[str, Any] = {"schema": _clean(route.body)}
        if route.body_example is not None:
            media["example"] = route.body_example
        op["requestBody"] = {"required": route.body_required, "content": {"application/json": media}}
    success: dict[str, Any] = {"description": "OK" if route.status < 300 else "Done"}
    if route.status == 204:
        success["description"] = "Done, no content"
    elif route.produces == "application/json":
        success["content"] = {"application/json": {"schema": _clean(route.response or {})}}
    elif route.produces in ("application/zip",):
        success["content"] = {
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
            "application/x-pem-file": {"schema": {"type": "string"}},
        }
    else:
        success["content"] = {route.produces: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(route.status): success}
    if route.ticket_auth:
        responses["101"] = {"description": "Switching to the WebSocket protocol"}
    for status in _error_statuses(route):
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    op["responses"] = responses
    return op


def build(routes: Sequence[Route], *, version: str, api_prefix: str = "/api/v1") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if route.kind != "api" or not route.path.startswith(api_prefix):
            continue  # routes kept outside /api/v1 for earlier platforms' clients (/ws) are in the README
        relative = route.path[len(api_prefix):]
        paths.setdefault(relative or "/", {})[route.method.lower()] = _operation(route, api_prefix)
    used = sorted({status for route in routes if route.kind == "api" for status in _error_statuses(route)})
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "bsscihub API",
            "version": version,
            "description": "The hub's REST API. JSON in and out; errors are {\"error\": {\"code\", \"message\"}}. "
                           "Lists take limit and offset and return items and total. "
                           "Authenticate with Authorization: Bearer <token or API key>, or the session cookie "
                           "(then state-changing calls need the X-CSRF-Token header).",
        },
        "servers": [{"url": api_prefix}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "bsh_... from POST /auth/token or POST /api-keys"},
                "session": {"type": "apiKey", "in": "cookie", "name": "bsscihub_session"},
            },
            "schemas": {"Error": ERROR_SCHEMA},
            "responses": {
                f"E{status}": {
                    "description": _ERROR_TEXT.get(status, "Error"),
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
                for status in used
            },
        },
        "security": [{"bearer": []}, {"session": []}],
    }
