"""The dashboard's pages: one registry used by ``app.py`` (navigation), by the page frame (each page's title and
caption) and by pages that link to each other.

Each page is a script in ``views/`` (file-based ``st.Page`` objects, so ``st.switch_page`` and AppTest's
``switch_page`` both work); its ``url_path`` is the page's address (``/explorer?label=coat``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

VIEWS = Path(__file__).parent / "views"


@dataclass(frozen=True)
class Route:
    name: str
    title: str
    icon: str
    #: One line under the title (markdown written by us, never a user string); ``""`` for none.
    caption: str = ""

    @property
    def script(self) -> Path:
        return VIEWS / f"{self.name}.py"


ROUTES = (
    Route("overview", "Overview", ":material/dashboard:"),
    Route("explorer", "Explorer", ":material/grid_view:"),
    Route(
        "embedding_map",
        "Embedding map",
        ":material/scatter_plot:",
        "Similar images lie close together. Drag to lasso (or switch to box select in the chart's toolbar) a "
        "region, then filter or tag it.",
    ),
    Route(
        "review",
        "Label review",
        ":material/rule:",
        "Samples ranked by label quality (lowest first): is the given label right?",
    ),
    Route("duplicates", "Duplicates & leakage", ":material/content_copy:"),
    Route("performance", "Model performance", ":material/monitoring:"),
    Route(
        "robustness",
        "Robustness",
        ":material/shield:",
        "Common corruptions, adversarial attacks and certified robustness of the workspace model, on a "
        "stratified sample of the data.",
    ),
    Route("collections", "Tags & collections", ":material/collections_bookmark:"),
    Route(
        "export", "Export", ":material/download:", "Everything here is also available headless: `robustlens export`."
    ),
)
BY_NAME = {route.name: route for route in ROUTES}


def page(name: str) -> st.Page:
    """The ``st.Page`` of page ``name`` (the same object ``st.navigation`` registers)."""
    route = BY_NAME[name]
    return st.Page(
        route.script,
        title=route.title,
        icon=route.icon,
        url_path=route.name.replace("_", "-"),
        default=route.name == "overview",
    )


def all_pages() -> list[st.Page]:
    return [page(route.name) for route in ROUTES]
