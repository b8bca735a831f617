"""`bsscihub sim devices` and `bsscihub sim ble`, run as the real command against a running hub and a real
mosquitto: what they publish is taken by the hub as from real devices and gateways; `bsscihub sim` stays mioty's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import threads

from tests.broker import Mosquitto
from tests.test_families import eventually, start_hub


def _sim(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bsscihub.cli", "sim", *args, "--config", str(tmp_path / "hub.yaml")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


@pytest_twisted.ensureDeferred
async def test_sim_devices_registers_and_feeds_generic_devices(tmp_path: Path, mosquitto: Mosquitto) -> None:
    running = await start_hub(tmp_path, mosquitto, ["devices"])
    try:
        done = await threads.deferToThread(_sim, tmp_path, "devices", "--devices", "3", "--rate", "40",
                                           "--duration", "1")
        assert done.returncode == 0, done.stderr
        summary = done.stdout.strip().splitlines()[-1]
        assert summary.startswith("3 devices: ") and "not acknowledged" not in summary

        async def all_online() -> Any:
            code, found = await running.api("GET", "/api/v1/devices")
            ids = {d["deviceId"]: d for d in found["items"]}
            wanted = {"SimDevice001", "SimDevice002", "SimDevice003"}
            return ids if wanted <= set(ids) and all(ids[i]["status"] == "online" for i in wanted) else None

        devices = await eventually(all_online, timeout=10, what="three simulated devices online")
        assert len(devices) == 3
        code, telemetry = await running.api("GET", "/api/v1/devices/SimDevice001/telemetry")
        assert code == 200
        kinds = {t["type"] for t in telemetry["items"]}
        assert {"temperature", "humidity", "battery"} <= {k.lower() for k in kinds}
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_sim_ble_feeds_gateways_and_beacons(tmp_path: Path, mosquitto: Mosquitto) -> None:
    running = await start_hub(tmp_path, mosquitto, ["ble"], ble={"dedup_window": "300ms"})
    try:
        done = await threads.deferToThread(_sim, tmp_path, "ble", "--gateways", "2", "--nodes", "4", "--copies", "2",
                                           "--rate", "40", "--duration", "1")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1].startswith("2 BLE gateways: ")

        async def heard() -> Any:
            gateways = (await running.api("GET", "/api/v1/ble/gateways"))[1]["items"]
            nodes = (await running.api("GET", "/api/v1/ble/nodes"))[1]["items"]
            return (gateways, nodes) if len(gateways) == 2 and len(nodes) == 4 else None

        gateways, nodes = await eventually(heard, timeout=10, what="two gateways and four beacons")
        assert {g["gatewayId"] for g in gateways} == {"SIMGW01", "SIMGW02"}
        assert all(g["state"] == "online" for g in gateways)
        assert all({"temperature", "humidity", "battery"} <= set(n["values"]) for n in nodes)
        code, readings = await running.api("GET", f"/api/v1/ble/nodes/{nodes[0]['id']}/readings")
        # Two gateways heard each reading: one reading with both, the nearest first (the run may end
        # between the two copies of its last one).
        both = [r["receivers"] for r in readings["items"] if len(r["receivers"]) == 2]
        assert both and all(first["rssi"] > second["rssi"] for first, second in both)
    finally:
        await running.stop()


def test_sim_without_a_family_is_still_the_mioty_simulator(tmp_path: Path) -> None:
    shown = subprocess.run([sys.executable, "-m", "bsscihub.cli", "sim", "--help"], capture_output=True, text=True,
                           timeout=60)
    assert shown.returncode == 0 and "--base-stations" in shown.stdout
    assert "simulate BLE gateways" in shown.stdout and "simulate generic MQTT devices" in shown.stdout
    (tmp_path / "hub.yaml").write_text("data_dir: var\n")
    refused = _sim(tmp_path, "devices", "--devices", "2", "--url", "mqtt://127.0.0.1:1", "--duration", "1")
    assert refused.returncode == 1
    assert refused.stderr.startswith("bsscihub: cannot reach the broker at 127.0.0.1:1")


@pytest_twisted.ensureDeferred
async def test_simulated_gateways_that_stop_raise_offline_alerts(tmp_path: Path, mosquitto: Mosquitto,
                                                                 subscriber_factory: Any) -> None:
    from tests.test_families import PREFIX, payloads

    witness = subscriber_factory(mosquitto, f"{PREFIX}/alerts/#")
    running = await start_hub(tmp_path, mosquitto, ["ble"], alerts={"check_interval": "100ms"})
    try:
        code, _ = await running.api("POST", "/api/v1/alert-rules", {
            "name": "gateway silent", "family": "ble", "kind": "gw", "condition": "offline", "after": 1})
        assert code == 201
        done = await threads.deferToThread(_sim, tmp_path, "ble", "--gateways", "2", "--nodes", "2", "--rate", "20",
                                           "--duration", "0.5")
        assert done.returncode == 0, done.stderr
        await witness.when(lambda m: m.topic.endswith("/offline"), timeout=10, count=2)
        assert {t for t in (m.topic for m in witness.messages)} == {
            f"{PREFIX}/alerts/ble/gw/SIMGW01/offline", f"{PREFIX}/alerts/ble/gw/SIMGW02/offline"}
        assert all(p["state"] == "firing" for p in payloads(witness, f"{PREFIX}/alerts/ble/gw/SIMGW01/offline"))
    finally:
        await running.stop()
