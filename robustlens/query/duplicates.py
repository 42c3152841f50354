"""Duplicate clusters as the duplicates stage wrote them, one row per clustered sample, for the dashboard's
Duplicates & leakage page (and anything else that lists clusters).

Nothing here re-derives what the stage decided: cluster membership (``dup.near_group``, which holds the exact
copies too; ``dup.exact_group`` for an identical-bytes group without one), the copy to keep
(``dup.is_representative``) and leakage (``dup.cross_split``: the cluster spans two or more *known* splits,
``unspecified`` ignored) are columns of ``artifacts/duplicates.parquet``, joined into the sample table
under the ``dup.`` prefix (:mod:`robustlens.query.sample_table`). This module only groups and orders them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Columns of :func:`duplicate_clusters`.
CLUSTER_COLUMNS = ["cluster", "kind", "position", "id", "split", "representative", "cross_split", "size"]


def has_duplicates(table: pd.DataFrame) -> bool:
    """Whether the duplicates stage's columns are in the sample table (the stage ran)."""
    return "dup.near_group" in table.columns


def duplicate_clusters(table: pd.DataFrame) -> pd.DataFrame:
    """One row per clustered sample, cross-split clusters first, then larger clusters.

    Parameters
    ----------
    table:
        The sample table (:func:`~robustlens.query.sample_table.load_sample_table`) with the ``dup.`` columns.

    Returns
    -------
    pandas.DataFrame
        Columns :data:`CLUSTER_COLUMNS`: ``cluster`` (key: ``g:<near_group>``, or ``x:<exact_group>`` for an
        exact group without a near group), ``kind`` (``exact`` when every member is a byte-identical copy of
        the others, else ``near``), ``position`` (row in ``table``), ``id``, ``split`` (text),
        ``representative`` (the stage's copy to keep; exactly one per cluster — the first member where the
        artifact flags none), ``cross_split`` (the stage's leakage verdict for the cluster) and ``size``
        (members in the cluster).
    """
    exact = _group_column(table, "dup.exact_group")
    near = _group_column(table, "dup.near_group")
    positions = np.flatnonzero((near >= 0) | (exact >= 0))
    if len(positions) == 0:
        return pd.DataFrame(columns=CLUSTER_COLUMNS)
    near_at, exact_at = near[positions], exact[positions]
    frame = pd.DataFrame(
        {
            "cluster": np.where(
                near_at >= 0, np.char.add("g:", near_at.astype(str)), np.char.add("x:", exact_at.astype(str))
            ),
            "exact_group": exact_at,
            "position": positions,
            "id": table["id"].iloc[positions].to_numpy(),
            "split": table["split"].iloc[positions].astype(str).to_numpy(),
            "representative": _flag_column(table, "dup.is_representative")[positions],
            "leaking": _flag_column(table, "dup.cross_split")[positions],
        }
    )
    grouped = frame.groupby("cluster")
    all_exact = (grouped["exact_group"].transform("min") >= 0) & (grouped["exact_group"].transform("nunique") == 1)
    frame["kind"] = np.where(all_exact.to_numpy(dtype=bool), "exact", "near")
    # Exactly one representative per cluster: the flagged one, else the first member.
    flagged_first = frame[frame["representative"]].drop_duplicates("cluster").index
    frame["representative"] = False
    frame.loc[flagged_first, "representative"] = True
    lacking = ~frame["cluster"].isin(frame.loc[flagged_first, "cluster"])
    frame.loc[frame[lacking].drop_duplicates("cluster").index, "representative"] = True
    # The stage writes its verdict on every member of a leaking cluster.
    frame["cross_split"] = grouped["leaking"].transform("any").to_numpy(dtype=bool)
    frame["size"] = grouped["id"].transform("size")
    frame = frame.sort_values(
        ["cross_split", "size", "cluster", "representative"], ascending=[False, False, True, False], kind="stable"
    )
    return frame[CLUSTER_COLUMNS].reset_index(drop=True)


def cluster_counts(clusters: pd.DataFrame) -> dict[str, int]:
    """Headline counts of :func:`duplicate_clusters`' result: ``exact_clusters``, ``near_clusters``,
    ``samples_in_clusters`` and ``cross_split_clusters``."""
    keys = clusters.drop_duplicates("cluster")
    return {
        "exact_clusters": int((keys["kind"] == "exact").sum()),
        "near_clusters": int((keys["kind"] == "near").sum()),
        "samples_in_clusters": len(clusters),
        "cross_split_clusters": int(keys["cross_split"].sum()),
    }


def _group_column(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        return np.full(len(table), -1, dtype=np.int64)
    return table[column].fillna(-1).to_numpy(dtype=np.int64)


def _flag_column(table: pd.DataFrame, column: str) -> np.ndarray:
    if column not in table.columns:
        return np.zeros(len(table), dtype=bool)
    return table[column].fillna(False).to_numpy(dtype=bool)
