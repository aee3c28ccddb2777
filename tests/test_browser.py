"""The app in a real browser: Debian's headless Chromium (packages chromium and chromium-driver).

The first test needs only the chromium binary (``--dump-dom`` and ``--screenshot``); the others
drive the page with Selenium through chromedriver: at 1280x800 the explanation panel is on screen
and no memory-plan size wraps; then it opens the settings, makes calibration and evaluation small,
presses Prune & evaluate and waits for the perplexity table. Screenshots land in artifacts/
(git-ignored; assets/app.png, the README's, is the 1280x800 one).
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


def selenium_driver(profile: Path, width: int, height: int):
    """Chromium driven through chromedriver, its window ``width`` x ``height``."""
    pytest.importorskip("selenium", reason="pip install selenium to drive the page")
    if CHROMEDRIVER is None:
        pytest.skip("no chromedriver (apt-get install chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


# Lines a piece of the page takes: the distinct tops of the line boxes of its text (a Range's
# client rects: one per line fragment, so a wrapped cell or a split "1.2 GiB" has two tops).
LINES_JS = """
const lines = (range) => new Set([...range.getClientRects()].filter(r => r.width > 0)
                                 .map(r => Math.round(r.top))).size;
const plan = document.getElementById("memory-plan");
const cells = [...plan.querySelectorAll("td.size, td.place")].map(td => {
  const range = document.createRange(); range.selectNodeContents(td);
  return [td.textContent, lines(range)];
});
const sizes = [];
const walker = document.createTreeWalker(plan, NodeFilter.SHOW_TEXT);
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  for (const m of node.data.matchAll(/\\d+(\\.\\d+)?\\s(GiB|MiB|KiB|B)\\b/g)) {
    const range = document.createRange();
    range.setStart(node, m.index); range.setEnd(node, m.index + m[0].length);
    sizes.push([m[0], lines(range)]);
  }
}
return {cells, sizes};
"""


def test_the_lab_page_at_1280x800_explains_and_plans_without_wrapping(server, tmp_path):
    """A classroom's projector: the "What is happening" panel is on screen beside the controls,
    and no memory-plan size or place breaks over two lines ("Gi B")."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = selenium_driver(tmp_path / "selenium", 1280, 800)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: "parameters" in d.find_element(By.CLASS_NAME, "model-info").text)
        plan = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#memory-plan details"))
        width, height = driver.execute_script("return [window.innerWidth, window.innerHeight]")
        assert width == 1280, width

        rect = "return arguments[0].getBoundingClientRect().toJSON()"
        panel = driver.find_element(By.ID, "what-is-happening")
        box = driver.execute_script(rect, panel)
        controls = driver.execute_script(rect, driver.find_element(By.ID, "controls-column"))
        assert panel.is_displayed() and "|Wij| · ‖Xj‖2" in panel.text and "Perplexity" in panel.text
        assert 0 <= box["top"] and box["bottom"] <= height, (box, height)  # all of it on screen
        assert box["right"] <= controls["left"] and box["bottom"] > controls["top"]  # beside them

        assert not driver.find_element(By.CSS_SELECTOR, "#memory-plan table").is_displayed()  # folded
        plan.find_element(By.TAG_NAME, "summary").click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#memory-plan table").is_displayed())
        found = driver.execute_script(LINES_JS)
        assert len(found["cells"]) >= 8 and len(found["sizes"]) >= 6, found  # 4+ rows, their sizes, totals
        assert [c for c in found["cells"] if c[1] != 1] == [], found
        assert [s for s in found["sizes"] if s[1] != 1] == [], found
        assert driver.find_element(By.TAG_NAME, "body").text.count("Memory") == 1  # once, no "Memory:" line

        plan.find_element(By.TAG_NAME, "summary").click()  # folded again, as a visitor first sees it
        driver.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "lab-1280x800.png"
        driver.save_screenshot(str(shot))
        assert png_size(shot)[0] == 1280 and shot.stat().st_size > 50_000
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(shot, ARTIFACTS / shot.name)
        print(f"screenshot: {shot} (and {ARTIFACTS / shot.name})")
    finally:
        driver.quit()


def test_prune_and_evaluate_by_clicking(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = selenium_driver(tmp_path / "selenium", WIDTH, HEIGHT)
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
