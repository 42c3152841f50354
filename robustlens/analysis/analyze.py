"""``robustlens analyze``: run the stages as a dependency graph.

Every stage is one module in :mod:`robustlens.analysis.stages` declaring ``SPEC``
(:class:`~robustlens.analysis.stages.base.StageSpec`): its name, its ``Config`` dataclass (validated at
construction), what it reads and writes, and ``run(context, config) -> StageResult``. :data:`STAGES` is the one
registry of stages; the graph is derived from the declarations (an edge from the stage writing an artifact to
every stage reading it), so the order is a topological order — ties broken by registry order, which keeps the
order of a plain ``robustlens analyze`` what it always was.

What runs (:func:`analyze`):

* ``stages=None``: every stage that is not on request (the ten analysis stages; not robustness);
* ``stages=[...]``: those stages, plus every stage they need (``reads``) that is not current
  (:func:`stage_status`), and then every stage that had run before and reads what a stage of this run wrote
  (running robustness re-runs ``issues`` and ``slices``, which read its ``fragile`` flags);
* ``only=True``: exactly the named stages, failing clearly when an input they need is missing.

A stage that runs still decides for itself whether its artifacts are current (the fingerprint of its config and
inputs in ``artifacts/index.json``) and then writes nothing (``StageResult.current``). :func:`stage_status` is the
cheap, generic answer used to decide whether a dependency must run and by ``--list-stages``.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from robustlens.analysis import artifacts, storage
from robustlens.analysis.stages.base import (
    WORKSPACE_INPUTS,
    StageContext,
    StageInputError,
    StageResult,
    StageSpec,
    config_hash,
    describe_refused,
)
from robustlens.analysis.workspace import Workspace
from robustlens.errors import RobustlensError, WorkspaceError

#: Stage name → module, in registry order: a topological order of the graph (ties are broken by it).
STAGES: dict[str, str] = {
    "metrics": "robustlens.analysis.stages.metrics",
    "embeddings": "robustlens.analysis.stages.embeddings",
    "projection": "robustlens.analysis.stages.projection",
    "duplicates": "robustlens.analysis.stages.duplicates",
    "outliers": "robustlens.analysis.stages.outliers",
    "label_issues": "robustlens.analysis.stages.label_issues",
    "quality_flags": "robustlens.analysis.stages.quality_flags",
    "robustness": "robustlens.analysis.stages.robustness",
    "issues": "robustlens.analysis.stages.issues",
    "evaluation": "robustlens.analysis.stages.evaluation",
    "slices": "robustlens.analysis.stages.slices",
}
#: ``--stages all``: every registered stage, on-request ones included.
ALL = "all"
#: ``artifacts/stage_runs.json``: when each stage last ran (or found itself current), with which config.
RUNS_FILE = "stage_runs.json"

Status = Literal["current", "stale", "never run"]


class StageGraphError(RobustlensError):
    """The stage declarations do not form a valid graph (a cycle, two writers of one artifact)."""


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
    #: Every stage run in order (a stage whose late reads changed after it runs twice; ``summaries`` keeps the
    #: last summary, this keeps each).
    runs: list[StageResult] = field(default_factory=list)
    #: Stage name → why it ran: ``"requested"``, ``"needed by X"`` or ``"reads what X wrote"``.
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def results(self) -> dict[str, StageResult]:
        """Stage name → its last :class:`StageResult` of this run."""
        return {result.stage: result for result in self.runs}


# -- the registry ------------------------------------------------------------------------------------------------


def stage_module(name: str) -> ModuleType:
    """The module of stage ``name`` (imported on first use)."""
    if name not in STAGES:
        raise StageInputError(f"unknown stage '{name}'; stages: {list(STAGES)}")
    return importlib.import_module(STAGES[name])


def stage_spec(name: str) -> StageSpec:
    """The :class:`StageSpec` that stage ``name``'s module declares."""
    spec = stage_module(name).SPEC
    if spec.name != name:
        raise StageGraphError(f"{STAGES[name]} declares stage '{spec.name}', registered as '{name}'")
    return spec


def stage_specs() -> dict[str, StageSpec]:
    """Every registered stage's spec, in registry order."""
    return {name: stage_spec(name) for name in STAGES}


def default_stages(specs: Mapping[str, StageSpec] | None = None) -> list[str]:
    """The stages of a plain ``robustlens analyze``: every registered stage that is not on request."""
    specs = stage_specs() if specs is None else specs
    return [name for name, spec in specs.items() if not spec.on_request]


