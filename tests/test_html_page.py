"""The interactive page of `sweep pareto --html`, opened in a real headless Chromium (Debian's
chromium + chromium-driver, installed by .ci/run): it loads offline with no console error, draws
the three plots, a click on a point or a table row shows that trial's decoder JSON and
--optimizations string, and the filters work. Also renders the committed lt-pareto results and
screenshots them (TTSWEEP_SAVE_SCREENSHOT=docs/report-page.png writes the README's screenshot)."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "data"))
from committed_points import committed_analysis  # noqa: E402  (test fixture)
from synthetic_study import build_study, journal_storage  # noqa: E402  (test fixture)

from sweep.cli import main  # noqa: E402

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FRONT_RGB, KNEE_RGB = (214, 39, 40), (44, 160, 44)  # sweep.plots.C_FRONT, C_KNEE


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        if os.environ.get("CI"):
            pytest.fail("chromium / chromium-driver missing: .ci/run installs them (apt-get install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}", "--window-size=1400,1300"):
        opts.add_argument(a)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> list[dict]:
    """Load the page; return its console messages of level SEVERE (errors)."""
    driver.get(path.resolve().as_uri())
    deadline = time.monotonic() + 30
    while driver.execute_script("return document.querySelectorAll('.js-plotly-plot').length") < 3:
        assert time.monotonic() < deadline, "the plots were not drawn"
        time.sleep(0.1)
    return [m for m in driver.get_log("browser") if m["level"] == "SEVERE"]


def n_markers(driver, plot: str) -> int:
    """Trial markers drawn in a plot (the knee's ring is a marker too: not counted)."""
    return driver.execute_script(
        f"const gd = document.getElementById('{plot}');"
        "return gd.querySelectorAll('.scatterlayer .trace path.point').length"
        " - gd.data.filter((t) => t.name === 'knee').length;")


def click_point(driver, plot: str, index: int = 0) -> str:
    """Click a marker with the mouse (Plotly's own hit test); return the selected trial's heading."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    marks = driver.find_elements(By.CSS_SELECTOR, f"#{plot} .scatterlayer .trace path.point")
    ActionChains(driver).move_to_element(marks[index]).click().perform()
    deadline = time.monotonic() + 5
    while not driver.find_element(By.ID, "detail-head").text:
        assert time.monotonic() < deadline, "a click on a point showed nothing"
        time.sleep(0.05)
    return driver.find_element(By.ID, "detail-head").text


def shown(driver) -> tuple[dict, str]:
    from selenium.webdriver.common.by import By

    return json.loads(driver.find_element(By.ID, "json").text), driver.find_element(By.ID, "opt").text


def test_page_from_sweep_pareto(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from sweep.html import page_data
    from sweep.pareto import analyze, open_study

    log = tmp_path / "lt-pareto.log"
    build_study(storage=journal_storage(log), constraints=lambda r: {"top1": 89.0 - r.top1})  # some infeasible
    page = tmp_path / "site" / "index.html"
    page.parent.mkdir()  # `sweep pareto` creates no folder the user did not ask for
    assert main(["pareto", str(log), "--out", str(tmp_path / "plots"), "--html", str(page)]) == 0
    text = page.read_text()
    assert not re.search(r"<script[^>]*\bsrc=|<link\b", text), "the page must not load anything from elsewhere"
    data = page_data(analyze(open_study(str(log))))
    by_n = {p["n"]: p for p in data["points"]}
    infeasible = [p["n"] for p in data["points"] if not p["feasible"]]
    assert infeasible and len(infeasible) < len(by_n)

    assert open_page(browser, page) == []
    dev = data["devices"][0]
    assert n_markers(browser, "plot-speed") == len(by_n)
    assert n_markers(browser, "plot-top5") == len(by_n)
    title = browser.execute_script("return document.getElementById('plot-speed').layout.title.text")
    assert dev in title and "Speed vs Top-1" in title

    # a click on a point shows its decoder JSON and --optimizations string
    head = click_point(browser, "plot-speed", 0)
    n = int(re.match(r"Trial (\d+):", head).group(1))
    assert shown(browser) == (by_n[n]["decoder_json"], by_n[n]["optimizations"])
    button = browser.find_element(By.CSS_SELECTOR, "button[data-copy=opt]")
    button.click()
    time.sleep(0.3)
    assert button.text in ("copied", "copy")  # "copied", then back after 1.2 s
    # a click on a table row does the same
    other = next(k for k in by_n if k != n)
    browser.find_element(By.CSS_SELECTOR, f"#all-table tr[data-n='{other}']").click()
    assert browser.find_element(By.ID, "detail-head").text.startswith(f"Trial {other}:")
    assert shown(browser) == (by_n[other]["decoder_json"], by_n[other]["optimizations"])

    # filters: constraint, minimum Top-1, device
    browser.find_element(By.ID, "infeasible").click()
    assert n_markers(browser, "plot-speed") == len(by_n) - len(infeasible)
    box = browser.find_element(By.ID, "mintop1")
    box.clear()
    box.send_keys("90")
    keep = [p for p in data["points"] if p["feasible"] and p["top1"] >= 90]
    assert browser.find_element(By.ID, "count").text == f"{len(keep)} of {len(by_n)} trials shown"
    assert n_markers(browser, "plot-speed") == len(keep)
    rows = browser.find_elements(By.CSS_SELECTOR, "#all-table tr[data-n]")
    assert sorted(int(r.get_attribute("data-n")) for r in rows) == sorted(p["n"] for p in keep)
    other_dev = data["devices"][1]
    browser.execute_script(f"const s = document.getElementById('device'); s.value = '{other_dev}';"
                           "s.dispatchEvent(new Event('input'));")
    assert other_dev in browser.execute_script("return document.getElementById('plot-speed').layout.title.text")
    front_rows = browser.find_elements(By.CSS_SELECTOR, "#front-table tr[data-n]")
    assert [int(r.get_attribute("data-n")) for r in front_rows] == [
        k for k in data["fronts"][other_dev]["speed"] if by_n[k]["top1"] >= 90]
    assert [m for m in browser.get_log("browser") if m["level"] == "SEVERE"] == []


def _count(img, rgb, tol=30) -> int:
    px = img.convert("RGB").get_flattened_data() if hasattr(img, "get_flattened_data") else img.convert("RGB").getdata()
    return sum(1 for p in px if all(abs(a - b) <= tol for a, b in zip(p, rgb)))


def test_committed_results_page_screenshot(browser, tmp_path):
    from PIL import Image

    from sweep.html import write_page

    page = write_page(committed_analysis(), tmp_path / "index.html")
    assert open_page(browser, page) == []
    head = click_point(browser, "plot-speed", n_markers(browser, "plot-speed") - 1)
    assert head.startswith("Trial ")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ActionChains(browser).move_to_element(browser.find_element(By.ID, "title")).perform()  # no hover box
    time.sleep(0.4)
    shot = tmp_path / "page.png"
    browser.save_screenshot(str(shot))
    img = Image.open(shot)
    assert img.size[0] >= 1200 and img.size[1] >= 1000
    assert _count(img, FRONT_RGB) > 300, "no front drawn"  # red front line and markers
    assert _count(img, KNEE_RGB) > 30, "no knee ring drawn"
    target = os.environ.get("TTSWEEP_SAVE_SCREENSHOT")
    if target:
        shutil.copy(shot, target)
