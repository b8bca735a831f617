"""Route declarations: every API route and page says, next to its handler, its method, path and minimum role.

The web app collects them into one table; that table drives the dispatcher, OpenAPI and the permission tests.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from bsscihub.web.schema import Schema

ANONYMOUS = None
"""The role of the few routes anyone may call (logging in, the OpenAPI document)."""

KIB = 1024


@attrs.frozen
class Param:
    """A path or query parameter; `example` is a valid value (used by the tests and the document)."""

    name: str
    schema: Schema = attrs.field(factory=lambda: {"type": "string"})
    description: str = ""
    required: bool = False
    example: Any = None


@attrs.frozen
class Route:
    """What a route is: the single source for dispatching, authorization and the OpenAPI document."""

    kind: str  # "api" or "page"
    method: str
    path: str  # OpenAPI style, "/users/{name}", relative to where the group is mounted
    role: str | None
    summary: str
    name: str = ""  # the handler's name; made unique per group when collected
    tag: str = ""
    description: str = ""
    params: tuple[Param, ...] = ()
    query: tuple[Param, ...] = ()
    body: Schema | None = None
    body_required: bool = True
    body_example: Any = None
    response: Schema | None = None
    status: int = 200
    produces: str = "application/json"
    errors: tuple[int, ...] = ()
    audit: str | None = None
    audit_target: str | None = None  # name of the path parameter that is the audit target
    max_body: int = 64 * KIB
    ticket_auth: bool = False  # may authenticate with a short-lived ?ticket= (the WebSocket stream)

    @property
    def changes_state(self) -> bool:
        return self.method not in ("GET", "HEAD", "OPTIONS")

    def mounted(self, prefix: str, tag: str, name_prefix: str) -> Route:
        path = (prefix.rstrip("/") + self.path) or "/"
        return attrs.evolve(self, path=path, tag=self.tag or tag, name=name_prefix + self.name)

    def werkzeug_path(self) -> str:
        """`/users/{name}` -> `/users/<name>` for Klein's router."""
        return re.sub(r"\{(\w+)\}", r"<\1>", self.path)

    def example_path(self) -> str:
        """The path with every parameter replaced by its example (for tests and docs)."""
        examples = {p.name: p.example for p in self.params}
        return re.sub(r"\{(\w+)\}", lambda m: str(examples.get(m.group(1), "x")), self.path)


def _declare(kind: str, method: str, path: str, role: str | None, summary: str, **options: Any) -> Callable[[Any], Any]:
    if kind == "api" and role is not None and role not in ("admin", "operator", "viewer"):
        raise ValueError(f"unknown role {role!r}")
    route = Route(kind=kind, method=method.upper(), path=path, role=role, summary=summary, **options)
    missing = set(re.findall(r"\{(\w+)\}", path)) - {p.name for p in route.params}
    if missing:
        raise ValueError(f"{method} {path}: declare the path parameters {sorted(missing)}")

    def decorate(fn: Any) -> Any:
        fn.__dict__.setdefault("__routes__", []).append(attrs.evolve(route, name=route.name or fn.__name__))
        return fn

    return decorate


def api_route(method: str, path: str, *, role: str | None, summary: str, **options: Any) -> Callable[[Any], Any]:
    """Declare an API handler `async def handler(self, call: Call)`; `role=None` means anonymous."""
    return _declare("api", method, path, role, summary, **options)


def page_route(method: str, path: str, *, role: str | None, summary: str, **options: Any) -> Callable[[Any], Any]:
    """Declare an admin page handler `async def handler(self, call: Call) -> Page | Redirect | ...`."""
    return _declare("page", method, path, role, summary, **options)


@attrs.frozen
class BoundRoute:
    route: Route
    handler: Callable[[Call], Any]
    scope: str = ""
    """The group's name prefix: a page's call.invoke("x") runs that group's API handler "x"."""


def collect(group: Any, *, api_prefix: str, page_prefix: str, tag: str, name_prefix: str = "") -> list[BoundRoute]:
    """Every route declared on the methods of `group`, mounted under the prefixes."""
    found: list[BoundRoute] = []
    for attr in dir(type(group)):
        fn = getattr(type(group), attr, None)
        for route in getattr(fn, "__routes__", ()):
            prefix = api_prefix if route.kind == "api" else page_prefix
            found.append(BoundRoute(route.mounted(prefix, tag, name_prefix), getattr(group, attr), name_prefix))
    return sorted(found, key=lambda b: (b.route.kind, b.route.path, b.route.method))


@attrs.define
class Call:
    """One authorized call of a handler: who, with which parameters and body, from where.

    A handler sets `target` and `detail` to say what the audit entry of a change should record.
    """

    principal: Any
    params: dict[str, Any] = attrs.field(factory=dict)
    query: dict[str, Any] = attrs.field(factory=dict)
    body: Any = None
    source: str = ""
    request: Any = None
    target: str = ""
    detail: dict[str, Any] = attrs.field(factory=dict)
    audit_action: str | None = None
    dispatcher: Any = None
    scope: str = ""
    acting_as: str | None = None
    """Who the audit entry names when there is no principal yet (a log-in names the user)."""

    @property
    def actor(self) -> str:
        if self.acting_as is not None:
            return self.acting_as
        return self.principal.name if self.principal is not None else "anonymous"

    async def invoke(self, name: str, **kwargs: Any) -> Any:
        """Run API handler `name` of the same group for the same caller (role check, validation, audit)."""
        return await self.dispatcher.invoke(
            self.scope + name, self.principal, source=self.source, request=self.request, **kwargs
        )


# -- what handlers return

@attrs.frozen
class Created:
    value: Any
    location: str | None = None


@attrs.frozen
class Accepted:
    value: Any


@attrs.frozen
class NoContent:
    pass


NO_CONTENT = NoContent()


@attrs.frozen
class Download:
    data: bytes
    filename: str
    content_type: str
    status: int = 200


@attrs.frozen
class Text:
    text: str | bytes
    content_type: str = "text/plain; charset=utf-8"


@attrs.frozen
class Page:
    template: str
    context: Mapping[str, Any] = attrs.field(factory=dict)
    status: int = 200


@attrs.frozen
class Redirect:
    location: str
    flash: str | None = None
    error: str | None = None


@attrs.frozen
class NavItem:
    label: str
    path: str
    role: str
    icon: str = ""


def page(items: Sequence[Any], total: int, limit: int, offset: int) -> dict[str, Any]:
    return {"items": list(items), "total": total, "limit": limit, "offset": offset}


LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50}, "page size", example=10)
OFFSET = Param("offset", {"type": "integer", "minimum": 0, "maximum": 1_000_000_000, "default": 0}, "items to skip",
                example=0)
PAGING = (LIMIT, OFFSET)