def resolve_stage_names(names: Iterable[str] | None, specs: Mapping[str, StageSpec] | None = None) -> list[str]:
    """``None`` → :func:`default_stages`; ``["all"]`` → every stage; otherwise the names, checked."""
    specs = stage_specs() if specs is None else specs
    if names is None:
        return default_stages(specs)
    names = list(names)
    if ALL in names:
        return list(specs)
    unknown = sorted(set(names) - set(specs))
    if unknown:
        raise StageInputError(f"unknown stage(s) {unknown}; stages: {', '.join(specs)} (or '{ALL}')")
    return [name for name in specs if name in set(names)]


# -- the graph ---------------------------------------------------------------------------------------------------


def writer_of(artifact: str, specs: Mapping[str, StageSpec]) -> str | None:
    """The stage that writes ``artifact`` (``writes`` or a ``may_write`` name / glob pattern), or ``None``."""
    for name, spec in specs.items():
        if artifact in spec.writes or any(fnmatch.fnmatchcase(artifact, pattern) for pattern in spec.may_write):
            return name
    return None


def dependencies(specs: Mapping[str, StageSpec]) -> dict[str, list[str]]:
    """Stage → the stages it must run after: the writers of what it ``reads`` or ``uses`` (not ``reads_late``).

    Raises :class:`StageGraphError` when two stages declare the same artifact in ``writes``.
    """
    owners: dict[str, str] = {}
    for name, spec in specs.items():
        for artifact in spec.writes:
            if artifact in owners:
                raise StageGraphError(
                    f"artifact '{artifact}' is written by both stage '{owners[artifact]}' and stage '{name}'"
                )
            owners[artifact] = name
    graph: dict[str, list[str]] = {}
    for name, spec in specs.items():
        before = []
        for artifact in spec.reads + spec.uses:
            writer = writer_of(artifact, specs)
            if writer is not None and writer != name and writer not in before:
                before.append(writer)
        graph[name] = before
    return graph


def topological_order(specs: Mapping[str, StageSpec]) -> list[str]:
    """The stages in an order where each runs after the stages it depends on (ties: the order of ``specs``).

    Raises
    ------
    StageGraphError
        The declarations form a cycle; the message names its stages, e.g. ``a -> b -> a``.
    """
    graph = dependencies(specs)
    rank = {name: position for position, name in enumerate(specs)}
    waiting = {name: set(before) for name, before in graph.items()}
    order: list[str] = []
    while waiting:
        ready = [name for name, before in waiting.items() if not before]
        if not ready:
            raise StageGraphError(
                f"the stages form a cycle: {' -> '.join(_find_cycle(waiting))}; break it by "
                "declaring one of those reads as 'reads_late' (the stage reconciles it itself)"
            )
        chosen = min(ready, key=rank.__getitem__)
        order.append(chosen)
        del waiting[chosen]
        for before in waiting.values():
            before.discard(chosen)
    return order


def _find_cycle(waiting: Mapping[str, set[str]]) -> list[str]:
    """One cycle among stages that all still wait on one another (each has an unresolved dependency), in data-flow
    order: ``[a, b, c, a]`` when ``b`` reads what ``a`` writes, ``c`` what ``b`` writes, ``a`` what ``c`` writes."""
    path: list[str] = []
    node = min(waiting)
    while node not in path:
        path.append(node)
        node = min(waiting[node])
    # Walked along "needs"; reported along the data flow (each stage writes what the next one reads).
    return [*path[path.index(node) :], node][::-1]


# -- status ------------------------------------------------------------------------------------------------------


def _runs(workspace: Workspace) -> dict[str, Any]:
    path = workspace.artifact_path(RUNS_FILE)
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _timestamp(text: str | None) -> float | None:
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _artifact_exists(workspace: Workspace, name: str) -> bool:
    return any(workspace.artifact_path(name + suffix).exists() for suffix in (".parquet", ".npy", ".json", ".npz"))


def _input_time(workspace: Workspace, name: str) -> float | None:
    """Last modification of a workspace input (:data:`WORKSPACE_INPUTS`), ``None`` when it is absent."""
    root = Path(workspace.root)
    if name == "samples":
        files = [root / "samples.parquet"]
    elif name == "predictions":
        files = [root / entry["file"] for entry in workspace.manifest.get("prediction_sets", {}).values()]
    else:
        folder = root / "model"
        files = [p for p in folder.rglob("*") if p.is_file()] if workspace.has_model and folder.exists() else []
    times = [path.stat().st_mtime for path in files if path.exists()]
    return max(times) if times else None


def has_input(workspace: Workspace, name: str) -> bool:
    """Whether input ``name`` (a workspace input or an artifact) exists in ``workspace``."""
    if name == "samples":
        return True
    if name == "predictions":
        return bool(workspace.prediction_names)
    if name == "model":
        return workspace.has_model
    return _artifact_exists(workspace, name)


