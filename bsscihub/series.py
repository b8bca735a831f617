"""Time series for the families' REST API and charts: a time range from a request, and the samples in it
averaged into buckets in SQL (charts ask for a few hundred points whatever the range; the database averages)."""

from __future__ import annotations

import math
from typing import Any

from bsscihub.contract import rfc3339
from bsscihub.store import Store
from bsscihub.web.errors import bad_field
from bsscihub.web.routing import Param
from bsscihub.web.schema import ANY_OBJECT, TIME, obj

MAX_POINTS = 2000
DAY = 86400.0

# The query parameters of `time_range` and `bucketed`, and the body `series_json` makes, as routes declare them.
SINCE = Param("since", {"type": "number", "minimum": 0}, "start, Unix seconds (default: a day before until)",
              example=0)
UNTIL = Param("until", {"type": "number", "minimum": 0}, "end, Unix seconds (default: now)", example=4102444800)
POINTS = Param("points", {"type": "integer", "minimum": 1, "maximum": MAX_POINTS, "default": 300},
               "at most this many buckets", example=100)
SERIES = obj({"since": TIME, "until": TIME, "bucket": {"type": "number"},
              "points": {"type": "array", "items": ANY_OBJECT}}, ("since", "until", "bucket", "points"), closed=False)


def time_range(query: dict[str, Any], now: float) -> tuple[float, float]:
    """[since, until) from a request's optional `since`/`until` (seconds): by default the last day up to one
    second past `now`, so that a sample stored at this very instant is in it (the end is exclusive)."""
    until = query.get("until") or now + 1
    since = query.get("since")
    if since is None:
        since = until - DAY
    if since >= until:
        raise bad_field("since", "must be before until")
    return float(since), float(until)


def bucket_expression(dialect: str) -> str:
    """The bucket number of a row, from (start, width) parameters; floor division on both backends."""
    if dialect == "postgresql":
        return "FLOOR((time - ?) / ?)"
    # SQLite's CAST truncates toward zero, which is floor here: rows are never before the start.
    return "CAST((time - ?) / ? AS INTEGER)"


def bucket_width(since: float, until: float, points: int) -> float:
    """Whole seconds, at least one, so that [since, until) fits in `points` buckets."""
    return float(max(1, math.ceil((until - since) / max(1, min(points, MAX_POINTS)))))


async def bucketed(
    store: Store, table: str, where: str, params: tuple[Any, ...], since: float, until: float, points: int
) -> dict[str, Any]:
    """Averages (with min, max and count) of `value` per bucket of `table` rows matching `where`.

    `table` and `where` come from the family's code, never from a request; `params` fill `where`.
    """
    width = bucket_width(since, until, points)
    sql = (
        f"SELECT b, AVG(value), MIN(value), MAX(value), COUNT(*) FROM ("
        f" SELECT {bucket_expression(store.dialect)} AS b, value FROM {table}"
        f" WHERE {where} AND time >= ? AND time < ?) AS t GROUP BY b ORDER BY b"
    )
    rows = await store.fetchall(sql, (since, width, *params, since, until))
    return {
        "since": since,
        "until": until,
        "bucket": width,
        "points": [
            {"time": since + int(b) * width, "avg": float(avg), "min": float(lo), "max": float(hi), "count": int(n)}
            for b, avg, lo, hi, n in rows
        ],
    }


def chart_points(series: dict[str, Any]) -> list[dict[str, Any]]:
    """The shape the admin UI's line charts take: [{"t": seconds, "v": [value]}]."""
    return [{"t": p["time"] + series["bucket"] / 2, "v": [round(p["avg"], 4)]} for p in series["points"]]


def series_json(series: dict[str, Any]) -> dict[str, Any]:
    """`bucketed` as a REST body: times as RFC 3339, the bucket width in seconds."""
    return {**series, "since": rfc3339(series["since"]), "until": rfc3339(series["until"]),
            "points": [{**p, "time": rfc3339(p["time"])} for p in series["points"]]}
