"""Label review: the samples most likely mislabelled, one at a time, with the model's view and neighbours.

Every decision is appended to the curation database under the user's name with the time; decisions
by others show on each item, and by default items someone already decided leave the queue, so several
reviewers can work one queue at once. Keys: A accept · K keep · M ambiguous · X exclude · L relabel ·
S skip · B back.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from robustlens.dashboard import data, state
from robustlens.dashboard.components.frame import analysis_missing, run_page
from robustlens.dashboard.components.markup import code, plot_text, text
from robustlens.dashboard.components.sample_detail import neighbours_block
from robustlens.errors import RobustlensError
from robustlens.query.review import flagged_count, has_review_queue, review_queue_spec
from robustlens.query.sample_table import prediction_sets

POSITION = "review.position"
SCOPE = "review.scope"
HIDE_DECIDED = "review.hide_decided"
CLASS = "review.class"
NOTE = "review.note"
RELABEL_TO = "review.relabel_to"
ACTION_NAMES = {
    "relabel": "relabelled",
    "keep": "kept the label",
    "ambiguous": "marked ambiguous",
    "exclude": "excluded",
}


def render() -> None:
    table = data.table()
    if not has_review_queue(table):
        analysis_missing("label-issue ranking")
        return
    user = _ask_user()
    if user is None:
        return
    latest = {d["sample_id"]: d for d in data.curation().decisions(latest_only=True)}
    queue = _queue_controls(table)
    mine = sum(1 for d in latest.values() if d["created_by"] == user)
    st.caption(
        f"{len(queue):,} in this queue · {len(latest):,} samples decided by the team · {mine:,} by you ({text(user)})"
    )
    if len(queue) == 0:
        st.success("Nothing left in this queue. Switch **Show** to all samples, or show decided items to revisit them.")
        return
    index = min(max(int(st.session_state.get(POSITION, 0)), 0), len(queue) - 1)
    st.session_state[POSITION] = index
    st.progress((index + 1) / len(queue), text=f"Item {index + 1:,} of {len(queue):,}")
    _item(table, int(queue[index]), latest, user, index)
    _upcoming(table, queue[index + 1 : index + 11])


def _ask_user() -> str | None:
    """The user's name, asked once per browser session (Enter submits)."""
    if state.user():
        return state.user()
    with st.form("review.who"):
        name = st.text_input("Your name", placeholder="so the team sees who decided what", key="review.name")
        submitted = st.form_submit_button("Start reviewing", type="primary")
    if submitted:
        if name.strip():
            state.set_user(name)
            st.rerun()
        st.warning("Please type your name.")
    return None


def _queue_controls(table: pd.DataFrame) -> np.ndarray:
    flagged = flagged_count(table)
    left, middle, right = st.columns([2, 1, 1], vertical_alignment="bottom")
    scope = left.radio(
        "Show",
        ["flagged", "all"],
        key=SCOPE,
        horizontal=True,
        format_func=lambda s: (
            f"flagged label issues ({flagged:,})"
            if s == "flagged"
            else f"all samples by label quality ({len(table):,})"
        ),
    )
    label = middle.selectbox(
        "Given label", list(table["label"].cat.categories), index=None, key=CLASS, placeholder="any class"
    )
    hide = right.toggle("Hide decided", value=True, key=HIDE_DECIDED, help="Leave out samples anyone already decided")
    return data.filtered_positions(
        table, review_queue_spec(table, flagged_only=scope == "flagged", label=label, hide_decided=hide)
    )


def _item(table: pd.DataFrame, position: int, latest: dict, user: str, index: int) -> None:
    row = table.iloc[position]
    sample_id = row["id"]
    suggested = row.get("label_issue.suggested_label")
    suggested = None if pd.isna(suggested) else str(suggested)
    with st.container(border=True):
        image, facts, chart = st.columns([1, 1, 2])
        with image:
            path = data.thumbnails([position])[0]
            if path:
                st.image(path, width="stretch", output_format="JPEG")
            st.caption(text(sample_id))
        with facts:
            st.metric("Given label", text(row["label"]))
            st.metric("Suggested label", text(suggested) if suggested else "—")
            st.metric(
                "Label quality",
                f"{row['label_issue.label_quality']:.3f}",
                help="How much the model believes the given label (0 = not at all)",
            )
        with chart:
            _probabilities(table, position)
        _others(sample_id, latest)
        _actions(table, sample_id, str(row["label"]), suggested, user, index)
    with st.expander("Nearest neighbours", expanded=True):
        neighbours_block(table, position, key="review.nn", on_open=None)