def stage_status(workspace: Workspace, name: str, config: object | None = None) -> Status:
    """``"current"``, ``"stale"`` or ``"never run"``: a cheap check of stage ``name`` on ``workspace``.

    Based on ``artifacts/index.json`` (config hashes and ``written_at`` of what the stage wrote and of what it
    reads), ``artifacts/stage_runs.json`` (when the stage last ran or found itself current) and the modification
    times of the workspace inputs it reads. ``config``: the config it would run with (default ``Config()``).
    Not the authority: a stage that runs re-checks the fingerprints of its actual inputs. Timestamps in
    ``index.json`` have one-second resolution, so a read rewritten within the second after the stage ran is not
    seen here.
    """
    return stage_status_detail(workspace, name, config)[0]


def stage_status_detail(
    workspace: Workspace, name: str, config: object | None = None, specs: Mapping[str, StageSpec] | None = None
) -> tuple[Status, str]:
    """:func:`stage_status` with the reason (e.g. ``"metrics was rewritten after it ran"``)."""
    specs = stage_specs() if specs is None else specs
    return _Statuses(workspace, specs, {} if config is None else {name: config}).of(name)


class _Statuses:
    """Stage statuses of one workspace, with its ``index.json`` and runs file read once and each answer kept (one
    instance per question asked: a stage's status does not change while it is asked)."""

    def __init__(self, workspace: Workspace, specs: Mapping[str, StageSpec], configs: Mapping[str, object]) -> None:
        self.workspace, self.specs, self.configs = workspace, specs, configs
        self.index, self.runs = artifacts.read_index(workspace), _runs(workspace)
        self.memo: dict[str, tuple[Status, str]] = {}

    def of(self, name: str, *, check_config: bool = True) -> tuple[Status, str]:
        """:func:`stage_status_detail` of ``name``. ``check_config=False`` (a stage upstream of the one asked
        about): whichever config it last ran with, the question is whether its inputs changed since."""
        key = name if check_config else f"{name}/upstream"
        if key not in self.memo:
            self.memo[key] = ("current", "")  # a guard; the graph is acyclic
            self.memo[key] = self._compute(name, check_config)
        return self.memo[key]

    def _compute(self, name: str, check_config: bool) -> tuple[Status, str]:
        workspace, specs, configs, index, runs = self.workspace, self.specs, self.configs, self.index, self.runs
        spec = specs[name]
        entries = {
            artifact: entry
            for artifact, entry in index.items()
            if isinstance(entry, dict) and entry.get("stage") == name
        }
        run = runs.get(name) or {}
        if not entries and not run:
            return ("never run", "")
        missing = [a for a in spec.writes if a not in entries or not _artifact_exists(workspace, a)]
        if missing:
            return ("stale", f"{', '.join(missing)} missing")
        config = configs.get(name)
        wanted = config_hash(config if config is not None else spec.config())
        recorded = (
            {entries[a].get("config_hash") for a in spec.writes}
            if spec.writes
            else {entry.get("config_hash") for entry in entries.values()}
        )
        if run and not spec.writes:
            recorded = {run.get("config_hash")}
        if check_config and recorded != {wanted}:
            return ("stale", "config changed")
        times = [t for t in (_timestamp(entries[a].get("written_at")) for a in spec.writes) if t is not None]
        finished = _timestamp(run.get("finished_at"))
        ran_at = max([*times, *([finished] if finished is not None else [])], default=None)
        if ran_at is None:
            return ("stale", "no time recorded")
        for read in spec.inputs:
            if read in WORKSPACE_INPUTS:
                changed = _input_time(workspace, read)
                if changed is not None and changed > ran_at:
                    return ("stale", f"workspace {read} changed after it ran")
                continue
            entry = index.get(read)
            if not isinstance(entry, dict):
                continue  # never written (its writer could not run on this data, or is on request)
            written = _timestamp(entry.get("written_at"))
            # index.json keeps whole seconds: rewritten "after" means in a later second.
            if written is not None and written > int(ran_at):
                return ("stale", f"{read} was rewritten after it ran")
        for read in spec.reads + spec.uses:
            writer = writer_of(read, specs)
            if writer is not None and writer != name:
                upstream, _ = self.of(writer, check_config=False)
                if upstream == "stale":
                    return ("stale", f"upstream stage '{writer}' is stale")
        return ("current", "")


