"""Real-browser test of the meter pages: headless Chromium against a running hub whose meter frames come from a
base station over mutual TLS. Adds a meter with its key, sees its readings and chart, charts another field."""

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
from tests.wmbus_frames import KEY, mode5_frame

__all__ = ["hub"]  # fixture

BS = "70b3d59cd00000c3"
METER = "dme-12345678"


def reading(volume_litres: int, temperature_tenths: int, acc: int) -> bytes:
    records = bytes.fromhex("0c13") + bytes.fromhex(f"{volume_litres:08d}")[::-1]
    records += bytes.fromhex("025a") + temperature_tenths.to_bytes(2, "little")
    return mode5_frame(records, acc=acc)


def browse(url: str, port: int, certs: Path) -> list[str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    issued = pki.issue_client_cert(certs / "ca.pem", certs / "ca.key", "bs-meters", certs / "bs",
                                   binding=STATION.bind(BS))
    station = vm_station(port, issued.cert_path, issued.key_path, certs / "ca.pem")
    station.connect(BS, "bs-meters")
    station.expect("vm.activateCmp")
    ARTIFACTS.mkdir(exist_ok=True)
    driver, profile = start_chromium()
    saved: list[str] = []

    def wait(condition: Callable[[Any], Any], timeout: float = 15) -> Any:
        return WebDriverWait(driver, timeout).until(condition)

    def rows() -> int:
        return len(driver.find_elements(By.CSS_SELECTOR, "[data-stream] tbody tr"))

    try:
        driver.get(url + "/login")
        log_in(driver, url)

        driver.get(url + "/mioty/meters")
        assert "No meters yet" in driver.page_source
        driver.find_element(By.ID, "meter-id").send_keys(METER)
        driver.find_element(By.ID, "meter-key").send_keys(KEY.hex())
        driver.find_element(By.ID, "add-meter-submit").click()
        wait(lambda d: d.current_url == f"{url}/mioty/meters/{METER}")
        assert "added with its key" in driver.page_source and KEY.hex() not in driver.page_source

        for i, (litres, tenths) in enumerate(((1000, 201), (1500, 215), (2250, 198))):
            op = vm_uplink(station, reading(litres, tenths, acc=i), snr=6.0, sys_time=time.time_ns())
            station.expect("vm.ulDataRsp", op)
            time.sleep(0.7)  # past the dedup window: separate frames, separate readings
        driver.get(f"{url}/mioty/meters/{METER}")
        wait(lambda d: rows() == 3)
        field = Select(driver.find_element(By.NAME, "field"))
        assert field.first_selected_option.get_attribute("value") == "volume"
        assert "2.25" in driver.find_element(By.CSS_SELECTOR, "[data-stream] tbody tr").text
        assert painted(driver, "meter-chart")
        saved.append("20-meter.png")
        driver.save_screenshot(str(ARTIFACTS / saved[-1]))

        # Another field: the page reloads with it charted.
        field.select_by_value("flow_temperature")
        wait(lambda d: d.current_url.endswith("?field=flow_temperature"))
        points = driver.execute_script("return JSON.parse(document.getElementById('meter-chart').dataset.points)")
        assert [p["v"] for p in points] == [[20.1], [21.5], [19.8]] and painted(driver, "meter-chart")
        # A new frame shows up live, without reloading.
        wait(lambda d: d.find_element(By.ID, "live-state").get_attribute("data-state") == "live")
        vm_uplink(station, reading(3000, 222, acc=9), snr=6.0, sys_time=time.time_ns())
        wait(lambda d: rows() == 4, timeout=20)
        assert "22.2" in driver.find_element(By.CSS_SELECTOR, "[data-stream] tbody tr").text
        saved.append("21-meter-temperature.png")
        driver.save_screenshot(str(ARTIFACTS / saved[-1]))

        driver.get(url + "/mioty/meters")
        assert METER in driver.find_element(By.CSS_SELECTOR, "table").text
        console = console_of(driver)
        assert not refused_by_csp(console), console
    finally:
        station.close()
        stop_chromium(driver, profile)
    return saved


@pytest_twisted.ensureDeferred
async def test_meter_page_with_its_chart(hub: dict[str, Any]) -> None:  # noqa: F811
    certs = Path(hub["hub"].config.tls.ca).parent
    saved = await threads.deferToThread(browse, hub["url"], hub["bssci_port"], certs)
    assert saved == ["20-meter.png", "21-meter-temperature.png"]
    entries = await hub["hub"].store.fetchall("SELECT action, target FROM audit_log ORDER BY id")
    assert ("mioty.meter.key_set", METER) in entries
