"""Every family, and the core, against its declared EventSpecs and the docs' payload tables (docs/mqtt.md,
docs/families.md, docs/gate.md): a field that drifts in the code, the spec or the docs fails here.
BLE, devices, gate, the alerts and the hub status run without a broker, mioty behind its real TLS listener;
every event they publish is checked against its spec and its docs row."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import pytest_twisted

from bsscihub.bus import Event
from bsscihub.family import EventSpec, installed_families
from bsscihub.hub import core_events
from bsscihub.mqtt.bridge import STATUS_EVENTS, hub_status
from tests.contract import DOCS, ContractWitness, DocRow, doc_problems, doc_rows, shape_of, topic_pattern, violations
from tests.memory_bridge import running_family, stop_family, until
from tests.test_mioty_service import PKI, pki

__all__ = ["pki"]  # a fixture, imported for pytest

FAMILIES = installed_families()
FAMILY_SPECS = [(name, spec) for name, family in sorted(FAMILIES.items()) for spec in family.events]
SPECS = FAMILY_SPECS + [("core", spec) for spec in core_events()]
BRIDGE_ANSWERED = "answered by the MQTT bridge"


def test_every_family_declares_its_events() -> None:
    assert {name for name, _ in FAMILY_SPECS} == set(FAMILIES)
    for name, family in FAMILIES.items():
        specs = family.events
        assert all(isinstance(s, EventSpec) for s in specs)
        root = getattr(family, "topic_root", None) or name
        assert all(s.topic.startswith(f"{root}/") for s in specs), name


def _doc_rows_for(topic: str) -> list[Any]:
    return [row for found, rows in doc_rows().items() if topic_pattern(found).match(topic) or found == topic
            for row in rows]  # fmt: skip


@pytest.mark.parametrize(("family", "spec"), SPECS, ids=[f"{n}:{s.kind}:{s.topic}" for n, s in SPECS])
def test_the_docs_table_says_what_the_spec_declares(family: str, spec: EventSpec) -> None:
    rows = _doc_rows_for(spec.topic)
    assert rows, f"{spec.topic} is in no topic table of {', '.join(d.name for d in DOCS)}"
    declared = shape_of(spec.payload)
    for row in rows:
        assert row.retained == spec.retained, f"{row.file}: {spec.topic} retained {row.retained}"
        documented = shape_of(row.payload)
        if declared is None or documented is None:
            continue
        if documented.open:
            assert documented.required <= declared.required | declared.optional, row.file
        else:
            assert (documented.required, documented.optional) == (declared.required, declared.optional), row.file


def _json_examples(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(topic without {p}/, the first JSON object) of every `### `{p}/...`` section of a doc."""
    text = path.read_text(encoding="utf-8")
    for match in re.finditer(r"^### `\{p\}/([^`]+)`.*?\n(.*?)(?=^### |\Z)", text, re.M | re.S):
        block = re.search(r"```json\n(.*?)```", match.group(2), re.S)
        if block:
            yield match.group(1), json.loads(block.group(1).split("\n\n")[0])


EXAMPLES = list(_json_examples(DOCS[0]))


def test_the_docs_examples_are_found() -> None:
    assert {"mioty/ep/{epEui}/up", "mioty/bs/{bsEui}/state", "mioty/meter/{meter}/reading"} <= {t for t, _ in EXAMPLES}


@pytest.mark.parametrize(("topic", "example"), EXAMPLES, ids=[t for t, _ in EXAMPLES])
def test_a_docs_example_matches_its_spec(topic: str, example: dict[str, Any]) -> None:
    specs = [s for _, s in SPECS if topic_pattern(s.topic).match(topic) or s.topic == topic
             or topic_pattern(topic).match(s.topic)]  # fmt: skip
    assert specs, f"{topic} has an example in the docs and no EventSpec, neither a family's nor the core's"
    problems = [violations(Event(s.topic.split("/")[0], s.kind, re.sub(r"\{[^}]+\}", "x", s.topic), example,
                                 s.retained), [s]) for s in specs]  # fmt: skip
    assert [] in problems, problems


def test_the_checker_catches_a_drifting_field() -> None:
    spec = EventSpec("up", "dev/device/{id}/up", False, '{"deviceId", "time", "invalid"?}')
    ok = Event("devices", "up", "dev/device/a/up", {"deviceId": "a", "time": "2026-01-01T00:00:00.000Z"})
    assert violations(ok, [spec]) == []
    assert violations(Event("devices", "up", "dev/device/a/up", {"deviceId": "a", "time": 1.5}), [spec]) == [
        "dev/device/a/up: time = 1.5 is not RFC 3339"]
    assert violations(Event("devices", "up", "dev/device/a/up", {"deviceId": "a", "time": None, "x": 1}), [spec]) \
        == ["dev/device/a/up: undeclared ['x']"]
    assert violations(Event("devices", "up", "dev/device/a/up", {"time": None}, True), [spec]) == [
        "dev/device/a/up: retain True, declared False", "dev/device/a/up: missing ['deviceId']"]
    assert violations(Event("devices", "down", "dev/device/a/down", {}), [spec]) != []