def _record_run(workspace: Workspace, result: StageResult, config: object) -> None:
    path = workspace.artifact_path(RUNS_FILE)
    runs = _runs(workspace)
    runs[result.stage] = {
        "finished_at": datetime.now(UTC).isoformat(timespec="microseconds"),
        "config_hash": config_hash(config),
        "current": result.current,
        "artifacts": list(result.artifacts),
    }
    storage.write_json(path, runs)


# -- the orchestrator --------------------------------------------------------------------------------------------


def analyze(
    workspace: Workspace,
    *,
    stages: list[str] | None = None,
    configs: Mapping[str, object] | None = None,
    only: bool = False,
    progress: bool = True,
    device: str = "cpu",
    random_state: int = 0,
    workers: int | None = None,
    threads: int | None = None,
) -> AnalysisReport:
    """Run ``stages`` on ``workspace`` in dependency order (see the module docstring).

    Parameters
    ----------
    stages:
        Stage names (or ``["all"]``); ``None``: every stage that is not on request. Run in graph order whatever
        the order given, with the stages they need that are not current, and the stages that read what they
        wrote (when those had run before).
    configs:
        Stage name → its ``Config`` instance (default config otherwise).
    only:
        Run exactly ``stages``: nothing pulled in, nothing re-run downstream. A required input that is missing
        raises :class:`~robustlens.errors.WorkspaceError` naming it and the stage that writes it.
    device:
        Torch device for model / tensor work.
    random_state:
        Seed for every stage.
    workers, threads:
        Image-decoding threads, and torch threads for the stages that set them (robustness).
    """
    specs = stage_specs()
    order = topological_order(specs)
    requested = resolve_stage_names(stages, specs)
    configs = dict(configs or {})
    for name, config in configs.items():
        if name in specs and config is not None and not isinstance(config, specs[name].config):
            raise StageInputError(
                f"the config of stage '{name}' must be a {specs[name].config.__qualname__}, "
                f"got {type(config).__qualname__}"
            )
    context = StageContext(
        workspace=workspace,
        progress=progress,
        device=device,
        random_state=random_state,
        workers=workers,
        threads=threads,
    )
    report = AnalysisReport()
    config_of = {
        name: configs.get(name) or spec.config() for name, spec in specs.items() if name in requested or not only
    }

    planned: dict[str, str] = {name: "requested" for name in requested}
    # Statuses as the run starts; whether a stage has ever run changes only when it runs itself.
    statuses = None if only else _Statuses(workspace, specs, configs)
    if statuses is None:
        _check_inputs(workspace, requested, specs, context, config_of)
    else:
        _add_needed(requested, specs, statuses, planned)

    written: dict[str, str] = {}  # artifact → the stage that wrote it in this run
    ran_at: dict[str, int] = {}  # stage → its position in the run
    for name in order:
        reason = planned.get(name)
        if reason is None and statuses is not None:
            source = next((written[a] for a in specs[name].reads + specs[name].uses if a in written), None)
            if source is not None and statuses.of(name)[0] != "never run":
                reason = f"reads what '{source}' wrote"
        if reason is None:
            continue
        result = _run_stage(context, specs[name], config_of[name], report, reason)
        if result is not None:
            ran_at[name] = len(report.runs)
            for artifact in result.artifacts:
                written[artifact] = name
    if not only:
        _late_pass(context, specs, config_of, report, ran_at)
    if len(context.refused):
        ids = workspace.samples["id"].to_numpy()
        report.refused = [
            {"index": e.index, "id": str(ids[e.index]), "path": e.path, "kind": e.kind, "reason": e.reason}
            for e in {e.index: e for e in context.refused.entries}.values()
        ]
        report.warnings.append(describe_refused(report.refused) + " (listed in artifacts/refused_files.json)")
    return report


def _add_needed(
    requested: list[str], specs: Mapping[str, StageSpec], statuses: _Statuses, planned: dict[str, str]
) -> None:
    """Add to ``planned`` the writers of what the planned stages ``reads`` that are not current (transitively)."""
    queue = list(requested)
    while queue:
        name = queue.pop()
        for artifact in specs[name].reads:
            writer = writer_of(artifact, specs)
            if writer is None or writer in planned:
                continue
            status, _ = statuses.of(writer)
            if status != "current":
                planned[writer] = f"needed by '{name}' ({status})"
                queue.append(writer)


