"""End-to-end: the served dashboard in a real headless Chromium."""

from __future__ import annotations

import pytest

from tests.browser import CHROMIUM_ARGS, chromium_path, served, wait_for_app_idle


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def test_overview_in_a_real_browser(browser, sample_workspace, tmp_path):
    with served(sample_workspace) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_role("heading", name="Overview").wait_for(timeout=60_000)
        wait_for_app_idle(page)
        metrics = page.locator("[data-testid='stMetric']")
        metrics.first.wait_for()
        texts = metrics.all_inner_texts()
        assert any("Samples" in t and "2,000" in t for t in texts), texts
        assert any("Accuracy (cnn)" in t and "91.8%" in t for t in texts), texts
        page.locator("[data-testid='stImage'] img").nth(47).wait_for(timeout=30_000)
        assert page.locator("[data-testid='stImage'] img").count() == 48
        # Thumbnails really load (non-zero natural size), not broken image links.
        loaded = page.evaluate("() => [...document.querySelectorAll(\"[data-testid='stImage'] img\")]"
                               ".filter(i => i.complete && i.naturalWidth > 0).length")
        assert loaded == 48
        assert page.locator("[data-testid='stException']").count() == 0
        page.screenshot(path=str(tmp_path / "overview.png"), full_page=True)
        page.close()
