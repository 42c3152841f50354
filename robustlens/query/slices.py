"""Slice membership and the slice tables, as the query layer serves them to the dashboard, the CLI and export.

A slice (a row of ``artifacts/slices.parquet``) is a conjunction of predicates; its members are the AND of
the predicates' bit-packed mask rows that the slices stage recorded (``slice_predicate_masks.npy``) — the
samples its ``size`` counted, nothing re-derived. :class:`SliceMembership` holds what the filter engine needs
to resolve ``FilterSpec(slice=...)`` in memory (the id → predicates map and the packed masks); load it once
per artifacts version with :func:`load_slice_membership` and pass it to the filter functions as ``slices=``.
The membership itself is :func:`robustlens.analysis.artifacts.slice_membership`, the same function the
slices and robustness stages use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from robustlens.analysis import artifacts
from robustlens.analysis.workspace import Workspace
from robustlens.errors import ValidationError

if TYPE_CHECKING:
    from robustlens.query.filters import FilterSpec

#: The slice holding every sample (no predicate).
ALL_SAMPLES = "all"


class SliceError(ValidationError, ValueError):
    """A slice that cannot be resolved (unknown id, no slice analysis, stale masks)."""


@dataclass(frozen=True)
class SliceMembership:
    """Everything needed to tell which samples a slice holds, read once from the slices stage's artifacts.

    Attributes
    ----------
    num_samples:
        ``N``, the number of samples (rows of the sample table).
    predicates:
        ``slice_id`` → indices of its predicates (``()``: every sample); empty when the slices stage has
        not run.
    packed:
        ``(P, ceil(N / 8))`` uint8 bit-packed predicate masks (``None`` when there are none).
    descriptions:
        ``slice_id`` → its human-readable ``description`` (``"label = coat AND brightness in [..]"``).
    """

    num_samples: int
    predicates: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    packed: np.ndarray | None = field(default=None, repr=False)
    descriptions: Mapping[str, str] = field(default_factory=dict, repr=False)

    @cached_property
    def known_ids(self) -> frozenset[str]:
        """Ids of the slices :meth:`mask` resolves (all of them, when the predicate masks were recorded); built
        once per membership (:func:`slice_row_filters` asks for it on every row)."""
        if self.packed is None:
            return frozenset(slice_id for slice_id, ids in self.predicates.items() if not ids)
        return frozenset(self.predicates)

    def description(self, slice_id: str) -> str:
        """The slice's ``description``; the id itself for a slice this analysis does not have."""
        return self.descriptions.get(slice_id, slice_id)

    @property
    def analysed(self) -> bool:
        """Whether the workspace has a slice analysis."""
        return bool(self.predicates)

    def mask(self, slice_id: str) -> np.ndarray:
        """``(N,)`` bool membership of slice ``slice_id`` (a fresh, writable array).

        Raises
        ------
        SliceError
            No slice analysis, or no such slice (e.g. an old link after a new analysis).
        """
        if not self.analysed:
            raise SliceError(f"no slice '{slice_id}': this workspace has no slice analysis (run `robustlens analyze`)")
        if slice_id not in self.predicates:
            raise SliceError(f"no slice '{slice_id}' in this workspace's slice analysis (from an older analysis run?)")
        ids = self.predicates[slice_id]
        if not ids:
            return np.ones(self.num_samples, dtype=bool)
        if self.packed is None:
            raise SliceError(
                f"slice '{slice_id}' cannot be resolved: the predicate masks are missing "
                "(run `robustlens analyze` again)"
            )
        try:
            return artifacts.slice_membership(self.packed, ids, self.num_samples)
        except IndexError as exc:
            raise SliceError(f"slice '{slice_id}' cannot be resolved: {exc}; run `robustlens analyze` again") from exc

    def members(self, slice_id: str, ids: pd.Series) -> list[str]:
        """Sample ids (``ids``: the ``id`` column, samples order) of slice ``slice_id``."""
        return ids[self.mask(slice_id)].tolist()


def load_slice_membership(workspace: Workspace) -> SliceMembership:
    """The slice membership of ``workspace`` (empty when the slices stage has not run).

    Raises
    ------
    WorkspaceError
        The slice artifacts do not fit the samples (stale: the slices stage must run again).
    """
    count = len(workspace.samples)
    table = artifacts.read_table(workspace, "slices")
    if table is None:
        return SliceMembership(count)
    predicates = {
        str(slice_id): tuple(int(i) for i in ids)
        for slice_id, ids in zip(table["slice_id"], table["predicate_ids"], strict=True)
    }
    descriptions = (
        {str(k): str(v) for k, v in zip(table["slice_id"], table["description"], strict=True)}
        if "description" in table.columns
        else {}
    )
    needs_masks = any(predicates.values())
    packed = np.asarray(artifacts.read_slice_masks(workspace)) if needs_masks else None
    return SliceMembership(count, predicates, packed, descriptions)


def class_slice_id(label: str) -> str:
    """The id the robustness stage gives its slice of class ``label`` when the slices stage did not run
    (``class_slices`` in :mod:`robustlens.analysis.robustness.tables`); compared whole, never parsed."""
    return f"label={label}"


def slice_row_filter(row: Mapping, membership: SliceMembership, classes: Sequence[str] = ()) -> FilterSpec | None:
    """The filter keeping exactly the samples of one row of a slice table (``slices``, ``worst_slices``,
    ``robustness_slices``); ``None`` when it cannot be expressed (e.g. an older analysis without masks).

    ``all`` keeps everything; an id :attr:`SliceMembership.known_ids` resolves becomes ``FilterSpec(slice=id)``;
    a robustness class slice (``kind == "class"``, id :func:`class_slice_id` of one of ``classes``) becomes a
    label filter. Ids are matched whole, never taken apart.
    """
    from robustlens.query.filters import FilterSpec

    slice_id = row.get("slice_id")
    if slice_id is None or (isinstance(slice_id, float) and math.isnan(slice_id)):
        return None
    slice_id = str(slice_id)
    if slice_id == ALL_SAMPLES:
        return FilterSpec()
    if slice_id in membership.known_ids:
        return FilterSpec(slice=slice_id)
    if row.get("kind") == "class":
        label = {class_slice_id(name): name for name in classes}.get(slice_id)
        return None if label is None else FilterSpec(labels=[label])
    return None


def slice_row_filters(
    frame: pd.DataFrame, membership: SliceMembership, classes: Sequence[str] = ()
) -> list[FilterSpec | None]:
    """:func:`slice_row_filter` of every row of ``frame`` (in row order)."""
    return [slice_row_filter(row, membership, classes) for row in frame.to_dict("records")]


def slice_rows(workspace: Workspace, *, worst: bool = False) -> pd.DataFrame | None:
    """The slice table the stage wrote: every slice (``slices.parquet``) or the worst (``worst_slices``)."""
    return artifacts.read_table(workspace, "worst_slices" if worst else "slices")
