"""End-to-end: the served dashboard in a real headless Chromium, driven like a user would.

One analysed workspace is served for the module; each test opens its page fresh (a new browser session),
waits for Streamlit to finish running, acts, and checks the result on screen and in the curation database.
An action that reruns the script is wrapped in ``script_runs(page).expect_run()``, which waits for the run
the action started (not merely for "no run going", which is still true right after the action).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from playwright.sync_api import expect

from robustlens.analysis.workspace import Workspace
from robustlens.query.filters import FilterSpec, filter_ids
from robustlens.query.sample_table import load_sample_table
from tests.browser import (
    CHROMIUM_ARGS,
    chromium_path,
    holding_requests,
    script_runs,
    served,
    wait_for_app_idle,
    watch_script_runs,
)
from tests.dashboard_fixtures import copy_workspace

pytestmark = pytest.mark.browser

TIMEOUT = 60_000
#: The script of Streamlit's multiselect component (loaded on demand, the first time one is drawn).
MULTISELECT_SCRIPT = re.compile(r"/static/js/Multiselect\.[\w-]+\.js$")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def workspace(analysed_template, tmp_path_factory) -> Path:
    return copy_workspace(analysed_template, tmp_path_factory.mktemp("browser") / "ws")


@pytest.fixture(scope="module")
def server(workspace):
    with served(workspace) as url:
        yield url


@pytest.fixture
def page(browser, server, tmp_path):
    context = browser.new_context(viewport={"width": 1500, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    watch_script_runs(page)
    yield page
    page.screenshot(path=str(tmp_path / "last.png"), full_page=True)
    context.close()


def open_page(page, url: str, heading: str) -> None:
    with script_runs(page).expect_run(TIMEOUT):
        page.goto(url, wait_until="domcontentloaded")
    page.get_by_role("heading", name=heading).wait_for(timeout=TIMEOUT)


def sign_in(page, name: str) -> None:
    field = page.locator("[data-testid='stSidebar']").get_by_role("textbox", name="Your name")
    field.fill(name)
    with script_runs(page).expect_run(TIMEOUT):
        field.press("Enter")


def wait_text(page, text) -> None:
    """Wait until ``text`` (a string or regex) is on screen and the script run that wrote it has finished."""
    page.get_by_text(text).first.wait_for(timeout=TIMEOUT)
    wait_for_app_idle(page)


def grid_captions(page, expected: int) -> list[str]:
    """Captions of the thumbnails once ``expected`` of them have loaded (images arrive after the script run)."""
    captions = page.locator("[data-testid='stImageCaption']")
    if expected:
        captions.nth(expected - 1).wait_for(timeout=TIMEOUT)
    return captions.all_inner_texts()


def no_exceptions(page) -> None:
    assert page.locator("[data-testid='stException']").count() == 0


def test_overview_shows_counts_and_issue_examples(page, server):
    open_page(page, server, "Overview")
    # Metrics, images and page links are drawn by components the browser loads on demand, after the run has
    # ended: wait for each to show what it must, rather than reading the page once.
    metrics = page.locator("[data-testid='stMetric']")
    expect(metrics.filter(has_text=re.compile(r"^Samples\s*2,000$"))).to_have_count(1, timeout=TIMEOUT)
    expect(metrics.filter(has_text=re.compile(r"Accuracy \(cnn\)\s*91\.8%"))).to_have_count(1, timeout=TIMEOUT)
    page.wait_for_function(
        "() => [...document.querySelectorAll(\"[data-testid='stImage'] img\")]"
        ".filter(i => i.complete && i.naturalWidth > 0).length >= 6",
        timeout=TIMEOUT,
    )
    expect(page.get_by_role("link", name="Open in explorer").nth(4)).to_be_visible(timeout=TIMEOUT)
    no_exceptions(page)


def test_a_shared_filter_url_then_filtering_in_the_sidebar(page, server, workspace):
    table = load_sample_table(Workspace(workspace))
    open_page(page, f"{server}/explorer?label=coat&correct=0", "Explorer")
    expected = filter_ids(table, FilterSpec(labels=["coat"], correctness="incorrect"))
    wait_text(page, f"{len(expected):,} of 2,000 samples")
    captions = grid_captions(page, min(48, len(expected)))
    assert len(captions) == min(48, len(expected)) and all(c.startswith("coat → ") for c in captions), captions
    search = page.get_by_label("Search id or path")
    search.fill("test_00")
    with script_runs(page).expect_run(TIMEOUT):
        search.press("Enter")
    narrowed = filter_ids(table, FilterSpec(labels=["coat"], correctness="incorrect", text="test_00"))
    wait_text(page, f"{len(narrowed):,} of 2,000 samples")
    assert "q=test_00" in page.url and "label=coat" in page.url
    no_exceptions(page)


def test_lasso_on_the_map_then_tag_in_one_action(page, server, workspace):
    open_page(page, f"{server}/embedding-map", "Embedding map")
    sign_in(page, "lasso-user")
    drag = page.locator("[data-testid='stPlotlyChart'] .nsewdrag").first
    drag.wait_for(timeout=TIMEOUT)
    box = drag.bounding_box()
    cx, cy, w, h = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["width"], box["height"]
    outline = [
        (cx - 0.2 * w, cy - 0.2 * h),
        (cx + 0.2 * w, cy - 0.2 * h),
        (cx + 0.2 * w, cy + 0.2 * h),
        (cx - 0.2 * w, cy + 0.2 * h),
        (cx - 0.2 * w, cy - 0.19 * h),
    ]
    page.mouse.move(*outline[0])
    page.mouse.down()
    for x, y in outline[1:]:
        page.mouse.move(x, y, steps=8)
    with script_runs(page).expect_run(TIMEOUT):
        page.mouse.up()
    selected = page.get_by_text(re.compile(r"[\d,]+ samples selected"))
    selected.wait_for(timeout=TIMEOUT)
    wait_for_app_idle(page)
    count = int(re.search(r"([\d,]+) samples selected", selected.inner_text()).group(1).replace(",", ""))
    assert 10 < count < 2000
    page.get_by_label("Tag the selected samples").fill("lasso-region")
    with script_runs(page).expect_run(TIMEOUT):
        page.get_by_role("button", name=f"Tag {count:,} samples").click()
    wait_text(page, f"Tagged {count:,} sample(s) 'lasso-region'")
    store = Workspace(workspace).curation()
    tagged = store.samples_with_tag("lasso-region")
    store.close()
    assert len(tagged) == count
    no_exceptions(page)


def test_clicking_a_confusion_cell_opens_its_samples(page, server, workspace):
    table = load_sample_table(Workspace(workspace))
    open_page(page, f"{server}/performance", "Model performance")
    # The first prediction set's confusion matrix, by its key (perf.cm.<set>.<generation>): the page has
    # several plotly charts, drawn in whatever order their plotly instances finish.
    chart = page.locator("[class*='st-key-perf-cm-cnn-'] [data-testid='stPlotlyChart']")
    cells = chart.locator(".nsewdrag").first
    cells.wait_for(timeout=TIMEOUT)
    box = cells.bounding_box()
    classes = list(table["label"].cat.categories)
    given, predicted = classes.index("shirt"), classes.index("tshirt_top")
    cell = {"x": box["width"] * (predicted + 0.5) / len(classes), "y": box["height"] * (given + 0.5) / len(classes)}
    cells.hover(position=cell, timeout=TIMEOUT)
    # The cell's hover label shows once plotly is interactive; one click then selects it (a second would deselect).
    chart.locator(".hoverlayer .hovertext").filter(has_text=re.compile("given shirt.*predicted tshirt_top")).wait_for(
        timeout=TIMEOUT
    )
    with script_runs(page).expect_run(TIMEOUT):
        cells.click(position=cell, timeout=TIMEOUT)
    page.get_by_role("heading", name="Explorer").wait_for(timeout=TIMEOUT)
    expected = filter_ids(table, FilterSpec(labels=["shirt"], predicted=["tshirt_top"]))
    wait_text(page, f"{len(expected):,} of 2,000 samples")
    assert "label=shirt" in page.url and "pred=tshirt_top" in page.url
    no_exceptions(page)


def test_create_a_collection_from_the_current_filter(page, server, workspace):
    # The sidebar's multiselects (label, issues) are drawn only once their component's script has loaded. Hold
    # it back until the user has signed in, as on a slow machine: the sign-in rerun then comes before the
    # browser has shown the link's filter, which used to lose that filter for good.
    with holding_requests(page, MULTISELECT_SCRIPT) as held:
        open_page(page, f"{server}/collections?label=sandal&issue=dark", "Tags & collections")
        sign_in(page, "curator")
    assert held, f"no request matched {MULTISELECT_SCRIPT.pattern}: Streamlit renamed its multiselect script?"
    wait_text(page, "the current filter (")
    # the link's filter is applied (the sidebar's widgets appear once their components have loaded)
    expect(page.locator("[data-testid='stSidebar']")).to_contain_text("sandal", timeout=TIMEOUT)
    page.get_by_role("textbox", name="New collection").fill("dark sandals")
    page.get_by_role("textbox", name="Description").fill("check the exposure")
    page.get_by_text("saved filter (re-evaluates)").click()
    with script_runs(page).expect_run(TIMEOUT):
        page.get_by_role("button", name="Create collection").click()
    wait_text(page, "Created collection 'dark sandals' (saved filter).")
    store = Workspace(workspace).curation()
    entry = store.collection("dark sandals")
    store.close()
    assert entry["filter"] == {"labels": ["sandal"], "issues": ["dark"]} and entry["created_by"] == "curator"
    no_exceptions(page)


def test_review_a_label_issue_with_the_keyboard(page, server, workspace):
    table = load_sample_table(Workspace(workspace))
    queue = table[table["label_issue.is_label_issue"]].sort_values("label_issue.rank")["id"].tolist()
    open_page(page, f"{server}/review", "Label review")
    form_name = page.locator("[data-testid='stForm']").get_by_label("Your name")
    form_name.fill("keyboard-reviewer")
    form_name.press("Enter")  # a form submits on Enter
    wait_text(page, "Keys: ")
    store = Workspace(workspace).curation()
    decided = {d["sample_id"] for d in store.decisions()}
    first = next(sample for sample in queue if sample not in decided)
    wait_text(page, first)
    keep = page.get_by_role("button", name=re.compile("Keep label"))
    expect(keep).to_be_enabled(timeout=TIMEOUT)  # the shortcut belongs to the mounted, enabled button
    page.get_by_role("heading", name="Label review").click()  # focus off the text field, so keys are shortcuts
    wait_for_app_idle(page)
    page.keyboard.press("k")
    wait_text(page, f"Saved: {first} kept the label.")
    latest = {d["sample_id"]: d for d in store.decisions()}
    store.close()
    assert latest[first]["action"] == "keep" and latest[first]["created_by"] == "keyboard-reviewer"
    no_exceptions(page)


def test_export_download_holds_the_filtered_samples(page, server, workspace, tmp_path):
    table = load_sample_table(Workspace(workspace))
    open_page(page, f"{server}/export?label=trouser&sort=metric.brightness", "Export")
    button = page.get_by_role("button", name="Download CSV")
    button.wait_for(timeout=TIMEOUT)
    with page.expect_download(timeout=TIMEOUT) as download:
        button.click()
    target = tmp_path / "export.csv"
    download.value.save_as(target)
    frame = pd.read_csv(target)
    assert frame["id"].tolist() == filter_ids(table, FilterSpec(labels=["trouser"], sort_by="metric.brightness"))
    assert list(frame.columns) == ["id", "path", "label", "split", "source_index"]
    no_exceptions(page)
