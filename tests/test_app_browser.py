"""The demo page in a real browser: ``app.py --backbone tiny`` on 127.0.0.1, driven by headless
Chromium through Playwright.

Chromium is the distribution's package (``make install-browser``; Playwright's own download is
not used), found on PATH. In CI (``CI=true``) a missing browser fails the test; elsewhere it is
skipped with the reason. ``DIFFSEG_APP_SCREENSHOT=path`` also saves the page's screenshot there
(how assets/app.png is made).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "assets" / "samples"
IN_CI = os.environ.get("CI", "").lower() == "true"


def _need(what: str, found) -> None:
    if found:
        return
    if IN_CI:
        pytest.fail(f"{what} (CI=true: the browser test must run; make install-browser)")
    pytest.skip(what)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    _need("no Chromium on PATH (make install-browser installs the distribution's package)", path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free port with the tiny backbone (small input: a CPU answers in seconds)."""
    _need(
        "gradio is not installed (pip install -e .[app])", shutil.which("true") and _has("gradio")
    )
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, str(REPO / "app.py"), "--backbone", "tiny", "--method", "kmeans_c"]
    cmd += ["--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--image-size", "128", "--resolution", "64"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _image_at(page, selector: str) -> np.ndarray:
    """The picture an <img> of the page shows, fetched from the server."""
    src = page.locator(f"{selector} img").first.get_attribute("src")
    data = page.request.get(src).body() if not src.startswith("data:") else None
    if data is None:
        import base64

        data = base64.b64decode(src.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _upload(page, path: Path) -> None:
    clear = page.locator("#photo button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.locator("#photo input[type=file]").set_input_files(str(path))
    page.locator(f"#photo [aria-label='{path.name}']").first.wait_for(timeout=30_000)


def _src(page) -> str | None:
    img = page.locator("#overlay img")
    return img.first.get_attribute("src") if img.count() else None


def _message(page) -> str:
    """The page's message line (empty when all went well), once no progress is shown."""
    tracker = page.locator("#status [data-testid='status-tracker']")
    busy = ("%", "processing", "segmenting", "loading", "queue")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = page.locator("#status").inner_text()
        hidden = not tracker.count() or "hide" in (tracker.first.get_attribute("class") or "")
        if hidden and not any(word in text for word in busy):
            return text.strip()
        time.sleep(0.2)
    raise AssertionError(f"the page is still busy after 120 s: {text!r}")


def _segment(page) -> str:
    """Press Segment; once a new overlay or a new message is on the page, return the message."""
    before_src, before_status = _src(page), _message(page)
    page.locator("#segment").click()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status, src = _message(page), _src(page)
        if (status != before_status and "error" in status) or (src and src != before_src):
            return status
        time.sleep(0.3)
    raise AssertionError("no overlay and no message after 120 s")


def test_page_segments_a_photo_and_survives_a_corrupt_upload(server, tmp_path):
    url, log = server
    executable = _chromium()
    _need("playwright is not installed (pip install -e .[app])", _has("playwright"))
    from playwright.sync_api import expect, sync_playwright

    sample = SAMPLES / "chelsea.jpg"
    photo = np.asarray(Image.open(sample).convert("RGB"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff this is not a jpeg")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            banner = page.locator("#banner")
            banner.get_by_text("random weights: shapes only").wait_for(timeout=60_000)
            assert banner.is_visible()

            _upload(page, sample)
            number = page.locator("#num_clusters input[type=number]")
            number.fill("5")
            number.press("Enter")
            number.blur()
            expect(page.locator("#num_clusters input[type=range]")).to_have_value("5")
            time.sleep(0.5)  # the value reaches the server with the next event
            assert _segment(page) == ""
            overlay = _image_at(page, "#overlay")
            assert overlay.shape[1] > 2 * photo.shape[1]  # photo | segments | edges, side by side
            assert overlay.shape != photo.shape and overlay.std() > 0
            info = page.locator("#info").inner_text()
            assert "5 segments" in info and "features" in info, info  # the slider was used

            _upload(page, broken)
            status = _segment(page)
            assert "error:" in status and "broken.jpg" in status, status
            assert "Traceback" not in page.content()

            _upload(page, SAMPLES / "coffee.jpg")
            assert _segment(page) == ""
            coffee = np.asarray(Image.open(SAMPLES / "coffee.jpg").convert("RGB"))
            assert _image_at(page, "#overlay").shape[1] > 2 * coffee.shape[1]
            assert banner.is_visible()

            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            if os.environ.get("DIFFSEG_APP_SCREENSHOT"):
                shutil.copy(shot, os.environ["DIFFSEG_APP_SCREENSHOT"])

            # compare: two methods side by side from one feature pass
            page.get_by_role("tab", name="Compare").click()
            page.locator("#compare").click()
            page.locator("#gallery img").nth(1).wait_for(timeout=120_000)
            info = page.locator("#compare_info")
            info.get_by_text("1 feature pass group(s) for 2 methods").wait_for(timeout=30_000)
            assert "kmeans_c" in info.inner_text() and "diffseg" in info.inner_text()

            # a backbone without weights (offline): the weights error is a message on the page
            page.get_by_role("tab", name="Segment").click()
            page.locator("#backbone input").click()
            page.get_by_role("option", name="sd14", exact=True).click()
            status = _segment(page)
            assert "error:" in status and "backbone=sd14" in status, status
        finally:
            browser.close()
    assert "Traceback" not in log.read_text() or "unexpected error" in log.read_text()
