"""The status page in a real headless browser (Chromium through Selenium): it shows the backends,
queues and bucket levels of the live gateway and refreshes by itself, behind the admin token
(HTTP Basic, what a browser can send), and every worker's rows under ``--workers 2``. Skipped,
with the install lines, where no browser is."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import MakeAdmin, MakeGateway, policy_text, until
from tests.integration.stub import StubBackend

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"
TIMEOUT_S = 20.0


def _missing(what: str) -> None:
    """Skip where a browser cannot be had; under CI (.ci/run installs one) that is a failure."""
    message = f"{what} ({INSTALL})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _driver_or_skip() -> Any:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        _missing("no Chromium and chromedriver on this machine")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    # the driver named here: Selenium would otherwise try to download one
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    driver = _driver_or_skip()
    try:
        yield driver
    finally:
        driver.quit()


def _text(browser: Any, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, selector)]


async def _shown(browser: Any, selector: str, want: str) -> None:
    """Wait until an element matching ``selector`` shows ``want`` (the page updates itself)."""
    try:
        await until(lambda: want in _text(browser, selector), TIMEOUT_S)
    except TimeoutError:
        shown = _text(browser, selector), _text(browser, "#summary"), _text(browser, "#error")
        raise AssertionError(f"{selector} never showed {want!r}: {shown}") from None


async def test_the_status_page_shows_the_live_gateway_and_refreshes_by_itself(
    browser: Any,
    make_gateway: MakeGateway,
    admin: MakeAdmin,
    stub: StubBackend,
    stub_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", "s3cret")
    text = policy_text([stub_url]).replace(
        "server:\n", "server:\n  admin: {host: 0.0.0.0, token: env:ADMIN_TOKEN}\n", 1
    )
    client, _ = await make_gateway(text)
    ops = await admin(client)
    port = ops.server.port
    # the browser asks once (HTTP Basic, the token as the password) and sends it on every fetch
    url = f"http://operator:s3cret@127.0.0.1:{port}/status"
    await asyncio.to_thread(browser.get, url)
    await _shown(browser, "#backends td.phase", "ready")
    assert stub_url in _text(browser, "#backends td")
    assert "m1" in _text(browser, "#queues td")
    limits = _text(browser, "#limits td")
    assert "tenant acme's requests limit of 1000/s" in limits
    assert "model m1" not in limits  # m1 has no limits of its own here
    assert _text(browser, "#error") == [""]
    assert "s3cret" not in browser.page_source

    # a request held in flight shows up without reloading the page
    stub.hold_first_byte = True
    held = asyncio.ensure_future(
        client.post(
            "/v1/chat/completions",
            json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]},
        )
    )
    await until(lambda: stub.requests)
    before = browser.find_element("css selector", "body").get_attribute("data-updates")
    await _shown(browser, "#backends td.inflight", "1")
    after = browser.find_element("css selector", "body").get_attribute("data-updates")
    assert int(after) > int(before)
    assert browser.current_url.endswith("/status")
    stub.release.set()
    assert (await held).status == 200
    await _shown(browser, "#backends td.inflight", "0")


async def test_the_status_page_says_when_it_cannot_update(
    browser: Any,
    make_gateway: MakeGateway,
    admin: MakeAdmin,
    stub_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ADMIN_TOKEN", "s3cret")
    text = policy_text([stub_url]).replace(
        "server:\n", "server:\n  admin: {host: 0.0.0.0, token: env:ADMIN_TOKEN}\n", 1
    )
    client, _ = await make_gateway(text)
    ops = await admin(client)
    await asyncio.to_thread(
        browser.get, f"http://operator:s3cret@127.0.0.1:{ops.server.port}/status"
    )
    await _shown(browser, "#backends td.phase", "ready")
    await ops.server.close()  # the admin listener goes away under the open page
    await until(lambda: any("not updated" in t for t in _text(browser, "#error")), TIMEOUT_S)


async def test_the_status_page_of_a_worker_group_shows_every_worker(
    browser: Any, tmp_path: Path, stub_url: str
) -> None:
    from tests.integration.test_workers import _start_group

    proc, _, admin = await _start_group(tmp_path, stub_url)
    try:
        await asyncio.to_thread(browser.get, f"{admin}/status")
        await _shown(browser, "#backends td.worker", "1")
        assert sorted(_text(browser, "#backends td.worker")) == ["0", "1"]
        assert sorted(_text(browser, "#queues td.worker")) == ["0", "1"]
        summary = _text(browser, "#summary")[0]
        assert "worker 0: policy" in summary
        assert "worker 1: policy" in summary
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
