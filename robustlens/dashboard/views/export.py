"""Export: a filter result, selection, collection or tag to CSV / JSON / Parquet (download or saved on the
server), the review decisions as a relabel file, or an ImageFolder copy — the same code as ``robustlens export``.

Saving on the server writes only under the export root (``WORKSPACE/exports`` or ``robustlens serve
--export-root DIR``), under a NAME the reviewer types (letters, digits, ``._-``: no folders, no ``..``), and
always as a new file or folder: a taken name gets a numbered variant and the page says so. Nothing on the
server is ever replaced or deleted from here."""

from __future__ import annotations

import shlex
from urllib.parse import urlencode

import numpy as np
import streamlit as st

from robustlens.dashboard import data, state
from robustlens.dashboard.components.filter_panel import filter_panel
from robustlens.dashboard.components.frame import done, run_page
from robustlens.dashboard.components.markup import code, text
from robustlens.errors import RobustlensError
from robustlens.query import export
from robustlens.query.filters import FilterError, FilterSpec, to_query_params


def render() -> None:
    table = data.table()
    spec = filter_panel(table)
    store = data.curation()
    try:
        source, positions, cli_args = _source(table, spec, store)
    except FilterError as exc:
        st.error(f"This selection cannot be exported: {text(exc)}")
        state.publish(spec)
        return
    _samples(table, positions, source, cli_args, store)
    _relabels(table, store)
    _imagefolder(table, positions, source, store)
    state.publish(spec)


def _source(table, spec: FilterSpec, store) -> tuple[str, np.ndarray, list[str]]:
    """Which samples: returns a short name, their row positions and the matching ``robustlens export`` arguments."""
    st.subheader("Samples")
    chosen = state.selection()
    collections = store.collection_names()
    tags = list(store.tag_counts())
    options = (
        ["filter"]
        + (["selection"] if chosen else [])
        + (["collection"] if collections else [])
        + (["tag"] if tags else [])
    )
    labels = {
        "filter": "current filter result",
        "selection": f"grid selection ({len(chosen):,})",
        "collection": "a collection",
        "tag": "a tag",
    }
    source = st.radio("Export", options, format_func=labels.get, key="export.source", horizontal=True)
    if source == "filter":
        query = urlencode(to_query_params(spec), doseq=True)
        return "filtered", data.filtered_positions(table, spec), (["--query", query] if query else [])
    if source == "selection":
        ids = FilterSpec(ids=chosen)
        return "selection", data.filtered_positions(table, ids), ["--filter", ids.to_json()]
    if source == "collection":
        name = st.selectbox("Collection", collections, key="export.collection")
        return _slug(name), export.select_positions(table, store, collections=[name]), ["--collection", name]
    name = st.selectbox("Tag", tags, key="export.tag")
    return _slug(name), export.select_positions(table, store, tags=[name]), ["--tag", name]


def _samples(table, positions: np.ndarray, source: str, cli_args: list[str], store) -> None:
    left, middle, right = st.columns(3)
    columns = left.radio(
        "Columns",
        list(export.COLUMN_SETS),
        key="export.columns",
        format_func={"manifest": "manifest (re-importable)", "all": "all columns + tags"}.get,
    )
    fmt = middle.selectbox("Format", list(export.TABLE_FORMATS), key="export.format")
    apply = right.checkbox(
        "Apply review decisions",
        key="export.apply",
        help="relabel decisions change the label; excluded samples are left out",
    )
    raw_csv = right.checkbox(
        "Raw CSV cells",
        key="export.raw_csv",
        help="By default CSV text starting with = + - @ (or a tab / CR) gets a leading ' so a "
        "spreadsheet shows it instead of running it as a formula; tick for programs that "
        "read the file",
    )
    stem = st.text_input(
        "Name on the server",
        value=f"robustlens-{source}",
        key="export.name",
        help=f"Saved as a new file NAME.{fmt} in {code(data.export_root())}; a taken name gets a number",
    )
    name = f"robustlens-{source}.{fmt}"
    st.caption(f"{len(positions):,} samples.")

    def frame():
        return export.export_frame(table, positions, columns=columns, curation=store, apply_decisions=apply)

    buttons = st.columns([1, 1, 3])
    buttons[0].download_button(
        f"Download {fmt.upper()}",
        data=lambda: export.frame_bytes(frame(), fmt, raw_csv=raw_csv),
        file_name=name,
        mime=export.MIME_TYPES[fmt],
        key="export.download",
        on_click="ignore",
        icon=":material/download:",
        disabled=len(positions) == 0,
    )
    if buttons[1].button(
        "Save on the server",
        key="export.save",
        disabled=len(positions) == 0,
        help=f"Write a new file under {code(data.export_root())}",
    ):
        _save(frame, stem, fmt, raw_csv)
    preview = export.export_frame(table, positions[:20], columns=columns, curation=store, apply_decisions=apply)
    st.dataframe(preview, hide_index=True, width="stretch", height=240)
    extra = (
        (["--columns", "all"] if columns == "all" else [])
        + (["--apply-decisions"] if apply else [])
        + (["--raw-csv"] if raw_csv and fmt == "csv" else [])
    )
    command = ["robustlens", "export", str(data.workspace_path()), *cli_args, *extra, "--out", name]
    st.caption("The same from a terminal:")
    st.code(shlex.join(command), language="bash")


