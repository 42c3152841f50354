"""Stage ``robustness`` (on request): how the workspace model holds up under corruptions and attacks.

A registered stage wrapping :func:`robustlens.analysis.robustness.run.run_robustness` — the corruption
benchmark, the attacks (AutoAttack headline, previews), validity diagnostics, formal verification, perturbation
stability, randomized-smoothing certification and attack self-checks — with
:class:`~robustlens.analysis.robustness.run.RobustnessConfig` as its config. It is *on request*: a plain
``robustlens analyze WS`` does not run it; ``--stages robustness`` or ``--stages all`` (and the
``robustlens robustness`` shortcut) do.

Reads ``samples.parquet`` and the model; when present, ``slices.parquet`` and ``slice_predicate_masks.npy``
(to rank robustness per slice). Writes the ``robustness_*`` artifacts and ``flags_robustness.parquet``
(issue ``fragile``), which the ``issues`` and ``slices`` stages read, so the orchestrator re-runs them after
this stage when they had run before.

The slices read is a *late* read (:attr:`~robustlens.analysis.stages.base.StageSpec.reads_late`): robustness
writes flags that slices reads, and slices writes the table robustness ranks by — a genuine cycle. It is closed
by :func:`run_robustness` itself: with the same config, samples and model it does not attack again, it only
re-ranks its slice table from the stored per-sample results when ``slices.parquet`` changed.

Per-sample part and reduction: each sample's clean / corrupted / attacked outcome (``robustness_samples``) is
per sample given the model, but attacks run on batches chosen by a stratified whole-dataset sample
(:func:`~robustlens.analysis.robustness.tables.select_samples`), and the curves, certification and slice
tables are reductions over them.
"""

from __future__ import annotations

from robustlens.analysis.robustness.run import (
    EXAMPLES,
    PARQUET_ARTIFACTS,
    STAGE,
    SUMMARY,
    RobustnessConfig,
    run_robustness,
)
from robustlens.analysis.stages.base import StageContext, StageResult, StageSpec
from robustlens.analysis.stages.slices import MASKS_NAME

#: The stage's config: the robustness settings (validated by ``run_robustness`` with field-naming errors).
Config = RobustnessConfig


def run(context: StageContext, config: RobustnessConfig) -> StageResult:
    """Run the robustness analysis of the workspace model (see the module docstring).

    Summary: the content of ``robustness_summary.json`` plus ``skipped`` (``True`` when config, samples and model
    were unchanged, ``"slices"`` when only the slice table was rebuilt), as ``robustlens robustness`` prints it.
    """
    summary = run_robustness(
        context.workspace,
        config,
        progress=context.progress,
        device=context.device,
        workers=context.workers,
        threads=context.threads,
    )
    skipped = summary.get("skipped")
    if skipped is True:
        return SPEC.result(summary, current=True, artifacts=())
    if skipped == "slices":
        return SPEC.result(summary, current=False, artifacts=("robustness_slices", SUMMARY))
    examples = (EXAMPLES,) if context.workspace.artifact_path(f"{EXAMPLES}.npz").exists() else ()
    return SPEC.result(summary, current=False, artifacts=SPEC.writes + examples)


def precondition(context: StageContext, config: RobustnessConfig) -> str | None:
    """Why the stage cannot run on this workspace (it has no model), or ``None``."""
    if not context.workspace.has_model:
        return (
            "robustness needs a model to attack and certify; create the workspace with one: robustlens init WS "
            "--data DIR --model model.pt --model-config model.json"
        )
    return None


SPEC = StageSpec(
    name=STAGE,
    config=RobustnessConfig,
    run=run,
    reads=("samples", "model"),
    reads_late=("slices", MASKS_NAME),
    writes=(*PARQUET_ARTIFACTS, SUMMARY),
    may_write=(EXAMPLES,),
    on_request=True,
    precondition=precondition,
    description="corruptions, attacks, verification and certification of the model",
)
