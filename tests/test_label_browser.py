"""`trustrl label` as an annotator uses it: the real server (`trustrl label`, a subprocess on
a tiny model that samples the responses), driven in headless Chromium (Debian's chromium and
chromium-driver, installed by `make browser`; selenium drives them and downloads nothing).

1. Rank with the keyboard (numbers, Enter), with the mouse (drag responses and chips into the
   ranking, click a separator to tie, click Submit), skip, undo a skip, undo a placement;
   leave a note.
2. Kill the server (SIGKILL: no clean shutdown), check the JSONL rows, start it again: the page
   continues at the first unranked item with the same sampled responses, and finishes.
3. Untrusted text: a prompt and responses full of HTML and script are shown as text and never
   run (also under a token, which the page carries); code blocks stay code blocks. A
   screenshot of this page is written (and to $TRUSTRL_LABEL_SCREENSHOT when set: docs/label.png).

Never silently skipped: without Chromium the test fails, unless TRUSTRL_ALLOW_NO_BROWSER=1 says
to skip it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from trustrl.data import write_jsonl

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[1]

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    if os.environ.get("TRUSTRL_ALLOW_NO_BROWSER") == "1":
        pytest.skip("chromium / chromedriver missing and TRUSTRL_ALLOW_NO_BROWSER=1", allow_module_level=True)
    raise RuntimeError("test_label_browser: chromium / chromedriver missing: run `make browser` (apt-get install "
                       "chromium chromium-driver), or set TRUSTRL_ALLOW_NO_BROWSER=1 to skip on purpose")

from selenium import webdriver  # noqa: E402  (the `test` extra)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 180  # an upper bound for a slow machine (model loading, sampling); never a speed check


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1280,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m trustrl.cli label ARGS` on a free port, up once /api/health answers."""

    def __init__(self, args: list[str], logdir: Path, token: str | None = None, port: int | None = None):
        self.port = port or _free_port()
        self.token = token
        self.log = logdir / f"server-{self.port}-{time.monotonic_ns()}.log"
        self.out = self.log.open("w")
        cmd = [sys.executable, "-m", "trustrl.cli", "label", *args, "--port", str(self.port)]
        if token:
            cmd += ["--token", token]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{self.port}/" + (f"?token={token}" if token else "")
        deadline = time.monotonic() + WAIT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"trustrl label exited with {self.proc.returncode}: "
                                     f"{self.log.read_text()}")
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/health",
                                             headers={"X-Trustrl-Token": token or ""})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if json.load(r)["ok"]:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, "trustrl label did not come up"
            time.sleep(0.2)

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no shutdown handler runs
        self.proc.wait()
        self.out.close()


def _state(driver) -> tuple[str, str | None]:  # type: ignore[no-untyped-def]
    return driver.execute_script("return [document.body.dataset.state, document.body.dataset.item || null]")


def _wait_item(driver, item: str | None, state: str = "ready") -> None:  # type: ignore[no-untyped-def]
    WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(
        lambda d: _state(d) == [state, item] or (item is None and _state(d)[0] == state),
        message=f"waiting for item {item} ({state}); status: {driver.find_element(By.ID, 'status').text}")


def _keys(driver, keys: str) -> None:  # type: ignore[no-untyped-def]
    driver.execute_script("document.activeElement && document.activeElement.blur()")
    ActionChains(driver).send_keys(keys).perform()


def _drag(driver, source, target) -> None:  # type: ignore[no-untyped-def]
    ActionChains(driver).click_and_hold(source).move_by_offset(8, 8).move_to_element(target).pause(0.05) \
        .release().perform()


def _ranking(driver) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """The ranking bar: groups of response numbers, best first."""
    return driver.execute_script("""return Array.from(document.querySelectorAll('#ranking .group')).map(
        g => Array.from(g.querySelectorAll('.chip')).map(c => Number(c.textContent)));""")


