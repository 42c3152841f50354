"""``robustlens analyze``: run the analysis stages in dependency order.

Each stage is one module in :mod:`robustlens.analysis.stages` exposing ``Config`` (a dataclass of its
parameters, all with defaults) and ``run(context, config) -> dict`` (writes its artifacts and returns a
small JSON-serialisable summary). This list is the one registry of stages.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from robustlens.analysis.stages.base import StageContext
from robustlens.analysis.workspace import Workspace

#: Stage name → module, in run order (each stage only reads artifacts of stages before it).
STAGES: dict[str, str] = {
    "metrics": "robustlens.analysis.stages.metrics",
    "embeddings": "robustlens.analysis.stages.embeddings",
    "projection": "robustlens.analysis.stages.projection",
    "duplicates": "robustlens.analysis.stages.duplicates",
    "outliers": "robustlens.analysis.stages.outliers",
    "label_issues": "robustlens.analysis.stages.label_issues",
    "quality_flags": "robustlens.analysis.stages.quality_flags",
    "issues": "robustlens.analysis.stages.issues",
    "evaluation": "robustlens.analysis.stages.evaluation",
    "slices": "robustlens.analysis.stages.slices",
}


@dataclass
class AnalysisReport:
    """What :func:`analyze` did: per stage its summary and wall time; stages skipped and why."""

    summaries: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    #: Stage name → why it did not run (the data cannot support it); later stages still ran.
    skipped: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: Dataset files refused while reading them (``index``, ``id``, ``path``, ``kind``, ``reason``): their samples
    #: were skipped (NaN metrics, left out of the embedding-based stages); also in artifacts/refused_files.json.
    refused: list[dict] = field(default_factory=list)


def stage_module(name: str):
    if name not in STAGES:
        raise ValueError(f"unknown stage '{name}'; stages: {list(STAGES)}")
    return importlib.import_module(STAGES[name])


def analyze(workspace: Workspace, *, stages: list[str] | None = None, configs: dict[str, object] | None = None,
            progress: bool = True, device: str = "cpu", random_state: int = 0,
            workers: int | None = None) -> AnalysisReport:
    """Run ``stages`` (default: all, in order) on ``workspace``.

    Parameters
    ----------
    stages:
        Subset of :data:`STAGES` to run; run in registry order whatever the order given.
    configs:
        Stage name → its ``Config`` instance (default config otherwise).
    device:
        Torch device for model / tensor work.
    random_state:
        Seed for every stage.
    """
    selected = list(STAGES) if stages is None else [s for s in STAGES if s in set(stages)]
    unknown = set(stages or []) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages: {list(STAGES)}")
    context = StageContext(workspace=workspace, progress=progress, device=device, random_state=random_state,
                           workers=workers)
    report = AnalysisReport()
    for name in selected:
        module = stage_module(name)
        config = (configs or {}).get(name) or module.Config()
        reason = PRECONDITIONS[name](context, config) if name in PRECONDITIONS else None
        if reason is not None:
            report.skipped[name] = reason
            report.warnings.append(f"stage '{name}' skipped: {reason}; the other stages ran")
            continue
        start = time.perf_counter()
        report.summaries[name] = module.run(context, config)
        report.seconds[name] = time.perf_counter() - start
    if len(context.refused):
        from robustlens.analysis.stages.base import describe_refused

        ids = workspace.samples["id"].to_numpy()
        report.refused = [{"index": e.index, "id": str(ids[e.index]), "path": e.path, "kind": e.kind,
                           "reason": e.reason} for e in {e.index: e for e in context.refused.entries}.values()]
        report.warnings.append(describe_refused(report.refused) + " (listed in artifacts/refused_files.json)")
    return report


def _label_issues_precondition(context: StageContext, config) -> str | None:
    """Why the label-issues stage cannot run on this workspace, or ``None`` when it can.

    Without out-of-sample predictions the stage cross-validates a classifier on the embeddings, and
    stratified k-fold needs at least two samples of every class.
    """
    from robustlens.analysis.stages import label_issues

    classes = context.workspace.classes
    if len(classes) < 2:
        return f"label issues need at least two classes, the workspace has {classes}"
    try:
        source, _, _ = label_issues.choose_source(context, config)
    except ValueError as exc:  # no predictions and no embeddings: the stage says what is missing
        return str(exc)
    if source != "cross_validated":
        return None
    from robustlens.analysis.stages.base import excluded_rows

    # Samples whose file was refused are left out of the cross-validation.
    labels = context.workspace.samples["label_index"].to_numpy(dtype=np.int64)[~excluded_rows(context.workspace)]
    counts = np.bincount(labels, minlength=len(classes))
    thin = [f"'{classes[i]}' ({int(counts[i])} image{'s' if counts[i] != 1 else ''})"
            for i in np.flatnonzero((counts > 0) & (counts < 2))]
    if thin:
        return (f"without out-of-sample predictions, label issues come from cross-validation on the embeddings, "
                f"which needs at least 2 samples per class; class {', '.join(thin)} has fewer (add images or "
                "pass --predictions to 'robustlens init')")
    return None


#: Stage name → ``(context, config) -> reason or None``: checks that skip a stage the data cannot support
#: (with a warning) instead of failing the whole run.
PRECONDITIONS: dict[str, Callable[[StageContext, object], str | None]] = {
    "label_issues": _label_issues_precondition,
}
