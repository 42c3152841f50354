"""The dashboard's web surface: user strings are shown as text (never markdown or HTML) on every page, and the
served app refuses requests that name a foreign host (DNS rebinding).

A workspace is built whose class names, file names, metadata values, tags, collection names and
descriptions, reviewer names, notes and slice descriptions are markdown and HTML payloads pointing at
``evil.invalid``. Every page is rendered with AppTest (and the filter of a hostile link); every string that
Streamlit renders as markdown is checked for markup that survived, plotly figures for HTML, and the escape
helpers themselves against each payload. One Chromium run of the served app records every request the
pages make and looks for links and images in the DOM. The DNS-rebinding guard is checked with raw HTTP and
WebSocket handshakes against ``robustlens serve``.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from robustlens.analysis import curation as curation_db
from robustlens.analysis.workspace import Workspace
from robustlens.dashboard.components import markup
from robustlens.dashboard.host_guard import HostGuard, HostPolicy, host_of_header, host_of_origin
from robustlens.dashboard.routes import ROUTES
from robustlens.errors import ValidationError
from robustlens.query.filters import FilterSpec, to_query_params
from tests.browser import served
from tests.conftest import SAMPLE_DATA
from tests.dashboard_fixtures import write_analysis_artifacts

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "robustlens" / "dashboard" / "app.py")
EVIL = "evil.invalid"

IMAGE = "![u](http://evil.invalid/x)"
LINK = "[Session expired](http://evil.invalid/login)"
HTML_IMG = "<img src=http://evil.invalid/y>"
ANCHOR = '<a href="http://evil.invalid/a">click</a>'
SCRIPT = "<script>fetch('http://evil.invalid/s')</script>"
AUTOLINK = "www.evil.invalid"
URL = "http://evil.invalid/plain"
CLASSES = [IMAGE, LINK, HTML_IMG, ANCHOR]  # plus two real classes the fixture's slices need
CAMERAS = ["cam [x](http://evil.invalid/m)", SCRIPT, AUTOLINK]
FILE_NAMES = ["![f](https:evil.invalid) 0.png", "<img src=https:evil.invalid> 1.png"]
TAGS = [IMAGE, f"{LINK} tag", "_em_ `tick` **b** :red[x] $x$", "a`b ![c](http://evil.invalid/c) d`e"]
COLLECTION = f"{HTML_IMG} coll"
REVIEWER = f"{LINK} reviewer"
NOTE = f"{IMAGE} {URL} note"
#: Every payload, and markdown / HTML that would be harmless only if escaped.
PAYLOADS = [
    IMAGE,
    LINK,
    HTML_IMG,
    ANCHOR,
    SCRIPT,
    AUTOLINK,
    URL,
    *CAMERAS,
    *FILE_NAMES,
    *TAGS,
    COLLECTION,
    REVIEWER,
    NOTE,
    "# heading",
    "1. list",
    "> quote",
    "a@evil.invalid",
    "&lt;img&gt;",
    "line\n# break",
    ":material/home: :smile:",
]


# -- a workspace made of payloads --------------------------------------------------------------------------
def _darkest(table: pd.DataFrame, label: str, count: int) -> pd.DataFrame:
    rows = table[table["label"] == label].head(60)
    brightness = [np.asarray(Image.open(SAMPLE_DATA / path)).mean() for path in rows["path"]]
    return rows.assign(b=brightness).nsmallest(count, "b").drop(columns="b")


def build_hostile_workspace(base: Path) -> Path:
    """60 sample images: 40 in four payload classes, 10 each of two real ones (dark enough for the fixture's
    slices); two payload file names, the first also copied as the last image (an exact duplicate); a metadata
    column of payloads; every analysis artifact."""
    from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace

    source = pd.read_csv(SAMPLE_DATA / "labels.csv")
    chosen = pd.concat(
        [
            _darkest(source, "shirt", 10),
            _darkest(source, "pullover", 10),
            source[~source["label"].isin(["shirt", "pullover"])].head(40),
        ]
    ).reset_index(drop=True)
    data = base / "data"
    (data / "imgs").mkdir(parents=True)
    rows = []
    for i, row in chosen.iterrows():
        name = FILE_NAMES[i] if i < len(FILE_NAMES) else f"im{i}.png"
        # The last image is an exact copy of the first (a payload file name), so the duplicates page has a cluster.
        source_path = chosen.loc[0, "path"] if i == len(chosen) - 1 else row["path"]
        shutil.copy(SAMPLE_DATA / source_path, data / "imgs" / name)
        rows.append(
            {
                "path": f"imgs/{name}",
                "label": row["label"] if row["label"] in ("shirt", "pullover") else CLASSES[i % len(CLASSES)],
                "split": "test" if i % 4 == 0 else "train",
                "camera": CAMERAS[i % len(CAMERAS)],
            }
        )
    pd.DataFrame(rows).to_csv(base / "labels.csv", index=False)
    classes = sorted({r["label"] for r in rows})
    probabilities = np.random.default_rng(0).dirichlet(np.full(len(classes), 0.3), size=len(rows))
    predictions = pd.DataFrame(probabilities, columns=classes)
    predictions.insert(0, "path", [r["path"] for r in rows])
    predictions.to_csv(base / "predictions.csv", index=False)
    root = base / "ws"
    init_workspace(
        root,
        InitOptions(
            data=data, labels=base / "labels.csv", predictions=[("cnn", base / "predictions.csv")], progress=False
        ),
    )
    workspace = write_analysis_artifacts(root)
    plant_curation(workspace)
    return root


def plant_curation(workspace: Workspace) -> None:
    """Payload tags, a payload collection and payload review decisions.

    Through the store when it accepts the names; otherwise written to the tables directly — the state of
    a database filled before names were validated, or by another client: the dashboard must still show
    it as text.
    """
    store = workspace.curation()
    ids = workspace.samples["id"].tolist()
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        for number, tag in enumerate(TAGS):
            tag_id = conn.execute(
                curation_db.tags.insert().values(name=tag, created_by=REVIEWER, created_at=now)
            ).inserted_primary_key[0]
            conn.execute(
                curation_db.sample_tags.insert(),
                [
                    {"sample_id": sid, "tag_id": tag_id, "created_by": REVIEWER, "created_at": now}
                    for sid in ids[number::3]
                ],
            )
        collection_id = conn.execute(
            curation_db.collections.insert().values(
                name=COLLECTION, description=f"{ANCHOR} {IMAGE}", filter_json=None, created_by=REVIEWER, created_at=now
            )
        ).inserted_primary_key[0]
        conn.execute(
            curation_db.collection_members.insert(),
            [
                {"collection_id": collection_id, "sample_id": sid, "created_by": REVIEWER, "created_at": now}
                for sid in ids[:10]
            ],
        )
        conn.execute(
            curation_db.collections.insert().values(
                name=f"{LINK} saved",
                description=SCRIPT,
                created_by=REVIEWER,
                created_at=now,
                filter_json=json.dumps(FilterSpec(labels=[IMAGE], text=LINK).to_dict()),
            )
        )
        for sid in ids[:6]:
            conn.execute(
                curation_db.review_decisions.insert().values(
                    sample_id=sid, action="relabel", new_label=LINK, created_by=REVIEWER, note=NOTE, created_at=now
                )
            )
    store.close()


@pytest.fixture(scope="module")
def hostile_workspace(tmp_path_factory) -> Path:
    return build_hostile_workspace(tmp_path_factory.mktemp("hostile"))


def hostile_query() -> dict[str, str | list[str]]:
    """A link's filter made of payloads: search text (the issue's example), classes, tag, metadata, sort."""
    params = to_query_params(
        FilterSpec(
            text=f"{IMAGE}{LINK}", labels=[IMAGE, HTML_IMG], tags=[TAGS[0]], metadata={"camera": [CAMERAS[0], SCRIPT]}
        )
    )
    params["label"] = [*params["label"], ANCHOR + " not a class"]  # not a class: dropped with a notice
    params["sort"] = LINK  # not a column: dropped with a notice
    return params


def sample_link(workspace: Path) -> dict[str, str]:
    """A link that opens the sample whose file name is a payload."""
    return {"sample": Workspace(workspace).samples["id"].iloc[0]}


# -- what Streamlit renders as markdown -----------------------------------------------------------------------
#: Proto fields Streamlit renders as markdown: every widget's label and tooltip, image captions, the body of
#: markdown / alerts / headings / metrics (not of st.text, st.code, st.html), progress text, radio options.
MARKDOWN_FIELDS = {"label", "help", "caption"}
PLAIN_BODIES = {"Text", "Code", "Html", "Exception", "Json"}


def _is_markdown(kind: str, name: str) -> bool:
    return (
        name in MARKDOWN_FIELDS
        or (name == "body" and kind not in PLAIN_BODIES)
        or (name == "text" and kind == "Progress")
        or (name == "options" and kind == "Radio")
    )


def _strings(message, found: list[tuple[str, str, str]]) -> None:
    """(message type, field, value) of every string field of a protobuf message, recursively."""
    kind = message.DESCRIPTOR.name
    for field, value in message.ListFields():
        repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
        values = value if repeated else [value]
        for item in values:
            if isinstance(item, str):
                found.append((kind, field.name, item))
            elif hasattr(item, "ListFields"):
                _strings(item, found)


def rendered(app: AppTest) -> tuple[list[str], list[dict], list[str]]:
    """(markdown sources, plotly figure specs, st.html bodies) of everything on the page."""
    strings: list[tuple[str, str, str]] = []
    stack = [app._tree]
    while stack:
        node = stack.pop()
        stack.extend(getattr(node, "children", {}).values())
        proto = getattr(node, "proto", None)
        if proto is not None and hasattr(proto, "ListFields"):
            _strings(proto, strings)
    markdown = [value for kind, name, value in strings if _is_markdown(kind, name)]
    figures = [json.loads(value) for kind, name, value in strings if kind == "PlotlyChart" and name == "spec"]
    bodies = [value for kind, name, value in strings if kind == "Html" and name == "body"]
    return markdown, figures, bodies


_CODE_SPAN = re.compile(r"(?<![`\\])(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.DOTALL)
_ESCAPED = re.compile(r"\\[!-/:-@\[-`{-~]")
#: Markup that makes a link, an image or an HTML element, in markdown whose escaped characters are masked.
_DANGEROUS = re.compile(r"\]\(|!\[|\[[^\]]*\]\[|<[A-Za-z/!?]|&#?\w+;")
#: GitHub autolink literals, found in the text *after* escapes and entities are resolved (as remark-gfm does).
_AUTOLINK = re.compile(r"(?i:https?://|www\.)|[-.\w+]@[-\w]")


def surviving_markup(source: str) -> list[str]:
    """The link / image / HTML / autolink markup in a markdown source, outside code spans."""
    outside_code = _CODE_SPAN.sub(" ", source)
    resolved = html.unescape(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", outside_code))
    return _DANGEROUS.findall(_ESCAPED.sub("\x00", outside_code)) + _AUTOLINK.findall(resolved)


def plotly_strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in plotly_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in plotly_strings(v)]
    return []


def assert_shown_as_text(app: AppTest, where: str) -> int:
    """No payload markup survives anywhere on the page; returns how many rendered strings quote a payload."""
    assert not app.exception, (where, [e.value for e in app.exception])
    markdown, figures, bodies = rendered(app)
    quoting = [source for source in markdown if EVIL in source]
    for source in quoting:
        assert not surviving_markup(source), (where, source, surviving_markup(source))
        for payload in PAYLOADS:
            if "<" in payload or "](" in payload:
                assert payload not in _CODE_SPAN.sub(" ", source), (where, source)
    for figure in figures:
        for value in plotly_strings(figure.get("data", [])) + plotly_strings(figure.get("layout", {})):
            if EVIL in value:
                assert "<" not in value and ">" not in value, (where, value)  # plotly parses <a href>, <b>…
    for body in bodies:
        assert not re.search(r"<(?!/?span\b)[A-Za-z/]", body), (where, body)  # the legend: spans only
    return len(quoting) + sum(EVIL in str(f) for f in figures) + sum(EVIL in b for b in bodies)


# -- the escape helpers --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", PAYLOADS)
def test_text_leaves_no_markup_and_keeps_every_character(payload):
    escaped = markup.text(payload)
    assert not surviving_markup(escaped), escaped
    assert "\n" not in escaped
    # Removing the escapes and word joiners gives the string back (line breaks become spaces, leading blanks go).
    shown = re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", escaped).replace(markup.WORD_JOINER, "")
    assert shown == re.sub(r"\s*\n\s*", " ", payload).lstrip()


def test_the_checker_sees_unescaped_payloads():
    """The page check would fail on the raw payloads (so its passing means something)."""
    for payload in (IMAGE, LINK, HTML_IMG, ANCHOR, SCRIPT, AUTOLINK, URL, "a@evil.invalid", "&lt;img&gt;"):
        assert surviving_markup(f"**{payload}** — label"), payload


def test_text_keeps_ordinary_names_readable():
    for name in (
        "tshirt_top",
        "needs-relabel",
        "images/test_00002.png",
        "Tagged 2 sample(s) 'look-again'",
        "Saved: a kept the label.",
        "label = coat AND brightness ≤ q25",
    ):
        assert markup.text(name) == name


@pytest.mark.parametrize("payload", ["a`b", "``x``", "`", IMAGE, "line\nbreak"])
def test_code_spans_cannot_be_closed_from_inside(payload):
    span = markup.code(payload)
    match = _CODE_SPAN.fullmatch(span)
    assert match is not None and match.group(2).strip() == payload.replace("\n", " ")


def test_plot_text_escapes_html():
    assert markup.plot_text(ANCHOR) == '&lt;a href="http://evil.invalid/a"&gt;click&lt;/a&gt;'
    assert markup.plot_text("a & b") == "a &amp; b"


# -- every page, AppTest ------------------------------------------------------------------------------------------
def _visit_every_page(workspace: Path, monkeypatch, query: dict, user: str) -> dict[str, int]:
    """Render every page, arriving with ``query`` as its link; returns how many rendered strings quote a
    payload, per page."""
    monkeypatch.setenv("ROBUSTLENS_WORKSPACE", str(workspace))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.text_input(key="rl.user_input").set_value(user).run()
    quoted = {}
    for route in ROUTES:
        app.switch_page(f"views/{route.name}.py")
        app.query_params = dict(query)
        app.run()
        quoted[route.name] = assert_shown_as_text(app, route.name)
        if route.name == "explorer" and "sample" in query:  # the detail view of the payload-named sample
            assert markup.text(query["sample"]) in [h.value for h in app.subheader]
    return quoted


def test_every_page_shows_payloads_as_text(hostile_workspace, monkeypatch):
    """Class names, file names, metadata, tags, collections, decisions, slices: every page, no filter."""
    quoted = _visit_every_page(hostile_workspace, monkeypatch, sample_link(hostile_workspace), REVIEWER)
    for name in ("overview", "explorer", "embedding_map", "review", "duplicates", "performance", "collections"):
        assert quoted[name] > 0, (name, quoted)  # the payloads did reach the page (as text)


def test_every_page_shows_a_hostile_link_as_text(hostile_workspace, monkeypatch):
    """The same pages opened from a link whose filter (search text, classes, tag, metadata, sample) is payloads."""
    quoted = _visit_every_page(hostile_workspace, monkeypatch, hostile_query(), "ann")
    for name in ("explorer", "embedding_map", "collections", "export"):  # the filter's description quotes the payloads
        assert quoted[name] > 0, (name, quoted)


def test_embedding_map_legend_and_hover_are_escaped(hostile_workspace, monkeypatch):
    monkeypatch.setenv("ROBUSTLENS_WORKSPACE", str(hostile_workspace))
    app = AppTest.from_file(APP, default_timeout=60).run()
    app.switch_page("views/embedding_map.py").run()
    for colour in ("label", "pred.cnn.label"):
        app.selectbox(key="map.colour").set_value(colour).run()
        _, figures, bodies = rendered(app)
        assert figures and bodies
        assert "&lt;img src=http://evil.invalid/y&gt;" in bodies[0]  # the class name, as text, in the legend
        assert_shown_as_text(app, f"map coloured by {colour}")
        hover = figures[0]["data"][0]["customdata"]
        assert any("&lt;img src=https:evil.invalid&gt;" in str(h) for h in hover)


# -- the served app in Chromium -----------------------------------------------------------------------------------
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@pytest.fixture(scope="module")
def served_hostile(hostile_workspace):
    with served(hostile_workspace, "--allowed-host", "dashboard.example") as url:
        port = int(urlsplit(url).port)
        yield port


#: Links, images and other references in the DOM (iframes included) whose target is on the outside host, or a
#: javascript: URL quoting it. A link to this dashboard whose query string quotes a payload is fine.
OUTSIDE_REFERENCES = r"""(evil) => {
    const found = [];
    const attributes = ['href', 'src', 'xlink:href', 'action', 'formaction', 'poster', 'data', 'background'];
    const outside = (value, base) => {
        let url;
        try { url = new URL(value.trim(), base); } catch (e) { return value.includes(evil); }
        return url.hostname.includes(evil) || (url.protocol === 'javascript:' && value.includes(evil));
    };
    for (const root of [document, ...[...document.querySelectorAll('iframe')].map(f => f.contentDocument)]) {
        if (!root) continue;
        for (const element of root.querySelectorAll('*')) {
            for (const name of attributes) {
                const value = element.getAttribute(name);
                if (value && outside(value, root.baseURI)) found.push(`${element.tagName} ${name}=${value}`);
            }
            for (const name of ['srcset', 'style']) {
                const value = element.getAttribute(name);
                if (value && value.includes(evil) && /(url\(|https?:|\/\/)/.test(value)) {
                    found.push(`${element.tagName} ${name}=${value}`);
                }
            }
        }
        for (const element of root.querySelectorAll('script')) {
            if (element.textContent.includes(evil)) found.push('SCRIPT ' + element.textContent.slice(0, 80));
        }
    }
    return found;
}"""


def settled_text(page, wait_for_app_idle, timeout_s: float = 30.0) -> str:
    """The page's text once the script run is over and the text (images, charts, captions) stopped changing."""
    deadline = time.monotonic() + timeout_s
    wait_for_app_idle(page)
    text = page.inner_text("body")
    while time.monotonic() < deadline:
        page.wait_for_timeout(400)
        wait_for_app_idle(page)
        again = page.inner_text("body")
        if again == text:
            break
        text = again
    return text


@pytest.mark.browser
def test_browser_loads_nothing_from_outside_and_shows_no_outside_link(served_hostile, hostile_workspace):
    sync_api = pytest.importorskip("playwright.sync_api")
    from tests.browser import CHROMIUM_ARGS, chromium_path, wait_for_app_idle

    base = f"http://127.0.0.1:{served_hostile}"
    requests: list[str] = []

    def record(route) -> None:
        requests.append(route.request.url)
        if (urlsplit(route.request.url).hostname or "") in LOOPBACK:
            route.continue_()
        else:
            route.abort()

    query = urlencode(hostile_query(), doseq=True)
    titles = {route.name.replace("_", "-"): route.title for route in ROUTES} | {"": "Overview"}
    # Review and export add nothing here that AppTest does not check (a name form, export settings).
    pages = [
        f"/explorer?{urlencode(sample_link(hostile_workspace))}",
        "/",
        "/embedding-map",
        "/duplicates",
        "/performance",
        "/collections",
        f"/explorer?{query}",
        f"/explorer?q={IMAGE}{LINK}",
    ]
    found: dict[str, list[str]] = {}
    shown: dict[str, bool] = {}
    must_show = {pages[0], "/", "/collections", "/duplicates"}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1600, "height": 1200})
            context.route("**/*", record)
            page = context.new_page()
            for path in pages:
                page.goto(base + path)
                title = titles[urlsplit(path).path.strip("/")]
                page.locator("h1", has_text=title).first.wait_for(timeout=60_000)  # this page's run is on screen
                text = settled_text(page, wait_for_app_idle)
                # where the payload must show, a slow chart may still be drawing: poll for it a while
                deadline = time.monotonic() + (45 if path in must_show else 0)
                while EVIL not in text and time.monotonic() < deadline:
                    page.wait_for_timeout(500)
                    text = page.inner_text("body")
                shown[path] = EVIL in text
                found[path] = page.evaluate(OUTSIDE_REFERENCES, EVIL)
            context.close()
        finally:
            browser.close()
    outside = [url for url in requests if (urlsplit(url).hostname or "") not in LOOPBACK]
    assert not outside, sorted(set(outside))
    assert not any(found.values()), found
    # The payloads are on the pages, as text.
    assert all(shown[path] for path in must_show), shown


