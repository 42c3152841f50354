"""The dashboard's pages: one registry used by ``app.py`` (navigation) and by pages that link to each other.

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

    @property
    def script(self) -> Path:
        return VIEWS / f"{self.name}.py"


ROUTES = (
    Route("overview", "Overview", ":material/dashboard:"),
    Route("explorer", "Explorer", ":material/grid_view:"),
    Route("embedding_map", "Embedding map", ":material/scatter_plot:"),
    Route("review", "Label review", ":material/rule:"),
    Route("duplicates", "Duplicates & leakage", ":material/content_copy:"),
    Route("performance", "Model performance", ":material/monitoring:"),
    Route("robustness", "Robustness", ":material/shield:"),
    Route("collections", "Tags & collections", ":material/collections_bookmark:"),
    Route("export", "Export", ":material/download:"),
)
BY_NAME = {route.name: route for route in ROUTES}


def page(name: str) -> st.Page:
    """The ``st.Page`` of page ``name`` (the same object ``st.navigation`` registers)."""
    route = BY_NAME[name]
    return st.Page(route.script, title=route.title, icon=route.icon, url_path=route.name.replace("_", "-"),
                   default=route.name == "overview")


def all_pages() -> list[st.Page]:
    return [page(route.name) for route in ROUTES]
