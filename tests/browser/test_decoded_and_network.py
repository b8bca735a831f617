"""Real-browser test of decoded sensor values and the network page: headless Chromium against a running hub whose
uplinks and meter frames come from a base station over mutual TLS. Charts a decoded field chosen on the sensor page,
then sees the station's links to the sensor and the meter on the network page, under the strict CSP."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import threads

from bsscihub import pki
from bsscihub.protocols.bssci.identity import STATION
from tests.browser.test_dashboard import (
    ARTIFACTS,
    console_of,
    hub,
    log_in,
    painted,
    refused_by_csp,
    start_chromium,
    stop_chromium,
)
from tests.test_meters_hub import vm_station, vm_uplink
from tests.wmbus_frames import mode5_frame

__all__ = ["hub"]  # fixture

BS = "70b3d59cd00000d4"
EP = "0011223344556677"
CLIMATE = "70b3d5677000a001"
DATA = Path(__file__).parent.parent / "data" / "blueprints"


def climate(temperature_tenths_kelvin: int, humidity: int, pressure_tenths: int) -> list[int]:
    return list(temperature_tenths_kelvin.to_bytes(2, "big") + bytes([humidity]) + pressure_tenths.to_bytes(2, "big"))


def browse(url: str, port: int, certs: Path) -> list[str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    issued = pki.issue_client_cert(certs / "ca.pem", certs / "ca.key", "bs-net", certs / "bs", binding=STATION.bind(BS))
    station = vm_station(port, issued.cert_path, issued.key_path, certs / "ca.pem")
    station.connect(BS, "bs-net")
    station.expect("vm.activateCmp")
    station.expect("attPrp")
    for cnt, (kelvin, humidity) in enumerate(((2931, 40), (2951, 42), (2941, 45)), start=1):
        op = station.send("ulData", epEui=int(EP, 16), rxTime=time.time_ns(), packetCnt=cnt, snr=12.5, rssi=-95.0,
                          userData=climate(kelvin, humidity, 10132), format=0, dlOpen=False, responseExp=False,
                          dlAck=False)
        station.expect("ulDataRsp", op)
        station.send("ulDataCmp", op)
        time.sleep(0.1)
    op = vm_uplink(station, mode5_frame(), snr=-2.5, sys_time=time.time_ns())  # a meter, no key: raw
    station.expect("vm.ulDataRsp", op)
    time.sleep(1.0)  # past the dedup windows

    ARTIFACTS.mkdir(exist_ok=True)
    driver, profile = start_chromium()
    saved: list[str] = []

    def wait(condition: Callable[[Any], Any], timeout: float = 15) -> Any:
        return WebDriverWait(driver, timeout).until(condition)

    try:
        driver.get(url + "/login")
        log_in(driver, url)

        driver.get(f"{url}/mioty/sensors/{EP}")
        values = driver.find_element(By.ID, "decoded-values").text
        assert "temperature" in values and "20.95 °C" in values and "45 %" in values and "1013.2 hPa" in values, values
        field = Select(driver.find_element(By.ID, "chart-field"))
        assert [o.get_attribute("value") for o in field.options] == ["", "temperature", "humidity", "pressure"]
        field.select_by_value("humidity")
        wait(lambda d: d.current_url.endswith("?field=humidity"))
        points = driver.execute_script("return JSON.parse(document.getElementById('signal-chart').dataset.points)")
        assert [p["v"] for p in points] == [[40], [42], [45]] and painted(driver, "signal-chart")
        saved.append("30-sensor-decoded.png")
        driver.save_screenshot(str(ARTIFACTS / saved[-1]))

        driver.get(url + "/mioty/network")
        table = driver.find_element(By.ID, "network-table")
        sensor_row = table.find_element(By.CSS_SELECTOR, f'tr[data-device="{EP}"]')
        assert sensor_row.find_element(By.CSS_SELECTOR, 'td[data-quality="good"]').text.startswith("12.5 dB")
        meter_row = table.find_element(By.CSS_SELECTOR, 'tr[data-device="dme-12345678"]')
        assert meter_row.find_element(By.CSS_SELECTOR, 'td[data-quality="poor"]').text.startswith("-2.5 dB")
        assert "bs-net" in table.find_element(By.CSS_SELECTOR, "thead").text.lower()
        Select(driver.find_element(By.ID, "network-hours")).select_by_value("1")
        wait(lambda d: d.current_url.endswith("?hours=1"))
        assert driver.find_elements(By.CSS_SELECTOR, f'#network-table tr[data-device="{EP}"]')
        saved.append("31-network.png")
        driver.save_screenshot(str(ARTIFACTS / saved[-1]))
        console = console_of(driver)
        assert not refused_by_csp(console), console
    finally:
        station.close()
        stop_chromium(driver, profile)
    return saved


@pytest_twisted.ensureDeferred
async def test_decoded_chart_and_network_page(hub: dict[str, Any]) -> None:  # noqa: F811
    service = hub["hub"].services["mioty"]
    await service.blueprints.add((DATA / "climate.json").read_text(), "test")
    await service.attach(EP, bytes(range(16)), 0x1A2B, False, actor="test")
    await service.blueprints.set_type(EP, CLIMATE)
    certs = Path(hub["hub"].config.tls.ca).parent
    saved = await threads.deferToThread(browse, hub["url"], hub["bssci_port"], certs)
    assert saved == ["30-sensor-decoded.png", "31-network.png"]
