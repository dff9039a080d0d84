"""The three pages in a real browser: headless Chromium (Debian) driven by Selenium, against the
real ``d2s ui RUN_DIR`` command. A screenshot of each page goes to test-artifacts/ui/."""

from __future__ import annotations

from urllib.parse import urlencode

import pytest

from tests.ui.conftest import SHORT_CAPTION

pytestmark = pytest.mark.slow

WAIT = 90  # the first search embeds the split (seconds on one core)


def _wait(browser, css: str, timeout: float = WAIT):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def _visible(browser, css: str, timeout: float = WAIT):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(ec.visibility_of_element_located((By.CSS_SELECTOR, css)))


def _page_errors(browser) -> str:
    from selenium.webdriver.common.by import By

    e = browser.find_element(By.ID, "error")
    return e.text if e.is_displayed() else ""


def test_search_page_finds_the_image_of_an_exact_caption(browser, ui_server, best_query, artifacts):
    from selenium.webdriver.common.by import By

    caption, key = best_query
    browser.get(f"{ui_server}/search")
    _wait(browser, "body[data-ready]")
    box = browser.find_element(By.ID, "query")
    box.send_keys(caption)
    browser.find_element(By.ID, "go").click()
    first = _wait(browser, '.column[data-model="trained"] .result[data-rank="1"]')
    assert first.get_attribute("data-key") == key
    assert "own" in first.get_attribute("class").split()
    assert caption in first.text
    _wait(browser, '.column[data-model="init"] .result[data-rank="1"]')  # both models side by side
    assert _page_errors(browser) == ""
    browser.save_screenshot(str(artifacts / "search.png"))
    # the other direction: click the image, its texts come back with its own caption among them
    first.find_element(By.TAG_NAME, "img").click()
    _wait(browser, "#query-image img")
    texts = _wait(browser, '.column[data-model="trained"] .result.own')
    assert texts.get_attribute("data-key") == key
    browser.save_screenshot(str(artifacts / "search-image.png"))


def test_search_page_shows_a_refusal_as_a_message(browser, ui_server):
    from selenium.webdriver.common.by import By

    browser.get(f"{ui_server}/search")
    _wait(browser, "body[data-ready]")
    browser.find_element(By.ID, "go").click()  # no sentence typed
    msg = _visible(browser, "#error").text
    assert "q: type a sentence to search for" in msg and "Traceback" not in browser.page_source


def test_corpus_page_shows_a_dropped_caption_with_its_reason(browser, ui_server, artifacts):
    from selenium.webdriver.common.by import By

    browser.get(f"{ui_server}/corpus?{urlencode({'verdict': 'too_short'})}")
    _wait(browser, ".sample .dense.dropped")
    assert "10 images match" in browser.find_element(By.ID, "page-info").text
    dropped = browser.find_elements(By.CSS_SELECTOR, ".sample .dense.dropped")
    assert dropped and all(d.get_attribute("data-verdict") == "too_short" for d in dropped)
    assert "dropped: too_short" in dropped[0].text and SHORT_CAPTION in dropped[0].text
    assert "source short-captioner" in dropped[0].text and "words=3.000" in dropped[0].text
    _wait(browser, "#charts svg")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#charts .chart")) >= 3
    _wait(browser, "#figures img")
    assert _page_errors(browser) == ""
    browser.save_screenshot(str(artifacts / "corpus.png"))


def test_corpus_page_colours_sentences_by_grounding_score(browser, ui_server):
    from selenium.webdriver.common.by import By

    browser.get(f"{ui_server}/corpus?{urlencode({'key': 'train_00000001'})}")
    _wait(browser, ".sent")
    spans = browser.find_elements(By.CSS_SELECTOR, ".sent")
    assert [s.text for s in spans] == ["The image shows shapes.", "A purple dragon flies."]
    colours = [s.value_of_css_property("background-color") for s in spans]
    assert colours[0].startswith("rgba(44, 160, 44") and colours[1].startswith("rgba(214, 39, 40")
    assert "removed" in spans[1].get_attribute("class") and "score 2.40" in spans[0].get_attribute("title")


def test_runs_page_compares_results(browser, ui_server, artifacts):
    from selenium.webdriver.common.by import By

    browser.get(f"{ui_server}/runs")
    sec = _wait(browser, 'section[data-benchmark="custom"]')
    rows = sec.find_elements(By.CSS_SELECTOR, "table tr")
    assert {"bench_trained", "bench_init"} <= {r.find_elements(By.TAG_NAME, "td")[0].text for r in rows[1:3]}
    assert "bench_trained - bench_init" in sec.text or "bench_init - bench_trained" in sec.text
    assert len(sec.find_elements(By.CSS_SELECTOR, "svg polyline")) == 4  # two runs, two directions
    assert _page_errors(browser) == ""
    browser.save_screenshot(str(artifacts / "runs.png"))


def test_a_path_outside_the_roots_is_refused_in_the_browser(browser, ui_server):
    from selenium.webdriver.common.by import By

    for path in ("../../../../etc/passwd", "/etc/passwd"):
        browser.get(f"{ui_server}/api/file?{urlencode({'root': 'run', 'path': path})}")
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "refused" in body and "root:x:0" not in body
