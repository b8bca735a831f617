"""Alerts and webhooks against the running hub, a real mosquitto and a real HTTP receiver: rules from REST,
one message per transition on {p}/alerts/..., state kept over a restart, signed webhook deliveries in order."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web import resource, server
from zope.interface import implementer
from zope.interface.verify import verifyObject

from bsscihub import audit
from bsscihub.family import IReceivers, installed_families
from tests.broker import Mosquitto, free_port
from tests.conftest import _reset_pg_schema
from tests.helpers import until
from tests.test_families import PREFIX, RFC3339, DeviceClient, eventually, payloads, start_hub
from tests.test_fleets import _token

ALERTS = {"alerts": {"check_interval": "100ms"}}


def _alerts(subscriber: Any, topic: str) -> list[dict[str, Any]]:
    return [p for p in payloads(subscriber, topic) if p is not None]


@pytest_twisted.ensureDeferred
async def test_offline_and_battery_alerts_fire_once_per_transition_and_survive_a_restart(
        tmp_path: Path, mosquitto: Mosquitto, subscriber_factory: Any) -> None:
    witness = subscriber_factory(mosquitto, f"{PREFIX}/alerts/#")
    running = await start_hub(tmp_path, mosquitto, ["devices", "ble"], **ALERTS)
    device = DeviceClient(mosquitto)
    offline_topic = f"{PREFIX}/alerts/devices/device/Device001/offline"
    battery_topic = f"{PREFIX}/alerts/devices/device/Device001/battery_low"
    try:
        viewer = await _token(running, "viewer")
        rule = {"name": "device silent", "family": "devices", "kind": "device", "condition": "offline", "after": 1}
        code, refused = await running.api("POST", "/api/v1/alert-rules", rule,
                                          headers={"Authorization": f"Bearer {viewer}"}, token=None)
        assert code == 403
        code, bad = await running.api("POST", "/api/v1/alert-rules", {**rule, "family": "zigbee"})
        assert code == 400 and "zigbee" in bad["error"]["message"]
        code, bad = await running.api("POST", "/api/v1/alert-rules", {**rule, "condition": "battery_below"})
        assert code == 400 and "threshold" in bad["error"]["message"]
        code, offline_rule = await running.api("POST", "/api/v1/alert-rules", rule)
        assert code == 201 and offline_rule["after"] == 1
        code, battery_rule = await running.api("POST", "/api/v1/alert-rules", {
            "name": "battery low", "family": "devices", "target": "Device001", "condition": "battery_below",
            "threshold": 20, "hysteresis": 5})
        assert code == 201
        code, listed = await running.api("GET", "/api/v1/alert-rules", headers={"Authorization": f"Bearer {viewer}"},
                                         token=None)
        assert code == 200 and [r["id"] for r in listed["items"]] == [offline_rule["id"], battery_rule["id"]]

        # Heard, then silent for longer than a second: offline fires once.
        await device.publish("SensorData", {"device_id": "Device001", "type": "Temperature", "value": 25.5})
        await witness.when(lambda m: m.topic == offline_topic, timeout=10)
        await task.deferLater(reactor, 0.8, lambda: None)  # several more checks: no second message
        [fired] = _alerts(witness, offline_topic)
        assert (fired["state"], fired["condition"], fired["ruleId"], fired["threshold"]) == (
            "firing", "offline", offline_rule["id"], 1)
        assert fired["value"] > 1 and RFC3339.match(fired["since"]) and RFC3339.match(fired["lastSeen"])
        code, active = await running.api("GET", "/api/v1/alerts", headers={"Authorization": f"Bearer {viewer}"},
                                         token=None)
        assert [(a["id"], a["condition"]) for a in active["items"]] == [("Device001", "offline")]

        # Back online: resolved, once.
        await device.publish("SensorData", {"device_id": "Device001", "type": "battery", "value": 15})
        await witness.when(lambda m: m.topic == offline_topic and b'"resolved"' in m.payload, timeout=10)
        [low] = [json.loads(m.payload) for m in await witness.when(lambda m: m.topic == battery_topic)]
        assert (low["state"], low["value"], low["threshold"]) == ("firing", 15.0, 20)
        await device.publish("SensorData", {"device_id": "Device001", "type": "battery", "value": 22})  # < 20 + 5
        await task.deferLater(reactor, 0.3, lambda: None)
        assert len(_alerts(witness, battery_topic)) == 1
        await running.stop()

        # A restart neither re-fires the battery alert nor forgets it.
        running = await start_hub(tmp_path, mosquitto, ["devices", "ble"], **ALERTS)
        code, active = await running.api("GET", "/api/v1/alerts")
        assert ("Device001", "battery_low") in [(a["id"], a["condition"]) for a in active["items"]]
        await device.publish("SensorData", {"device_id": "Device001", "type": "battery", "value": 12})
        await task.deferLater(reactor, 0.3, lambda: None)
        assert len(_alerts(witness, battery_topic)) == 1
        await device.publish("SensorData", {"device_id": "Device001", "type": "battery", "value": 80})
        await witness.when(lambda m: m.topic == battery_topic and b'"resolved"' in m.payload, timeout=10)
        assert [a["state"] for a in _alerts(witness, battery_topic)] == ["firing", "resolved"]

        code, history = await running.api("GET", "/api/v1/alerts/history")
        assert history["total"] == len(history["items"]) >= 4
        assert [(h["condition"], h["state"]) for h in reversed(history["items"])][:4] == [
            ("offline", "firing"), ("offline", "resolved"), ("battery_below", "firing"),
            ("battery_below", "resolved")]
        entries, _ = await audit.query(running.hub.store, action="alert.rule.add")
        assert len(entries) == 2

        code, _ = await running.api("DELETE", f"/api/v1/alert-rules/{battery_rule['id']}")
        assert code == 204
        assert (await running.api("GET", f"/api/v1/alert-rules/{battery_rule['id']}"))[0] == 404
    finally:
        device.stop()
        await running.stop()


# -- webhooks


class Receiver(resource.Resource):
    """A webhook receiver: records every POST (headers and body) and answers 204."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[dict[str, str], bytes]] = []

    def render_POST(self, request: Any) -> bytes:
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.received.append((headers, request.content.read()))
        request.setResponseCode(204)
        return b""


