"""The admin page in a real headless Chromium against a real server subprocess.

Signs in, creates a key and reads it off the page, uses it against the API, finds the usage
on the Usage page, revokes the key (the next API call is a 401), pulls a model from a
loopback URL while watching the progress bar reach 100 %, and checks the Live page polls.
Screenshots of every page (and a phone-width one) go to ``test-output/screenshots/``; page
response times against the real server are printed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.admin.range_server import RangeServer
from tests.support.tiny_qwen35 import write_tiny_qwen35

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "test-output" / "screenshots"
PASSWORD = "browser test password"
SERVED = "tiny-qwen35"
PULLED = "tiny-qwen35moe-pulled"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin"),
]
sync_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("admin-browser")
    data, models = root / "data", root / "models"
    models.mkdir()
    write_tiny_qwen35(models / f"{SERVED}.gguf", moe=False)
    appliance = [sys.executable, "-m", "appliance"]
    done = subprocess.run(
        [*appliance, "admin", "set-password", "--password", PASSWORD, "--data-dir", str(data)],
        capture_output=True, text=True, env=_env(), timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    port = _free_port()
    log_path = root / "server.log"
    command = [
        *appliance, "serve", "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data), "--models-dir", str(models),
        "--threads", "1", "--ctx-size", "1024", "--parallel", "2",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_env())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _shot(page: object, name: str) -> None:
    # caret="initial": hiding the caret would inject a <style>, which the page's CSP blocks.
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True, caret="initial")  # type: ignore[attr-defined]


def _chat(base: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6},
        timeout=60,
    )


def _response_times(base: str, cookies: dict[str, str]) -> None:
    rows = []
    with httpx.Client(base_url=base, cookies=cookies) as client:
        for path in ("/admin/live", "/admin/models", "/admin/keys", "/admin/usage"):
            for headers in ({}, {"HX-Request": "true"}):
                times = []
                for _ in range(20):
                    start = time.perf_counter()
                    response = client.get(path, headers=headers)
                    times.append((time.perf_counter() - start) * 1000)
                    assert response.status_code == 200, (path, response.status_code)
                kind = "fragment" if headers else "full"
                rows.append((path, kind, statistics.median(times), max(times)))
    print("\nadmin page response times (real server over loopback, 20 GETs each):")
    for path, kind, median, worst in rows:
        print(f"  {path:<14} {kind:<8} median {median:6.2f} ms   max {worst:6.2f} ms")


def test_admin_page_in_a_real_browser(server: str, tmp_path: Path) -> None:
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    served = tmp_path / "serve"
    served.mkdir()
    pulled_file = write_tiny_qwen35(served / f"{PULLED}.gguf", moe=True)
    problems: list[str] = []

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(15_000)

        def on_console(message: object) -> None:
            text = message.text  # type: ignore[attr-defined]
            # Expected: the wrong password's 401 and the bad price's 400 (Chromium logs them).
            expected = "Failed to load resource: the server responded with a status of 4"
            if message.type == "error" and not text.startswith(expected):  # type: ignore[attr-defined]
                problems.append(text)

        page.on("console", on_console)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("dialog", lambda dialog: dialog.accept())  # hx-confirm on revoke

        # -- sign in --
        page.goto(f"{server}/admin/keys")
        assert "/admin/login" in page.url
        _shot(page, "login")
        page.fill("#password", "wrong password")
        page.click("button[type=submit]")
        sync_api.expect(page.locator("#login-error")).to_contain_text("Wrong password")
        page.fill("#password", PASSWORD)
        page.press("#password", "Enter")  # the keyboard works too
        page.wait_for_url("**/admin/keys")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"

        # -- create a key and read it off the page --
        page.fill("#new-name", "browser")
        page.fill("#new-credits", "10")
        page.click("text=Create key")
        key = page.locator("#new-key").inner_text().strip()
        assert re.fullmatch(r"apl_\w+", key), key
        assert page.locator("[data-copy=new-key]").is_visible()
        _shot(page, "keys")
        page.click("text=Create a key")
        page.click("text=Edit “browser”")
        _shot(page, "keys-forms")

        # -- use it against the API; its usage shows up --
        response = _chat(server, key)
        assert response.status_code == 200, response.text
        page.click("nav#nav >> text=Usage")
        page.wait_for_url("**/admin/usage")
        row = page.locator("table.usage").first.locator("tr", has_text="browser")
        sync_api.expect(row).to_contain_text("1")
        sync_api.expect(page.locator("svg.chart")).to_be_visible()
        page.click(".segmented >> text=Last 24 hours")
        page.wait_for_url("**period=24h")
        sync_api.expect(page.locator("table.usage").first).to_contain_text("browser")
        _shot(page, "usage")

        # -- revoke it: the next API call fails --
        page.click("nav#nav >> text=Keys")
        page.click("text=Edit “browser”")
        page.click("text=Revoke “browser”")
        sync_api.expect(page.locator(".flash.ok")).to_contain_text("Revoked")
        assert key not in page.content()
        assert _chat(server, key).status_code == 401

        # -- pull a model from a loopback URL, watching the progress --
        page.click("nav#nav >> text=Models")
        page.wait_for_url("**/admin/models")
        with RangeServer(pulled_file, rate=160_000) as files:
            page.fill("#pull-url", files.url)
            page.click("form.pull-form >> text=Pull")
            bar = page.locator(f".pull:has-text('{pulled_file.name}') progress")
            sync_api.expect(bar).to_be_visible()
            page.wait_for_function(
                "() => { const b = document.querySelector('.pull progress');"
                " return b && Number(b.value) > 5 && Number(b.value) < 100; }"
            )
            _shot(page, "models-pulling")
            sync_api.expect(page.locator(".pull")).to_contain_text("100 %", timeout=30_000)
        sync_api.expect(page.locator(f"tr[data-model='{PULLED}']")).to_be_visible()
        sync_api.expect(page.locator(".pull")).to_contain_text(f"Added as {PULLED}")
        _shot(page, "models")

        # -- an alias, a bad price (a message, the page stays), the delete confirmation --
        row = page.locator(f"tr[data-model='{PULLED}']")
        row.locator("summary").click()
        row.locator("input[name=alias]").fill("chat")
        row.locator("text=Add alias").click()
        sync_api.expect(page.locator(f"tr[data-model='{PULLED}'] .chip")).to_contain_text("chat")
        row.locator("summary").click()
        row.locator("input[name=input]").fill("cheap")
        row.locator("text=Save prices").click()
        sync_api.expect(page.locator(".flash.error")).to_contain_text("Input price")
        row.locator("text=Delete…").click()
        sync_api.expect(page.locator(".confirm")).to_contain_text(f"Delete {PULLED}?")
        _shot(page, "models-confirm")
        page.click(".confirm >> text=Cancel")
        sync_api.expect(page.locator(".confirm")).to_have_count(0)

        # -- live: the fragment polls --
        page.click("nav#nav >> text=Live")
        page.wait_for_url("**/admin/live")
        stamp = page.locator("#live .title-row .muted").inner_text()
        page.wait_for_function(
            "s => document.querySelector('#live .title-row .muted').innerText !== s",
            arg=stamp,
            timeout=6_000,
        )
        sync_api.expect(page.locator("#live")).to_contain_text(SERVED)
        _shot(page, "live")

        # -- phone width --
        phone = browser.new_context(
            viewport={"width": 390, "height": 844}, storage_state=context.storage_state()
        )
        small = phone.new_page()
        small.goto(f"{server}/admin/models")
        assert small.evaluate("document.documentElement.scrollWidth") <= 390
        _shot(small, "phone-models")
        small.goto(f"{server}/admin/keys")
        assert small.evaluate("document.documentElement.scrollWidth") <= 390
        _shot(small, "phone-keys")
        cookies = {c["name"]: c["value"] for c in context.cookies()}
        browser.close()

    assert not problems, problems  # no script errors, no CSP violations
    _response_times(server, cookies)