# -- the families run in memory, their events checked as they are published


async def answered(hub: Any, devices: Any, witness: ContractWitness, command: str) -> None:
    """A command on `{p}/{command}` through the real MQTT bridge, until its cmd_result event is out."""
    before = len([e for e in witness.events if e.kind == "cmd_result"])
    assert devices.deliver(hub.mqtt.topic(command), {})
    await until(lambda: len([e for e in witness.events if e.kind == "cmd_result"]) > before, f"the answer to {command}")


def declared(family: str) -> set[str]:
    return {s.kind for s in FAMILIES[family].events}


@pytest_twisted.ensureDeferred
async def test_ble_publishes_what_it_declares(tmp_path: Path) -> None:
    hub, bridge, witness = await running_family(tmp_path, "ble", ble={"dedup_window": "50ms"})
    try:
        for gateway, rssi in (("GW001", -71), ("GW002", -60)):
            assert bridge.deliver(f"BLEGatewayData/{gateway}", {"gateway_id": gateway, "mac": "11:22:33:44:55:66",
                                                                 "rssi": rssi, "temperature": 22, "humidity": 65})
        assert bridge.deliver("BLEGatewayData/GW001", {"gateway_id": "GW001", "mac": "aa:22:33:44:55:66",
                                                       "temperature": float("nan")})
        await until(lambda: {"up", "node_registered", "gateway_state", "gateway_registered"} <= witness.kinds(),
                     "every kind of BLE event")
        await answered(hub, bridge, witness, "ble/gw/GW001/cmd/no_such_command")
    finally:
        await stop_family(hub)
    assert witness.problems == []
    assert witness.kinds() == declared("ble")


@pytest_twisted.ensureDeferred
async def test_devices_publish_what_they_declare(tmp_path: Path) -> None:
    hub, bridge, witness = await running_family(tmp_path, "devices")
    try:
        assert bridge.deliver("SensorData/esp32-01", {"device_id": "esp32-01", "type": "temperature", "value": 1})
        assert bridge.deliver("device/esp32-02/telemetry/humidity", b"55")
        assert bridge.deliver("device/esp32-02/status", {"state": "online", "firmware": "1.0.0"})
        await until(lambda: {"up", "status", "registered"} <= witness.kinds(), "every kind of device event")
        await answered(hub, bridge, witness, "dev/device/esp32-01/cmd/no_such_command")
    finally:
        await stop_family(hub)
    assert witness.problems == []


@pytest_twisted.ensureDeferred
async def test_devices_rejected_event_is_as_declared(tmp_path: Path) -> None:
    hub, bridge, witness = await running_family(tmp_path, "devices", devices={"auto_register": False})
    try:
        bridge.deliver("SensorData/stranger", {"device_id": "stranger", "type": "temperature", "value": 1})
        await until(lambda: "rejected" in witness.kinds(), "the rejected event")
    finally:
        await stop_family(hub)
    assert witness.problems == []


def test_the_docs_checker_catches_what_the_table_does_not_say() -> None:
    rows = {"dev/device/{id}/up": [DocRow("x.md", "dev/device/{id}/up", False, '{"deviceId", "time", "invalid"?}')]}
    ok = Event("devices", "up", "dev/device/a/up", {"deviceId": "a", "time": None})
    assert doc_problems(ok, rows) == []
    assert doc_problems(Event("devices", "up", "dev/device/a/up", {"time": None, "x": 1}, True), rows) == [
        "x.md: dev/device/a/up retained False, published True", "x.md: dev/device/a/up lacks documented ['deviceId']",
        "x.md: dev/device/a/up has undocumented ['x']"]
    assert doc_problems(Event("devices", "down", "dev/device/a/down", {}), rows) != []


# -- the core's own events: the hub's presence and the alerts


@pytest.mark.parametrize("node", [None, "hub1"])
def test_the_hub_status_is_what_the_core_declares(node: str | None) -> None:
    topic = "hub/status" if node is None else f"hub/{node}/status"
    rows = doc_rows()
    for since in (1_755_705_600.0, None):  # online, and the will (`since` unknown)
        event = Event("hub", "status", topic, json.loads(hub_status("online", "0.1.0", since, node)), True)
        assert violations(event, STATUS_EVENTS) == [] and doc_problems(event, rows) == []
    # the one-hub payload on a node's topic, and the other way round
    drifted = Event("hub", "status", topic, json.loads(hub_status("online", "0.1.0", None, None if node else "x")),
                    True)
    assert violations(drifted, STATUS_EVENTS) != [] and doc_problems(drifted, rows) != []