@pytest_twisted.ensureDeferred
async def test_webhook_gets_every_event_signed_and_in_order_after_being_away_across_a_restart(
        tmp_path: Path, mosquitto: Mosquitto, database_url: str) -> None:
    port = free_port()
    overrides = {"webhooks": {"retry_min": "100ms", "retry_max": "300ms", "timeout": "2s"}, "database": database_url}
    running = await start_hub(tmp_path, mosquitto, ["devices"], **overrides)
    device = DeviceClient(mosquitto)
    receiver = Receiver()
    listening: Any = None
    try:
        code, created = await running.api("POST", "/api/v1/webhooks", {
            "name": "crm", "url": f"http://127.0.0.1:{port}/hook", "families": ["devices"], "events": ["up"]})
        assert code == 201
        secret = created["secret"].encode()
        hook_id = created["webhook"]["id"]
        code, bad = await running.api("POST", "/api/v1/webhooks", {"name": "x", "url": "ftp://example.net/"})
        assert code == 400 and "url" in bad["error"]["message"]

        # The receiver is down: the events wait, the webhook says why.
        for value in range(3):
            await device.publish("SensorData", {"device_id": "Device001", "type": "Temperature", "value": value})
        hook = await eventually(lambda: _hook(running, hook_id, lambda h: h["lastError"] and h["queued"] == 3),
                                timeout=10, what="delivery failures")
        assert hook["delivered"] == 0 and "refused" in hook["lastError"].lower()
        code, shown = await running.api("GET", f"/api/v1/webhooks/{hook_id}")
        assert "secret" not in json.dumps(shown)
        entries, _ = await audit.query(running.hub.store, action="webhook.add")
        assert created["secret"] not in json.dumps([e.to_json() if hasattr(e, "to_json") else str(e)
                                                    for e in entries])

        # A restart keeps the queue; more events join it behind the first ones.
        await running.stop()
        running = await start_hub(tmp_path, mosquitto, ["devices"], **overrides)
        for value in range(3, 6):
            await device.publish("SensorData", {"device_id": "Device001", "type": "Temperature", "value": value})
        await eventually(lambda: _hook(running, hook_id, lambda h: h["queued"] == 6), timeout=10,
                         what="six queued")

        # The receiver comes up: every event arrives once, in order, with a signature that verifies.
        listening = await TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(server.Site(receiver))
        await eventually(lambda: len(receiver.received) >= 6, timeout=15, what="six deliveries")
        await task.deferLater(reactor, 0.3, lambda: None)
        assert len(receiver.received) == 6
        values = []
        for headers, body in receiver.received:
            expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["x-bsscihub-signature-256"], expected)
            assert headers["x-bsscihub-event"] == "devices.up" and headers["content-type"] == "application/json"
            doc = json.loads(body)
            assert (doc["family"], doc["event"], doc["topic"]) == ("devices", "up", "dev/device/Device001/up")
            assert doc["id"] == headers["x-bsscihub-delivery"] and RFC3339.match(doc["time"])
            values.append(doc["payload"]["value"])
        assert values == [0, 1, 2, 3, 4, 5]
        hook = await _hook(running, hook_id, lambda h: h["queued"] == 0)
        assert hook and hook["delivered"] == 6 and hook["lastStatus"] == "204"
    finally:
        device.stop()
        await running.stop()
        if listening is not None:
            await listening.stopListening()


