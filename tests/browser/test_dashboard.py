"""Real-browser test: headless Chromium (Selenium) against a whole running hub fed by `bsscihub sim`.

Logs in, adds a sensor, sees its uplinks arrive live on the dashboard, logs out; screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, threads

from bsscihub import pki, users
from bsscihub.family import installed_families
from bsscihub.tap import build_service
from tests.conftest import make_config

pytest_plugins = ["tests.broker"]

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PASSWORD = "browser-test-password"


def _require_browser() -> None:
    problems = [f"{path} not found" for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        problems.append("selenium is not installed (pip install selenium)")
    if problems:
        reason = ("real-browser test needs Chromium: " + "; ".join(problems)
                  + " (apt-get install chromium chromium-driver)")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


def start_chromium() -> tuple[Any, str]:
    """Headless Chromium through chromedriver with a throwaway profile, its console log kept (blocking)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="bsscihub-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options), profile


def stop_chromium(driver: Any, profile: str) -> None:
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def log_in(driver: Any, url: str) -> None:
    """On the login page: signs in as admin and waits for the dashboard (blocking)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "username").send_keys("admin")
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, 15).until(lambda d: d.current_url == url + "/")


def painted(driver: Any, canvas: str) -> bool:
    """Whether the canvas with this id has a pixel that is not transparent: a chart was drawn on it."""
    return bool(driver.execute_script(
        "var c = document.getElementById(arguments[0]);"
        "var d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "for (var i = 3; i < d.length; i += 4) { if (d[i] !== 0) return true; } return false;", canvas))


def console_of(driver: Any) -> list[str]:
    """What the pages wrote to the browser's console (since the last call)."""
    return [entry["message"] for entry in driver.get_log("browser")]


def refused_by_csp(console: list[str]) -> list[str]:
    """The console's lines saying the Content Security Policy refused something."""
    return [m for m in console if "Content Security Policy" in m or "Refused" in m]


def _free_port() -> int:
    from tests.broker import free_port

    return free_port()


@pytest.fixture
def hub(tmp_path: Path, mosquitto: Any) -> Iterator[dict[str, Any]]:
    _require_browser()
    certs = tmp_path / "certs"
    web_port, bssci_port = _free_port(), _free_port()
    config = make_config(
        tmp_path,
        families=["mioty"],
        web={"listen": f"tcp:{web_port}:interface=127.0.0.1"},
        bssci={"listen": f"tcp:{bssci_port}:interface=127.0.0.1"},
        mqtt={"url": f"mqtt://127.0.0.1:{mosquitto.port}"},
        tls={"ca": str(certs / "ca.pem"), "ca_key": str(certs / "ca.key"), "cert": str(certs / "hub.pem"),
             "key": str(certs / "hub.key")},
    )
    pki.create_ca(config.tls.ca, config.tls.ca_key)
    pki.issue_server_cert(config.tls.ca, config.tls.ca_key, config.tls.cert, config.tls.key)
    failed: list[bool] = []
    service = build_service(config, {"mioty": installed_families()["mioty"]}, reactor, lambda: failed.append(True))
    service.startService()
    pytest_twisted.blockon(service.when_ready())
    pytest_twisted.blockon(defer.ensureDeferred(users.add_user(service.hub.store, "admin", "admin", PASSWORD)))
    yield {"url": f"http://127.0.0.1:{web_port}", "bssci_port": bssci_port, "config": tmp_path / "hub.yaml",
           "hub": service.hub}
    pytest_twisted.blockon(service.stopService())


