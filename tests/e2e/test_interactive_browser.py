"""``interactive_modify`` and ``deltadist pick`` driven in a real headless browser.

Debian's ``chromium`` and ``chromium-driver`` (installed by ``.ci/run``) under Selenium: open the
page, expand, unfold a repeated block, select (one box, "every X", a filter's matches), submit a
selection the method refuses and then a good one; check what the Python call returns and attaches.
``DELTADIST_SCREENSHOT=1`` also writes the page as ``docs/interactive_modify.png`` (the README's).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest

import deltadist
from tests.picking import picking, status_of
from tests.tiny import build_tiny

webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromedriver: apt-get install chromium "
                              "chromium-driver (.ci/run installs them)"),
]
REPO = Path(__file__).resolve().parents[2]
LAYERS = 4
FOLD = "model.layers.0"
"""The first module of the folded block ``0-3`` (``data-path`` of its row, which stands for 4)."""


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _wait_state(driver: webdriver.Chrome, state: str) -> None:
    WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                    == state)


def _row(driver: webdriver.Chrome, path: str, n: int = 1) -> WebElement:
    """The row of the node standing for ``n`` modules, the first of which is ``path``."""
    return WebDriverWait(driver, 30).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f'.row[data-path="{path}"][data-n="{n}"]'))


def _box(driver: webdriver.Chrome, path: str, n: int = 1) -> WebElement:
    return _row(driver, path, n).find_element(By.CSS_SELECTOR, ".pick")


def _click(driver: webdriver.Chrome, path: str, n: int, part: str) -> None:
    _row(driver, path, n).find_element(By.CSS_SELECTOR, part).click()


def _selected(driver: webdriver.Chrome) -> str:
    return driver.find_element(By.ID, "count").text


def _filter(driver: webdriver.Chrome, text: str) -> None:
    search = driver.find_element(By.ID, "search")
    search.send_keys(Keys.CONTROL, "a")
    search.send_keys(Keys.BACKSPACE)
    if text:
        search.send_keys(text)
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "select-matches").is_enabled())
    else:
        WebDriverWait(driver, 30).until(lambda d: not d.find_element(By.ID, "select-matches").is_enabled())


def _listening_addresses(port: int) -> set[str]:
    """Local addresses listening on ``port`` (Linux ``/proc/net/tcp*``, hex as the kernel writes them)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as handle:
            for line in handle.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_pick_in_the_browser_attaches_exactly_the_selection(browser, tmp_path: Path) -> None:
    model = build_tiny("llama", "lm", num_hidden_layers=LAYERS)
    layer = "model.layers.{}.{}".format
    with picking(lambda: deltadist.LoraModel(model, interactive_modify=0, interactive_timeout=240,
                                             lora_r=2)) as run:
        url = run.url
        port = int(re.search(r":(\d+)/", url).group(1))
        # Safe by default: loopback only, and nothing answers without the token.
        assert url.startswith("http://127.0.0.1:")
        assert _listening_addresses(port) in ({"0100007F"}, set())  # set(): no /proc (not Linux)
        assert status_of(url.split("?")[0]) == 403
        assert status_of(run.api("/api/tree").replace("token=", "token=x")) == 403

        browser.get(url)
        _wait_state(browser, "ready")
        assert browser.find_element(By.ID, "title").text == "LoraModel on LlamaForCausalLM"
        fold = _row(browser, FOLD, LAYERS)  # "0-3 ×4", shown on load
        assert fold.find_element(By.CSS_SELECTOR, ".name").text == f"0-{LAYERS - 1}"

        # Expand the folded block and its attention; a box there selects the module in every layer.
        _click(browser, FOLD, LAYERS, ".toggle")
        _click(browser, layer(0, "self_attn"), LAYERS, ".toggle")
        _click(browser, layer(0, "self_attn.v_proj"), LAYERS, ".pick")
        assert _selected(browser) == "4 modules selected"
        # Filter, then select what it shows.
        _filter(browser, "down_proj")
        browser.find_element(By.ID, "select-matches").click()
        assert _selected(browser) == "8 modules selected"
        _filter(browser, "")
        assert "inside" in _row(browser, FOLD, LAYERS).get_attribute("class")  # marks what holds a pick

        # Unfold the repeated block: one layer's q_proj selects "every q_proj"; drop one v_proj.
        _click(browser, FOLD, LAYERS, ".unfold")
        _click(browser, "model.layers.3", 1, ".toggle")
        _click(browser, layer(3, "self_attn"), 1, ".toggle")
        _click(browser, layer(3, "self_attn.q_proj"), 1, ".every")
        assert _selected(browser) == "12 modules selected"
        _click(browser, layer(3, "self_attn.v_proj"), 1, ".pick")
        assert _selected(browser) == "11 modules selected"
        assert not _box(browser, layer(3, "self_attn.v_proj")).is_selected()
        assert _box(browser, layer(3, "self_attn.q_proj")).is_selected()

        # A module LoRA cannot modify: refused on the page, nothing attached.
        _click(browser, "model.layers.0", 1, ".toggle")
        _click(browser, layer(0, "input_layernorm"), 1, ".pick")
        browser.find_element(By.ID, "submit").click()
        _wait_state(browser, "error")
        assert "LoRA needs a linear layer" in browser.find_element(By.ID, "message").text
        assert deltadist.deltas_on(model) == {}

        _click(browser, layer(0, "input_layernorm"), 1, ".pick")
        _click(browser, layer(0, "self_attn"), 1, ".toggle")  # shown in the screenshot
        browser.find_element(By.ID, "submit").click()
        _wait_state(browser, "submitted")
        message = browser.find_element(By.ID, "message").text
        _screenshot(browser, tmp_path)
        delta = run.result()

    patterns = ["q_proj", r"[r][0-2]\.self_attn\.v_proj", "down_proj"]
    assert delta.config.modified_modules == patterns
    assert "modified_modules: " + json.dumps(patterns) in message  # JSON, also a Python literal
    kept = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")
    expected = [layer(i, m) for i in range(LAYERS) for m in kept if (i, m) != (3, "self_attn.v_proj")]
    assert delta.sites == expected
    assert deltadist.deltas_on(model) == {delta.name: delta}
    assert f"modified_modules: {patterns}" in run.printed.getvalue()


