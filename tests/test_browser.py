"""The app in a real browser: Debian's headless Chromium (packages chromium and chromium-driver).

The first test needs only the chromium binary (``--dump-dom`` and ``--screenshot``); the second
drives the page with Selenium through chromedriver: it opens the settings, makes calibration and
evaluation small, presses Prune & evaluate and waits for the perplexity table. Screenshots land in
artifacts/ (git-ignored).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.model]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
WIDTH, HEIGHT = 1600, 2300


@pytest.fixture(scope="module")
def server():
    if CHROMIUM is None:
        pytest.skip("no chromium binary (apt-get install chromium chromium-driver)")
    from app_server import start

    return start()


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240)


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


def test_page_renders_sliders_buttons_and_tabs(server, tmp_path):
    dom = chromium("--virtual-time-budget=30000", "--dump-dom", server.url, profile=tmp_path / "dom").stdout
    assert len(re.findall(r'type="range"', dom)) == 12  # all, attention, MLP, seven roles, two layer bounds
    for text in ("Prune &amp; evaluate", "Load model", "Generate both", "Run tasks", "Run study", "Allocate"):
        assert text in dom, text
    for tab in ("Side by side", "Downstream", "Sensitivity", "Export"):
        assert tab in dom, tab
    assert "Will prune" in dom and "53.1" in dom  # the live readout for 50 % of SmolLM2's 106.2 M weights

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "app-page.png"
    shot.unlink(missing_ok=True)
    chromium(f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=30000", f"--screenshot={shot}",
             server.url, profile=tmp_path / "shot")  # fmt: skip
    assert png_size(shot) == (WIDTH, HEIGHT)
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one


def test_prune_and_evaluate_by_clicking(server, tmp_path):
    pytest.importorskip("selenium", reason="pip install selenium to drive the page")
    if CHROMEDRIVER is None:
        pytest.skip("no chromedriver (apt-get install chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'selenium'}", f"--window-size={WIDTH},{HEIGHT}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 120)
        button = wait.until(lambda d: d.find_element(By.ID, "prune-button"))
        driver.find_element(By.CSS_SELECTOR, "#settings button").click()  # open the accordion
        for elem_id, value in (("nsamples", 4), ("seqlen", 128), ("eval-windows", 2), ("eval-seqlen", 128)):
            box = wait.until(lambda d, e=elem_id: d.find_element(By.CSS_SELECTOR, f"#{e} input"))
            box.clear()
            box.send_keys(str(value))
        button.click()
        WebDriverWait(driver, 420, poll_frequency=2).until(
            lambda d: "Run #" in d.find_element(By.ID, "run-status").text
        )
        status = driver.find_element(By.ID, "run-status").text
        assert "50.0 % of attention + MLP weights pruned" in status
        lines = driver.find_element(By.ID, "ppl-table").text.splitlines()
        row = lines[lines.index("wikitext2") + 1 :]  # dataset, dense, pruned, ratio, size
        dense, pruned = float(row[0]), float(row[1])
        assert 1 < dense < pruned
        ARTIFACTS.mkdir(exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(ARTIFACTS / "app-results.png"))
        assert png_size(ARTIFACTS / "app-results.png")[0] == WIDTH
    finally:
        driver.quit()
