"""Real-browser test of /api/docs: headless Chromium renders Swagger UI from the hub's OpenAPI document.

Every API operation shows, "Try it out" reaches the hub, and the page breaks no rule of the CSP (served offline).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from bsscihub.tap import build_service
from tests.browser.test_dashboard import (
    ARTIFACTS,
    _free_port,
    _require_browser,
    refused_by_csp,
    start_chromium,
    stop_chromium,
)
from tests.conftest import make_config


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[dict[str, Any]]:
    _require_browser()
    port = _free_port()
    config = make_config(tmp_path, families=[], web={"listen": f"tcp:{port}:interface=127.0.0.1"})
    service = build_service(config, {}, reactor, lambda: None)
    service.startService()
    pytest_twisted.blockon(service.when_ready())
    document = service.getServiceNamed("web").web.openapi()
    operations = sum(len(item) for item in document["paths"].values())
    yield {"url": f"http://127.0.0.1:{port}", "operations": operations}
    pytest_twisted.blockon(service.stopService())


def browse(url: str) -> dict[str, Any]:
    """Blocking, on a thread: open /api/docs, count the operations, try one, collect the console."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(exist_ok=True)
    driver, profile = start_chromium()
    try:
        driver.get(url + "/api/docs")
        wait = WebDriverWait(driver, 20)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) > 0)
        title = driver.find_element(By.CSS_SELECTOR, ".info .title").text
        operations = len(driver.find_elements(By.CSS_SELECTOR, ".opblock"))
        # Open GET /openapi.json, try it out, execute: the answer comes from the hub itself.
        block = driver.find_element(By.ID, "operations-hub-openapi")
        block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
        block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
        block.find_element(By.CSS_SELECTOR, ".execute").click()
        wait.until(lambda d: block.find_elements(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"))
        status = block.find_element(By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status").text
        driver.save_screenshot(str(ARTIFACTS / "api-docs.png"))
        console = [entry["message"] for entry in driver.get_log("browser")]
        return {"title": title, "operations": operations, "status": status, "console": console}
    finally:
        stop_chromium(driver, profile)


@pytest_twisted.ensureDeferred
async def test_swagger_ui_renders_every_operation_under_the_csp(hub: dict[str, Any]) -> None:
    seen = await threads.deferToThread(browse, hub["url"])
    assert seen["title"].startswith("bsscihub API")
    assert seen["operations"] == hub["operations"]
    assert seen["status"].strip() == "200"
    violations = refused_by_csp(seen["console"])
    assert not violations, violations