# -- DNS-rebinding guard ----------------------------------------------------------------------------------------------
def http_status(port: int, host: str | None, *, path: str = "/", origin: str | None = None) -> int:
    """Status of a raw HTTP/1.1 GET sent with exactly these Host / Origin headers."""
    lines = [f"GET {path} HTTP/1.1"] + ([f"Host: {host}"] if host is not None else [])
    lines += [f"Origin: {origin}"] if origin else []
    return _exchange(port, lines)


def websocket_status(port: int, host: str, origin: str | None) -> int:
    """Status of a WebSocket handshake to /_stcore/stream (101 = accepted)."""
    lines = [
        "GET /_stcore/stream HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    lines += [f"Origin: {origin}"] if origin else []
    return _exchange(port, lines)


def _exchange(port: int, lines: list[str]) -> int:
    if not any(line.startswith("Connection:") for line in lines):
        lines = [*lines, "Connection: close"]
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    return int(head.split(b" ", 2)[1])


@pytest.mark.slow
def test_http_requests_naming_a_foreign_host_are_refused(served_hostile):
    port = served_hostile
    for host in (
        f"evil.example:{port}",
        "evil.example",
        f"127.0.0.1.evil.example:{port}",
        f"localhost.evil:{port}",
        f"dashboard.example.evil:{port}",
        "",
        "[::1",
        "a:b:c",
    ):
        assert http_status(port, host) == 403, host
    assert http_status(port, None) in (400, 403)  # no Host header at all: the HTTP server itself refuses it
    for host in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"[::1]:{port}",
        f"LOCALHOST.:{port}",
        "127.0.0.1",
        f"dashboard.example:{port}",
    ):  # the last one: --allowed-host
        assert http_status(port, host) == 200, host
    assert http_status(port, f"127.0.0.1:{port}", path="/_stcore/health") == 200
    assert http_status(port, f"evil.example:{port}", path="/_stcore/health") == 403
    assert http_status(port, f"127.0.0.1:{port}", origin=f"http://evil.example:{port}") == 403
    assert http_status(port, f"127.0.0.1:{port}", origin=f"http://localhost:{port}") == 200