async def _hook(running: Any, hook_id: int, test: Any) -> Any:
    code, hook = await running.api("GET", f"/api/v1/webhooks/{hook_id}")
    assert code == 200
    return hook if test(hook) else None


@pytest_twisted.ensureDeferred
async def test_alerts_reach_webhooks(tmp_path: Path, mosquitto: Mosquitto) -> None:
    receiver = Receiver()
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(receiver))
    running = await start_hub(tmp_path, mosquitto, ["devices"], **ALERTS)
    device = DeviceClient(mosquitto)
    try:
        code, _ = await running.api("POST", "/api/v1/webhooks", {
            "name": "pager", "url": f"http://127.0.0.1:{listening.getHost().port}/", "families": ["alerts"]})
        assert code == 201
        await running.api("POST", "/api/v1/alert-rules", {"name": "flat", "family": "devices",
                                                          "condition": "battery_below", "threshold": 10})
        await device.publish("SensorData", {"device_id": "D2", "type": "battery", "value": 3})
        await eventually(lambda: receiver.received, timeout=10, what="the alert delivered")
        doc = json.loads(receiver.received[0][1])
        assert (doc["family"], doc["event"], doc["payload"]["condition"], doc["payload"]["id"]) == (
            "alerts", "alert", "battery_low", "D2")
    finally:
        device.stop()
        await running.stop()
        await defer.maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_admin_pages_manage_rules_and_webhooks(tmp_path: Path, mosquitto: Mosquitto) -> None:
    running = await start_hub(tmp_path, mosquitto, ["devices", "gate"], **ALERTS)
    try:
        code, where = await running.form("/alerts/rules", {"name": "gate silent", "family": "gate", "kind": "unit",
                                                           "condition": "offline", "after": "15m"})
        assert code in (302, 303) and where == "/alerts"
        [rule] = running.hub.extensions[0]._service.rules.values()
        assert (rule.family, rule.kind, rule.after) == ("gate", "unit", 900.0)
        code, html = await running.page("/alerts")
        assert code == 200 and "gate silent" in html and "No alert is firing." in html
        code, where = await running.form("/alerts/rules", {"name": "x", "family": "gate",
                                                           "condition": "battery_below"})
        code, html = await running.page(where)
        assert "needs a threshold" in html

        cookies, csrf = await running._login()
        response = await treq.post(running.base + "/webhooks", data={
            "name": "crm", "url": "https://example.net/hook", "families": "gate, alerts", "_csrf": csrf},
            cookies=cookies, allow_redirects=False)
        html = await response.text()
        assert response.code == 200 and "Shown this once" in html
        [hook] = running.hub.extensions[1]._service.hooks.values()
        assert hook.families == ("gate", "alerts")
        code, html = await running.page("/webhooks")
        assert code == 200 and "example.net/hook" in html and "Shown this once" not in html
        code, html = await running.page("/")
        assert "Active alerts" in html
    finally:
        await running.stop()


# -- every family's kinds, in memory (a Clock for time, a real SQLite store)


