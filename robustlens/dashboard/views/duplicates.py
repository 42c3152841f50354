"""Duplicates & leakage: clusters of identical or near-identical images, side by side with the one to keep.

A cluster is an exact-duplicate group (same bytes) or a near-duplicate group (embedding cosine); a
cluster whose members sit in two or more known splits is train/test leakage and is listed first. "Keep one,
tag the rest" tags every member except the representative, for one cluster or all listed clusters at once.
Clusters, representatives and leakage are the duplicates stage's, read through :mod:`robustlens.query.duplicates`.
"""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from robustlens.dashboard import data
from robustlens.dashboard.components.frame import analysis_missing, done, require_user, run_page
from robustlens.dashboard.components.grid import thumbnail_grid
from robustlens.dashboard.components.markup import text
from robustlens.errors import RobustlensError
from robustlens.query.duplicates import cluster_counts, duplicate_clusters, has_duplicates

CLUSTERS_PER_PAGE = 8
KIND = "dup.kind"
LEAKAGE_ONLY = "dup.leakage_only"
TAG = "dup.tag"


def render() -> None:
    table = data.table()
    if not has_duplicates(table):
        analysis_missing("duplicate detection")
        return
    clusters = duplicate_clusters(table)
    _summary(clusters)
    if clusters.empty:
        st.success("No duplicates found.")
        return
    left, middle, right = st.columns([2, 1, 2], vertical_alignment="bottom")
    kind = left.radio(
        "Kind",
        ["all", "exact", "near"],
        key=KIND,
        horizontal=True,
        format_func={"all": "all clusters", "exact": "exact (same bytes)", "near": "near (similar)"}.get,
    )
    leakage_only = middle.toggle("Only cross-split", key=LEAKAGE_ONLY, help="Clusters spanning train/test: leakage")
    tag = right.text_input("Tag for the non-representatives", value="duplicate", key=TAG)
    listed = clusters
    if kind != "all":
        listed = listed[listed["kind"] == kind]
    if leakage_only:
        listed = listed[listed["cross_split"]]
    keys = listed.drop_duplicates("cluster")["cluster"].tolist()
    rest = listed[~listed["representative"]]
    if st.button(
        f"Keep one per cluster, tag the other {len(rest):,} samples of these {len(keys):,} clusters '{text(tag)}'",
        key="dup.tag_all",
        disabled=rest.empty or not tag.strip(),
        type="primary",
        icon=":material/sell:",
    ):
        _tag_rest(rest["id"].tolist(), tag, f"{len(keys):,} clusters")
    pages = max(1, math.ceil(len(keys) / CLUSTERS_PER_PAGE))
    page = st.pagination(pages, key=f"dup.page.{kind}.{leakage_only}.{pages}", max_visible_pages=9)
    for cluster in keys[(page - 1) * CLUSTERS_PER_PAGE : page * CLUSTERS_PER_PAGE]:
        _cluster(table, listed[listed["cluster"] == cluster], tag)
    _pairs()


def _summary(clusters: pd.DataFrame) -> None:
    counts = cluster_counts(clusters)
    cols = st.columns(4)
    cols[0].metric("Exact-duplicate clusters", f"{counts['exact_clusters']:,}")
    cols[1].metric("Near-duplicate clusters", f"{counts['near_clusters']:,}")
    cols[2].metric("Samples in clusters", f"{counts['samples_in_clusters']:,}")
    cols[3].metric("Cross-split clusters (leakage)", f"{counts['cross_split_clusters']:,}")


def _cluster(table: pd.DataFrame, members: pd.DataFrame, tag: str) -> None:
    first = members.iloc[0]
    with st.container(border=True):
        head, action = st.columns([3, 1], vertical_alignment="center")
        title = f"**{'Exact' if first['kind'] == 'exact' else 'Near'}-duplicate cluster** · {len(members)} samples"
        if first["cross_split"]:
            title += " · :red[**leakage: spans " + " / ".join(map(text, sorted(members["split"].unique()))) + "**]"
        head.markdown(title)
        rest = members[~members["representative"]]["id"].tolist()
        if action.button(
            "Keep one, tag the rest", key=f"dup.one.{first['cluster']}", disabled=not rest or not tag.strip()
        ):
            _tag_rest(rest, tag, "this cluster")
        captions = {
            row.position: ("★ keep · " if row.representative else "") + f"{row.split} · "
            for row in members.itertuples()
        }
        thumbnail_grid(
            table,
            members["position"].to_numpy()[:12],
            columns=8,
            key=f"dup.grid.{first['cluster']}",
            selectable=False,
            caption=lambda r: captions[int(r.name)] + str(r["label"]),
        )


def _tag_rest(ids: list[str], tag: str, what: str) -> None:
    user = require_user()
    if not user or not ids:
        return
    try:
        count = data.curation().add_tag(ids, tag.strip(), user=user)
    except RobustlensError as exc:  # refused name, a write conflict, the database unreachable: nothing changed
        st.error(text(f"Not saved: {exc}"))
        return
    done(f"Tagged {count:,} non-representative sample(s) of {what} '{tag.strip()}'.")


def _pairs() -> None:
    pairs = data.artifact("duplicate_pairs")
    if pairs is None or pairs.empty:
        return
    with st.expander(f"All {len(pairs):,} duplicate pairs"):
        st.dataframe(pairs, hide_index=True, width="stretch")


if __name__ == "__main__":
    run_page("duplicates", render)