def _save(build, stem: str, fmt: str, raw_csv: bool) -> None:
    """Write a new file ``STEM.FMT`` (or a numbered variant) under the export root; never replaces one."""
    try:
        target = export.save_table_on_server(build(), data.export_root(), stem, fmt, raw_csv=raw_csv)
    except (RobustlensError, OSError) as exc:
        st.error(f"Export failed: {text(exc)}")
        return
    if target.name != f"{stem.removesuffix('.' + fmt)}.{fmt}":
        state.notice(f"A file named {stem}.{fmt} already exists there, so this one is {target.name}.", "info")
    done(f"Saved {target}")


def _relabels(table, store) -> None:
    st.subheader("Relabel file")
    include_all = st.checkbox("Include keep / ambiguous / exclude decisions", key="export.all_decisions")
    frame = export.relabel_frame(table, store, include_all=include_all)
    if frame.empty:
        st.info("No review decisions yet: work the **Label review** queue first.")
        return
    st.caption(f"{len(frame):,} decision(s), the latest per sample.")
    st.dataframe(frame.head(50), hide_index=True, width="stretch", height=200)
    left, right = st.columns([1, 4])
    raw_csv = st.session_state.get("export.raw_csv", False)
    left.download_button(
        "Download relabels.csv",
        data=export.frame_bytes(frame, "csv", raw_csv=raw_csv),
        file_name="relabels.csv",
        mime="text/csv",
        key="export.relabels",
        on_click="ignore",
        icon=":material/download:",
    )
    if right.button(
        "Save on the server",
        key="export.relabels_save",
        help=f"Write a new file relabels.csv (or a numbered variant) under {code(data.export_root())}",
    ):
        _save(lambda: frame, "relabels", "csv", raw_csv)


def _imagefolder(table, positions: np.ndarray, source: str, store) -> None:
    st.subheader("ImageFolder copy")
    root = data.export_root()
    st.caption(
        f"Copies the images into a new folder {code(f'{root}/NAME/<label>/')} with a `manifest.csv`; "
        "re-import with "
        "`robustlens init WS --data DEST --labels DEST/manifest.csv`. An existing folder is never replaced: "
        "a taken name gets a number."
    )
    name = st.text_input(
        "New folder name",
        value=f"imagefolder-{source}",
        key="export.dest",
        help="Letters, digits, '.', '_' and '-' only; created inside the export root",
    )
    apply = st.session_state.get("export.apply", False)
    raw_csv = st.session_state.get("export.raw_csv", False)
    if st.button(f"Write {len(positions):,} images", key="export.imagefolder", disabled=len(positions) == 0):
        try:
            frame = export.export_frame(table, positions, columns="manifest", curation=store, apply_decisions=apply)
            result = export.save_imagefolder_on_server(data.workspace(), frame, root, name, raw_csv=raw_csv)
        except (RobustlensError, OSError) as exc:
            st.error(f"ImageFolder export failed: {text(exc)}")
            return
        if result.path.name != name:
            state.notice(f"A folder named {name} already exists there, so this export is {result.path.name}.", "info")
        if result.refused:
            state.notice(result.refused_summary(), "warning")
        done(f"Wrote {result.copied:,} images to {result.path}")


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in text).strip("-") or "export"


if __name__ == "__main__":
    run_page("export", render)