def _responses(driver) -> list[str]:  # type: ignore[no-untyped-def]
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.response .text')).map(e => e.textContent)")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rank_with_mouse_and_keys_kill_restart_resume(browser, tiny_model_dir, tmp_path):
    prompts = [{"prompt": "1+2="}, {"prompt": "3+4="}, {"prompt": "5+6="}, {"prompt": "7+8="}]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    log = tmp_path / "judgements.jsonl"
    args = ["--model", str(tiny_model_dir), "--prompts", str(tmp_path / "prompts.jsonl"), "--k", "3",
            "--max-new-tokens", "6", "--out", str(log)]
    server = Server(args, tmp_path)
    try:
        browser.get(server.url)
        browser.find_element(By.ID, "annotator").send_keys("alice\n")
        _wait_item(browser, "0")
        sampled = {"0": _responses(browser)}
        assert len(sampled["0"]) == 3

        # item 0, keyboard: response 3 best, then 1, then 2 -> ranks [2, 3, 1]
        _keys(browser, "31")
        assert _ranking(browser) == [[3], [1]]
        _keys(browser, "2\n")
        _wait_item(browser, "1")
        sampled["1"] = _responses(browser)

        # item 1, mouse: drag response 2's header and response 3's header into the ranking bar,
        # then the unranked chip 1 onto chip 3 (goes before it): 2 > 1 > 3; click the ">"
        # between 1 and 3 to tie them: 2 > 1 = 3 -> ranks [2, 1, 2]
        ranking = browser.find_element(By.ID, "ranking")
        headers = browser.find_elements(By.CSS_SELECTOR, ".response header")
        _drag(browser, headers[1], ranking)
        _drag(browser, headers[2], ranking)
        assert _ranking(browser) == [[2], [3]]
        chip1 = browser.find_element(By.CSS_SELECTOR, "#tray .chip[data-index='0']")
        chip3 = browser.find_element(By.CSS_SELECTOR, "#ranking .chip[data-index='2']")
        _drag(browser, chip1, chip3)
        assert _ranking(browser) == [[2], [1], [3]]
        browser.find_element(By.CSS_SELECTOR, "#ranking .sep[data-before='2']").click()
        assert _ranking(browser) == [[2], [1, 3]]
        badges = [b.text for b in browser.find_elements(By.CSS_SELECTOR, ".response .badge")]
        assert badges == ["rank 2 (tie)", "rank 1", "rank 2 (tie)"]
        browser.find_element(By.ID, "note").send_keys("1 and 3 are equally bad <b>")
        browser.find_element(By.ID, "submit").click()
        _wait_item(browser, "2")
        sampled["2"] = _responses(browser)

        # item 2: skip it, undo the skip (it comes back), place 1, 2, 3, undo the last placement,
        # place 3 again, submit -> ranks [1, 2, 3]
        _keys(browser, "s")
        _wait_item(browser, "3")
        _keys(browser, "u")
        _wait_item(browser, "2")
        assert _responses(browser) == sampled["2"]
        _keys(browser, "123")
        assert _ranking(browser) == [[1], [2], [3]]
        _keys(browser, "u")
        assert _ranking(browser) == [[1], [2]]
        _keys(browser, "3\n")
        _wait_item(browser, "3")
        sampled["3"] = _responses(browser)
        progress = browser.find_element(By.ID, "progress").text
        assert "you: 3 ranked, 0 skipped" in progress and "items complete: 3/4" in progress, progress
    finally:
        server.kill()

    # every acknowledged action is on disk, in order
    rows = _rows(log)
    assert [(r["action"], r.get("item")) for r in rows] == [
        ("rank", "0"), ("rank", "1"), ("skip", "2"), ("undo", "2"), ("rank", "2")]
    ranked = [r for r in rows if r["action"] == "rank"]
    assert [r["ranks"] for r in ranked] == [[2, 3, 1], [2, 1, 2], [1, 2, 3]]
    assert {r["annotator"] for r in rows} == {"alice"}
    assert ranked[1]["note"] == "1 and 3 are equally bad <b>"
    assert rows[3]["undoes"] == rows[2]["id"]
    for r in ranked:
        assert r["responses"] == sampled[r["item"]] and r["prompt"] == prompts[int(r["item"])]["prompt"]

    # restart (same address: the page remembers the annotator per origin): it continues at
    # item 3, with the same responses
    server = Server(args, tmp_path, port=server.port)
    try:
        browser.get(server.url)
        _wait_item(browser, "3")
        assert _responses(browser) == sampled["3"]
        _keys(browser, "213\n")
        _wait_item(browser, None, state="done")
        assert "All items are done" in browser.find_element(By.ID, "status").text
    finally:
        server.kill()
    rows = _rows(log)
    assert len(rows) == 6 and rows[-1]["item"] == "3" and rows[-1]["ranks"] == [2, 1, 3]
    # `trustrl train rm` reads this log: 4 rankings in force
    from trustrl.rankings import current_judgements

    assert sum(r["action"] == "rank" for r in current_judgements(rows)) == 4