@pytest.mark.slow
def test_websocket_handshakes_naming_a_foreign_host_or_origin_are_refused(served_hostile):
    port = served_hostile
    own = f"127.0.0.1:{port}"
    # DNS rebinding: the browser sends the attacker's name as Host, and the matching Origin.
    assert websocket_status(port, f"evil.example:{port}", f"http://evil.example:{port}") == 403
    assert websocket_status(port, f"evil.example:{port}", None) == 403
    # Cross-site WebSocket: our Host, a foreign (or opaque) Origin.
    assert websocket_status(port, own, f"http://evil.example:{port}") == 403
    assert websocket_status(port, own, "null") == 403
    # The dashboard's own page.
    assert websocket_status(port, own, f"http://{own}") == 101
    assert websocket_status(port, f"dashboard.example:{port}", f"http://dashboard.example:{port}") == 101


def test_host_policy_names():
    policy = HostPolicy("127.0.0.1", ["Dash.Example."])
    assert policy.names == {"127.0.0.1", "localhost", "::1", "dash.example"}
    assert [host_of_header(h) for h in ("[::1]:8501", "LocalHost:1", "x.y", "[::1", "a:b", "h:port", "")] == [
        "::1",
        "localhost",
        "x.y",
        None,
        None,
        None,
        None,
    ]
    assert host_of_origin("http://[::1]:8501") == "::1" and host_of_origin("null") is None
    assert not policy.allows("10.0.0.5") and not policy.allows("evil.example") and not policy.allows(None)
    wildcard = HostPolicy("0.0.0.0")  # noqa: S104 — the wildcard bind is what is being tested
    assert wildcard.allows("10.0.0.5") and wildcard.allows("fe80::1") and not wildcard.allows("evil.example")
    bound = HostPolicy("192.168.1.7")
    assert bound.allows("192.168.1.7") and not bound.allows("192.168.1.8")
    assert HostPolicy.from_environ(bound.to_environ()).names == bound.names
    assert HostPolicy.from_environ({}).names == {"127.0.0.1", "localhost", "::1"}
    assert HostPolicy.from_environ({"ROBUSTLENS_ALLOWED_HOSTS": "not json"}).names == {"127.0.0.1", "localhost", "::1"}
    for bad in ("evil.example/x", "name:8501", "a b", "user@host", ""):
        with pytest.raises(ValidationError, match="--allowed-host"):
            HostPolicy("127.0.0.1", [bad])
    with pytest.raises(ValidationError, match="--host"):
        HostPolicy("my host")


def test_guard_passes_lifespan_and_refuses_duplicate_host_headers():
    import asyncio

    calls = []

    async def inner(scope, receive, send):
        calls.append(scope["type"])

    sent = []

    async def send(message):
        sent.append(message)

    guard = HostGuard(inner, HostPolicy())
    asyncio.run(guard({"type": "lifespan"}, None, send))
    asyncio.run(
        guard(
            {"type": "http", "path": "/", "headers": [(b"host", b"127.0.0.1"), (b"host", b"evil.example")]}, None, send
        )
    )
    asyncio.run(guard({"type": "http", "path": "/", "headers": [(b"host", b"127.0.0.1:1")]}, None, send))
    assert calls == ["lifespan", "http"]
    assert sent[0]["status"] == 403


def test_serve_refuses_a_bad_allowed_host(hostile_workspace, capsys):
    from robustlens.cli import main

    assert main(["serve", str(hostile_workspace), "--allowed-host", "evil.example/x"]) == 2  # before any launch
    assert "--allowed-host" in capsys.readouterr().err
