"""The robustness run of a workspace: corruptions, attacks, certification and self-checks, tied back to
samples and slices (``robustlens robustness WORKSPACE``).

:func:`run_robustness` picks up to ``max_samples`` samples (stratified by class, seeded), decodes them into
the model's input layout and runs, with the workspace model:

1. **corruptions** — every corruption × severity of :data:`~.corruptions.CORRUPTIONS` on all chosen samples;
2. **attacks** — every attack on the first ``attack_samples`` of them (a stratified prefix), on an ε grid
   per norm; a sample counts robust at ε only if it survives *every* attack of that norm (worst case);
3. **self-checks** — an attack-strength active test of every attack run, at the reference ε of its norm,
   on the first ``selfcheck_samples``, and gradient-masking symptom checks per norm;
4. **certification** — randomized smoothing (CERTIFY) on the first ``smoothing_samples``;

then writes, under ``WORKSPACE/artifacts/`` (atomically, recorded in ``index.json``):

==================================  =====================================================================
artifact                            content
==================================  =====================================================================
``robustness_summary.json``         config, sample counts, clean accuracy, corruption summary, per-attack
                                    success and robust accuracy per ε, curves, certification, self-check
                                    and gradient-masking results, ``warnings``, worst slices, timings
``robustness_corruptions.parquet``  ``corruption``, ``family``, ``severity``, ``accuracy``, ``error``,
                                    ``relative_error`` (error − clean error), ``flip_rate``, ``n_samples``
``robustness_curves.parquet``       ``norm``, ``attack`` (an attack or ``worst_case``), ``eps``,
                                    ``robust_accuracy``, ``success_rate``, ``n_samples``
``robustness_certified.parquet``    ``radius``, ``certified_accuracy``, ``n_samples``, ``sigma``
``robustness_slices.parquet``       :data:`~.tables.SLICE_COLUMNS` (class slices, plus every slice of
                                    ``slices.parquet`` when the slices stage ran)
``robustness_samples.parquet``      one row per evaluated sample (others absent): ``id`` and the scores
                                    below
``flags_robustness.parquet``        ``id``, ``issue`` (``fragile``), ``severity``, ``explanation``
``robustness_examples.npz``         up to ``num_examples`` samples: clean / corrupted / adversarial images
                                    and the model's predictions on each (see :func:`example_images`)
==================================  =====================================================================

Per-sample scores (``robustness_samples.parquet``):

* ``rob_clean_correct`` — the model classifies the clean (decoded, resized) image correctly;
* ``rob_corruption_accuracy`` — fraction of the corruption × severity cells classified correctly;
* ``rob_flip_severity_<family>`` — lowest severity at which any corruption of the family changes the
  prediction (NaN: never);
* ``rob_attacked`` — the sample is in the attack subset;
* ``rob_min_linf_eps`` / ``rob_min_l2_eps`` — smallest budget of the L∞ / L2 grid at which some attack of
  that norm changes the prediction (0 for clean errors; NaN: robust on the whole grid, or not attacked);
* ``rob_min_l2`` — smallest L2 perturbation found by DeepFool / C&W that changes the prediction (0 for
  clean errors; NaN: none found or not attacked);
* ``rob_certified_radius`` — L2 radius within which the smoothed classifier provably predicts the *true*
  class (0 when it abstains or certifies another class; NaN outside the smoothing subset);
  ``rob_certified_correct`` — it certifies the true class (NA outside the subset);
* ``rob_fragile``, ``rob_fragility`` (0–1), ``rob_fragile_reason`` — a clean-correct sample broken by a
  tiny attack, a tiny minimal perturbation, or the mildest corruptions of several families
  (:class:`~.tables.FragilityRule`); these are the ``fragile`` issue flags.

Attack curves use the monotone closure per attack: a sample an attack broke at ε also counts broken at
every larger ε of the grid (its adversarial lies inside the larger ball too), so each attack is only
re-run on the samples it has not broken yet, and every curve is non-increasing in ε.

A re-run with the same config, samples, labels and model file is skipped (only the slice table is
rebuilt when ``slices.parquet`` changed). Nothing here imports streamlit.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from robustlens.analysis import storage
from robustlens.analysis.ingest.model import prepare_images
from robustlens.analysis.loader import iter_decoded
from robustlens.analysis.stages.base import (StageContext, fingerprint, is_current, read_artifact,
                                             record_artifact, write_artifact)
from robustlens.analysis.stages.evaluation import json_safe
from robustlens.analysis.stages.slices import slice_mask
from robustlens.analysis.workspace import Workspace
from robustlens.errors import ValidationError

from ._common import derive_seed, eval_mode, make_generator, model_device, predict_labels
from .attacks import ATTACKS, BUDGET_TOL, run_attack
from .corruptions import CORRUPTIONS, SEVERITIES, corruption_benchmark
from .selfcheck import attack_self_check, gradient_masking_checks
from .smoothing import certify
from .tables import (FragilityRule, SliceReference, class_slices, family_flip_severity, family_of, fragile_flags,
                     fragility, records, select_samples, slice_robustness)

STAGE = "robustness"
SUMMARY = "robustness_summary"
EXAMPLES = "robustness_examples"
PARQUET_ARTIFACTS = ("robustness_corruptions", "robustness_curves", "robustness_certified", "robustness_slices",
                     "robustness_samples", "flags_robustness")

#: CPU-sane attack settings (measured on the sample CNN, 2 cores); override per attack with ``attack_params``.
DEFAULT_ATTACK_PARAMS: dict[str, dict[str, Any]] = {
    "fgsm": {},
    "pgd_linf": {"steps": 10},
    "pgd_l2": {"steps": 10},
    "deepfool": {"max_iter": 50, "candidates": 10, "overshoot": 0.02},
    "cw_l2": {"binary_search_steps": 3, "max_iter": 40, "initial_const": 0.1, "learning_rate": 0.05},
    "square_linf": {"max_iter": 100, "p_init": 0.8},
}
DEFAULT_LINF_EPS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
DEFAULT_L2_EPS = (0.1, 0.25, 0.5, 1.0)


@dataclass
class RobustnessConfig:
    """Settings of a robustness run (all defaulted; the defaults finish in a few minutes on 2 CPU cores
    for the 28×28 sample CNN).

    Attributes
    ----------
    corruptions, severities:
        Corruption names (keys of ``CORRUPTIONS``) and severities (1..5) evaluated; default all × all.
    attacks:
        Attack names (keys of ``ATTACKS``); default all six. An empty tuple skips attacks.
    linf_eps, l2_eps:
        Budget grids of the L∞ attacks (pixel units in [0, 1]; default 1, 2, 4, 8 /255) and the L2 attacks
        (default 0.1, 0.25, 0.5, 1.0; a 28×28 image has L2 norm ≤ 28).
    reference_linf_eps, reference_l2_eps:
        Budget of the per-slice robust accuracy and of the self-checks; must be on the grid;
        ``None`` = the grid's upper median (4/255 and 0.5 by default).
    attack_params:
        Per attack, keyword arguments overriding :data:`DEFAULT_ATTACK_PARAMS`.
    smoothing_sigma, smoothing_n0, smoothing_n, smoothing_alpha:
        Randomized smoothing noise σ and CERTIFY's selection / estimation sample counts and error level.
    reference_radius:
        Certified radius of the per-slice certified accuracy; ``None`` = ``smoothing_sigma``.
    max_samples:
        Samples evaluated under corruptions (stratified by class).
    attack_samples, smoothing_samples:
        Stratified prefixes of them that are attacked / certified (``0`` skips that analysis).
    selfcheck_samples, selfcheck_threshold:
        Samples of each attack's active test and the success rate it needs to pass.
    masking_samples:
        Samples of the gradient-masking checks.
    corruption_batch_size, attack_batch_size, smoothing_batch_size:
        Chunk sizes (memory vs. speed).
    fragile_linf_eps, fragile_l2, fragile_min_families:
        The ``fragile`` flag's thresholds (:class:`~.tables.FragilityRule`).
    min_slice_samples, worst_slices:
        Smallest slice (in attacked samples) that is ranked, and length of the worst-robustness list.
    num_examples:
        Samples stored with their clean / corrupted / adversarial images for the dashboard.
    random_state:
        Seed of the sample choice, the corruptions' noise, randomized attacks and the smoothing noise.
    """

    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = tuple(SEVERITIES)
    attacks: tuple[str, ...] = ("fgsm", "pgd_linf", "pgd_l2", "deepfool", "cw_l2", "square_linf")
    linf_eps: tuple[float, ...] = DEFAULT_LINF_EPS
    l2_eps: tuple[float, ...] = DEFAULT_L2_EPS
    reference_linf_eps: float | None = None
    reference_l2_eps: float | None = None
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    smoothing_sigma: float = 0.25
    smoothing_n0: int = 100
    smoothing_n: int = 1000
    smoothing_alpha: float = 0.001
    reference_radius: float | None = None
    max_samples: int = 500
    attack_samples: int = 200
    smoothing_samples: int = 100
    selfcheck_samples: int = 32
    selfcheck_threshold: float = 0.95
    masking_samples: int = 64
    corruption_batch_size: int = 128
    attack_batch_size: int = 128
    smoothing_batch_size: int = 500
    fragile_linf_eps: float = 1 / 255
    fragile_l2: float = 0.1
    fragile_min_families: int = 2
    min_slice_samples: int = 10
    worst_slices: int = 10
    num_examples: int = 24
    random_state: int = 0

    def params_for(self, attack: str) -> dict[str, Any]:
        """Keyword arguments the run passes to ``attack`` (defaults updated by ``attack_params``)."""
        return {**DEFAULT_ATTACK_PARAMS.get(attack, {}), **self.attack_params.get(attack, {})}

    def attacks_of(self, norm: str) -> list[str]:
        """The configured attacks of ``norm`` (``"linf"`` / ``"l2"``), in config order."""
        return [a for a in self.attacks if ATTACKS[a].norm == norm]

    def reference_eps(self, norm: str) -> float:
        """Reference budget of ``norm``: the configured one, else the grid's upper median."""
        grid = sorted(self.linf_eps if norm == "linf" else self.l2_eps)
        given = self.reference_linf_eps if norm == "linf" else self.reference_l2_eps
        return float(grid[len(grid) // 2]) if given is None else float(given)

    def radius(self) -> float:
        """Reference certified radius."""
        return float(self.smoothing_sigma if self.reference_radius is None else self.reference_radius)


# -- validation ---------------------------------------------------------------------------------------------

def _positive(value: Any, name: str, *, integer: bool = False, allow_zero: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int | np.integer) if integer else isinstance(value, int | float | np.number)
    if isinstance(value, bool) or not ok_type or not math.isfinite(float(value)) or \
            (float(value) < 0 if allow_zero else float(value) <= 0):
        raise ValidationError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}; got {value!r}")


def validate_config(config: RobustnessConfig) -> None:
    """Raise :class:`~robustlens.errors.ValidationError` naming the first bad setting (what was expected, what came)."""
    unknown = [c for c in config.corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ValidationError(f"unknown corruption(s) {unknown}; expected names from {list(CORRUPTIONS)}")
    bad = [s for s in config.severities
           if isinstance(s, bool) or not isinstance(s, int | np.integer) or s not in SEVERITIES]
    if bad:
        raise ValidationError(f"severities must be integers in 1..5; got {list(config.severities)}")
    if config.corruptions and not config.severities:
        raise ValidationError("severities is empty; give at least one of 1..5 (or no corruptions)")
    unknown = [a for a in config.attacks if a not in ATTACKS]
    if unknown:
        raise ValidationError(f"unknown attack(s) {unknown}; expected names from {list(ATTACKS)}")
    unknown = [a for a in config.attack_params if a not in ATTACKS]
    if unknown:
        raise ValidationError(f"attack_params names unknown attack(s) {unknown}; expected names from {list(ATTACKS)}")
    for norm, grid in (("linf", config.linf_eps), ("l2", config.l2_eps)):
        if not config.attacks_of(norm):
            continue
        if not grid:
            raise ValidationError(f"{norm}_eps is empty but {norm} attacks {config.attacks_of(norm)} are requested")
        for eps in grid:
            _positive(eps, f"{norm}_eps values")
        if norm == "linf" and max(grid) >= 0.5:
            raise ValidationError(f"linf_eps values must be < 0.5 (pixel units in [0, 1]); got {list(grid)}")
        reference = config.reference_eps(norm)
        if not any(abs(reference - e) <= 1e-9 * max(1.0, e) for e in grid):
            raise ValidationError(f"reference_{norm}_eps {reference} must be one of the {norm}_eps grid {list(grid)}")
    for name in ("smoothing_sigma", "smoothing_alpha", "selfcheck_threshold", "fragile_linf_eps", "fragile_l2"):
        _positive(getattr(config, name), name)
    if config.smoothing_alpha >= 1 or config.selfcheck_threshold > 1:
        raise ValidationError(f"smoothing_alpha must be in (0, 1) and selfcheck_threshold in (0, 1]; got "
                              f"{config.smoothing_alpha} and {config.selfcheck_threshold}")
    _positive(config.radius(), "reference_radius", allow_zero=True)
    for name in ("smoothing_n0", "smoothing_n", "max_samples", "selfcheck_samples", "masking_samples",
                 "corruption_batch_size", "attack_batch_size", "smoothing_batch_size", "fragile_min_families",
                 "min_slice_samples", "worst_slices"):
        _positive(getattr(config, name), name, integer=True)
    for name in ("attack_samples", "smoothing_samples", "num_examples", "random_state"):
        _positive(getattr(config, name), name, integer=True, allow_zero=True)


# -- inputs --------------------------------------------------------------------------------------------------

def model_digest(workspace: Workspace) -> str:
    """Fingerprint of the workspace model: its config plus the model file's bytes (or the factory name)."""
    entry = workspace.manifest.get("model")
    if entry is None:
        raise ValidationError(f"{workspace.root} has no model; robustness analysis needs one: pass --model (and "
                              "--model-config) to 'robustlens init'")
    parts: list[Any] = [entry.get("kind"), entry.get("config")]
    if entry.get("kind") == "torchscript":
        digest = hashlib.sha256((workspace.root / entry["file"]).read_bytes()).hexdigest()
        parts.append(digest)
    else:
        parts.append(entry.get("factory") or entry.get("file"))
    return fingerprint(*parts)


def load_images(workspace: Workspace, positions: np.ndarray, model_config, *, workers: int | None = None,
                progress: bool = False) -> torch.Tensor:
    """Decode the samples at ``positions`` ``(M,)`` into the model's layout: ``(M, C, H, W)`` float32 in [0, 1]."""
    paths = workspace.samples["path"].tolist()
    pixels: list[np.ndarray] = []
    for _, batch in iter_decoded(workspace.dataset_root, paths, positions, workers=workers, progress=progress,
                                 desc="Decoding"):
        pixels.extend(batch)
    return prepare_images(pixels, model_config)


def _slice_specs(workspace: Workspace, positions: np.ndarray) -> tuple[list[dict], str]:
    """Slices over the evaluated samples (membership ``(M,)``) and a fingerprint of where they came from.

    Class slices always; every row of ``slices.parquet`` (through :func:`slice_mask`) when the slices
    stage ran — its class rows then replace the generated ones.
    """
    labels = workspace.samples["label_index"].to_numpy()[positions]
    table = read_artifact(workspace, "slices")
    if table is None:
        return class_slices(labels, workspace.classes), "classes-only"
    specs = [{"slice_id": "all", "description": "all evaluated samples", "kind": "all",
              "members": np.ones(positions.shape[0], dtype=bool)}]
    for _, row in table.iterrows():
        if row["kind"] == "all":
            continue
        specs.append({"slice_id": row["slice_id"], "description": row["description"], "kind": row["kind"],
                      "members": slice_mask(workspace, row)[positions]})
    digest_column = table["members_digest"] if "members_digest" in table else table["slice_id"]
    return specs, fingerprint(table["slice_id"], digest_column, len(workspace.samples))


# -- the analyses ---------------------------------------------------------------------------------------------

@dataclass
class AttackFamily:
    """Attacks of one norm on ``A`` samples, ``E`` budgets.

    Attributes
    ----------
    norm, eps:
        Threat model and its ascending budget grid ``(E,)``.
    broken:
        Attack name → ``(E, A)`` bool: clean-correct and an adversarial within that budget was found
        (monotone in ε, see the module docstring).
    min_norm:
        ``(A,)`` smallest successful perturbation of the minimal-norm attacks (NaN: none).
    params:
        Attack name → the keyword arguments used.
    """

    norm: str
    eps: np.ndarray
    broken: dict[str, np.ndarray]
    min_norm: np.ndarray
    params: dict[str, dict[str, Any]]

    def worst(self) -> np.ndarray:
        """``(E, A)`` bool: broken by at least one attack."""
        return np.logical_or.reduce(list(self.broken.values()))


def run_attack_family(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, clean_correct: np.ndarray,
                      norm: str, config: RobustnessConfig, bar: tqdm) -> AttackFamily:
    """Run the configured attacks of ``norm`` on ``images`` ``(A, C, H, W)`` with true ``labels`` ``(A,)``."""
    grid = np.array(sorted(config.linf_eps if norm == "linf" else config.l2_eps), dtype=float)
    broken: dict[str, np.ndarray] = {}
    min_norm = np.full(images.shape[0], np.nan)
    params = {}
    for name in config.attacks_of(norm):
        params[name] = config.params_for(name)
        spec = ATTACKS[name]
        hits = np.zeros((grid.size, images.shape[0]), dtype=bool)
        if spec.minimal:
            todo = np.flatnonzero(clean_correct)
            if todo.size:
                result = run_attack(model, images[todo], labels[todo], name, None, random_state=config.random_state,
                                    batch_size=config.attack_batch_size, **params[name])
                size = result.l2 if norm == "l2" else result.linf
                for e, eps in enumerate(grid):
                    hits[e, todo] = result.success & (size <= eps * (1 + BUDGET_TOL) + BUDGET_TOL)
                min_norm[todo] = np.fmin(min_norm[todo], np.where(result.success, size, np.nan))
            bar.update(grid.size)
        else:
            already = np.zeros(images.shape[0], dtype=bool)
            for e, eps in enumerate(grid):
                todo = np.flatnonzero(clean_correct & ~already)
                if todo.size:
                    result = run_attack(model, images[todo], labels[todo], name, float(eps),
                                        random_state=derive_seed(config.random_state, name, e) & 0x7FFFFFFF,
                                        batch_size=config.attack_batch_size, **params[name])
                    already[todo[result.success]] = True
                hits[e] = already
                bar.update(1)
        broken[name] = hits
    return AttackFamily(norm=norm, eps=grid, broken=broken, min_norm=min_norm, params=params)


def breaking_budget(family: AttackFamily, clean_correct: np.ndarray) -> np.ndarray:
    """``(A,)`` smallest budget at which some attack broke the sample; 0 for clean errors, NaN if never."""
    worst = family.worst()
    out = np.full(worst.shape[1], np.nan)
    ever = worst.any(axis=0)
    out[ever] = family.eps[worst.argmax(axis=0)[ever]]
    out[~clean_correct] = 0.0
    return out


def curve_rows(family: AttackFamily, clean_correct: np.ndarray) -> list[dict]:
    """Rows of ``robustness_curves.parquet`` for one norm: every attack and the worst case at every ε."""
    n = clean_correct.shape[0]
    correct = int(clean_correct.sum())
    rows = []
    for attack, hits in [*family.broken.items(), ("worst_case", family.worst())]:
        for e, eps in enumerate(family.eps):
            broken = int((hits[e] & clean_correct).sum())
            rows.append({"norm": family.norm, "attack": attack, "eps": float(eps),
                         "robust_accuracy": (correct - broken) / n if n else np.nan,
                         "success_rate": broken / correct if correct else np.nan, "n_samples": n})
    return rows


def run_self_checks(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, config: RobustnessConfig,
                    norms: list[str], bar: tqdm) -> dict[str, Any]:
    """Active test of every attack run (at its norm's reference ε) and gradient-masking checks per norm.

    Returns ``{"attacks": {name: result dict}, "masking": {norm: report dict}, "passed": bool,
    "warnings": [...]}``; a failed active test or a suspicious masking report adds a warning.
    """
    checks: dict[str, Any] = {}
    masking: dict[str, Any] = {}
    warnings: list[str] = []
    sc_images = images[:config.selfcheck_samples]
    for norm in norms:
        eps = config.reference_eps(norm)
        for name in config.attacks_of(norm):
            result = attack_self_check(model, sc_images, name, eps, threshold=config.selfcheck_threshold,
                                       attack_params=config.params_for(name), random_state=config.random_state,
                                       batch_size=config.attack_batch_size)
            entry = result.to_dict()
            entry.pop("success")
            checks[name] = entry
            if not result.passed:
                warnings.append(f"attack self-check FAILED for {name} at {norm} eps={eps:.4g}: it found only "
                                f"{result.success_rate:.0%} of the adversarial examples known to exist (needs "
                                f"{result.threshold:.0%}); its robust accuracy overestimates robustness — "
                                "strengthen its parameters")
            bar.update(1)
        ms = config.masking_samples
        report = gradient_masking_checks(model, images[:ms], labels[:ms], eps, norm=norm,
                                         pgd_steps=2 * config.params_for(f"pgd_{norm}").get("steps", 10),
                                         square_iters=config.params_for("square_linf").get("max_iter", 100),
                                         random_state=config.random_state)
        masking[norm] = report.to_dict()
        warnings += [f"gradient masking suspected ({norm}): {message}" for message in report.messages]
        bar.update(1)
    passed = all(c["passed"] for c in checks.values()) and not any(m["suspicious"] for m in masking.values())
    return {"attacks": checks, "masking": masking, "passed": passed, "warnings": warnings}


def run_smoothing(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, config: RobustnessConfig,
                  bar: tqdm) -> dict[str, np.ndarray]:
    """CERTIFY on ``images`` ``(S, C, H, W)`` one by one (seed per position), returning ``(S,)`` arrays:
    ``prediction`` (-1 = abstain), ``radius`` (0 when abstained), ``abstain``, ``correct`` (certified true class)."""
    predictions, radii = [], []
    for i in range(images.shape[0]):
        result = certify(model, images[i:i + 1], config.smoothing_sigma, n0=config.smoothing_n0, n=config.smoothing_n,
                         alpha=config.smoothing_alpha, batch_size=config.smoothing_batch_size,
                         random_state=derive_seed(config.random_state, "certify", i) & 0x7FFFFFFF)
        predictions.append(int(result.prediction[0]))
        radii.append(float(result.radius[0]))
        bar.update(1)
    prediction = np.array(predictions, dtype=np.int64)
    abstain = prediction < 0
    return {"prediction": prediction, "radius": np.array(radii), "abstain": abstain,
            "correct": ~abstain & (prediction == labels)}


def certified_curve(radius: np.ndarray, correct: np.ndarray, config: RobustnessConfig) -> pd.DataFrame:
    """``robustness_certified.parquet``: certified accuracy on a radius grid of step σ/10 up to the largest
    radius CERTIFY can give with ``n`` samples (``σ·Φ⁻¹(α^(1/n))``)."""
    from scipy.stats import norm as normal

    sigma = config.smoothing_sigma
    largest = sigma * float(normal.ppf(config.smoothing_alpha ** (1.0 / config.smoothing_n)))
    step = sigma / 10
    grid = np.round(np.arange(0.0, largest + step, step), 10)
    accuracy = [float(np.mean(correct & (radius >= r))) if radius.size else np.nan for r in grid]
    return pd.DataFrame({"radius": grid, "certified_accuracy": accuracy, "n_samples": radius.size,
                         "sigma": sigma})


# -- per-sample table and examples --------------------------------------------------------------------------

def samples_frame(ids: np.ndarray, clean_correct: np.ndarray, corruption: dict | None, attacked: int,
                  families: dict[str, AttackFamily], attack_correct: np.ndarray, smoothing: dict | None,
                  config: RobustnessConfig) -> pd.DataFrame:
    """The ``robustness_samples`` table (see the module docstring), one row per evaluated sample ``(M,)``."""
    m = ids.shape[0]
    frame = pd.DataFrame({"id": ids.astype(str), "rob_clean_correct": clean_correct})
    if corruption is not None:
        frame["rob_corruption_accuracy"] = corruption["accuracy"]
        for family, values in corruption["flip"].items():
            frame[f"rob_flip_severity_{family}"] = values
    frame["rob_attacked"] = np.arange(m) < attacked
    for norm, column in (("linf", "rob_min_linf_eps"), ("l2", "rob_min_l2_eps")):
        if norm in families:
            values = np.full(m, np.nan)
            values[:attacked] = breaking_budget(families[norm], attack_correct)
            frame[column] = values
    if "l2" in families and any(ATTACKS[a].minimal for a in families["l2"].broken):
        values = np.full(m, np.nan)
        values[:attacked] = np.where(attack_correct, families["l2"].min_norm, 0.0)
        frame["rob_min_l2"] = values
    if smoothing is not None:
        s = smoothing["radius"].shape[0]
        radius = np.full(m, np.nan)
        radius[:s] = np.where(smoothing["correct"], smoothing["radius"], 0.0)
        frame["rob_certified_radius"] = radius
        correct = pd.array([pd.NA] * m, dtype="boolean")
        correct[:s] = smoothing["correct"]
        frame["rob_certified_correct"] = correct
    rule = FragilityRule(config.fragile_linf_eps, config.fragile_l2, config.fragile_min_families)
    lowest = min(config.severities) if corruption is not None else None
    severity, reasons = fragility(frame, rule, lowest)
    frame["rob_fragile"] = severity > 0
    frame["rob_fragility"] = severity
    frame["rob_fragile_reason"] = reasons
    return frame


def choose_examples(frame: pd.DataFrame, count: int) -> np.ndarray:
    """Row positions of up to ``count`` example samples: the most fragile half, then others in stratified order.

    Only attacked rows are eligible when there are any (they have adversarial versions).
    """
    eligible = frame.index[frame["rob_attacked"]] if frame["rob_attacked"].any() else frame.index
    fragile = frame.loc[eligible]
    fragile = fragile[fragile["rob_fragile"]].sort_values("rob_fragility", ascending=False, kind="stable")
    chosen = list(fragile.index[:count // 2])
    chosen += [i for i in eligible if i not in set(chosen)][:count - len(chosen)]
    return np.array(sorted(chosen), dtype=np.int64)


def example_images(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, rows: np.ndarray,
                   frame: pd.DataFrame, corruption: dict | None, families: dict[str, AttackFamily],
                   config: RobustnessConfig) -> dict[str, np.ndarray]:
    """Arrays of ``robustness_examples.npz`` for the evaluated rows ``rows`` ``(X,)``.

    Keys: ``ids`` (X,) str; ``labels``; ``clean`` / ``corrupted`` / ``adversarial`` ``(X, C, H, W)`` float16
    in [0, 1]; ``clean_pred`` / ``corrupted_pred`` / ``adversarial_pred`` (X,) class indices predicted *on
    the stored images*; ``perturbation`` ``(X, C, H, W)`` float16, adversarial − clean computed before the
    float16 rounding (exact to ~1e-3 relative, unlike the difference of the stored images); ``corruption``
    (X,) str and ``severity`` (X,) int of the corrupted version (the
    corruption and severity at which the sample first flips, else the harshest cell evaluated; exactly the
    image of the benchmark, regenerated from its seed); ``attack`` (X,) str, ``eps`` (X,) float of the
    adversarial version (the attack and smallest budget that broke it, else the strongest run);
    ``classes`` (K,) str.
    """
    device = model_device(model, images.device)
    x = images[rows]
    corrupted, adversarial = x.clone(), x.clone()
    names = np.full(rows.shape[0], "", dtype=object)
    severities = np.zeros(rows.shape[0], dtype=np.int64)
    if corruption is not None:
        cells: dict[tuple[str, int, int], list[int]] = {}
        for k, row in enumerate(rows):
            names[k], severities[k] = _example_corruption(corruption, int(row))
            cells.setdefault((names[k], int(severities[k]), int(row) // config.corruption_batch_size), []).append(k)
        # Regenerate each benchmark batch once, with its own seed: the stored image is exactly the one evaluated.
        for (name, severity, batch_index), members in cells.items():
            start = batch_index * config.corruption_batch_size
            batch = images[start:start + config.corruption_batch_size].to(device)
            generator = make_generator(int(config.random_state), name, severity, batch_index)
            with torch.no_grad():
                out = CORRUPTIONS[name](batch, severity, generator).cpu()
            for k in members:
                corrupted[k] = out[int(rows[k]) - start]
    attacks, budgets = np.full(rows.shape[0], "", dtype=object), np.zeros(rows.shape[0])
    family = families.get("linf") or families.get("l2")
    if family is not None:
        runs: dict[tuple[str, float], list[int]] = {}
        for k, row in enumerate(rows):
            attacks[k], budgets[k] = _example_attack(family, int(row))
            runs.setdefault((attacks[k], float(budgets[k])), []).append(k)
        for (attack, eps), members in runs.items():
            chosen = torch.as_tensor(members)
            result = run_attack(model, x[chosen], labels[rows[members]], attack,
                                None if ATTACKS[attack].minimal else eps, random_state=config.random_state,
                                batch_size=config.attack_batch_size, **family.params[attack])
            adversarial[chosen] = result.adv_images.cpu()
    with eval_mode(model):
        preds = [predict_labels(model, t.to(device), 256).cpu().numpy() for t in (x, corrupted, adversarial)]
    return {"ids": frame["id"].to_numpy()[rows].astype(str), "labels": labels[rows].astype(np.int64),
            "clean": x.numpy().astype(np.float16), "corrupted": corrupted.numpy().astype(np.float16),
            "adversarial": adversarial.numpy().astype(np.float16),
            "perturbation": (adversarial - x).numpy().astype(np.float16), "clean_pred": preds[0],
            "corrupted_pred": preds[1], "adversarial_pred": preds[2], "corruption": names.astype(str),
            "severity": severities, "attack": attacks.astype(str), "eps": budgets}


def _example_corruption(corruption: dict, row: int) -> tuple[str, int]:
    """(corruption, severity) shown for evaluated row ``row``: first flip, else the harshest cell."""
    first = corruption["first_flip"].iloc[row]
    if first.notna().any():
        severity = float(first.min())
        candidates = [c for c in first.index if first[c] == severity]
        table = corruption["table"]
        accuracy = {c: float(table[(table["corruption"] == c) & (table["severity"] == severity)]["accuracy"].iloc[0])
                    for c in candidates}
        return min(candidates, key=lambda c: accuracy[c]), int(severity)
    worst = corruption["table"].sort_values(["severity", "accuracy"], ascending=[False, True]).iloc[0]
    return str(worst["corruption"]), int(worst["severity"])


def _example_attack(family: AttackFamily, row: int) -> tuple[str, float]:
    """(attack, budget) shown for attacked row ``row``: the first attack that broke it at its breaking budget."""
    worst = family.worst()[:, row]
    if worst.any():
        e = int(worst.argmax())
        attack = next(a for a, hits in family.broken.items() if hits[e, row])
        return attack, float(family.eps[e])
    bounded = [a for a in family.broken if not ATTACKS[a].minimal]
    return (bounded[0] if bounded else next(iter(family.broken))), float(family.eps[-1])


# -- the run ------------------------------------------------------------------------------------------------------

def run_robustness(workspace: Workspace, config: RobustnessConfig | None = None, *, progress: bool = True,
                   device: str = "cpu", workers: int | None = None, threads: int | None = None) -> dict:
    """Run the robustness analysis of ``workspace``'s model and write its artifacts (see the module docstring).

    Parameters
    ----------
    workspace:
        A workspace with a model.
    config:
        Settings (default :class:`RobustnessConfig`).
    progress:
        Show tqdm progress bars (on stderr).
    device:
        Torch device of the model (``"cpu"``, ``"cuda"``); images are moved there batch by batch.
    workers:
        Image-decoding threads (``None``: one per core).
    threads:
        Torch intra-op threads for the run (restored afterwards); ``None`` leaves torch's setting. On a
        machine whose cores are busy, fewer threads than cores is much faster: torch's worker threads
        spin-wait for each other, and one descheduled thread stalls them all (measured: a 40-sample run
        took 78 s with 2 threads and 5 s with 1 on 2 shared cores).

    Returns
    -------
    dict
        The content of ``robustness_summary.json`` plus ``skipped`` (``True`` when config, samples and model
        were unchanged, ``"slices"`` when only the slice table was rebuilt).
    """
    config = config or RobustnessConfig()
    validate_config(config)
    if threads is not None:
        _positive(threads, "threads", integer=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _run(workspace, config, progress=progress, device=device, workers=workers)
    finally:
        torch.set_num_threads(before)


def _run(workspace: Workspace, config: RobustnessConfig, *, progress: bool, device: str, workers: int | None) -> dict:
    """:func:`run_robustness` once the config is valid and torch's threads are set."""
    digest = model_digest(workspace)
    context = StageContext(workspace=workspace, progress=progress, device=device, random_state=config.random_state,
                           workers=workers)
    samples = workspace.samples
    labels_all = samples["label_index"].to_numpy().astype(np.int64)
    positions = select_samples(labels_all, config.max_samples, config.random_state)
    inputs = fingerprint(samples.iloc[positions][["id", "content_hash", "label_index"]].astype(str), digest,
                         workspace.classes)
    slices, slice_inputs = _slice_specs(workspace, positions)
    if _current(context, config, inputs):
        return _refresh_slices(context, config, inputs, slices, slice_inputs)

    timings: dict[str, float] = {}
    clock = time.perf_counter()
    model = workspace.load_model(device)
    images = load_images(workspace, positions, model.config, workers=workers, progress=progress)
    labels = labels_all[positions]
    with eval_mode(model):
        clean_pred = predict_labels(model, images.to(device), 256).cpu().numpy()
    clean_correct = clean_pred == labels
    timings["decode"] = time.perf_counter() - clock

    summary: dict[str, Any] = {"format_version": 1, "config": asdict(config), "model_digest": digest}
    corruption, corruption_rows = _corruptions(model, images, labels, config, progress, timings)
    attacked = min(config.attack_samples, positions.shape[0]) if config.attacks else 0
    families, curves, self_check = _attacks(model, images[:attacked], labels[:attacked],
                                            clean_correct[:attacked], config, progress, timings)
    smoothing = _smoothing(model, images, labels, config, progress, timings)

    clock = time.perf_counter()
    ids = samples["id"].to_numpy()[positions]
    frame = samples_frame(ids, clean_correct, corruption, attacked, families, clean_correct[:attacked], smoothing,
                          config)
    flags = fragile_flags(frame)
    slice_table = _slice_table(frame, slices, config, families, smoothing)
    timings["tables"] = time.perf_counter() - clock

    clock = time.perf_counter()
    rows = choose_examples(frame, config.num_examples)
    examples = example_images(model, images, labels, rows, frame, corruption, families, config) if rows.size else None
    timings["examples"] = time.perf_counter() - clock

    summary.update(_summary_body(workspace, config, ids, clean_correct, attacked, corruption, families,
                                 clean_correct[:attacked], smoothing, self_check, frame, slice_table))
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    summary["timings"]["total"] = round(sum(timings.values()), 2)
    summary["slice_inputs"] = slice_inputs
    artifacts = {
        "robustness_corruptions": corruption_rows,
        "robustness_curves": pd.DataFrame(curves, columns=["norm", "attack", "eps", "robust_accuracy", "success_rate",
                                                            "n_samples"]),
        "robustness_certified": (certified_curve(smoothing["radius"], smoothing["correct"], config)
                                 if smoothing is not None else
                                 pd.DataFrame(columns=["radius", "certified_accuracy", "n_samples", "sigma"])),
        "robustness_slices": slice_table,
        "robustness_samples": frame,
        "flags_robustness": flags,
    }
    _write(context, config, inputs, artifacts, examples, workspace.classes, summary)
    return {**summary, "skipped": False}


def _corruptions(model, images, labels, config, progress, timings) -> tuple[dict | None, pd.DataFrame]:
    """Corruption benchmark, one corruption at a time (for progress); ``None`` and an empty table when none."""
    columns = ["corruption", "family", "severity", "accuracy", "error", "relative_error", "flip_rate", "n_samples"]
    if not config.corruptions:
        return None, pd.DataFrame(columns=columns)
    clock = time.perf_counter()
    tables, first_flip, correct_cells = [], [], np.zeros(images.shape[0])
    with tqdm(total=len(config.corruptions) * len(config.severities), desc="Corruptions", unit="cell",
              disable=not progress) as bar:
        for name in config.corruptions:
            bench = corruption_benchmark(model, images, labels, names=[name], severities=config.severities,
                                         batch_size=config.corruption_batch_size, random_state=config.random_state)
            tables.append(bench.table)
            first_flip.append(bench.first_flip_severity)
            correct_cells += (bench.predictions[0] == labels[None, :]).sum(axis=0)
            bar.update(len(config.severities))
    table = pd.concat(tables, ignore_index=True)
    table.insert(1, "family", table["corruption"].map(family_of))
    table["n_samples"] = images.shape[0]
    first = pd.concat(first_flip, axis=1)
    timings["corruptions"] = time.perf_counter() - clock
    flips = family_flip_severity(first)
    result = {"table": table, "first_flip": first, "flip": {f: flips[f].to_numpy() for f in flips.columns},
              "accuracy": correct_cells / (len(config.corruptions) * len(config.severities))}
    return result, table[columns]


def _attacks(model, images, labels, clean_correct, config, progress, timings):
    """Attack families, curve rows and self-checks on the attack subset (empty when there is none)."""
    norms = [n for n in ("linf", "l2") if config.attacks_of(n)] if images.shape[0] else []
    families: dict[str, AttackFamily] = {}
    curves: list[dict] = []
    self_check = {"attacks": {}, "masking": {}, "passed": True, "warnings": []}
    if not norms:
        return families, curves, self_check
    clock = time.perf_counter()
    units = sum(len(config.linf_eps if ATTACKS[a].norm == "linf" else config.l2_eps) for a in config.attacks)
    with tqdm(total=units, desc="Attacks", unit="run", disable=not progress) as bar:
        for norm in norms:
            families[norm] = run_attack_family(model, images, labels, clean_correct, norm, config, bar)
            curves += curve_rows(families[norm], clean_correct)
    timings["attacks"] = time.perf_counter() - clock
    clock = time.perf_counter()
    with tqdm(total=len(config.attacks) + len(norms), desc="Self-checks", unit="check", disable=not progress) as bar:
        self_check = run_self_checks(model, images, labels, config, norms, bar)
    timings["self_checks"] = time.perf_counter() - clock
    return families, curves, self_check


def _smoothing(model, images, labels, config, progress, timings) -> dict | None:
    """Certification of the smoothing subset, or ``None`` when ``smoothing_samples`` is 0."""
    count = min(config.smoothing_samples, images.shape[0])
    if count == 0:
        return None
    clock = time.perf_counter()
    with tqdm(total=count, desc="Certifying", unit="img", disable=not progress) as bar:
        result = run_smoothing(model, images[:count], labels[:count], config, bar)
    timings["smoothing"] = time.perf_counter() - clock
    return result


def _reference(config: RobustnessConfig, families: dict, smoothing: dict | None) -> SliceReference:
    return SliceReference(linf_eps=config.reference_eps("linf") if "linf" in families else None,
                          l2_eps=config.reference_eps("l2") if "l2" in families else None,
                          radius=config.radius() if smoothing is not None else None)


def _slice_table(frame: pd.DataFrame, slices: list[dict], config: RobustnessConfig, families: dict,
                 smoothing: dict | None) -> pd.DataFrame:
    return slice_robustness(frame, slices, _reference(config, families, smoothing),
                            min_samples=config.min_slice_samples, top_k=config.worst_slices)


WORST_COLUMNS = ("worst_rank", "slice_id", "description", "kind", "n_samples", "n_attacked", "clean_accuracy",
                 "corruption_accuracy", "robust_accuracy_linf", "robust_accuracy_l2", "certified_accuracy")


def _worst_list(slice_table: pd.DataFrame) -> list[dict]:
    worst = slice_table[slice_table["worst_rank"].notna()].sort_values("worst_rank")
    return records(worst, WORST_COLUMNS)


def _summary_body(workspace, config, ids, clean_correct, attacked, corruption, families, attack_correct,
                  smoothing, self_check, frame, slice_table) -> dict:
    """Everything of ``robustness_summary.json`` except config, timings and fingerprints."""
    body: dict[str, Any] = {
        "num_samples": {"workspace": len(workspace.samples), "evaluated": int(ids.shape[0]), "attacked": attacked,
                        "certified": 0 if smoothing is None else int(smoothing["radius"].shape[0])},
        "clean_accuracy": float(clean_correct.mean()) if clean_correct.size else None,
        "classes": workspace.classes,
    }
    if corruption is not None:
        table = corruption["table"]
        by_corruption = table.drop(columns=["severity", "family"]).groupby("corruption", sort=False).mean()
        by_corruption = by_corruption.drop(columns="n_samples").reset_index()
        by_corruption.insert(1, "family", by_corruption["corruption"].map(family_of))
        body["corruptions"] = {
            "mean_accuracy": float(table["accuracy"].mean()),
            "mean_relative_error": float(table["relative_error"].mean()),
            "mean_flip_rate": float(table["flip_rate"].mean()),
            "by_corruption": by_corruption.to_dict(orient="records"),
            "by_family": table.groupby("family")["accuracy"].mean().to_dict(),
            "by_severity": table.groupby("severity")["accuracy"].mean().to_dict(),
        }
    body["attacks"] = {}
    for norm, family in families.items():
        correct = int(attack_correct.sum())
        entry = {"eps": family.eps.tolist(), "reference_eps": config.reference_eps(norm),
                 "clean_accuracy": float(attack_correct.mean()), "attacks": {}}
        for name, hits in family.broken.items():
            broken = (hits & attack_correct).sum(axis=1)
            entry["attacks"][name] = {"params": family.params[name],
                                      "success_rate": (broken / correct).tolist() if correct else None,
                                      "robust_accuracy": ((correct - broken) / attack_correct.size).tolist()}
        worst = (family.worst() & attack_correct).sum(axis=1)
        entry["worst_case_robust_accuracy"] = ((correct - worst) / attack_correct.size).tolist()
        if norm == "l2" and np.isfinite(family.min_norm).any():
            entry["median_min_l2"] = float(np.nanmedian(family.min_norm))
        body["attacks"][norm] = entry
    if smoothing is not None:
        curve = certified_curve(smoothing["radius"], smoothing["correct"], config)
        radius = config.radius()
        body["certified"] = {
            "sigma": config.smoothing_sigma, "n0": config.smoothing_n0, "n": config.smoothing_n,
            "alpha": config.smoothing_alpha, "abstention_rate": float(smoothing["abstain"].mean()),
            "smoothed_accuracy": float(smoothing["correct"].mean()), "reference_radius": radius,
            "certified_accuracy_at_reference": float(np.mean(smoothing["correct"] & (smoothing["radius"] >= radius))),
            "radius": curve["radius"].tolist(), "certified_accuracy": curve["certified_accuracy"].tolist(),
        }
    body["self_check"] = {k: self_check[k] for k in ("attacks", "masking", "passed")}
    body["warnings"] = list(self_check["warnings"])
    body["fragile"] = {"count": int(frame["rob_fragile"].sum()), "rate": float(frame["rob_fragile"].mean()),
                       "rule": {"linf_eps": config.fragile_linf_eps, "l2": config.fragile_l2,
                                "min_families": config.fragile_min_families}}
    body["worst_slices"] = _worst_list(slice_table)
    return json_safe(body)


# -- artifacts and skipping ---------------------------------------------------------------------------------------

def _current(context: StageContext, config: RobustnessConfig, inputs: str) -> bool:
    workspace = context.workspace
    return (is_current(context, SUMMARY, config=config, inputs=inputs)
            and all(workspace.artifact_path(f"{name}.parquet").exists() for name in PARQUET_ARTIFACTS))


def _refresh_slices(context: StageContext, config: RobustnessConfig, inputs: str, slices: list[dict],
                    slice_inputs: str) -> dict:
    """A skipped run: rebuild only the slice table (from ``robustness_samples``) when the slices changed."""
    import json

    workspace = context.workspace
    summary = json.loads(workspace.artifact_path(f"{SUMMARY}.json").read_text(encoding="utf-8"))
    if summary.get("slice_inputs") == slice_inputs:
        return {**summary, "skipped": True}
    frame = read_artifact(workspace, "robustness_samples")
    ran = {"linf": "rob_min_linf_eps" in frame, "l2": "rob_min_l2_eps" in frame}
    reference = SliceReference(linf_eps=config.reference_eps("linf") if ran["linf"] else None,
                               l2_eps=config.reference_eps("l2") if ran["l2"] else None,
                               radius=config.radius() if "rob_certified_radius" in frame else None)
    table = slice_robustness(frame, slices, reference, min_samples=config.min_slice_samples, top_k=config.worst_slices)
    write_artifact(context, "robustness_slices", table, stage=STAGE, config=config, inputs=inputs)
    summary.update(worst_slices=json_safe(_worst_list(table)), slice_inputs=slice_inputs)
    storage.write_json(workspace.artifact_path(f"{SUMMARY}.json"), summary)
    record_artifact(context, SUMMARY, stage=STAGE, config=config, inputs=inputs)
    return {**summary, "skipped": "slices"}


def _write(context: StageContext, config: RobustnessConfig, inputs: str, artifacts: dict[str, pd.DataFrame],
           examples: dict | None, classes: list[str], summary: dict) -> None:
    """Write every artifact atomically; the summary last, so an interrupted run is never taken as current."""
    workspace = context.workspace
    for name, frame in artifacts.items():
        write_artifact(context, name, frame, stage=STAGE, config=config, inputs=inputs)
    path = workspace.artifact_path(f"{EXAMPLES}.npz")
    if examples is not None:
        payload = {**examples, "classes": np.array(classes, dtype=str)}

        def save(tmp):
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, **payload)

        storage.atomic_write(path, save)
        record_artifact(context, EXAMPLES, stage=STAGE, config=config, inputs=inputs,
                        extra={"count": int(examples["ids"].shape[0])})
    elif path.exists():
        path.unlink()
    storage.write_json(workspace.artifact_path(f"{SUMMARY}.json"), summary)
    record_artifact(context, SUMMARY, stage=STAGE, config=config, inputs=inputs)