HOSTILE_PROMPT = ("Write a Python function that makes user text safe to show in a web page."
                  "<script>window.__pwned = 'prompt'</script>")
HOSTILE_RESPONSES = [
    "Use the standard library:\n```python\nimport html\n\ndef safe(text: str) -> str:\n"
    "    return html.escape(text, quote=True)\n```\nIt escapes &, <, > and quotes.",
    "<img src=x onerror=\"window.__pwned='img'\"><script>window.__pwned='script'</script>Just strip the tags "
    "with a regex.",
    "<b>Bold claim</b>: <a href=\"javascript:window.__pwned='link'\">click</a> escaping is never needed.",
]


def take_screenshot(driver, path: Path) -> Path:  # type: ignore[no-untyped-def]
    driver.set_window_size(1280, 800)
    driver.save_screenshot(str(path))
    return path


def test_untrusted_text_is_shown_as_text_never_run(browser, tmp_path):
    write_jsonl(tmp_path / "candidates.jsonl", [{"id": "html-1", "prompt": HOSTILE_PROMPT,
                                                 "responses": HOSTILE_RESPONSES}])
    server = Server(["--candidates", str(tmp_path / "candidates.jsonl"), "--out", str(tmp_path / "j.jsonl")],
                    tmp_path, token="tok-123")
    try:
        browser.get(server.url.replace("?token=tok-123", ""))  # without the token: refused
        assert "token is required" in browser.find_element(By.TAG_NAME, "body").text
        browser.get(server.url)
        browser.execute_script("localStorage.setItem('trustrl-annotator', 'bob')")
        browser.get(server.url)
        _wait_item(browser, "html-1")
        # shown exactly as written, as text
        assert browser.find_element(By.ID, "prompt").get_attribute("textContent") == HOSTILE_PROMPT
        shown = _responses(browser)
        assert shown[1] == HOSTILE_RESPONSES[1] and shown[2] == HOSTILE_RESPONSES[2]
        # nothing ran and no element came from the text
        assert browser.execute_script("return window.__pwned === undefined")
        assert browser.execute_script(
            "return document.querySelectorAll('#prompt *:not(div), .response .text img, .response .text script, "
            ".response .text a, .response .text b').length") == 0
        # the code block is a code block, its lines kept
        code = browser.find_elements(By.CSS_SELECTOR, ".response .text pre code")
        assert len(code) == 1 and code[0].get_attribute("textContent") == (
            "import html\n\ndef safe(text: str) -> str:\n    return html.escape(text, quote=True)\n")
        _keys(browser, "1t3")
        assert _ranking(browser) == [[1, 3]]
        _keys(browser, "c13")
        browser.find_element(By.ID, "note").send_keys("2 is unsafe advice")
        _keys(browser, "")
        shot = take_screenshot(browser, tmp_path / "label.png")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
        if os.environ.get("TRUSTRL_LABEL_SCREENSHOT"):
            shutil.copy(shot, os.environ["TRUSTRL_LABEL_SCREENSHOT"])
        _keys(browser, "2\n")
        _wait_item(browser, None, state="done")
        assert browser.execute_script("return window.__pwned === undefined")
    finally:
        server.kill()
    (row,) = _rows(tmp_path / "j.jsonl")
    assert row["responses"] == HOSTILE_RESPONSES and row["ranks"] == [1, 3, 2] and row["annotator"] == "bob"
