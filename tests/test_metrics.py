"""What /metrics exports on a running hub (process, Python and build info next to the hub's own; no
gauge that restates a counter) and the Grafana dashboard in contrib/: every query it makes names
metrics the hub exports, and its layout is a valid grid."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from bsscihub import __version__
from bsscihub.tap import build_service, load_hub_config
from tests.conftest import make_config
from tests.test_tls import PKI, pki  # noqa: F401 - the module-scoped PKI fixture

DASHBOARD = Path(__file__).parent.parent / "contrib" / "grafana" / "bsscihub.json"
# Sample names each metric type exports besides the family's own name.
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count"),
            "info": ("_info",)}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", ())]


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (the forms the dashboard uses)."""
    text = re.sub(r"\b(by|without)\s*\([^)]*\)", " ", expr)  # grouping labels
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers and legend templates
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end():].lstrip()[:1]
        if following != "(":  # not a function
            names.add(match.group())
    return names


async def scrape(tmp_path: Path, keys: PKI) -> str:
    """/metrics of a hub running every installed family, after some web traffic."""
    make_config(
        tmp_path,
        web={"public_health": True},
        tls={"ca": str(keys.ca), "ca_key": str(keys.ca.with_name("ca.key")), "cert": str(keys.hub.cert),
             "key": str(keys.hub.key)},
    )
    config, families = load_hub_config(str(tmp_path / "hub.yaml"), environ={})
    service = build_service(config, families, reactor)
    service.startService()
    try:
        await service.when_ready()
        port = (await service.getServiceNamed("web").when_listening()).getHost().port
        base = f"http://127.0.0.1:{port}"
        await (await treq.get(f"{base}/api/v1/openapi.json")).content()
        await (await treq.post(f"{base}/api/v1/auth/login", json={"username": "nobody", "password": "x"})).content()
        response = await treq.get(f"{base}/metrics")
        assert response.code == 200
        return str(await response.text())
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_metrics_of_a_running_hub_and_the_dashboard_queries(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
    dashboard: dict[str, Any],
) -> None:
    text = await scrape(tmp_path, pki)
    families = list(text_string_to_metric_families(text))
    exported = set()
    for family in families:
        exported.add(family.name)
        exported.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        exported.update(sample.name for sample in family.samples)

    # Process and Python collectors and the build info, next to the hub's own.
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "python_info", "python_gc_collections_total"):
        assert name in exported, name
    [build] = [s for f in families for s in f.samples if s.name == "bsscihub_build_info"]
    assert build.value == 1 and build.labels["version"] == __version__
    assert "bsscihub_bssci_tls_handshakes_pending" in exported and "bsscihub_mioty_uplinks_total" in exported
    # No gauge restating a counter (a rate is PromQL's job), no _created series doubling the lines.
    assert "bsscihub_mqtt_publish_rate" not in exported
    assert not [f.name for f in families if f.type == "gauge" and re.search(r"_rate$|per_second", f.name)]
    assert not [n for n in exported if n.endswith("_created")]

    # Every panel's query reads only metrics the hub exports.
    unknown = {(title, name) for title, expr in queries(dashboard) for name in metric_names(expr)
               if name not in exported}
    assert unknown == set()


def test_metric_names_finds_what_a_query_reads() -> None:
    expr = ("histogram_quantile(0.99, sum by (le, route) (rate(bsscihub_web_request_seconds_bucket{route!=\"x\"}"
            "[$__rate_interval]))) / sum(rate(process_cpu_seconds_total[5m]))")
    assert metric_names(expr) == {"bsscihub_web_request_seconds_bucket", "process_cpu_seconds_total"}


def test_dashboard_layout_and_datasource(dashboard: dict[str, Any]) -> None:
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        x, y, w, h = grid["x"], grid["y"], grid["w"], grid["h"]
        mine = {(col, line) for col in range(x, x + w) for line in range(y, y + h)}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"].strip("${}") in variables
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    titles = " ".join(p["title"] for p in panels).lower()
    for topic in ("uplink", "dedup", "connections", "outbox", "mqtt", "web", "process"):
        assert topic in titles, topic