def _screenshot(browser: webdriver.Chrome, tmp_path: Path) -> None:
    """The page as the README shows it (copied to docs/ when DELTADIST_SCREENSHOT=1)."""
    shot = tmp_path / "interactive_modify.png"
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(shot))
    if os.environ.get("DELTADIST_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "interactive_modify.png")


def test_deltadist_pick_prints_the_delta_section(browser, tmp_path: Path) -> None:
    checkpoint = tmp_path / "bert"
    build_tiny("bert", "cls").save_pretrained(checkpoint)
    process = subprocess.Popen(
        [sys.executable, "-m", "deltadist.cli", "pick", str(checkpoint), "--method", "lora", "--port", "0",
         "--timeout", "240"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    stderr: list[str] = []
    url_seen = threading.Event()

    def read_stderr() -> None:
        for line in process.stderr:
            stderr.append(line)
            if "?token=" in line:
                url_seen.set()
        url_seen.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert url_seen.wait(120), "deltadist pick printed no URL"
        url = re.search(r"http://\S+", "".join(stderr)).group(0)
        browser.get(url)
        _wait_state(browser, "ready")
        assert browser.find_element(By.ID, "title").text == "LoraModel on BertForSequenceClassification"
        _filter(browser, "query")
        browser.find_element(By.ID, "select-matches").click()
        assert _selected(browser) == "2 modules selected"
        browser.find_element(By.ID, "submit").click()
        _wait_state(browser, "submitted")
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        reader.join(timeout=10)
    assert process.returncode == 0, "".join(stderr)
    assert out == "delta:\n  delta_type: lora\n  modified_modules: [query]\n"
    assert "modified_modules: ['query']" in "".join(stderr)  # the picker's own lines go to stderr