@pytest_twisted.ensureDeferred
async def test_alerts_publish_what_the_core_declares(tmp_path: Path) -> None:
    from bsscihub.alerts import EVENTS, AlertService

    hub, bridge, _ = await running_family(tmp_path, "devices")
    witness = ContractWitness(hub.bus, "alerts", EVENTS)
    alerts = AlertService(hub)
    alerts.startService()
    try:
        await alerts.when_ready()
        await alerts.add_rule({"name": "battery low", "family": "devices", "target": "esp32-01",
                               "condition": "battery_below", "threshold": 20}, "test")
        for level in (15, 80):  # firing, then resolved
            assert bridge.deliver("SensorData/esp32-01", {"device_id": "esp32-01", "type": "battery", "value": level})
            await until(lambda n=level: len(witness.events) == (1 if n == 15 else 2), f"the alert at {level}")
    finally:
        await alerts.stopService()
        await stop_family(hub)
    assert [e.payload["state"] for e in witness.events] == ["firing", "resolved"]
    assert witness.problems == []


# -- gate, in memory


@pytest_twisted.ensureDeferred
async def test_gate_publishes_what_it_declares(tmp_path: Path) -> None:
    from bsscihub.protocols.gate.service import Caller

    hub, bridge, witness = await running_family(tmp_path, "gate")
    gate: Any = hub.services["gate"]
    user = Caller("alice", "user")
    try:
        await gate.register(hardware_id="hw-1", controller_id="gate-1", firmware_version="1.0.0", actor="test")
        await gate.register(hardware_id="hw-1", controller_id="gate-1", firmware_version="1.0.1", actor="test")
        assert bridge.deliver("gatetorio/gate-1/status", {"state": "closed", "battery": 87, "temp": float("nan")})
        await until(lambda: {"state", "status"} <= witness.kinds(), "the state and status events")
        unit = await gate.unit("gate-1")
        command = await gate.send_command(unit, "open", {"s": 1}, caller=user, via="rest")
        assert bridge.deliver("gatetorio/gate-1/status", {"command_id": command.id, "ok": True, "result": "done"})
        await until(lambda: "command" in witness.kinds(), "the command event")
        record, url, _ = await gate.upload_url(unit, name="log.txt", size=5, kind="log", base_url="http://hub",
                                               actor="test")
        args = dict(parse_qsl(urlsplit(url).query))
        await gate.receive_upload(record.id, args, io.BytesIO(b"hello"))
        await gate.rename("gate-1", "gate-2", "test")
        await answered(hub, bridge, witness, "gate/unit/gate-2/cmd/Not-A-Command")  # refused at once
        await gate.delete("gate-2")
        await until(lambda: witness.kinds() >= {"registered", "reregistered", "file_stored", "renamed", "deleted"},
                    "every kind of gate event")
    finally:
        await stop_family(hub)
    assert witness.problems == []
    assert witness.kinds() == declared("gate")


# -- mioty, behind its real mutual-TLS listener: stations and end points as tests' clients


@pytest_twisted.ensureDeferred
async def test_mioty_publishes_what_it_declares(tmp_path: Path, pki: PKI) -> None:
    from bsscihub.protocols.bssci.crypto import attach_signature
    from tests.test_mioty_field import EP_INT, att
    from tests.test_mioty_service import EP, KEY, A, B, Running, attached_and_heard, wait_for
    from tests.test_mioty_vm import METER, VmStation, connect
    from tests.wmbus_frames import mode5_frame

    hub, devices, witness = await running_family(
        tmp_path, "mioty", tls={"ca": str(pki.ca), "ca_key": str(pki.ca_key), "cert": str(pki.hub_cert),
                                "key": str(pki.hub_key)},
        mioty={"dedup_window": 0.2, "vm_mac_types": {1: "wmbus", 7: "raw"}})
    service: Any = hub.services["mioty"]
    service.drain_wait = 0.2
    running = Running(hub, service, witness.events, pki)
    try:
        # End points: attach, uplink, downlink and its result, reception status, a refused attach, detach.
        b = await attached_and_heard(running)  # state, and status (polled on connection)
        queued = await service.queue_downlink(EP, b"\xca\xfe", actor="test")
        await b.expect("dlDataQue")
        op = b.send("dlDataRes", epEui=EP_INT, queId=queued["queId"], result="sent", txTime=7, packetCnt=2)
        await b.expect("dlDataResRsp")
        b.send("dlDataResCmp", op)
        op = b.send("dlRxStat", epEui=EP_INT, rxTime=9, packetCnt=3, dlRxSnr=4.5, dlRxRssi=-99.0)
        await b.expect("dlRxStatRsp")
        att(b, 1, attach_signature(KEY, 0x99, 1))
        await b.expect("error")
        await service.detach(EP, actor="test")
        # Silence: warned, then detached by the hub.
        await service.attach(EP, KEY.hex(), "1a2b", True, actor="test")
        now = service.clock.seconds()
        await service.check_lifecycle(now + 36 * 3600)
        await service.check_lifecycle(now + 72 * 3600)
        # Variable MAC: a meter's first reading registers it, its downlink goes with its next uplink; a raw frame.
        a = await connect(running, "bs-a", A, VmStation(active=[1, 7]))
        a.vm_uplink(mode5_frame(), sys_time=1)
        await wait_for(lambda: "registered" in witness.kinds())
        await service.vm.queue_downlink(METER, "0102", actor="test")
        a.vm_uplink(mode5_frame(acc=0x2B), sys_time=2)
        a.vm_uplink(b"\x01\x02\x03", mac_type=7, sys_time=3)
        await answered(hub, devices, witness, f"mioty/bs/{B}/cmd/status")  # the station answers the poll
        await wait_for(lambda: declared("mioty") <= witness.kinds())
    finally:
        await stop_family(hub)
    assert witness.problems == []
    assert [e.payload["ok"] for e in witness.events if e.kind == "cmd_result"] == [True]
    assert {(e.kind, e.topic.split("/")[1]) for e in witness.events} >= {("dl_result", "ep"), ("dl_result", "meter")}


