"""Stage ``issues``: gather every stage's flags into one table the dashboard and exports filter on.

Inputs: ``artifacts/flags_<stage>.parquet`` (long: id, issue, severity, explanation), whichever exist (the
analysis stages' always; ``flags_robustness`` once the on-request robustness stage ran).
Outputs:

* ``artifacts/issues.parquet`` — the same long table, all stages, sorted by sample order then severity;
* ``artifacts/issue_matrix.parquet`` — one row per sample (samples order): ``id``, then for each issue
  type ``<issue>`` (severity, 0 where not flagged), plus ``issue_count`` and ``max_severity``.

Per-sample part and reduction: none per sample; a gather of the flag tables into samples order (a whole-dataset
reduction, cheap).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from robustlens.analysis import artifacts
from robustlens.analysis.stages.base import (
    FLAG_COLUMNS,
    StageContext,
    StageInputError,
    StageResult,
    StageSpec,
    fingerprint,
    is_current,
    write_artifact,
)

STAGE = "issues"
#: The flags tables the analysis stages write (the issues stage needs them); ``flags_robustness`` is used when
#: present.
ANALYSIS_FLAGS = ("flags_quality", "flags_duplicates", "flags_outliers", "flags_label_issues")


@dataclass
class Config:
    """No parameters: the flagging stages own their thresholds."""


def collect_flags(context: StageContext) -> pd.DataFrame:
    """Concatenate every ``flags_*.parquet`` (validated), keeping only current samples."""
    frames = []
    for name, frame in artifacts.read_flag_tables(context.workspace).items():
        path = context.workspace.artifact_path(f"{name}.parquet")
        missing = [c for c in FLAG_COLUMNS if c not in frame.columns]
        if missing:
            raise StageInputError(f"{path}: flags table lacks columns {missing}; expected {list(FLAG_COLUMNS)}")
        frame = frame[list(FLAG_COLUMNS)].copy()
        frame["stage"] = path.stem.removeprefix("flags_")
        frames.append(frame)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c == "severity" else str) for c in (*FLAG_COLUMNS, "stage")})
    flags = pd.concat(frames, ignore_index=True)
    flags["severity"] = flags["severity"].astype(float).clip(0.0, 1.0)
    return flags


def run(context: StageContext, config: Config) -> StageResult:
    """Gather the flags tables into ``issues`` and ``issue_matrix`` (a whole-dataset reduction).

    Summary: ``skipped``, ``counts`` (issue → samples flagged), ``samples_with_issues`` (when written).
    """
    return SPEC.result(_run(context, config))


def _run(context: StageContext, config: Config) -> dict:
    samples = context.workspace.samples
    flags = collect_flags(context)
    position = pd.Series(np.arange(len(samples)), index=samples["id"])
    flags = flags[flags["id"].isin(position.index)]
    inputs = fingerprint(samples["id"], flags)
    if is_current(context, "issue_matrix", config=config, inputs=inputs):
        return {"skipped": True, "counts": _counts(flags)}
    flags = flags.assign(_order=flags["id"].map(position)).sort_values(["_order", "severity"], ascending=[True, False])
    flags = flags.drop(columns="_order").reset_index(drop=True)
    write_artifact(context, "issues", flags, stage="issues", config=config, inputs=inputs)
    matrix = pd.DataFrame({"id": samples["id"]})
    for issue, group in flags.groupby("issue", sort=True):
        severity = np.zeros(len(samples))
        worst = group.groupby("id")["severity"].max()
        severity[position[worst.index].to_numpy()] = worst.to_numpy()
        matrix[issue] = severity
    issue_columns = [c for c in matrix.columns if c != "id"]
    matrix["issue_count"] = (matrix[issue_columns] > 0).sum(axis=1) if issue_columns else 0
    matrix["max_severity"] = matrix[issue_columns].max(axis=1) if issue_columns else 0.0
    write_artifact(context, "issue_matrix", matrix, stage="issues", config=config, inputs=inputs)
    return {"skipped": False, "counts": _counts(flags), "samples_with_issues": int((matrix["issue_count"] > 0).sum())}


def _counts(flags: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in flags.groupby("issue")["id"].nunique().sort_index().items()}


SPEC = StageSpec(
    name=STAGE,
    config=Config,
    run=run,
    reads=ANALYSIS_FLAGS,
    uses=("flags_robustness",),
    writes=("issues", "issue_matrix"),
    description="every stage's flags in one long table and one row per sample",
)
