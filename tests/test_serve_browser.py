"""The playground page in a real headless Chromium, driven by Selenium through the system's
chromedriver (given by path, so Selenium never looks for a driver on the network). Skipped, with
the reason, where no Chromium is installed: `apt-get install chromium chromium-driver`
(`bash scripts/setup.sh test` installs them where apt-get is available)."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from cairn.checkpoint.load import load  # noqa: E402
from cairn.serve.app import ServeSettings, create_app  # noqa: E402
from helpers import serving  # noqa: E402

# a real Chromium against a real server
pytestmark = pytest.mark.slow


def _first(*candidates: str):
    for c in candidates:
        found = shutil.which(c) or (c if os.path.isfile(c) and os.access(c, os.X_OK) else None)
        if found:
            return found
    return None


@pytest.fixture
def browser():
    binary = _first("chromium", "chromium-browser", "google-chrome", "/usr/lib/chromium/chromium")
    driver = _first("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")
    if binary is None or driver is None:
        pytest.skip("no Chromium and chromedriver found: install them with `apt-get install chromium "
                    "chromium-driver` (`bash scripts/setup.sh test` does where apt-get is available)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", "--window-size=1200,900"):
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    b.set_page_load_timeout(60)
    yield b
    b.quit()


# Every text the generated span shows, as the page writes it (each write replaces its text node)
RECORD_WRITES = """
window.writes = [];
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes) window.writes.push(n.textContent);
}).observe(document.querySelector('#output .gen'), {childList: true});
"""


def test_the_page_streams_a_story_in_chromium(browser, trained_run):
    loaded = load(trained_run.run, "cpu")
    app = create_app(loaded.model, loaded.tokenizer, ServeSettings(model_name="tiny-run", max_concurrency=4))
    with serving(app) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda b: "tiny-run" in b.find_element(By.ID, "model").text)  # the page read /v1/models
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("Once upon a time, Lily")
        for field, value in (("max_tokens", "120"), ("seed", "5"), ("top_k", "40")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.execute_script(RECORD_WRITES)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.startswith("done"))

        writes = browser.execute_script("return window.writes")
        shown = browser.find_element(By.CSS_SELECTOR, "#output .gen").get_attribute("textContent")
        tokens = int(browser.find_element(By.ID, "tokens").text)
        speed = browser.find_element(By.ID, "speed").text
        same = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "prompt": "Once upon a time, Lily", "max_tokens": 120, "seed": 5, "top_k": 40, "temperature": 0.8,
            "top_p": 1.0}).json()

    # the text grew piece by piece, each write extending the one before, up to the whole text
    assert len(writes) >= 5, writes
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(writes, writes[1:])), writes
    assert writes[-1] == shown
    # and it is what the API answers for the same settings, with the tokens and the speed shown
    assert shown == same["choices"][0]["text"]
    assert tokens == same["usage"]["completion_tokens"]
    assert speed.endswith("tokens/s") and float(speed.split()[0]) > 0
    assert browser.find_element(By.ID, "error").text == ""
