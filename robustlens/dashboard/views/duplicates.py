"""Duplicates & leakage: clusters of identical or near-identical images, side by side with the one to keep.

A cluster is an exact-duplicate group (same bytes) or a near-duplicate group (embedding cosine); a
cluster whose members sit in different splits is train/test leakage and is listed first. "Keep one, tag
the rest" tags every member except the representative, for one cluster or all listed clusters at once.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from robustlens.dashboard import data, widgets
from robustlens.errors import RobustlensError

CLUSTERS_PER_PAGE = 8
KIND = "dup.kind"
LEAKAGE_ONLY = "dup.leakage_only"
TAG = "dup.tag"


def render() -> None:
    widgets.start_page("Duplicates & leakage")
    table = data.table()
    if "dup.near_group" not in table.columns:
        widgets.analysis_missing("duplicate detection")
        return
    clusters = duplicate_clusters(table)
    _summary(clusters)
    if clusters.empty:
        st.success("No duplicates found.")
        return
    left, middle, right = st.columns([2, 1, 2], vertical_alignment="bottom")
    kind = left.radio("Kind", ["all", "exact", "near"], key=KIND, horizontal=True,
                      format_func={"all": "all clusters", "exact": "exact (same bytes)", "near": "near (similar)"}.get)
    leakage_only = middle.toggle("Only cross-split", key=LEAKAGE_ONLY, help="Clusters spanning train/test: leakage")
    tag = right.text_input("Tag for the non-representatives", value="duplicate", key=TAG)
    listed = clusters
    if kind != "all":
        listed = listed[listed["kind"] == kind]
    if leakage_only:
        listed = listed[listed["cross_split"]]
    keys = listed.drop_duplicates("cluster")["cluster"].tolist()
    rest = listed[~listed["representative"]]
    if st.button(f"Keep one per cluster, tag the other {len(rest):,} samples of these {len(keys):,} clusters "
                 f"'{widgets.text(tag)}'",
                 key="dup.tag_all", disabled=rest.empty or not tag.strip(), type="primary", icon=":material/sell:"):
        _tag_rest(rest["id"].tolist(), tag, f"{len(keys):,} clusters")
    pages = max(1, math.ceil(len(keys) / CLUSTERS_PER_PAGE))
    page = st.pagination(pages, key=f"dup.page.{kind}.{leakage_only}.{pages}", max_visible_pages=9)
    for cluster in keys[(page - 1) * CLUSTERS_PER_PAGE: page * CLUSTERS_PER_PAGE]:
        _cluster(table, listed[listed["cluster"] == cluster], tag)
    _pairs()


def duplicate_clusters(table: pd.DataFrame) -> pd.DataFrame:
    """One row per clustered sample: ``cluster`` key, ``kind``, ``position``, ``id``, ``split``, ``representative``,
    ``cross_split``, ``size``; cross-split clusters first, then larger clusters.

    A cluster is a ``near_group`` (which also holds exact copies), or an ``exact_group`` of samples without
    a near group. Its kind is ``exact`` when all its members are byte-identical copies of one another.
    """
    exact = _group_column(table, "dup.exact_group")
    near = _group_column(table, "dup.near_group")
    positions = np.flatnonzero((near >= 0) | (exact >= 0))
    columns = ["cluster", "kind", "position", "id", "split", "representative", "cross_split", "size"]
    if len(positions) == 0:
        return pd.DataFrame(columns=columns)
    near_at, exact_at = near[positions], exact[positions]
    frame = pd.DataFrame({
        "cluster": np.where(near_at >= 0, np.char.add("g:", near_at.astype(str)),
                            np.char.add("x:", exact_at.astype(str))),
        "exact_group": exact_at, "position": positions, "id": table["id"].iloc[positions].to_numpy(),
        "split": table["split"].iloc[positions].astype(str).to_numpy(),
        "representative": table["dup.is_representative"].to_numpy(dtype=bool)[positions]
        if "dup.is_representative" in table else np.zeros(len(positions), dtype=bool)})
    grouped = frame.groupby("cluster")
    all_exact = (grouped["exact_group"].transform("min") >= 0) & (grouped["exact_group"].transform("nunique") == 1)
    frame["kind"] = np.where(all_exact.to_numpy(dtype=bool), "exact", "near")
    # Exactly one representative per cluster: the flagged one, else the first member.
    flagged_first = frame[frame["representative"]].drop_duplicates("cluster").index
    frame["representative"] = False
    frame.loc[flagged_first, "representative"] = True
    lacking = ~frame["cluster"].isin(frame.loc[flagged_first, "cluster"])
    frame.loc[frame[lacking].drop_duplicates("cluster").index, "representative"] = True
    frame["cross_split"] = grouped["split"].transform("nunique") > 1
    frame["size"] = grouped["id"].transform("size")
    frame = frame.sort_values(["cross_split", "size", "cluster", "representative"],
                              ascending=[False, False, True, False], kind="stable")
    return frame[columns].reset_index(drop=True)


def _group_column(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        return np.full(len(table), -1, dtype=np.int64)
    return table[column].fillna(-1).to_numpy(dtype=np.int64)


def _summary(clusters: pd.DataFrame) -> None:
    cols = st.columns(4)
    keys = clusters.drop_duplicates("cluster")
    cols[0].metric("Exact-duplicate clusters", f"{int((keys['kind'] == 'exact').sum()):,}")
    cols[1].metric("Near-duplicate clusters", f"{int((keys['kind'] == 'near').sum()):,}")
    cols[2].metric("Samples in clusters", f"{len(clusters):,}")
    cols[3].metric("Cross-split clusters (leakage)", f"{int(keys['cross_split'].sum()):,}")


def _cluster(table: pd.DataFrame, members: pd.DataFrame, tag: str) -> None:
    first = members.iloc[0]
    with st.container(border=True):
        head, action = st.columns([3, 1], vertical_alignment="center")
        title = f"**{'Exact' if first['kind'] == 'exact' else 'Near'}-duplicate cluster** · {len(members)} samples"
        if first["cross_split"]:
            title += (" · :red[**leakage: spans " + " / ".join(map(widgets.text, sorted(members["split"].unique())))
                      + "**]")
        head.markdown(title)
        rest = members[~members["representative"]]["id"].tolist()
        if action.button("Keep one, tag the rest", key=f"dup.one.{first['cluster']}",
                         disabled=not rest or not tag.strip()):
            _tag_rest(rest, tag, "this cluster")
        captions = {row.position: ("★ keep · " if row.representative else "") + f"{row.split} · "
                    for row in members.itertuples()}
        widgets.thumbnail_grid(table, members["position"].to_numpy()[:12], columns=8,
                               key=f"dup.grid.{first['cluster']}", selectable=False,
                               caption=lambda r: captions[int(r.name)] + str(r["label"]))


def _tag_rest(ids: list[str], tag: str, what: str) -> None:
    user = widgets.require_user()
    if not user or not ids:
        return
    try:
        count = data.curation().add_tag(ids, tag.strip(), user=user)
    except RobustlensError as exc:  # refused name, a write conflict, the database unreachable: nothing changed
        st.error(widgets.text(f"Not saved: {exc}"))
        return
    widgets.done(f"Tagged {count:,} non-representative sample(s) of {what} '{tag.strip()}'.")


def _pairs() -> None:
    pairs = data.artifact("duplicate_pairs")
    if pairs is None or pairs.empty:
        return
    with st.expander(f"All {len(pairs):,} duplicate pairs"):
        st.dataframe(pairs, hide_index=True, width="stretch")


if __name__ == "__main__":
    widgets.run_page(render)