def _probabilities(table: pd.DataFrame, position: int) -> None:
    sets = prediction_sets(table)
    if not sets:
        st.caption("No predictions in this workspace.")
        return
    classes = [plot_text(c) for c in table["label"].cat.categories]
    figure = go.Figure()
    for name in sets:
        figure.add_bar(y=classes, x=data.probabilities(name, position), name=plot_text(name), orientation="h")
    figure.update_layout(
        height=260,
        margin=dict(l=10, r=10, t=24, b=10),
        barmode="group",
        title={"text": "Class probabilities", "font": {"size": 13}},
        xaxis={"range": [0, 1]},
        yaxis={"autorange": "reversed"},
        legend={"orientation": "h"},
    )
    st.plotly_chart(figure, width="stretch", key="review.probabilities")


def _others(sample_id: str, latest: dict) -> None:
    history = data.curation().decision_history(sample_id)
    if not history:
        st.caption("No decision on this sample yet.")
        return
    lines = [
        f"- **{text(d['created_by'])}** {text(ACTION_NAMES.get(d['action'], d['action']))}"
        + (f" → {code(d['new_label'])}" if d["action"] == "relabel" else "")
        + f" · {pd.Timestamp(d['created_at']).strftime('%Y-%m-%d %H:%M')}"
        + (f" · _{text(d['note'])}_" if d["note"] else "")
        for d in history
    ]
    st.markdown("**Decisions so far** (latest counts)\n" + "\n".join(lines))


def _actions(table: pd.DataFrame, sample_id: str, given: str, suggested: str | None, user: str, index: int) -> None:
    hide = bool(st.session_state.get(HIDE_DECIDED, True))
    st.text_input("Note (optional)", key=NOTE, placeholder="why — saved with the decision")
    row1 = st.columns(6)
    row1[0].button(
        f"Accept → {text(suggested)}" if suggested else "Accept suggestion",
        key="review.accept",
        type="primary",
        shortcut="A",
        disabled=not suggested or suggested == given,
        on_click=_decide,
        args=(sample_id, "relabel", suggested, user, hide),
    )
    # The decisions that carry no new label: one button each, keyed review.<decision>.
    keeping = (("Keep label", "keep", "K"), ("Ambiguous", "ambiguous", "M"), ("Exclude", "exclude", "X"))
    for column, (title, decision, shortcut) in zip(row1[1:4], keeping, strict=True):
        column.button(
            title,
            key=f"review.{decision}",
            shortcut=shortcut,
            on_click=_decide,
            args=(sample_id, decision, None, user, hide),
        )
    row1[4].button("Skip", key="review.skip", shortcut="S", on_click=_move, args=(index + 1,))
    row1[5].button("Back", key="review.back", shortcut="B", on_click=_move, args=(index - 1,), disabled=index == 0)
    others = [c for c in table["label"].cat.categories if c != given]
    left, right = st.columns([3, 1], vertical_alignment="bottom")
    left.selectbox("Relabel to", others, key=RELABEL_TO, index=None, placeholder="choose the right class")
    right.button("Relabel", key="review.relabel", shortcut="L", on_click=_relabel, args=(sample_id, user, hide))
    st.caption(
        "Keys: **A** accept · **K** keep · **M** ambiguous · **X** exclude · **L** relabel · **S** skip · **B** back"
    )


def _decide(sample_id: str, action: str, new_label: str | None, user: str, hide: bool) -> None:
    note = str(st.session_state.get(NOTE) or "").strip()
    try:
        data.curation().record_decision(sample_id, action, user=user, new_label=new_label, note=note)
    except RobustlensError as exc:  # refused input, a write conflict, the database unreachable: nothing saved
        state.notice(f"Not saved: {exc}", "error")
        return
    st.session_state[NOTE] = ""
    st.session_state[RELABEL_TO] = None
    if not hide:
        st.session_state[POSITION] = int(st.session_state.get(POSITION, 0)) + 1
    verb = ACTION_NAMES[action] + (f" → {new_label}" if action == "relabel" else "")
    state.notice(f"Saved: {sample_id} {verb}.", "success")


def _relabel(sample_id: str, user: str, hide: bool) -> None:
    target = st.session_state.get(RELABEL_TO)
    if not target:
        state.notice("Choose the class to relabel to first (the 'Relabel to' box).")
        return
    _decide(sample_id, "relabel", target, user, hide)


def _move(index: int) -> None:
    st.session_state[POSITION] = max(index, 0)


def _upcoming(table: pd.DataFrame, positions: np.ndarray) -> None:
    if len(positions) == 0:
        return
    rows = table.iloc[positions]
    with st.expander(f"Next {len(rows)} in the queue"):
        st.dataframe(
            pd.DataFrame(
                {
                    "id": rows["id"],
                    "label": rows["label"].astype(str),
                    "suggested": rows["label_issue.suggested_label"].astype(str),
                    "label quality": rows["label_issue.label_quality"],
                }
            ),
            hide_index=True,
            width="stretch",
        )


if __name__ == "__main__":
    run_page("review", render)
