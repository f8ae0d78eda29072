"""The run report as a reader sees it: rendered in headless Chromium (Debian's chromium and
chromium-driver, installed by `make browser`; selenium drives it, downloading nothing).

Checks: every panel's image is loaded and non-empty; the page makes no network request; it fits
a phone's width without sideways scrolling and lays panels side by side on a desktop; a metric
whose whole range is 0.01 (TRPO's step KL, the figure TRPO is about) is drawn across its
panel, measured on the pixels the browser decoded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trustrl.report import write_report

from test_report import _write_run, _write_samples  # the synthetic runs of test_report.py
from trustrl.report.plot import RUN_COLORS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[test]')")
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("chromium / chromedriver missing: run `make browser` (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# Per panel: the image's state, and the vertical spread of the pixels drawn in the EMA colour,
# read back from a canvas (data: images do not taint it).
_INSPECT = """
const [hex] = arguments;
const want = [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
return Array.from(document.querySelectorAll('figure.panel')).map(fig => {
  const img = fig.querySelector('img');
  const r = {metric: fig.dataset.metric, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
             shownW: img.getBoundingClientRect().width, top: fig.getBoundingClientRect().top,
             rows: null, distinctColors: 0};
  if (img.complete && img.naturalWidth > 0) {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let lo = Infinity, hi = -Infinity;
    const colors = new Set();
    for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
      const k = 4 * (y * c.width + x);
      colors.add((d[k] << 16) | (d[k + 1] << 8) | d[k + 2]);
      if (Math.abs(d[k] - want[0]) < 10 && Math.abs(d[k + 1] - want[1]) < 10 && Math.abs(d[k + 2] - want[2]) < 10) {
        lo = Math.min(lo, y); hi = Math.max(hi, y);
      }
    }
    r.rows = hi >= lo ? [lo, hi] : null;
    r.distinctColors = colors.size;
  }
  return r;
});
"""


def _open(driver, page: Path, width: int, height: int):  # type: ignore[no-untyped-def]
    driver.set_window_size(width, height)
    driver.get(page.resolve().as_uri())
    driver.execute_script(
        "return Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))")
    return driver.execute_script(_INSPECT, RUN_COLORS[0])


def test_report_in_headless_chromium(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = _write_run(tmp_path / "trpo")
    _write_samples(run)
    page = write_report(run)
    panels = _open(browser, page, 390, 844)  # a phone
    metrics = [p["metric"] for p in panels]
    # the "is it working?" panels come first (test_report.py pins their order)
    assert metrics[:3] == ["reward/mean", "reward/correct/mean", "reward/format/mean"]
    assert {"trpo/kl", "eval/accuracy", "policy/entropy", "completion/mean_length", "trpo/grad_norm"} <= set(metrics)
    for p in panels:  # loaded, non-empty, drawn (a blank image has one colour)
        assert p["complete"] and p["w"] > 300 and p["h"] > 150, p
        assert p["shownW"] > 200 and p["distinctColors"] > 20, p

    # a phone: no sideways scrolling, panels in one column
    width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], width
    tops = [p["top"] for p in panels]
    assert len(set(tops)) == len(tops)

    # nothing fetched from anywhere: every resource is inline
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(not r.startswith(("http:", "https:")) for r in resources), resources

    # The 0.01-range TRPO KL spans most of its panel's height (a flat line would be a few
    # pixels; test_report.py shows the same measure reads < 5% for the old shared-axis plot).
    kl = next(p for p in panels if p["metric"] == "trpo/kl")
    lo, hi = kl["rows"]
    assert (hi - lo) / kl["h"] > 0.4, kl

    # the samples table is there, with the model's text as text
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('table.samples td.text')).map(td => td.textContent)")
    assert "<b>0-1</b><script>x</script>" in cells
    assert browser.execute_script("return document.querySelectorAll('table.samples script').length") == 0

    # a desktop: panels side by side
    panels = _open(browser, page, 1280, 900)
    assert panels[0]["top"] == panels[1]["top"]


def test_overlay_in_headless_chromium(browser, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a = _write_run(tmp_path / "seed0", 30, seed=0)
    b = _write_run(tmp_path / "seed1", 30, seed=1)
    out = write_report([a, b], output=tmp_path / "cmp.html")
    panels = _open(browser, out, 390, 844)
    assert panels and all(p["complete"] and p["w"] > 0 and p["distinctColors"] > 20 for p in panels)
    legend = browser.execute_script(
        "return Array.from(document.querySelectorAll('table tr')).map(tr => tr.textContent)")
    assert any("seed0" in row and "seed=0" in row for row in legend), json.dumps(legend)
    assert any("seed1" in row and "seed=1" in row for row in legend)
