"""``robustlens analyze``: run the analysis stages in dependency order.

Each stage is one module in :mod:`robustlens.analysis.stages` exposing ``Config`` (a dataclass of its
parameters, all with defaults) and ``run(context, config) -> dict`` (writes its artifacts and returns a
small JSON-serialisable summary). This list is the one registry of stages.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field

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
    """What :func:`analyze` did: per stage its summary and wall time."""

    summaries: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


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
        start = time.perf_counter()
        report.summaries[name] = module.run(context, config)
        report.seconds[name] = time.perf_counter() - start
    return report
