"""A small JSON Schema subset: the same dicts validate request bodies and parameters and go into OpenAPI.

Errors name the field at fault ("receivers[2].snr: expected a number"), which the API returns as is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

Schema = Mapping[str, Any]


class FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message = field, message


@lru_cache(maxsize=512)
def _pattern(text: str) -> re.Pattern[str]:
    return re.compile(text)


_TYPE_NAMES = {
    "object": "an object",
    "array": "a list",
    "string": "a string",
    "integer": "a whole number",
    "number": "a number",
    "boolean": "true or false",
}


def _is_type(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def validate(value: Any, schema: Schema, path: str = "") -> Any:
    """Return value if it matches schema; raise FieldError naming the first field that does not."""
    if value is None and schema.get("nullable"):
        return value
    kind = schema.get("type")
    if kind is not None and not _is_type(value, kind):
        raise FieldError(path, f"expected {schema.get('x-expected') or _TYPE_NAMES.get(kind, kind)}")
    if "enum" in schema and value not in schema["enum"]:
        raise FieldError(path, "expected one of " + ", ".join(str(v) for v in schema["enum"]))
    if isinstance(value, str):
        expected = schema.get("x-expected")
        if expected and (
            len(value) < schema.get("minLength", 0)
            or len(value) > schema.get("maxLength", len(value))
            or ("pattern" in schema and not _pattern(schema["pattern"]).search(value))
        ):
            raise FieldError(path, f"expected {expected}")
        if len(value) < schema.get("minLength", 0):
            raise FieldError(path, "must not be empty" if schema["minLength"] == 1 else
                             f"at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise FieldError(path, f"at most {schema['maxLength']} characters")
        if "pattern" in schema and not _pattern(schema["pattern"]).search(value):
            raise FieldError(path, f"expected {schema.get('x-expected', 'a value matching ' + schema['pattern'])}")
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise FieldError(path, f"must be at least {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise FieldError(path, f"must be at most {schema['maximum']}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                raise FieldError(_join(path, name), "missing")
        for name, item in value.items():
            if name in properties:
                validate(item, properties[name], _join(path, name))
            elif schema.get("additionalProperties") is False:
                raise FieldError(_join(path, name), "unknown field; expected " + (", ".join(properties) or "none"))
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            raise FieldError(path, f"at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise FieldError(path, f"at most {schema['maxItems']} items")
        items = schema.get("items")
        if items is not None:
            for index, item in enumerate(value):
                validate(item, items, _join(path, index))
    return value


def parse_parameter(raw: str, schema: Schema, name: str) -> Any:
    """A query or path parameter from its text, converted to the schema's type, then validated."""
    kind = schema.get("type", "string")
    value: Any = raw
    try:
        if kind == "integer":
            value = int(raw, 10)
        elif kind == "number":
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(raw)
        elif kind == "boolean":
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            value = lowered in ("true", "1")
    except ValueError:
        raise FieldError(name, f"expected {_TYPE_NAMES.get(kind, kind)}") from None
    return validate(value, schema, name)


# Reusable pieces (the descriptions end up in the OpenAPI document).

def string(description: str = "", **extra: Any) -> dict[str, Any]:
    return {"type": "string", **({"description": description} if description else {}), **extra}


def hexstr(digits: int, description: str) -> dict[str, Any]:
    return string(
        description,
        pattern=f"^[0-9a-fA-F]{{{digits}}}$",
        minLength=digits,
        maxLength=digits,
        **{"x-expected": f"{digits} hex digits"},
    )


def obj(properties: Mapping[str, Any], required: tuple[str, ...] = (), *, closed: bool = True) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": dict(properties)}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def page_of(item: Schema) -> dict[str, Any]:
    """A paginated list: one page of items and how many there are in all."""
    return obj(
        {
            "items": {"type": "array", "items": dict(item)},
            "total": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer"},
            "offset": {"type": "integer"},
        },
        ("items", "total", "limit", "offset"),
        closed=False,
    )


ANY_OBJECT: dict[str, Any] = {"type": "object"}

TIME: dict[str, Any] = {"type": "string", "format": "date-time", "description": "RFC 3339 UTC"}
"""A time in a response body, as the contract writes every time (bsscihub.contract.rfc3339)."""
OPT_TIME: dict[str, Any] = {**TIME, "nullable": True}
