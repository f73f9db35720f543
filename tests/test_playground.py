"""The playground page in a real browser (Debian's chromium, headless, driven by Selenium through
chromium-driver): a message streams in over several updates, tokens/s are shown, and the stop
button cancels the request, which the server counts as aborted."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.prometheus_text import scrape
from tests.server_process import ServerProcess

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), "make test-deps installs chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def aborted(server: ServerProcess) -> float:
    return scrape(server.metrics_url()).value("mistralserve_request_success_total", finished_reason="abort")


@pytest.mark.slow
def test_playground_streams_shows_rate_and_stops(default_server: ServerProcess, browser: webdriver.Chrome) -> None:
    before = aborted(default_server)
    browser.get(default_server.http_url + "/")
    assert browser.title == "mistral-serve playground"
    deadline = time.monotonic() + 30
    while browser.find_element(By.ID, "model").text in ("…", "") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert browser.find_element(By.ID, "model").text == "SmolLM2-135M-Instruct"

    temperature, max_tokens = browser.find_element(By.ID, "temperature"), browser.find_element(By.ID, "max-tokens")
    temperature.clear()
    temperature.send_keys("0")
    max_tokens.clear()
    max_tokens.send_keys("3000")
    browser.find_element(By.ID, "prompt").send_keys("Write a very long story about a dragon, in twenty chapters.")
    browser.find_element(By.ID, "send").click()

    seen: list[str] = []  # each distinct text of the reply, as the page showed it
    deadline = time.monotonic() + 120
    while len(seen) < 4 and time.monotonic() < deadline:
        replies = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")
        text = replies[-1].text if replies else ""
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.01)
    assert len(seen) >= 4, (seen, browser.find_element(By.ID, "log").text)
    assert all(later.startswith(earlier) and later != earlier for earlier, later in itertools.pairwise(seen))
    assert browser.find_element(By.ID, "stop").is_enabled()
    browser.find_element(By.ID, "stop").click()

    deadline = time.monotonic() + 30
    while "(stopped)" not in browser.find_element(By.ID, "stats").text and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = browser.find_element(By.ID, "stats").text
    assert re.search(r"^\d+ tokens · [\d.]+ tokens/s · first token [\d.]+ s", stats), stats
    assert "(stopped)" in stats
    assert browser.find_element(By.ID, "send").is_enabled() and not browser.find_element(By.ID, "stop").is_enabled()
    stopped_text = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].text
    time.sleep(0.5)
    assert browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].text == stopped_text  # no more text

    deadline = time.monotonic() + 30
    while aborted(default_server) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborted(default_server) == before + 1