def _sim(config: Path, port: int) -> subprocess.Popen[bytes]:
    bsscihub = Path(sys.executable).with_name("bsscihub")
    return subprocess.Popen(
        [str(bsscihub), "sim", "--config", str(config), "--port", str(port), "--base-stations", "2",
         "--sensors", "1", "--copies", "2", "--rate", "2", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def browse(url: str, config: Path, bssci_port: int, sensor: dict[str, Any]) -> list[str]:
    """The whole browser session (blocking, on a thread); returns the screenshots saved."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(exist_ok=True)
    driver, profile = start_chromium()
    saved: list[str] = []
    sim = None

    def wait(condition: Callable[[Any], Any], timeout: float = 15) -> Any:
        return WebDriverWait(driver, timeout).until(condition)

    def shot(name: str, *, full: bool = True) -> None:
        path = ARTIFACTS / f"{name}.png"
        if full:
            # The whole page, not only the window: Chrome renders beyond the viewport on request.
            width, height = driver.execute_script(
                "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
            image = driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 4000), "scale": 1}})
            path.write_bytes(base64.b64decode(image["data"]))
        else:
            driver.save_screenshot(str(path))
        saved.append(path.name)

    def visit(path: str) -> None:
        driver.set_window_size(1280, 900)
        driver.get(url + path)

    eui = sensor["eui"]
    try:
        visit("/")
        wait(lambda d: d.current_url.startswith(url + "/login"))
        shot("01-login", full=False)
        log_in(driver, url)

        visit("/mioty/sensors")
        driver.find_element(By.ID, "sensor-eui").send_keys(eui)
        driver.find_element(By.ID, "sensor-short").send_keys(sensor["shortAddr"])
        driver.find_element(By.ID, "sensor-key").send_keys(sensor["nwKey"])
        driver.find_element(By.ID, "add-sensor-submit").click()
        wait(lambda d: d.current_url == f"{url}/mioty/sensors/{eui}")
        assert "added and attached" in driver.page_source

        visit("/")
        wait(lambda d: d.find_element(By.ID, "live-state").get_attribute("data-state") == "live")
        topic = f"mioty/ep/{eui}/up"
        assert topic not in driver.find_element(By.ID, "events").text  # no uplink yet: what follows is live
        sim = _sim(config, bssci_port)
        wait(lambda d: topic in d.find_element(By.ID, "events").text, timeout=30)
        time.sleep(2)  # a few more rows and bars for the screenshot
        assert driver.find_element(By.ID, "count-mioty-baseStations").text.startswith(("0", "1", "2"))
        shot("02-dashboard")

        visit("/mioty/sensors")
        shot("03-sensors")
        visit(f"/mioty/sensors/{eui}")
        rows = len(driver.find_elements(By.CSS_SELECTOR, "[data-stream] tbody tr"))
        wait(lambda d: len(d.find_elements(By.CSS_SELECTOR, "[data-stream] tbody tr")) > rows, timeout=20)
        shot("04-sensor")
        visit("/mioty/base-stations")
        shot("05-base-stations")
        driver.find_element(By.CSS_SELECTOR, "td.mono a").click()
        wait(lambda d: "/mioty/base-stations/" in d.current_url)
        shot("06-base-station")
        for name, path in (("07-certificates", "/certificates"), ("08-users", "/users"), ("09-audit", "/audit"),
                           ("10-logs", "/logs"), ("11-config", "/config"), ("12-account", "/account")):
            visit(path)
            shot(name)

        driver.set_window_size(390, 844)
        driver.get(url + "/")
        wait(lambda d: d.find_element(By.ID, "live-state").get_attribute("data-state") == "live")
        shot("13-phone-dashboard", full=False)
        driver.get(f"{url}/mioty/sensors/{eui}")
        shot("14-phone-sensor", full=False)
        # Nothing on the page may be wider than a phone screen (tables scroll inside their card).
        overflow = driver.execute_script("return document.documentElement.scrollWidth")
        assert overflow <= 390, overflow

        console = console_of(driver)
        assert not refused_by_csp(console), console

        driver.set_window_size(1280, 900)
        driver.find_element(By.ID, "logout").click()
        wait(lambda d: d.current_url.startswith(url + "/login"))
        driver.get(url + "/")
        wait(lambda d: d.current_url.startswith(url + "/login"))
    finally:
        if sim is not None:
            sim.send_signal(signal.SIGINT)
            try:
                sim.wait(10)
            except subprocess.TimeoutExpired:
                sim.kill()
        stop_chromium(driver, profile)
    return saved


@pytest_twisted.ensureDeferred
async def test_login_add_sensor_live_uplink_logout(hub: dict[str, Any]) -> None:
    from bsscihub.protocols.bssci.sim._plan import endpoints

    sensor = endpoints(1)[0]
    saved = await threads.deferToThread(browse, hub["url"], hub["config"], hub["bssci_port"], sensor)
    assert len(saved) == 14
    entries = await hub["hub"].store.fetchall("SELECT actor, action, target FROM audit_log ORDER BY id")
    assert ("admin", "mioty.sensor.create", sensor["eui"]) in entries
    assert [a for _, a, _ in entries if a.startswith("auth.")] == ["auth.login", "auth.logout"]