async def _alert_service(tmp_path: Path, clock: task.Clock, database_url: str,
                         families: dict[str, Any] | None = None) -> tuple[Any, list[Any]]:
    from types import SimpleNamespace

    from bsscihub.alerts import MIGRATIONS, AlertService
    from bsscihub.bus import EventBus
    from bsscihub.cluster import local_cluster
    from bsscihub.family import installed_families
    from bsscihub.store import open_store
    from bsscihub.store.schema import CORE_MIGRATIONS
    from tests.conftest import make_config

    config = make_config(tmp_path, alerts={"check_interval": "5s"})
    store = open_store(database_url, tmp_path / "a.sqlite", reactor)
    store.start()
    await store.migrate([*CORE_MIGRATIONS, *MIGRATIONS])
    bus = EventBus()
    published: list[Any] = []
    bus.subscribe(lambda e: published.append(e) if e.family == "alerts" else None)
    hub = SimpleNamespace(config=config, reactor=clock, store=store, bus=bus,
                          families=installed_families() if families is None else families, cluster=local_cluster())
    service = AlertService(hub)
    service.startService()
    await service.when_ready()
    return service, published


async def _settled(service: Any) -> None:
    while service._pending:
        await defer.DeferredList(list(service._pending))


async def _advance(clock: task.Clock, service: Any, seconds: float) -> None:
    """Time passes in the check interval's steps; each round's writes (real threads) finish before the next.

    A round still writing when the clock moves on would be skipped by its LoopingCall, so each
    step waits until the loop has scheduled its next round (however long the writes took).
    """
    for _ in range(int(seconds // 5)):
        clock.advance(5)
        deadline = reactor.seconds() + 15
        while service._loop.call is None:
            assert reactor.seconds() < deadline, "an alert check round did not finish"
            await task.deferLater(reactor, 0.005, lambda: None)


@pytest_twisted.ensureDeferred
async def test_every_family_kind_goes_offline_and_comes_back(tmp_path: Path, database_url: str) -> None:
    from bsscihub.bus import Event

    clock = task.Clock()
    clock.advance(1000)
    service, published = await _alert_service(tmp_path, clock, database_url)
    try:
        for family in ("mioty", "ble", "devices", "gate"):
            await service.add_rule({"name": f"{family} silent", "family": family, "condition": "offline",
                                    "after": 60}, "tests")
        heard = [
            Event("mioty", "uplink", "mioty/ep/70b3d59ce0000001/up",
                  {"receivers": [{"bsEui": "70b3d59cd0000001", "rssi": -90.0}]}),
            Event("mioty", "meter_reading", "mioty/meter/dme-81795246/reading", {"values": {}}),
            Event("ble", "up", "ble/node/112233445566/up", {"receivers": [{"gatewayId": "GW001", "rssi": -60}]}),
            Event("devices", "up", "dev/device/Device001/up", {"deviceId": "Device001", "value": 1}),
            Event("gate", "state", "gate/unit/gate-1/state", {"state": "online"}),
            # the hub's own answers are no sign of life
            Event("gate", "cmd_result", "gate/unit/gate-2/event/cmd_result", {"ok": True}),
        ]
        for event in heard:
            service.on_event(event)
        await _advance(clock, service, 55)
        await _settled(service)
        assert published == []
        await _advance(clock, service, 10)  # 65 s of silence, checked at the next round
        await _settled(service)
        fired = sorted(e.topic for e in published)
        assert fired == sorted([
            "alerts/mioty/ep/70b3d59ce0000001/offline", "alerts/mioty/bs/70b3d59cd0000001/offline",
            "alerts/mioty/meter/dme-81795246/offline", "alerts/ble/node/112233445566/offline",
            "alerts/ble/gw/GW001/offline", "alerts/devices/device/Device001/offline",
            "alerts/gate/unit/gate-1/offline"])
        assert all(e.payload["state"] == "firing" for e in published)
        await _advance(clock, service, 60)
        await _settled(service)
        assert len(published) == 7  # once per transition

        published.clear()
        for event in heard:
            service.on_event(event)
        await _settled(service)
        assert len(published) == 7 and all(e.payload["state"] == "resolved" for e in published)
    finally:
        await service.stopService()
        await service.hub.store.stop()


@implementer(IReceivers)
class Relays:
    """A family the core has never heard of: its devices are heard through relays, named `relayId`."""

    name = topic_root = "relays"
    receiver_id = ("relayId", "relay")


@pytest_twisted.ensureDeferred
async def test_the_receivers_a_device_was_heard_by_are_named_as_their_family_declares(
        tmp_path: Path, database_url: str) -> None:
    from bsscihub.bus import Event

    families = {**installed_families(), "relays": Relays()}
    assert verifyObject(IReceivers, families["relays"])
    clock = task.Clock()
    service, _ = await _alert_service(tmp_path, clock, database_url, families)
    try:
        for event in (
            Event("relays", "up", "relays/sensor/s-1/up", {"receivers": [{"relayId": "R7"}, {"relayId": ""}, "R8"]}),
            # another family's word means nothing here, and a family that declares no receivers has none
            Event("relays", "up", "relays/sensor/s-2/up", {"receivers": [{"bsEui": "70b3d59cd0000001"}]}),
            Event("devices", "up", "dev/device/D1/up", {"receivers": [{"gatewayId": "GW9", "relayId": "R9"}]}),
            Event("ble", "up", "ble/node/112233445566/up", {"receivers": [{"bsEui": "70b3d59cd0000002"}]}),
        ):
            service.on_event(event)
        assert sorted(service.targets) == [
            ("ble", "node", "112233445566"), ("devices", "device", "D1"),
            ("relays", "relay", "R7"), ("relays", "sensor", "s-1"), ("relays", "sensor", "s-2")]
    finally:
        await service.stopService()
        await service.hub.store.stop()


@pytest_twisted.ensureDeferred
async def test_reported_offline_and_signal_with_hysteresis(tmp_path: Path, database_url: str) -> None:
    from bsscihub.bus import Event

    clock = task.Clock()
    service, published = await _alert_service(tmp_path, clock, database_url)
    try:
        await service.add_rule({"name": "bs down", "family": "mioty", "kind": "bs", "condition": "offline"}, "t")
        await service.add_rule({"name": "weak", "family": "mioty", "kind": "ep", "target": "70b3d59ce0000001",
                                "condition": "signal_below", "threshold": -110, "hysteresis": 3}, "t")
        service.on_event(Event("mioty", "state", "mioty/bs/70b3d59cd0000001/state", {"state": "offline"}))
        await _settled(service)
        assert [(e.topic, e.payload["state"]) for e in published] == [
            ("alerts/mioty/bs/70b3d59cd0000001/offline", "firing")]
        service.on_event(Event("mioty", "state", "mioty/bs/70b3d59cd0000001/state", {"state": "online"}))
        await _settled(service)
        assert published[-1].payload["state"] == "resolved"

        published.clear()
        for rssi in (-120, -115, -108, -100, -99):  # fires below -110, resolves only above -107
            service.on_event(Event("mioty", "uplink", "mioty/ep/70b3d59ce0000001/up",
                                   {"receivers": [{"bsEui": "70b3d59cd0000001", "rssi": rssi}]}))
        await _settled(service)
        assert [(e.payload["state"], e.payload["value"]) for e in published] == [
            ("firing", -120.0), ("resolved", -100.0)]
        # another end point is not this rule's
        service.on_event(Event("mioty", "uplink", "mioty/ep/70b3d59ce0000002/up", {"rssi": -130}))
        await _settled(service)
        assert len(published) == 2
    finally:
        await service.stopService()
        await service.hub.store.stop()


def d1_first_firing_held(service: Any) -> tuple[threading.Event, list[tuple[str, bool]]]:
    """From now on the first write of D1's firing waits in its store thread (PostgreSQL has 4) until the returned
    Event is set; the list gets (device, firing) of each alert write as it starts."""
    first_may_go = threading.Event()
    writes: list[tuple[str, bool]] = []
    store_transition = service._store_transition

    def first_write_slow(cursor: Any, fence: Any, rule: Any, target: Any, firing: bool, *rest: Any) -> None:
        writes.append((target.id, firing))
        if (target.id, firing) == ("D1", True) and writes.count(("D1", True)) == 1:  # a rerun after a deadlock goes on
            assert first_may_go.wait(30), "the test never let the first write go"
        store_transition(cursor, fence, rule, target, firing, *rest)

    service._store_transition = first_write_slow
    return first_may_go, writes


async def d1_firing_under_way(service: Any, writes: list[tuple[str, bool]]) -> Any:
    """A rule on devices going offline, and D1 gone offline, once its firing's write started (and, held by
    d1_first_firing_held, waits); returns the rule."""
    from bsscihub.bus import Event

    rule = await service.add_rule({"name": "down", "family": "devices", "kind": "device",
                                   "condition": "offline"}, "tests")
    service.on_event(Event("devices", "state", "dev/device/D1/state", {"state": "offline"}))
    await until(lambda: ("D1", True) in writes, "D1's firing write started")
    return rule


async def transitions_stored_in_decided_order(service: Any, published: list[Any]) -> None:
    """D1's first alert write waits while its "resolved" and another device's alert are decided: the resolved
    one must not overtake it, the other device's must."""
    from bsscihub.bus import Event

    store = service.hub.store
    first_may_go, writes = d1_first_firing_held(service)
    try:
        rule = await service.add_rule({"name": "down", "family": "devices", "kind": "device",
                                       "condition": "offline"}, "tests")
        service.on_event(Event("devices", "state", "dev/device/D1/state", {"state": "offline"}))
        service.on_event(Event("devices", "state", "dev/device/D1/state", {"state": "online"}))
        await until(lambda: ("D1", True) in writes, "D1's firing write started")
        service.on_event(Event("devices", "state", "dev/device/D2/state", {"state": "offline"}))
        await until(lambda: store.fetchall("SELECT state FROM alert_history WHERE target = 'D2'"),
                    "another device's alert stored while D1's first write waits")
        # D1's "resolved" waits its turn (the code before had no turns: it went on and committed first).
        d1 = (rule.id, "devices", "device", "D1")
        await until(lambda: d1 in getattr(service, "_in_turn", {}) or store.fetchall(
            "SELECT state FROM alert_history WHERE target = 'D1'"), "D1's resolved waiting or stored")
        first_may_go.set()
        await until(lambda: len(published) == 3 and not service._pending, "the three transitions stored and out")
    finally:
        first_may_go.set()
    assert [e.payload["state"] for e in published if e.payload["id"] == "D1"] == ["firing", "resolved"]
    assert list(service.active) == [(rule.id, "devices", "device", "D2")]
    assert [tuple(r) for r in await store.fetchall("SELECT rule_id, target FROM alert_states")] == [(rule.id, "D2")]
    history = await store.fetchall("SELECT state FROM alert_history WHERE target = 'D1' ORDER BY id")
    assert [state for (state,) in history] == ["firing", "resolved"]


@pytest_twisted.ensureDeferred
async def test_one_alerts_transitions_are_stored_in_the_order_they_were_decided(
        tmp_path: Path, postgres_url: str) -> None:
    _reset_pg_schema(postgres_url)
    service, published = await _alert_service(tmp_path, task.Clock(), postgres_url)
    try:
        await transitions_stored_in_decided_order(service, published)
    finally:
        await service.stopService()
        await service.hub.store.stop()


@pytest_twisted.ensureDeferred
async def test_a_deleted_devices_alert_state_is_removed_after_its_transitions_and_before_the_next(
        tmp_path: Path, postgres_url: str) -> None:
    from bsscihub.bus import Event

    _reset_pg_schema(postgres_url)
    clock = task.Clock()
    service, _ = await _alert_service(tmp_path, clock, postgres_url)
    store = service.hub.store
    first_may_go, writes = d1_first_firing_held(service)
    try:
        rule = await d1_firing_under_way(service, writes)
        service.on_event(Event("devices", "deleted", "dev/device/D1/event/deleted", {}))
        clock.advance(10)
        service.on_event(Event("devices", "state", "dev/device/D1/state", {"state": "offline"}))  # heard again
        # The deletion and the new firing wait their turn (the code before had no turns: the new firing went on).
        await until(lambda: ("devices", "device", "D1") in getattr(service, "_in_turn", {}) or store.fetchall(
            "SELECT state FROM alert_history WHERE target = 'D1'"), "D1's deletion waiting or its new firing stored")
        first_may_go.set()
        await _settled(service)
        assert list(service.active) == [(rule.id, "devices", "device", "D1")]
        assert service.active[(rule.id, "devices", "device", "D1")].since == clock.seconds()
        states = await store.fetchall("SELECT target, since FROM alert_states")
        assert [tuple(r) for r in states] == [("D1", clock.seconds())]  # the new firing's, not the deleted one's
        history = await store.fetchall("SELECT time FROM alert_history WHERE target = 'D1' ORDER BY id")
        assert [time for (time,) in history] == [clock.seconds() - 10, clock.seconds()]
    finally:
        first_may_go.set()
        await service.stopService()
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_rule_switched_off_while_its_transition_is_stored_leaves_no_state(
        tmp_path: Path, postgres_url: str) -> None:
    _reset_pg_schema(postgres_url)
    service, _ = await _alert_service(tmp_path, task.Clock(), postgres_url)
    store = service.hub.store
    first_may_go, writes = d1_first_firing_held(service)
    try:
        rule = await d1_firing_under_way(service, writes)
        # Switched off meanwhile: its states go once the firing is stored (before, the firing stored its state again).
        switched_off = defer.ensureDeferred(service.update_rule(rule.id, {"enabled": False}))
        await until(lambda: not service.rules[rule.id].enabled, "the rule switched off")
        await task.deferLater(reactor, 0.5, lambda: None)  # a DELETE that went ahead would be done by now
        assert not switched_off.called, "the switch-off did not wait for the firing still being stored"
        first_may_go.set()
        await switched_off
        await _settled(service)
        assert not service.active
        assert await store.fetchall("SELECT rule_id, target FROM alert_states") == []
    finally:
        first_may_go.set()
        await service.stopService()
        await store.stop()


class Refusing(Receiver):
    """Refuses the first delivery for good (410), takes the others."""

    def render_POST(self, request: Any) -> bytes:
        body = super().render_POST(request)
        if len(self.received) == 1:
            request.setResponseCode(410)
        return body


@pytest_twisted.ensureDeferred
async def test_a_delivery_refused_for_good_is_dropped_and_the_secret_never_logged(
        tmp_path: Path, mosquitto: Mosquitto, logged: list[Any]) -> None:
    from twisted.logger import formatEvent

    receiver = Refusing()
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(receiver))
    running = await start_hub(tmp_path, mosquitto, ["devices"])
    device = DeviceClient(mosquitto)
    try:
        secret = "s3cret-" + "x" * 20
        code, created = await running.api("POST", "/api/v1/webhooks", {
            "name": "crm", "url": f"http://user:pw@127.0.0.1:{listening.getHost().port}/in?token=abc",
            "events": ["up"], "secret": secret})
        assert code == 201 and created["secret"] == secret
        for value in (1, 2):
            await device.publish("SensorData", {"device_id": "D3", "type": "Temperature", "value": value})
        hook = await eventually(lambda: _hook(running, created["webhook"]["id"],
                                              lambda h: h["delivered"] == 1 and h["queued"] == 0),
                                timeout=10, what="one dropped, one delivered")
        assert "410" in hook["lastError"] and hook["failures"] == 1
        assert hook["url"] == f"http://user:***@127.0.0.1:{listening.getHost().port}/in?token=abc"
        assert receiver.received[0][0]["authorization"] == "Basic dXNlcjpwdw=="  # user:pw
        assert [json.loads(b)["payload"]["value"] for _, b in receiver.received] == [1, 2]
        everything = "\n".join(formatEvent(e) or "" for e in logged)
        hub = "\n".join(formatEvent(e) or "" for e in logged if e.get("log_namespace", "").startswith("bsscihub"))
        assert secret not in everything
        # The hub names the receiver without its credentials or query (the test receiver's own access log may)
        assert "refused delivery" in hub and "410" in hub and "token=abc" not in hub and "pw@" not in hub
    finally:
        device.stop()
        await running.stop()
        await defer.maybeDeferred(listening.stopListening)


@pytest_twisted.ensureDeferred
async def test_a_webhook_queue_is_bounded(tmp_path: Path, mosquitto: Mosquitto) -> None:
    running = await start_hub(tmp_path, mosquitto, ["devices"], webhooks={"max_queue": 2, "retry_min": "5s"})
    device = DeviceClient(mosquitto)
    try:
        code, created = await running.api("POST", "/api/v1/webhooks", {
            "name": "away", "url": f"http://127.0.0.1:{free_port()}/", "events": ["up"]})
        for value in range(3):
            await device.publish("SensorData", {"device_id": "D4", "type": "Temperature", "value": value})
        hook = await eventually(lambda: _hook(running, created["webhook"]["id"], lambda h: h["dropped"] == 1),
                                timeout=10, what="the third event dropped")
        assert hook["queued"] == 2
    finally:
        device.stop()
        await running.stop()