def _check_inputs(
    workspace: Workspace,
    names: list[str],
    specs: Mapping[str, StageSpec],
    context: StageContext,
    config_of: Mapping[str, object],
) -> None:
    """``only``: every required input of ``names`` exists (or its writer cannot run on this data)."""
    for name in names:
        for artifact in specs[name].reads:
            if has_input(workspace, artifact):
                continue
            writer = writer_of(artifact, specs)
            if writer is None:
                raise WorkspaceError(
                    f"stage '{name}' needs the workspace's {artifact}, which {workspace.root} does "
                    "not have; add it with 'robustlens init'"
                )
            precondition = specs[writer].precondition
            if (
                writer not in names
                and precondition is not None
                and precondition(context, config_of.get(writer) or specs[writer].config()) is not None
            ):
                continue  # its writer is skipped on this data: the stage does without it
            raise WorkspaceError(
                f"stage '{name}' needs artifact '{artifact}', written by stage '{writer}', which "
                f"{workspace.root} does not have yet; run 'robustlens analyze {workspace.root} "
                f"--stages {name}' (it runs '{writer}' first) or '--only {writer}'"
            )


def _run_stage(
    context: StageContext, spec: StageSpec, config: object, report: AnalysisReport, reason: str
) -> StageResult | None:
    """Run one stage (unless its precondition fails: then a warning); record the result."""
    why_not = spec.precondition(context, config) if spec.precondition is not None else None
    if why_not is not None:
        report.skipped[spec.name] = why_not
        report.warnings.append(f"stage '{spec.name}' skipped: {why_not}; the other stages ran")
        return None
    start = time.perf_counter()
    result = spec.run(context, config)
    report.seconds[spec.name] = report.seconds.get(spec.name, 0.0) + time.perf_counter() - start
    if not isinstance(result, StageResult):  # a stage module outside this package returning a plain summary
        result = spec.result(dict(result))
    report.summaries[spec.name] = result.summary
    report.runs.append(result)
    report.reasons.setdefault(spec.name, reason)
    _record_run(context.workspace, result, config)
    return result


def _late_pass(
    context: StageContext,
    specs: Mapping[str, StageSpec],
    config_of: Mapping[str, object],
    report: AnalysisReport,
    ran_at: dict[str, int],
) -> None:
    """Run once more each stage of this run whose ``reads_late`` were rewritten after it (it reconciles them)."""
    for name, position in list(ran_at.items()):
        spec = specs[name]
        later = [r for r in report.runs[position:] if any(a in r.artifacts for a in spec.reads_late)]
        if later:
            _run_stage(context, spec, config_of[name], report, report.reasons.get(name, ""))


# -- listing -----------------------------------------------------------------------------------------------------


def list_stages(
    workspace: Workspace | None = None, configs: Mapping[str, object] | None = None
) -> list[dict[str, Any]]:
    """Every stage in graph order: ``name``, ``reads``, ``uses``, ``reads_late``, ``writes``, ``may_write``,
    ``on_request``, ``description`` and, given a workspace, ``status`` and ``reason`` (:func:`stage_status`)."""
    specs = stage_specs()
    statuses = _Statuses(workspace, specs, configs or {}) if workspace is not None else None
    rows = []
    for name in topological_order(specs):
        spec = specs[name]
        row: dict[str, Any] = {
            "name": name,
            "reads": list(spec.reads),
            "uses": list(spec.uses),
            "reads_late": list(spec.reads_late),
            "writes": list(spec.writes),
            "may_write": list(spec.may_write),
            "on_request": spec.on_request,
            "description": spec.description,
        }
        if statuses is not None:
            row["status"], row["reason"] = statuses.of(name)
        rows.append(row)
    return rows


def format_stage_list(rows: list[dict[str, Any]]) -> str:
    """:func:`list_stages` as text, one block per stage (what ``robustlens analyze --list-stages`` prints)."""
    lines = []
    for row in rows:
        head = f"{row['name']}"
        if "status" in row:
            head += f"  [{row['status']}{': ' + row['reason'] if row.get('reason') else ''}]"
        if row["on_request"]:
            head += "  (on request)"
        lines.append(head)
        lines.append(f"    {row['description']}")
        for label, key in (
            ("reads", "reads"),
            ("uses", "uses"),
            ("reads late", "reads_late"),
            ("writes", "writes"),
            ("may write", "may_write"),
        ):
            if row[key]:
                lines.append(f"    {label + ':':<11} {', '.join(row[key])}")
    return "\n".join(lines)


#: Stage name → ``(context, config) -> reason or None`` (the stages' declared preconditions): checks that skip a
#: stage the data cannot support (with a warning) instead of failing the whole run.
def _preconditions() -> dict[str, Callable[[StageContext, Any], str | None]]:
    return {name: spec.precondition for name, spec in stage_specs().items() if spec.precondition is not None}


def __getattr__(name: str) -> Any:
    # PRECONDITIONS stays importable; it is read from the specs (importing every stage) only when asked for.
    if name == "PRECONDITIONS":
        return _preconditions()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