# -- README.rst's own table of what the hub publishes, and a decoded uplink


def readme_topic_rows() -> list[tuple[str, bool, str]]:
    """(topic without {p}/, retained, payload cell) of each row of README.rst's "Published by the hub" table."""
    readme = (Path(__file__).resolve().parents[1] / "README.rst").read_text(encoding="utf-8")
    table = readme.split("Published by the hub:", 1)[1].split("\n\n", 2)[1]
    rows: list[list[Any]] = []
    for line in table.splitlines():
        row = re.match(r"``\{p\}/(\S+)``\s+(yes|no)\s+(.*)$", line)
        if row:
            rows.append([row.group(1), row.group(2) == "yes", row.group(3)])
        elif rows and line.startswith(" "):
            rows[-1][2] += " " + line.strip()
    return [(topic, retained, cell) for topic, retained, cell in rows]


def test_the_readme_topic_table_says_what_the_specs_declare() -> None:
    rows = readme_topic_rows()
    assert len(rows) >= 15, "README.rst's topic table was not found"
    for topic, retained, cell in rows:
        specs = [s for _, s in SPECS if topic_pattern(topic).match(s.topic) or s.topic == topic]
        assert specs, f"README.rst: {topic} is declared by no EventSpec"
        assert {s.retained for s in specs} == {retained}, f"README.rst: {topic} retained {retained}"
        literal = re.search(r"``(\{.*?\})``", cell)
        shapes = [shape for shape in map(shape_of, (s.payload for s in specs)) if shape is not None]
        if literal and shapes:
            documented = shape_of(literal.group(1))
            assert documented is not None
            declared = set().union(*(shape.required | shape.optional for shape in shapes))
            assert documented.required | documented.optional <= declared, (
                f"README.rst: {topic} names {sorted((documented.required | documented.optional) - declared)}")
        if topic.endswith("/{kind}"):
            named = set(re.findall(r"``(\w+)``", cell))
            kinds = {s.topic.rsplit("/", 1)[1] for s in specs if not s.payload.startswith(BRIDGE_ANSWERED)}
            assert kinds <= named, f"README.rst: {topic} does not name the kinds {sorted(kinds - named)}"
    published = [s for _, s in SPECS if not s.payload.startswith(BRIDGE_ANSWERED)]  # cmd_result: "Commands"
    unlisted = [s.topic for s in published if not any(topic_pattern(t).match(s.topic) for t, _, _ in rows)]
    assert not unlisted, f"published and not in README.rst's topic table: {unlisted}"


def test_an_uplink_decoded_with_a_blueprint_is_what_the_spec_declares() -> None:
    """README, "Decoded sensor payloads": the uplink keeps its fields and gains typeEui with decoded or decodeError."""
    plain = dict(EXAMPLES)["mioty/ep/{epEui}/up"]
    specs = FAMILIES["mioty"].events
    for gained in ({"typeEui": "70b3d5677000a001", "decoded": {"temperature": {"value": 24.95, "unit": "°C"}}},
                   {"typeEui": "70b3d5677000a001", "decodeError": "too short"}):
        event = Event("mioty", "uplink", "mioty/ep/0011223344556677/up", {**plain, **gained})
        assert violations(event, specs) == []
