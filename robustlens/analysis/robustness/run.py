"""The robustness run of a workspace: corruptions, attacks, certification and self-checks, tied back to
samples and slices (``robustlens robustness WORKSPACE``).

:func:`run_robustness` picks up to ``max_samples`` samples (stratified by class, seeded), decodes them into
the model's input layout and runs, with the workspace model:

1. **corruptions** — every corruption × severity of :data:`~.corruptions.CORRUPTIONS` on all chosen samples;
2. **preview attacks** — every configured attack (FGSM, PGD, DeepFool, C&W, Square: fast, labelled "preview")
   on the first ``attack_samples`` of them (a stratified prefix), on an ε grid per norm;
3. **the headline** — AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T, Square-5000; :mod:`.autoattack`)
   at the reference ε of each norm (or the whole grid), on the clean-correct attacked samples;
4. **self-checks** — an attack-strength active test of every preview attack at the reference ε, on the first
   ``selfcheck_samples``, and gradient-masking symptom checks per norm;
5. **validity diagnostics** — :func:`~.validity.validity_diagnostics` at the reference ε of each norm (gradient
   statistics per loss, black-box, transfer, unbounded, monotonicity, more iterations, EOT, BPDA, an active test
   inside the model's input path); their attacks count in the per-sample worst case;
6. **formal verification** — IBP and CROWN (:mod:`.verify`) on the first ``verify_samples`` attacked samples, on
   each ε grid ("not supported: …" for models with other layers);
7. **certification** — randomized smoothing (CERTIFY) on the first ``smoothing_samples``;

A sample counts robust at ε only if it survives *every* attack run on it (previews, AutoAttack, diagnostics):
the per-sample worst case. The **headline** of each norm (``summary["headline"]``) is that worst case at the
reference ε with its Wilson 95 % interval; it is labelled a preview when AutoAttack did not run, and an
**upper bound** (with how much the diagnostic attacks lowered it) whenever the validity status is not "pass".
The summary's top-level ``"validity"`` is ``{"status": "pass" | "warn" | "fail", "checks": [...]}``: every
diagnostic check, the previews' self-checks, and "verified ⇒ not broken" (``fail`` if a verified sample was
ever broken). The AutoAttack, validity and verification modules are imported lazily: without one, the run
goes on and says so (a warning check; the headline falls back to the previews).

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
                                    ``robust_accuracy``, ``success_rate``, ``n_samples``,
                                    ``robust_accuracy_ci_low`` / ``_ci_high`` (Wilson 95 %), ``kind``
                                    (``preview`` / ``headline`` / ``worst_case``); an attack has rows
                                    only at the budgets it ran at
``robustness_verified.parquet``     :data:`VERIFIED_COLUMNS`: verified accuracy per norm, method, ε
                                    beside the empirical worst case of the same samples
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
* ``rob_broken_by_linf`` / ``rob_broken_by_l2`` — the first attack (run order) that broke the sample at the
  reference ε; ``""`` robust, ``"clean error"``, NA when not attacked;
* ``rob_verified_linf_eps`` / ``rob_verified_l2_eps`` — largest ε of the grid at which IBP or CROWN verified
  the sample (0: none; NaN outside the verified subset);
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from robustlens.analysis import robustness_defaults as defaults
from robustlens.analysis import storage
from robustlens.analysis.ingest.model import prepare_images
from robustlens.analysis.loader import iter_decoded
from robustlens.analysis.stages.base import (
    StageContext,
    fingerprint,
    is_current,
    read_artifact,
    record_artifact,
    write_artifact,
)
from robustlens.analysis.stages.evaluation import json_safe, wilson_interval
from robustlens.analysis.stages.slices import slice_mask
from robustlens.analysis.workspace import Workspace
from robustlens.errors import ConfigError, ValidationError

from ._common import derive_seed, eval_mode, logit_margin, make_generator, model_device, predict_labels
from .attacks import (
    ATTACKS,
    CURVE_RECORD_COLUMNS,
    AttackResult,
    RobustAccuracyCurve,
    attack_in_chunks,
    curve_from_breaks,
    pgd,
    run_attack,
    within_budget,
)
from .corruptions import CORRUPTIONS, SEVERITIES, corruption_benchmark
from .selfcheck import robustness_self_check
from .smoothing import certified_accuracy_curve, certify, radius_grid
from .tables import (
    TOO_FEW,
    FragilityRule,
    SliceReference,
    class_slices,
    family_flip_severity,
    family_of,
    fragile_flags,
    fragility,
    rate_with_interval,
    records,
    select_samples,
    slice_robustness,
)

STAGE = "robustness"
SUMMARY = "robustness_summary"
EXAMPLES = "robustness_examples"
PARQUET_ARTIFACTS = (
    "robustness_corruptions",
    "robustness_curves",
    "robustness_certified",
    "robustness_verified",
    "robustness_slices",
    "robustness_samples",
    "flags_robustness",
)

#: Settings of the preview attacks (fast, labelled "preview"; the headline is AutoAttack). PGD runs 50 steps from
#: a random start (Madry et al.), Square 1,000 queries; override per attack with ``attack_params`` / the TOML file.
DEFAULT_ATTACK_PARAMS: dict[str, dict[str, Any]] = {
    "fgsm": {},
    "pgd_linf": {"steps": 50, "random_start": True},
    "pgd_l2": {"steps": 50, "random_start": True},
    "deepfool": {"max_iter": 50, "candidates": 10, "overshoot": 0.02},
    "cw_l2": {"binary_search_steps": 3, "max_iter": 40, "initial_const": 0.1, "learning_rate": 0.05},
    "square_linf": {"max_iter": 1000, "p_init": 0.8},
}
#: The headline attack of each norm: AutoAttack's standard cascade (APGD-CE, APGD-T, FAB-T, Square), published
#: settings (Croce & Hein 2020).
HEADLINE_ATTACKS: dict[str, str] = {"linf": "autoattack_linf", "l2": "autoattack_l2"}
DEFAULT_AUTOATTACK_PARAMS: dict[str, Any] = {
    "version": "standard",
    "n_iter": 100,
    "n_restarts": 1,
    "n_target_classes": 9,
    "square_queries": 5000,
}
#: Losses the PGD previews can ascend: cross-entropy, the logit margin ``max_{j≠y} z_j - z_y`` (C&W), or DLR.
PGD_LOSSES = ("ce", "margin", "dlr")
VALIDITY_BUDGETS = ("fast", "standard")
VERIFY_METHODS = ("ibp", "crown")
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
        Preview attack names (keys of ``ATTACKS``); default all six. An empty tuple skips the previews.
    headline:
        ``"autoattack"`` (default): the headline robust accuracy of each norm that has attacks is AutoAttack's
        standard cascade (:data:`HEADLINE_ATTACKS`, settings from ``attack_params``, defaults
        :data:`DEFAULT_AUTOATTACK_PARAMS`); ``"preview"``: no AutoAttack, the previews' worst case is the
        headline (and says so). Without the AutoAttack module the run falls back to ``"preview"`` and warns.
    autoattack_eps:
        ``"reference"`` (default): AutoAttack at the reference ε of each norm; ``"grid"``: at every ε of the
        grid (on the samples it has not broken yet).
    validity:
        Run the validity diagnostics (gradient, black-box, transfer, unbounded, monotonicity, EOT, BPDA checks)
        at the reference ε of each norm; their attacks count in the per-sample worst case.
    validity_budget:
        Budget of the diagnostics (``"fast"`` or ``"standard"``, see ``validity_diagnostics``).
    verification:
        Formal verification methods (``"ibp"``, ``"crown"``) run on the ε grids; empty skips verification.
    verify_samples, verify_norms:
        Attacked samples (a prefix) that are formally verified, and the norms verified.
    stability_samples:
        Evaluated samples (a prefix) run through the ImageNet-P perturbation sequences (flip probability, top-5
        distance); ``0`` skips it.
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

    Raises
    ------
    ConfigError
        At construction (:func:`validate_config`), naming the first bad field, what it expected and what came.
    """

    corruptions: tuple[str, ...] = tuple(CORRUPTIONS)
    severities: tuple[int, ...] = tuple(SEVERITIES)
    attacks: tuple[str, ...] = ("fgsm", "pgd_linf", "pgd_l2", "deepfool", "cw_l2", "square_linf")
    linf_eps: tuple[float, ...] = DEFAULT_LINF_EPS
    l2_eps: tuple[float, ...] = DEFAULT_L2_EPS
    reference_linf_eps: float | None = None
    reference_l2_eps: float | None = None
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    headline: str = "autoattack"
    autoattack_eps: str = "reference"
    validity: bool = True
    validity_budget: str = "standard"
    verification: tuple[str, ...] = ("ibp", "crown")
    verify_samples: int = defaults.VERIFY_SAMPLES
    verify_norms: tuple[str, ...] = ("linf", "l2")
    stability_samples: int = 100
    smoothing_sigma: float = defaults.SMOOTHING_SIGMA
    smoothing_n0: int = defaults.SMOOTHING_N0
    smoothing_n: int = defaults.SMOOTHING_N
    smoothing_alpha: float = 0.001
    reference_radius: float | None = None
    max_samples: int = defaults.MAX_SAMPLES
    attack_samples: int = defaults.ATTACK_SAMPLES
    smoothing_samples: int = defaults.SMOOTHING_SAMPLES
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

    def __post_init__(self) -> None:
        validate_config(self)

    def params_for(self, attack: str) -> dict[str, Any]:
        """Keyword arguments the run passes to ``attack`` (defaults updated by ``attack_params``)."""
        headline = attack in HEADLINE_ATTACKS.values()
        base = DEFAULT_AUTOATTACK_PARAMS if headline else DEFAULT_ATTACK_PARAMS.get(attack, {})
        return {**base, **self.attack_params.get(attack, {})}

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

#: Who a configuration error of :class:`RobustnessConfig` is about (the first words of its message).
OWNER = f"stage '{STAGE}'"


def _positive(value: Any, name: str, *, integer: bool = False, allow_zero: bool = False, owner: str = OWNER) -> None:
    """Raise :class:`~robustlens.errors.ConfigError` unless ``value`` is a finite number (an int when ``integer``)
    ``> 0`` (``>= 0`` with ``allow_zero``)."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int | np.integer) if integer else isinstance(value, int | float | np.number)
    if (
        isinstance(value, bool)
        or not ok_type
        or not math.isfinite(float(value))
        or (float(value) < 0 if allow_zero else float(value) <= 0)
    ):
        raise ConfigError(owner, name, f"{kind} {'>= 0' if allow_zero else '> 0'}", value)


def _unknown(field_name: str, names: Any, known: list[str], what: str) -> ConfigError:
    """The error of ``field_name`` naming entries outside ``known``."""
    unknown = [n for n in names if n not in known]
    return ConfigError(OWNER, field_name, f"names from {known} (unknown {what}(s) {unknown})", list(names))


def validate_config(config: RobustnessConfig) -> None:
    """Raise :class:`~robustlens.errors.ConfigError` naming the first bad setting (field, what was expected, what
    came); :class:`RobustnessConfig` calls it at construction."""
    if any(c not in CORRUPTIONS for c in config.corruptions):
        raise _unknown("corruptions", config.corruptions, list(CORRUPTIONS), "corruption")
    bad = [
        s
        for s in config.severities
        if isinstance(s, bool) or not isinstance(s, int | np.integer) or s not in SEVERITIES
    ]
    if bad:
        raise ConfigError(OWNER, "severities", "integers in 1..5", list(config.severities))
    if config.corruptions and not config.severities:
        raise ConfigError(OWNER, "severities", "at least one of 1..5 (or no corruptions)", list(config.severities))
    if any(a not in ATTACKS for a in config.attacks):
        raise _unknown("attacks", config.attacks, list(ATTACKS), "attack")
    known = [*ATTACKS, *(a for a in HEADLINE_ATTACKS.values() if a not in ATTACKS)]
    if any(a not in known for a in config.attack_params):
        raise _unknown("attack_params", config.attack_params, known, "attack")
    for name, params in config.attack_params.items():
        loss = params.get("loss", "ce")
        if "loss" in params and (name not in ("pgd_linf", "pgd_l2") or loss not in PGD_LOSSES):
            raise ConfigError(
                OWNER,
                f"attack_params[{name!r}]['loss']",
                f"one of {list(PGD_LOSSES)} (only pgd_linf / pgd_l2 take a loss)",
                loss,
            )
    for name, allowed in (
        ("headline", ("autoattack", "preview")),
        ("autoattack_eps", ("reference", "grid")),
        ("validity_budget", VALIDITY_BUDGETS),
    ):
        if getattr(config, name) not in allowed:
            raise ConfigError(OWNER, name, f"one of {list(allowed)}", getattr(config, name))
    if any(n not in ("linf", "l2") for n in config.verify_norms):
        raise ConfigError(OWNER, "verify_norms", "among ['linf', 'l2']", list(config.verify_norms))
    if any(m not in VERIFY_METHODS for m in config.verification):
        raise ConfigError(OWNER, "verification", f"methods among {list(VERIFY_METHODS)}", list(config.verification))
    for norm, grid in (("linf", config.linf_eps), ("l2", config.l2_eps)):
        if not config.attacks_of(norm):
            continue
        if not grid:
            raise ConfigError(
                OWNER,
                f"{norm}_eps",
                f"a non-empty grid (the {norm} attacks {config.attacks_of(norm)} are requested)",
                list(grid),
            )
        for eps in grid:
            _positive(eps, f"{norm}_eps values")
        if norm == "linf" and max(grid) >= 0.5:
            raise ConfigError(OWNER, "linf_eps", "values < 0.5 (pixel units in [0, 1])", list(grid))
        reference = config.reference_eps(norm)
        if not any(abs(reference - e) <= 1e-9 * max(1.0, e) for e in grid):
            raise ConfigError(OWNER, f"reference_{norm}_eps", f"one of the {norm}_eps grid {list(grid)}", reference)
    for name in ("smoothing_sigma", "smoothing_alpha", "selfcheck_threshold", "fragile_linf_eps", "fragile_l2"):
        _positive(getattr(config, name), name)
    if config.smoothing_alpha >= 1:
        raise ConfigError(OWNER, "smoothing_alpha", "in (0, 1)", config.smoothing_alpha)
    if config.selfcheck_threshold > 1:
        raise ConfigError(OWNER, "selfcheck_threshold", "in (0, 1]", config.selfcheck_threshold)
    _positive(config.radius(), "reference_radius", allow_zero=True)
    for name in (
        "smoothing_n0",
        "smoothing_n",
        "max_samples",
        "selfcheck_samples",
        "masking_samples",
        "corruption_batch_size",
        "attack_batch_size",
        "smoothing_batch_size",
        "fragile_min_families",
        "min_slice_samples",
        "worst_slices",
    ):
        _positive(getattr(config, name), name, integer=True)
    for name in (
        "attack_samples",
        "smoothing_samples",
        "num_examples",
        "random_state",
        "verify_samples",
        "stability_samples",
    ):
        _positive(getattr(config, name), name, integer=True, allow_zero=True)


# -- the attack-config file (TOML) ------------------------------------------------------------------------------

_PGD_KEYS = {
    "steps": ("steps", "int"),
    "restarts": ("restarts", "int"),
    "step_size": ("step_size", "number"),
    "random_start": ("random_start", "bool"),
    "loss": ("loss", PGD_LOSSES),
}
_AUTOATTACK_KEYS = {
    "version": ("version", ("standard",)),
    "steps": ("n_iter", "int"),
    "n_iter": ("n_iter", "int"),
    "restarts": ("n_restarts", "int"),
    "n_restarts": ("n_restarts", "int"),
    "targets": ("n_target_classes", "int"),
    "n_target_classes": ("n_target_classes", "int"),
    "queries": ("square_queries", "int"),
    "square_queries": ("square_queries", "int"),
}
#: Per attack: TOML key → (keyword argument of the attack, kind). A kind is ``"int"`` (>= 1), ``"number"`` (> 0),
#: ``"fraction"`` (in (0, 1)), ``"bool"`` or a tuple of allowed strings. ``steps`` / ``restarts`` / ``queries`` are
#: the common names; each attack's own argument names are accepted too. Attacks registered elsewhere (e.g.
#: APGD, FAB) take the keyword arguments of their function, with the same three common names.
ATTACK_CONFIG_KEYS: dict[str, dict[str, tuple[str, Any]]] = {
    "fgsm": {},
    "pgd_linf": _PGD_KEYS,
    "pgd_l2": _PGD_KEYS,
    "deepfool": {
        "steps": ("max_iter", "int"),
        "max_iter": ("max_iter", "int"),
        "candidates": ("candidates", "int"),
        "overshoot": ("overshoot", "number"),
    },
    "cw_l2": {
        "steps": ("max_iter", "int"),
        "max_iter": ("max_iter", "int"),
        "binary_search_steps": ("binary_search_steps", "int"),
        "initial_const": ("initial_const", "number"),
        "learning_rate": ("learning_rate", "number"),
    },
    "square_linf": {"queries": ("max_iter", "int"), "max_iter": ("max_iter", "int"), "p_init": ("p_init", "fraction")},
    "autoattack_linf": _AUTOATTACK_KEYS,
    "autoattack_l2": _AUTOATTACK_KEYS,
}
_COMMON_ALIASES = {
    "steps": ("n_iter", "steps", "max_iter"),
    "restarts": ("n_restarts", "restarts"),
    "queries": ("n_queries", "queries", "square_queries", "max_iter"),
}
_TOP_LEVEL_KEYS = (
    "linf_eps",
    "l2_eps",
    "reference_linf_eps",
    "reference_l2_eps",
    "attacks",
    "headline",
    "autoattack_eps",
    "validity",
    "verification",
)


def _config_keys(attack: str) -> dict[str, tuple[str, Any]]:
    """TOML keys of ``attack`` (see :data:`ATTACK_CONFIG_KEYS`); other registered attacks from their signature."""
    import inspect

    if attack in ATTACK_CONFIG_KEYS:
        return ATTACK_CONFIG_KEYS[attack]
    skip = {
        "model",
        "images",
        "labels",
        "eps",
        "random_state",
        "seed",
        "progress",
        "batch_size",
        "norm",
        "loss",
        "counter",
    }
    fn = ATTACKS[attack].fn
    module, _ = _optional_module("autoattack")
    if module is not None and (fn.__doc__ or "").startswith("Registry adapter"):
        # AutoAttack's cascade attacks: the adapter forwards its settings to the attack function
        fn = (
            module.apgd
            if attack.startswith("apgd")
            else module.fab_targeted
            if attack.startswith("fab")
            else module.square
        )
    params = {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if name not in skip
        and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        and p.default is not inspect.Parameter.empty
    }

    def kind(default: Any) -> Any:
        if isinstance(default, bool):
            return "bool"
        if isinstance(default, int):
            return "int"
        return "number" if isinstance(default, float) else "any"

    keys = {name: (name, kind(default)) for name, default in params.items()}
    for alias, targets in _COMMON_ALIASES.items():
        target = next((t for t in targets if t in params), None)
        if target is not None and alias not in keys:
            keys[alias] = (target, kind(params[target]))
    return keys


def _toml_budget(value: Any, owner: str, where: str) -> float:
    """A budget from TOML: a positive number or a fraction string like ``"8/255"`` (``where``: its key)."""
    from fractions import Fraction

    expected = 'a positive number or a fraction like "8/255"'
    if isinstance(value, str):
        try:
            number = float(Fraction(value.strip()))
        except (ValueError, ZeroDivisionError) as exc:
            raise ConfigError(owner, where, expected, value) from exc
    elif isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ConfigError(owner, where, expected, value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(owner, where, "budgets > 0", value)
    return number


def _toml_value(value: Any, kind: Any, owner: str, where: str) -> Any:
    """Check one attack setting against its kind (see :data:`ATTACK_CONFIG_KEYS`); ``where``: its key."""
    if isinstance(kind, tuple):
        if value not in kind:
            raise ConfigError(owner, where, f"one of {list(kind)}", value)
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(owner, where, "true or false", value)
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(owner, where, "an integer >= 1", value)
        return value
    if kind in ("number", "fraction"):
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
            or (kind == "fraction" and value >= 1)
        ):
            raise ConfigError(owner, where, f"a number {'in (0, 1)' if kind == 'fraction' else '> 0'}", value)
        return float(value)
    return value


def load_attack_config(path: str | Path) -> dict[str, Any]:
    """Read an attack-config TOML file into :class:`RobustnessConfig` keyword arguments.

    Top-level keys: ``linf_eps`` / ``l2_eps`` (lists of budgets, numbers or fractions like ``"8/255"``),
    ``reference_linf_eps`` / ``reference_l2_eps``, ``attacks`` (list of preview attack names), ``headline``
    (``"autoattack"`` | ``"preview"``), ``autoattack_eps`` (``"reference"`` | ``"grid"``); tables
    ``[attacks.NAME]`` (settings of one attack, keys in :data:`ATTACK_CONFIG_KEYS`, e.g. ``steps``,
    ``restarts``, ``queries``, ``loss``), ``[validity]`` (``enabled``, ``budget``) and ``[verification]``
    (``methods``, ``samples``, ``norms``). Example::

        linf_eps = [0.00784, 0.0157, 0.0314]
        [attacks.pgd_linf]
        steps = 50
        restarts = 5
        loss = "dlr"
        [attacks.square_linf]
        queries = 5000

    Raises
    ------
    ValidationError
        The file is missing, unreadable or not TOML (the message names the file).
    ConfigError
        A key, attack name or value is not allowed: owner the file, field the key (``[attacks.NAME] KEY``),
        what was expected and what came.
    """
    import tomllib

    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValidationError(f"--attack-config {path}: no such file") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError(f"--attack-config {path}: cannot read it ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(f"{path}: not valid TOML: {exc}") from exc
    owner = str(path)
    out: dict[str, Any] = {}
    unknown = [k for k in document if k not in _TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(owner, "top-level keys", f"among {list(_TOP_LEVEL_KEYS)}", unknown)
    for norm in ("linf", "l2"):
        key = f"{norm}_eps"
        if key in document:
            grid = document[key]
            if not isinstance(grid, list) or not grid:
                raise ConfigError(owner, key, "a non-empty list of budgets", grid)
            out[key] = tuple(sorted({_toml_budget(v, owner, key) for v in grid}))
        key = f"reference_{norm}_eps"
        if key in document:
            out[key] = _toml_budget(document[key], owner, key)
    for key, choices in (("headline", ("autoattack", "preview")), ("autoattack_eps", ("reference", "grid"))):
        if key in document:
            out[key] = _toml_value(document[key], choices, owner, key)
    attacks = document.get("attacks", {})
    if isinstance(attacks, list):  # a list of preview attack names
        bad = [a for a in attacks if a not in ATTACKS]
        if bad or not all(isinstance(a, str) for a in attacks):
            raise ConfigError(owner, "attacks", f"names from {list(ATTACKS)} (unknown attack(s) {bad})", attacks)
        out["attacks"] = tuple(attacks)
        attacks = {}
    if not isinstance(attacks, dict):
        raise ConfigError(owner, "attacks", "a list of names or [attacks.NAME] tables", attacks)
    params: dict[str, dict[str, Any]] = {}
    known = [*ATTACKS, *(a for a in HEADLINE_ATTACKS.values() if a not in ATTACKS)]
    for name, table in attacks.items():
        if name not in known:
            raise ConfigError(owner, f"[attacks.{name}]", f"a table of a known attack, one of {known}", name)
        if not isinstance(table, dict):
            raise ConfigError(owner, f"attacks.{name}", "a table of settings", table)
        keys = _config_keys(name) if name in ATTACKS or name in ATTACK_CONFIG_KEYS else {}
        chosen: dict[str, Any] = {}
        for key, value in table.items():
            if key not in keys:
                raise ConfigError(owner, f"[attacks.{name}] key", f"one of {sorted(keys)}", key)
            argument, kind = keys[key]
            chosen[argument] = _toml_value(value, kind, owner, f"[attacks.{name}] {key}")
        params[name] = chosen
    if params:
        out["attack_params"] = params
    for section, allowed in (("validity", ("enabled", "budget")), ("verification", ("methods", "samples", "norms"))):
        table = document.get(section)
        if table is None:
            continue
        if not isinstance(table, dict):
            raise ConfigError(owner, section, f"a [{section}] table", table)
        bad = [k for k in table if k not in allowed]
        if bad:
            raise ConfigError(owner, f"[{section}] keys", f"among {list(allowed)}", bad)
        if "enabled" in table:
            out["validity"] = _toml_value(table["enabled"], "bool", owner, "[validity] enabled")
        if "budget" in table:
            out["validity_budget"] = _toml_value(table["budget"], VALIDITY_BUDGETS, owner, "[validity] budget")
        if "methods" in table:
            methods = table["methods"]
            if not isinstance(methods, list) or any(m not in VERIFY_METHODS for m in methods):
                raise ConfigError(
                    owner, "[verification] methods", f"a list of {list(VERIFY_METHODS)} (empty to skip)", methods
                )
            out["verification"] = tuple(dict.fromkeys(methods))
        if "norms" in table:
            norms = table["norms"]
            if not isinstance(norms, list) or any(n not in ("linf", "l2") for n in norms):
                raise ConfigError(owner, "[verification] norms", "a list of 'linf' / 'l2'", norms)
            out["verify_norms"] = tuple(dict.fromkeys(norms))
        if "samples" in table:
            samples = table["samples"]
            if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
                raise ConfigError(owner, "[verification] samples", "an integer >= 0", samples)
            out["verify_samples"] = samples
    return out


# -- inputs --------------------------------------------------------------------------------------------------


def model_digest(workspace: Workspace) -> str:
    """Fingerprint of the workspace model: its config plus the model file's bytes (or the factory name)."""
    entry = workspace.manifest.get("model")
    if entry is None:
        raise ValidationError(
            f"{workspace.root} has no model; robustness analysis needs one: pass --model (and "
            "--model-config) to 'robustlens init'"
        )
    parts: list[Any] = [entry.get("kind"), entry.get("config")]
    if entry.get("kind") == "torchscript":
        digest = hashlib.sha256((workspace.root / entry["file"]).read_bytes()).hexdigest()
        parts.append(digest)
    else:
        parts.append(entry.get("factory") or entry.get("file"))
    return fingerprint(*parts)


def load_images(
    workspace: Workspace,
    positions: np.ndarray,
    model_config: Any,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Decode the samples at ``positions`` ``(M,)`` into the model's layout: ``(M, C, H, W)`` float32 in [0, 1]."""
    paths = workspace.samples["path"].tolist()
    pixels: list[np.ndarray] = []
    # Content hashes of init: a file changed since is refused (DatasetFileError naming it), never used.
    for _, batch in iter_decoded(
        workspace.dataset_root,
        paths,
        positions.tolist(),
        workers=workers,
        progress=progress,
        desc="Decoding",
        expected_hashes=workspace.samples["content_hash"].tolist(),
    ):
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
    specs = [
        {
            "slice_id": "all",
            "description": "all evaluated samples",
            "kind": "all",
            "members": np.ones(positions.shape[0], dtype=bool),
        }
    ]
    for _, row in table.iterrows():
        if row["kind"] == "all":
            continue
        specs.append(
            {
                "slice_id": row["slice_id"],
                "description": row["description"],
                "kind": row["kind"],
                "members": slice_mask(workspace, row)[positions],
            }
        )
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
        (monotone in ε, see the module docstring: an adversarial found at ε counts at every larger ε too).
    min_norm:
        ``(A,)`` smallest successful perturbation of the minimal-norm attacks (NaN: none).
    params:
        Attack name → the keyword arguments used (its settings).
    ran:
        Attack name → ``(E,)`` bool, the budgets it was run at (previews: all; AutoAttack: the reference ε or
        the grid; diagnostics: the reference ε). Its curve has points only there.
    kind:
        Attack name → ``"preview"`` (fast previews), ``"headline"`` (AutoAttack) or ``"diagnostic"``
        (the validity diagnostics' attacks).
    cost:
        Attack name → ``{"seconds", "forward_passes_per_sample", "backward_passes_per_sample"}`` (passes of the
        model, averaged over the ``A`` samples, all budgets together).
    adversarial:
        Attacks outside the registry (AutoAttack, diagnostics) → ``(A, C, H, W)`` adversarial images at the
        reference ε (the clean image where none was found), for the example viewer.
    """

    norm: str
    eps: np.ndarray
    broken: dict[str, np.ndarray]
    min_norm: np.ndarray
    params: dict[str, dict[str, Any]]
    ran: dict[str, np.ndarray] = field(default_factory=dict)
    kind: dict[str, str] = field(default_factory=dict)
    cost: dict[str, dict[str, float]] = field(default_factory=dict)
    adversarial: dict[str, torch.Tensor] = field(default_factory=dict)

    def worst(self, kinds: tuple[str, ...] | None = None) -> np.ndarray:
        """``(E, A)`` bool: broken by at least one attack (of the given ``kinds``; all by default)."""
        chosen = [hits for name, hits in self.broken.items() if kinds is None or self.kind.get(name) in kinds]
        if not chosen:
            return np.zeros((self.eps.size, self.min_norm.shape[0]), dtype=bool)
        return np.logical_or.reduce(chosen)

    def reference_index(self, eps: float) -> int:
        """Position of ``eps`` on the grid."""
        return int(np.argmin(np.abs(self.eps - eps)))

    def curve(self, clean_correct: np.ndarray) -> RobustAccuracyCurve:
        """The robust-accuracy curve of every attack run (:func:`~.attacks.curve_from_breaks`) over the ``(A,)``
        clean-correct mask: per attack and worst case, breaking budgets (NaN: never broken), Wilson intervals."""
        return curve_from_breaks(self.broken, self.eps, clean_correct, norm=self.norm, min_norm=self.min_norm)

    def add(
        self,
        name: str,
        broken_at: np.ndarray,
        ran: np.ndarray,
        *,
        kind: str,
        params: dict[str, Any],
        cost: dict[str, float],
        adversarial: torch.Tensor | None = None,
    ) -> None:
        """Record an attack run outside :func:`run_attack_family`: ``broken_at`` ``(E, A)`` bool where it ran
        (other rows ignored), closed upwards in ε (an adversarial within ε lies within every larger budget)."""
        hits = np.logical_or.accumulate(broken_at & ran[:, None], axis=0)
        self.broken[name] = hits
        self.ran[name] = ran.copy()
        self.kind[name] = kind
        self.params[name] = params
        self.cost[name] = cost
        if adversarial is not None:
            self.adversarial[name] = adversarial


class PassCounter(torch.nn.Module):
    """Wraps a model and counts its forward and backward passes per input row.

    ``forward_rows`` grows by the batch size of every forward; ``backward_rows`` by the batch size of every
    forward whose output a gradient later flows through (counted when it does). Eval/train mode, device and
    parameters are those of the wrapped model.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forward_rows = 0
        self.backward_rows = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        rows = int(images.shape[0])
        self.forward_rows += rows
        if isinstance(out, torch.Tensor) and out.requires_grad:

            def count(grad: torch.Tensor) -> torch.Tensor:
                self.backward_rows += rows
                return grad

            out.register_hook(count)
        return out

    def reset(self) -> None:
        self.forward_rows = self.backward_rows = 0


class LossObjective(torch.nn.Module):
    """Two "logits" ``[0, L(z, y) / (1 + |L|)]`` whose cross-entropy on class 0 is increasing in the loss ``L`` of
    ``model``'s logits ``z``, so that PGD on it (label 0) ascends ``L`` with the same step direction.

    ``L`` is the logit margin ``max_{j≠y} z_j − z_y`` or DLR
    ``−(z_y − max_{j≠y} z_j) / (z_π1 − z_π3 + 1e-12)``
    (Croce & Hein 2020); both are > 0 exactly when the sample is misclassified, so class 1 wins exactly then.
    The per-sample divisor ``1 + |L|`` is detached: it only rescales the gradient (PGD's L∞ step uses its sign,
    the L2 step its direction), and keeps the softmax from saturating on huge logits (a model whose logits are
    scaled ×1000 has a zero cross-entropy gradient, not a zero margin gradient).

    ``labels`` ``(B,)`` must be the true classes of the rows of every batch the model is called on (PGD calls
    it on the whole batch it attacks).
    """

    def __init__(self, model: torch.nn.Module, labels: torch.Tensor, loss: str) -> None:
        super().__init__()
        self.model = model
        self.labels = labels
        self.loss = loss

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.model(images)
        y = self.labels
        value = -logit_margin(z, y)
        if self.loss == "dlr":
            top = z.sort(dim=1, descending=True).values
            value = value / (top[:, 0] - top[:, 2] + 1e-12)
        value = value / (1 + value.detach().abs())
        return torch.stack([torch.zeros_like(value), value], dim=1)


def run_preview_attack(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    name: str,
    eps: float | None,
    params: dict[str, Any],
    *,
    random_state: int,
    batch_size: int | None,
) -> AttackResult:
    """:func:`~.attacks.run_attack`, plus the ``loss`` setting of the PGD attacks (``"ce"``, ``"margin"``, ``"dlr"``).

    With a loss other than cross-entropy, PGD runs on :class:`LossObjective` of ``model`` (chunk by chunk, seeds as
    ``run_attack`` derives them) and the adversarials are scored on ``model`` itself.
    """
    params = dict(params)
    loss = params.pop("loss", "ce")
    if loss == "ce":
        return run_attack(model, images, labels, name, eps, random_state=random_state, batch_size=batch_size, **params)
    if eps is None:
        raise ConfigError(OWNER, f"attack_params[{name!r}]['loss']", "used with a budget (PGD needs eps)", loss)
    norm = ATTACKS[name].norm

    def attack_chunk(xb: torch.Tensor, yb: torch.Tensor, ci: int) -> torch.Tensor:
        objective = LossObjective(model, yb, loss)
        generator = make_generator(int(random_state), name, ci)
        return pgd(objective, xb, torch.zeros_like(yb), eps, norm=norm, random_state=generator, **params)

    y = torch.as_tensor(labels, dtype=torch.long, device=model_device(model, images.device))
    return attack_in_chunks(
        model, images, y, attack_chunk, norm, eps, name=name, batch_size=batch_size, params={**params, "loss": loss}
    )


def run_attack_family(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    clean_correct: np.ndarray,
    norm: str,
    config: RobustnessConfig,
    bar: tqdm,
) -> AttackFamily:
    """Run the configured preview attacks of ``norm`` on ``images`` ``(A, C, H, W)`` with true ``labels`` ``(A,)``."""
    grid = np.array(sorted(config.linf_eps if norm == "linf" else config.l2_eps), dtype=float)
    family = AttackFamily(norm=norm, eps=grid, broken={}, min_norm=np.full(images.shape[0], np.nan), params={})
    counter = PassCounter(model)
    for name in config.attacks_of(norm):
        params = config.params_for(name)
        spec = ATTACKS[name]
        hits = np.zeros((grid.size, images.shape[0]), dtype=bool)
        counter.reset()
        clock = time.perf_counter()
        if spec.minimal:
            todo = np.flatnonzero(clean_correct)
            if todo.size:
                result = run_preview_attack(
                    counter,
                    images[todo],
                    labels[todo],
                    name,
                    None,
                    params,
                    random_state=config.random_state,
                    batch_size=config.attack_batch_size,
                )
                size = result.l2 if norm == "l2" else result.linf
                for e, eps in enumerate(grid):
                    hits[e, todo] = result.success & within_budget(size, eps)
                family.min_norm[todo] = np.fmin(family.min_norm[todo], np.where(result.success, size, np.nan))
            bar.update(grid.size)
        else:
            already = np.zeros(images.shape[0], dtype=bool)
            for e, eps in enumerate(grid):
                todo = np.flatnonzero(clean_correct & ~already)
                if todo.size:
                    result = run_preview_attack(
                        counter,
                        images[todo],
                        labels[todo],
                        name,
                        float(eps),
                        params,
                        random_state=derive_seed(config.random_state, name, e) & 0x7FFFFFFF,
                        batch_size=config.attack_batch_size,
                    )
                    already[todo[result.success]] = True
                hits[e] = already
                bar.update(1)
        family.broken[name] = hits
        family.params[name] = params
        family.ran[name] = np.ones(grid.size, dtype=bool)
        family.kind[name] = "preview"
        family.cost[name] = _cost(
            time.perf_counter() - clock, counter.forward_rows, counter.backward_rows, images.shape[0]
        )
    return family


def _cost(seconds: float, forward_rows: float, backward_rows: float, samples: int) -> dict[str, float]:
    per = max(samples, 1)
    return {
        "seconds": round(float(seconds), 3),
        "forward_passes_per_sample": round(float(forward_rows) / per, 2),
        "backward_passes_per_sample": round(float(backward_rows) / per, 2),
    }


def robust_rate(robust: np.ndarray) -> dict[str, float | int | None]:
    """``{"robust_accuracy", "ci_low", "ci_high", "n"}`` of a ``(A,)`` bool robust mask, Wilson 95 % interval
    (:func:`~.tables.rate_with_interval`; ``None`` for ``n = 0``)."""
    n, rate, low, high = rate_with_interval(np.asarray(robust, dtype=bool))
    if n == 0:
        return {"robust_accuracy": None, "ci_low": None, "ci_high": None, "n": 0}
    return {"robust_accuracy": rate, "ci_low": low, "ci_high": high, "n": n}


def curve_rows(family: AttackFamily, clean_correct: np.ndarray) -> list[dict]:
    """Rows of ``robustness_curves.parquet`` for one norm (:meth:`~.attacks.RobustAccuracyCurve.records` of
    :meth:`AttackFamily.curve`, with each attack's ``kind``): every attack at the budgets it ran at, and the worst
    case (over every attack, closed upwards in ε) at every ε; robust accuracy with its Wilson 95 % interval."""
    kinds = {**family.kind, "worst_case": "worst_case"}
    return [
        {**row, "kind": kinds.get(row["attack"], "preview")}
        for row in family.curve(clean_correct).records(ran=family.ran)
    ]


CURVE_COLUMNS = [*CURVE_RECORD_COLUMNS, "kind"]


def run_self_checks(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    config: RobustnessConfig,
    norms: list[str],
    bar: tqdm,
) -> dict[str, Any]:
    """:func:`~.selfcheck.robustness_self_check` of every norm at its reference ε: the active test of every
    preview attack (on the first ``selfcheck_samples``) and the gradient-masking checks (first ``masking_samples``).

    Returns ``{"attacks": {name: result dict}, "masking": {norm: report dict}, "passed": bool,
    "warnings": [...]}``; a failed active test or a suspicious masking report adds a warning.
    """
    checks: dict[str, Any] = {}
    masking: dict[str, Any] = {}
    warnings: list[str] = []
    for norm in norms:
        eps = config.reference_eps(norm)
        attacks: dict[str, Any] = {}
        attack_params: dict[str, dict[str, Any]] = {}
        for name in config.attacks_of(norm):
            params = config.params_for(name)
            if params.get("loss", "ce") == "ce":
                attacks[name], attack_params[name] = name, {k: v for k, v in params.items() if k != "loss"}
            else:
                attacks[name] = _loss_attack(name, params, config)
        report = robustness_self_check(
            model,
            images,
            labels,
            eps,
            norm=norm,
            attacks=attacks,
            attack_params=attack_params,
            threshold=config.selfcheck_threshold,
            random_state=config.random_state,
            batch_size=config.attack_batch_size,
            attack_samples=config.selfcheck_samples,
            masking_samples=config.masking_samples,
            masking_params={
                "pgd_steps": 2 * config.params_for(f"pgd_{norm}").get("steps", 10),
                "square_iters": config.params_for("square_linf").get("max_iter", 100),
            },
            on_check=lambda: bar.update(1),
        )
        for name, result in report.attack_checks.items():
            entry = result.to_dict()
            entry.pop("success")
            checks[name] = entry
            if not result.passed:
                warnings.append(
                    f"attack self-check FAILED for {name} at {norm} eps={eps:.4g}: it found only "
                    f"{result.success_rate:.0%} of the adversarial examples known to exist (needs "
                    f"{result.threshold:.0%}); its robust accuracy overestimates robustness — "
                    "strengthen its parameters"
                )
        masking[norm] = report.masking.to_dict()
        warnings += [f"gradient masking suspected ({norm}): {message}" for message in report.masking.messages]
    passed = all(c["passed"] for c in checks.values()) and not any(m["suspicious"] for m in masking.values())
    return {"attacks": checks, "masking": masking, "passed": passed, "warnings": warnings}


def _loss_attack(name: str, params: dict[str, Any], config: RobustnessConfig) -> Callable[..., torch.Tensor]:
    """``attack(model, images, labels, eps) -> adv`` running :func:`run_preview_attack` (PGD with a non-CE loss)."""

    def attack(
        model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | np.ndarray, eps: float
    ) -> torch.Tensor:
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        return run_preview_attack(
            model,
            images,
            labels,
            name,
            eps,
            params,
            random_state=config.random_state,
            batch_size=config.attack_batch_size,
        ).adv_images

    attack.__name__ = name
    return attack


def run_smoothing(
    model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray, config: RobustnessConfig, bar: tqdm
) -> dict[str, np.ndarray]:
    """CERTIFY on ``images`` ``(S, C, H, W)`` one by one (seed per position), returning ``(S,)`` arrays:
    ``prediction`` (-1 = abstain), ``radius`` (0 when abstained), ``abstain``, ``correct`` (certified true class)."""
    predictions, radii = [], []
    for i in range(images.shape[0]):
        result = certify(
            model,
            images[i : i + 1],
            config.smoothing_sigma,
            n0=config.smoothing_n0,
            n=config.smoothing_n,
            alpha=config.smoothing_alpha,
            batch_size=config.smoothing_batch_size,
            random_state=derive_seed(config.random_state, "certify", i) & 0x7FFFFFFF,
        )
        predictions.append(int(result.prediction[0]))
        radii.append(float(result.radius[0]))
        bar.update(1)
    prediction = np.array(predictions, dtype=np.int64)
    abstain = prediction < 0
    return {
        "prediction": prediction,
        "radius": np.array(radii),
        "abstain": abstain,
        "correct": ~abstain & (prediction == labels),
    }


def certified_curve(radius: np.ndarray, correct: np.ndarray, config: RobustnessConfig) -> pd.DataFrame:
    """``robustness_certified.parquet``: :func:`~.smoothing.certified_accuracy_curve` of the ``(S,)`` radii and
    certified-correct flags on :func:`~.smoothing.radius_grid` (step σ/10 up to the largest radius CERTIFY can give
    with ``n`` samples)."""
    grid = radius_grid(config.smoothing_sigma, config.smoothing_n, config.smoothing_alpha)
    return pd.DataFrame(
        {
            "radius": grid,
            "certified_accuracy": certified_accuracy_curve(radius, correct, grid),
            "n_samples": radius.size,
            "sigma": config.smoothing_sigma,
        }
    )


# -- per-sample table and examples --------------------------------------------------------------------------


def verified_table(verification: dict[str, dict]) -> pd.DataFrame:
    """``robustness_verified.parquet``: per norm, method and ε the verified accuracy (Wilson 95 % interval) beside
    the empirical robust accuracy (worst case over every attack) of the same samples."""
    rows = []
    for norm, entry in verification.items():
        if not entry.get("supported"):
            continue
        for method, values in entry["methods"].items():
            for e, eps in enumerate(entry["eps"]):
                rows.append(
                    {
                        "norm": norm,
                        "method": method,
                        "eps": float(eps),
                        "verified_accuracy": values["verified_accuracy"][e],
                        "ci_low": values["ci_low"][e],
                        "ci_high": values["ci_high"][e],
                        "empirical_robust_accuracy": entry["empirical_robust_accuracy"][e],
                        "n_samples": entry["n_samples"],
                    }
                )
    return pd.DataFrame(rows, columns=VERIFIED_COLUMNS)


VERIFIED_COLUMNS = [
    "norm",
    "method",
    "eps",
    "verified_accuracy",
    "ci_low",
    "ci_high",
    "empirical_robust_accuracy",
    "n_samples",
]


def samples_frame(
    ids: np.ndarray,
    clean_correct: np.ndarray,
    corruption: dict | None,
    attacked: int,
    families: dict[str, AttackFamily],
    attack_correct: np.ndarray,
    smoothing: dict | None,
    config: RobustnessConfig,
    outcome: dict | None = None,
) -> pd.DataFrame:
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
            values[:attacked] = families[norm].curve(attack_correct).breaking_eps
            frame[column] = values
    for norm, family in families.items():
        e = family.reference_index(config.reference_eps(norm))
        by = pd.array([pd.NA] * m, dtype="string")
        names = np.full(attacked, "", dtype=object)
        for name in reversed(list(family.broken)):  # the first attack (run order) that broke it wins
            names[family.broken[name][e]] = name
        names[~attack_correct] = "clean error"
        by[:attacked] = names.astype(str)
        frame[f"rob_broken_by_{norm}"] = by
    stability = (outcome or {}).get("stability")
    if stability is not None:
        per_sample = stability["result"].per_sample
        for source, column in (("fp_mean", "rob_flip_probability"), ("t5d_mean", "rob_top5_distance")):
            values = np.full(m, np.nan)
            values[: len(per_sample)] = per_sample[source].to_numpy(dtype=float)
            frame[column] = values
    for norm, entry in ((outcome or {}).get("verification") or {}).items():
        if not entry.get("supported"):
            continue
        verified = entry["verified"]  # (E, V) any method
        grid = np.asarray(entry["eps"], dtype=float)
        largest = np.where(verified.any(axis=0), grid[::-1][np.argmax(verified[::-1], axis=0)], 0.0)
        values = np.full(m, np.nan)
        values[: verified.shape[1]] = largest
        frame[f"rob_verified_{norm}_eps"] = values
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
    chosen = list(fragile.index[: count // 2])
    chosen += [i for i in eligible if i not in set(chosen)][: count - len(chosen)]
    return np.array(sorted(chosen), dtype=np.int64)


def example_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    rows: np.ndarray,
    frame: pd.DataFrame,
    corruption: dict | None,
    families: dict[str, AttackFamily],
    config: RobustnessConfig,
) -> dict[str, np.ndarray]:
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
            batch = images[start : start + config.corruption_batch_size].to(device)
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
            if attack in family.adversarial:  # AutoAttack / diagnostics: their own adversarials
                adversarial[chosen] = family.adversarial[attack][torch.as_tensor(rows[members])].to(adversarial)
                continue
            result = run_preview_attack(
                model,
                x[chosen],
                labels[rows[members]],
                attack,
                None if ATTACKS[attack].minimal else eps,
                family.params[attack],
                random_state=config.random_state,
                batch_size=config.attack_batch_size,
            )
            adversarial[chosen] = result.adv_images.cpu()
    with eval_mode(model):
        preds = [predict_labels(model, t.to(device), 256).cpu().numpy() for t in (x, corrupted, adversarial)]
    return {
        "ids": frame["id"].to_numpy()[rows].astype(str),
        "labels": labels[rows].astype(np.int64),
        "clean": x.numpy().astype(np.float16),
        "corrupted": corrupted.numpy().astype(np.float16),
        "adversarial": adversarial.numpy().astype(np.float16),
        "perturbation": (adversarial - x).numpy().astype(np.float16),
        "clean_pred": preds[0],
        "corrupted_pred": preds[1],
        "adversarial_pred": preds[2],
        "corruption": names.astype(str),
        "severity": severities,
        "attack": attacks.astype(str),
        "eps": budgets,
    }


def _example_corruption(corruption: dict, row: int) -> tuple[str, int]:
    """(corruption, severity) shown for evaluated row ``row``: first flip, else the harshest cell."""
    first = corruption["first_flip"].iloc[row]
    if first.notna().any():
        severity = float(first.min())
        candidates = [c for c in first.index if first[c] == severity]
        table = corruption["table"]
        accuracy = {
            c: float(table[(table["corruption"] == c) & (table["severity"] == severity)]["accuracy"].iloc[0])
            for c in candidates
        }
        return min(candidates, key=lambda c: accuracy[c]), int(severity)
    worst = corruption["table"].sort_values(["severity", "accuracy"], ascending=[False, True]).iloc[0]
    return str(worst["corruption"]), int(worst["severity"])


def _example_attack(family: AttackFamily, row: int) -> tuple[str, float]:
    """(attack, budget) shown for attacked row ``row``: the first attack that broke it at its breaking budget."""
    worst = family.worst()[:, row]
    if worst.any():
        e = int(worst.argmax())
        attack = next(
            (a for a, hits in family.broken.items() if hits[e, row] and (a in ATTACKS or a in family.adversarial)), None
        )
        if attack is not None:
            return attack, float(family.eps[e])
    bounded = [a for a in family.broken if a in ATTACKS and not ATTACKS[a].minimal]
    previews = [a for a in family.broken if a in ATTACKS]
    return (bounded[0] if bounded else previews[0]), float(family.eps[-1])


# -- the run ------------------------------------------------------------------------------------------------------


def run_robustness(
    workspace: Workspace,
    config: RobustnessConfig | None = None,
    *,
    progress: bool = True,
    device: str = "cpu",
    workers: int | None = None,
    threads: int | None = None,
) -> dict:
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
    context = StageContext(
        workspace=workspace, progress=progress, device=device, random_state=config.random_state, workers=workers
    )
    samples = workspace.samples
    labels_all = samples["label_index"].to_numpy().astype(np.int64)
    positions = select_samples(labels_all, config.max_samples, config.random_state)
    inputs = fingerprint(
        samples.iloc[positions][["id", "content_hash", "label_index"]].astype(str), digest, workspace.classes
    )
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
    train = (images[attacked:], labels[attacked:]) if positions.shape[0] - attacked >= 10 else None
    families, curves, self_check, outcome = _attacks(
        model, images[:attacked], labels[:attacked], clean_correct[:attacked], config, progress, timings, train
    )
    smoothing = _smoothing(model, images, labels, config, progress, timings)
    stability = _stability(model, images, labels, config, timings, outcome["warnings"])

    clock = time.perf_counter()
    ids = samples["id"].to_numpy()[positions]
    outcome["stability"] = stability
    frame = samples_frame(
        ids, clean_correct, corruption, attacked, families, clean_correct[:attacked], smoothing, config, outcome
    )
    flags = fragile_flags(frame)
    slice_table = _slice_table(frame, slices, config)
    timings["tables"] = time.perf_counter() - clock

    clock = time.perf_counter()
    rows = choose_examples(frame, config.num_examples)
    examples = example_images(model, images, labels, rows, frame, corruption, families, config) if rows.size else None
    timings["examples"] = time.perf_counter() - clock

    summary.update(
        _summary_body(
            workspace,
            config,
            ids,
            clean_correct,
            attacked,
            corruption,
            families,
            clean_correct[:attacked],
            smoothing,
            self_check,
            frame,
            slice_table,
            outcome,
        )
    )
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    summary["timings"]["total"] = round(sum(timings.values()), 2)
    summary["slice_inputs"] = slice_inputs
    artifacts = {
        "robustness_corruptions": corruption_rows,
        "robustness_curves": pd.DataFrame(curves, columns=CURVE_COLUMNS),
        "robustness_certified": (
            certified_curve(smoothing["radius"], smoothing["correct"], config)
            if smoothing is not None
            else pd.DataFrame(columns=["radius", "certified_accuracy", "n_samples", "sigma"])
        ),
        "robustness_verified": verified_table(outcome.get("verification", {})),
        "robustness_slices": slice_table,
        "robustness_samples": frame,
        "flags_robustness": flags,
    }
    _write(context, config, inputs, artifacts, examples, workspace.classes, summary)
    return {**summary, "skipped": False}


def _corruptions(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    config: RobustnessConfig,
    progress: bool,
    timings: dict[str, float],
) -> tuple[dict | None, pd.DataFrame]:
    """Corruption benchmark, one corruption at a time (for progress); ``None`` and an empty table when none."""
    columns = ["corruption", "family", "severity", "accuracy", "error", "relative_error", "flip_rate", "n_samples"]
    if not config.corruptions:
        return None, pd.DataFrame(columns=columns)
    clock = time.perf_counter()
    tables, first_flip, correct_cells = [], [], np.zeros(images.shape[0])
    with tqdm(
        total=len(config.corruptions) * len(config.severities), desc="Corruptions", unit="cell", disable=not progress
    ) as bar:
        for name in config.corruptions:
            bench = corruption_benchmark(
                model,
                images,
                labels,
                names=[name],
                severities=config.severities,
                batch_size=config.corruption_batch_size,
                random_state=config.random_state,
            )
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
    result = {
        "table": table,
        "first_flip": first,
        "flip": {f: flips[f].to_numpy() for f in flips.columns},
        "accuracy": correct_cells / (len(config.corruptions) * len(config.severities)),
    }
    return result, table[columns]


def _attacks(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    clean_correct: np.ndarray,
    config: RobustnessConfig,
    progress: bool,
    timings: dict[str, float],
    train: tuple[torch.Tensor, np.ndarray] | None = None,
) -> tuple[dict[str, AttackFamily], list[dict], dict[str, Any], dict[str, Any]]:
    """Everything run on the attack subset ``(A, C, H, W)``: preview attacks, the AutoAttack headline, the previews'
    self-checks, the validity diagnostics and formal verification.

    ``train``: ``(images, labels)`` of evaluated samples outside the attack subset (the transfer diagnostic's
    surrogate may be trained on them) or ``None``. Returns ``(families, curves, self_check, outcome)`` where
    ``outcome`` holds ``headline``, ``validity`` and ``verification`` (see :func:`_summary_body`) and ``warnings``.
    """
    norms = [n for n in ("linf", "l2") if config.attacks_of(n)] if images.shape[0] else []
    families: dict[str, AttackFamily] = {}
    curves: list[dict] = []
    self_check = {"attacks": {}, "masking": {}, "passed": True, "warnings": []}
    outcome: dict[str, Any] = {"headline": {}, "validity": None, "verification": {}, "warnings": []}
    if not norms:
        return families, curves, self_check, outcome
    clock = time.perf_counter()
    units = sum(len(config.linf_eps if ATTACKS[a].norm == "linf" else config.l2_eps) for a in config.attacks)
    with tqdm(total=units, desc="Attacks (preview)", unit="run", disable=not progress) as bar:
        for norm in norms:
            families[norm] = run_attack_family(model, images, labels, clean_correct, norm, config, bar)
    timings["attacks"] = time.perf_counter() - clock
    clock = time.perf_counter()
    aa_runs: dict[str, dict | None] = {}
    if config.headline == "autoattack":
        for norm in tqdm(norms, desc="AutoAttack", unit="norm", disable=not progress):
            aa_runs[norm] = run_headline_attack(
                model, images, labels, clean_correct, families[norm], config, outcome["warnings"]
            )
        timings["autoattack"] = time.perf_counter() - clock
    clock = time.perf_counter()
    with tqdm(total=len(config.attacks) + len(norms), desc="Self-checks", unit="check", disable=not progress) as bar:
        self_check = run_self_checks(model, images, labels, config, norms, bar)
    timings["self_checks"] = time.perf_counter() - clock
    validity_reports: dict[str, dict] = {}
    if config.validity:
        clock = time.perf_counter()
        for norm in tqdm(norms, desc="Validity diagnostics", unit="norm", disable=not progress):
            validity_reports[norm] = run_validity(model, images, labels, clean_correct, families[norm], config, train)
        timings["validity"] = time.perf_counter() - clock
    if config.verification:
        clock = time.perf_counter()
        outcome["verification"] = run_verification(model, images, labels, clean_correct, families, config)
        timings["verification"] = time.perf_counter() - clock
    for norm in norms:
        curves += curve_rows(families[norm], clean_correct)
        outcome["headline"][norm] = headline_entry(
            families[norm], clean_correct, config, aa_runs.get(norm), validity_reports.get(norm)
        )
    outcome["validity"] = validity_section(config, validity_reports, self_check, outcome)
    for entry in outcome["headline"].values():
        entry["upper_bound"] = outcome["validity"]["status"] != "pass"
    return families, curves, self_check, outcome


def _optional_module(name: str) -> tuple[Any, str | None]:
    """The robustness submodule ``name``, or ``(None, why)`` when it cannot be imported (not installed yet)."""
    import importlib

    try:
        return importlib.import_module(f"{__package__}.{name}"), None
    except ImportError as exc:
        return None, f"robustlens.analysis.robustness.{name} is not available ({exc})"


def run_headline_attack(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    clean_correct: np.ndarray,
    family: AttackFamily,
    config: RobustnessConfig,
    warnings: list[str],
) -> dict | None:
    """AutoAttack (standard) of ``family.norm`` at the reference ε (or on the grid), added to ``family``.

    Runs on the clean-correct samples (on the grid: those it has not broken at a smaller ε). Returns
    ``{"name", "robust" (A,) bool at the reference ε, "broken_by" (A,) str, "settings", "seconds"}`` or ``None``
    when the AutoAttack module is unavailable (a warning says the headline is then the previews').
    """
    module, why = _optional_module("autoattack")
    if module is None:
        warnings.append(
            f"AutoAttack is not available, so the headline is the preview attacks' worst case and is "
            f"not AutoAttack-grade: {why}"
        )
        return None
    norm = family.norm
    name = HEADLINE_ATTACKS[norm]
    params = config.params_for(name)
    reference = family.reference_index(config.reference_eps(norm))
    indices = range(family.eps.size) if config.autoattack_eps == "grid" else [reference]
    n = images.shape[0]
    broken_at = np.zeros((family.eps.size, n), dtype=bool)
    ran = np.zeros(family.eps.size, dtype=bool)
    already = np.zeros(n, dtype=bool)
    broken_by = np.full(n, "", dtype=object)
    adversarial = images.clone()
    forward = backward = 0.0
    seconds: dict[str, float] = {}
    settings: dict[str, Any] = dict(params)
    clock = time.perf_counter()
    for e in indices:
        ran[e] = True
        todo = np.flatnonzero(clean_correct & ~already)
        if todo.size:
            try:
                result = module.auto_attack(
                    model,
                    images[todo],
                    labels[todo],
                    float(family.eps[e]),
                    norm=norm,
                    seed=derive_seed(config.random_state, name, e) & 0x7FFFFFFF,
                    batch_size=config.attack_batch_size,
                    **params,
                )
            except ValidationError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported: the headline falls back to the previews
                warnings.append(
                    f"AutoAttack is not available, so the headline is the preview attacks' worst case "
                    f"and is not AutoAttack-grade: it failed ({type(exc).__name__}: {exc})"
                )
                return None
            robust = np.asarray(result.robust, dtype=bool)
            broken = ~robust
            already[todo[broken]] = True
            adversarial[todo[broken]] = result.adv.detach().cpu()[torch.as_tensor(broken)].to(adversarial)
            broken_by[todo[broken]] = np.asarray(result.broken_by, dtype=object)[broken]
            forward += float(np.sum(result.forward_passes))
            backward += float(np.sum(result.backward_passes))
            for stage, value in dict(result.seconds).items():
                seconds[stage] = seconds.get(stage, 0.0) + float(value)
            settings = {**dict(result.settings), **params}
        broken_at[e] = already
    cost: dict[str, Any] = {
        **_cost(time.perf_counter() - clock, forward, backward, n),
        "seconds_by_attack": {k: round(v, 3) for k, v in seconds.items()},
    }
    family.add(name, broken_at, ran, kind="headline", params=settings, cost=cost, adversarial=adversarial)
    return {
        "name": name,
        "robust": clean_correct & ~family.broken[name][reference],
        "broken_by": broken_by,
        "settings": settings,
    }


def run_validity(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    clean_correct: np.ndarray,
    family: AttackFamily,
    config: RobustnessConfig,
    train: tuple | None,
) -> dict:
    """Validity diagnostics of ``family.norm`` at the reference ε; their breaks are added to ``family``.

    Returns ``{"status", "checks", "report" (the module's dict), "before", "after"}``: robust accuracy at the
    reference ε over every other attack (``before``) and once the diagnostics' attacks count too (``after``).
    Without the module: status ``"warn"`` and one check saying the diagnostics did not run.
    """
    norm = family.norm
    eps = config.reference_eps(norm)
    reference = family.reference_index(eps)
    robust_before = clean_correct & ~family.worst()[reference]
    module, why = _optional_module("validity")
    if module is None:
        check = {
            "name": "validity_diagnostics",
            "norm": norm,
            "status": "warn",
            "message": f"the validity diagnostics did not run: {why}; the robust accuracy is an unchecked upper bound",
        }
        return {"status": "warn", "checks": [check], "report": None, "before": robust_before, "after": robust_before}
    counter = PassCounter(model)
    clock = time.perf_counter()
    train_images, train_labels = train if train is not None else (None, None)
    try:
        report = module.validity_diagnostics(
            counter,
            images,
            labels,
            eps,
            norm=norm,
            robust_mask=robust_before,
            surrogate=None,
            train_images=train_images,
            train_labels=train_labels,
            budget=config.validity_budget,
            seed=config.random_state,
        )
    except ValidationError:
        raise
    except Exception as exc:  # noqa: BLE001 - a crashing diagnostic is a failed check, not a lost run
        check = {
            "name": "validity_diagnostics",
            "norm": norm,
            "status": "fail",
            "message": f"the validity diagnostics crashed ({type(exc).__name__}: {exc}); the robust accuracy "
            "is unchecked",
        }
        return {"status": "fail", "checks": [check], "report": None, "before": robust_before, "after": robust_before}
    after = robust_before & np.asarray(report.worst_case_robust, dtype=bool)
    broken_at = np.zeros((family.eps.size, images.shape[0]), dtype=bool)
    broken_at[reference] = robust_before & ~after
    ran = np.zeros(family.eps.size, dtype=bool)
    ran[reference] = True
    adversarial = getattr(report, "diagnostic_adv", None)
    if not (isinstance(adversarial, torch.Tensor) and adversarial.shape == images.shape):
        adversarial = None
    family.add(
        "validity_diagnostics",
        broken_at,
        ran,
        kind="diagnostic",
        params={"budget": config.validity_budget},
        cost=_cost(time.perf_counter() - clock, counter.forward_rows, counter.backward_rows, images.shape[0]),
        adversarial=None if adversarial is None else adversarial.detach().cpu(),
    )
    checks = [{"norm": norm, **dict(c)} for c in report.checks]
    return {
        "status": str(report.status),
        "checks": checks,
        "report": json_safe(_report_dict(report)),
        "before": robust_before,
        "after": after,
    }


def _report_dict(report: Any) -> dict:
    """``report.to_dict()`` without per-sample arrays or tensors (they are in the per-sample table)."""
    out = report.to_dict() if hasattr(report, "to_dict") else {}
    return {
        k: v
        for k, v in out.items()
        if k not in ("checks", "diagnostic_adv", "worst_case_robust")
        and not isinstance(v, torch.Tensor | np.ndarray)
        and not (isinstance(v, list) and len(v) > 64)
    }


def run_verification(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    clean_correct: np.ndarray,
    families: dict[str, AttackFamily],
    config: RobustnessConfig,
) -> dict[str, dict]:
    """Formal verification (IBP / CROWN) of the first ``verify_samples`` attacked samples on each norm's ε grid.

    Returns per norm either ``{"supported": False, "message"}`` or ``{"supported": True, "eps", "n_samples",
    "methods": {method: {"verified_accuracy": [E], "ci_low", "ci_high"}}, "empirical_robust_accuracy": [E],
    "violations": int, "seconds", "verified": (E, V) bool (any method)}``; ``violations`` counts samples verified at
    an ε where some attack broke them (or that are misclassified) — a bug if ever > 0.
    """
    module, why = _optional_module("verify")
    count = min(config.verify_samples, images.shape[0])
    out: dict[str, dict] = {}
    for norm, family in families.items():
        if norm not in config.verify_norms:
            continue
        if module is None:
            out[norm] = {"supported": False, "message": f"not available: {why}"}
            continue
        if count == 0:
            continue
        method = "both" if set(config.verification) == {"ibp", "crown"} else config.verification[0]
        clock = time.perf_counter()
        try:
            result = module.verify(
                model, images[:count], labels[:count], family.eps.tolist(), method=method, norm=norm, batch_size=64
            )
        except ValidationError as exc:
            out[norm] = {"supported": False, "message": f"not supported: {exc}"}
            continue
        except Exception as exc:  # noqa: BLE001 - a crashing verifier is reported (validity warns), the run goes on
            out[norm] = {
                "supported": False,
                "error": True,
                "message": f"verification failed ({type(exc).__name__}: {exc})",
            }
            continue
        seconds = time.perf_counter() - clock
        empirical = clean_correct[:count][None, :] & ~family.worst()[:, :count]
        methods, any_verified = {}, np.zeros_like(empirical)
        for name, verified in result.verified.items():
            verified = np.asarray(verified, dtype=bool)
            any_verified |= verified
            accuracy, low, high = _accuracy_per_budget(verified)
            methods[name] = {"verified_accuracy": accuracy, "ci_low": low, "ci_high": high}
        accuracy, low, high = _accuracy_per_budget(empirical)
        out[norm] = {
            "supported": True,
            "eps": family.eps.tolist(),
            "n_samples": count,
            "methods": methods,
            "empirical_robust_accuracy": accuracy,
            "empirical_ci_low": low,
            "empirical_ci_high": high,
            "violations": int((any_verified & ~empirical).any(0).sum()),
            "seconds": round(seconds, 3),
            "verified": any_verified,
        }
    return out


def _accuracy_per_budget(hits: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """Fraction of the ``V`` samples with ``hits`` ``(E, V)`` per budget, and its Wilson 95 % interval (lists)."""
    k = hits.sum(axis=1)
    count = hits.shape[1]
    low, high = wilson_interval(k, np.full(k.shape, count))
    return (k / count).tolist(), low.tolist(), high.tolist()


def headline_entry(
    family: AttackFamily,
    clean_correct: np.ndarray,
    config: RobustnessConfig,
    aa_run: dict | None,
    validity: dict | None,
) -> dict[str, Any]:
    """The headline of one norm at its reference ε (``summary["headline"][norm]``).

    ``robust_accuracy`` (with ``ci_low`` / ``ci_high``, Wilson 95 %, over ``n`` attacked samples) is the per-sample
    worst case over every attack run — AutoAttack, the previews and the validity diagnostics; ``autoattack`` is
    AutoAttack's own figure, ``before_diagnostics`` the worst case without the diagnostics, ``lowered_by`` how much
    the diagnostics lowered it. ``preview`` is true when AutoAttack did not run (the figure is then the previews').
    """
    eps = config.reference_eps(family.norm)
    e = family.reference_index(eps)
    worst = clean_correct & ~family.worst()[e]
    before = clean_correct & ~family.worst(("preview", "headline"))[e]
    entry: dict[str, Any] = {
        "norm": family.norm,
        "eps": eps,
        **robust_rate(worst),
        "preview": aa_run is None,
        "attack": aa_run["name"] if aa_run else "preview attacks",
        "label": (
            f"AutoAttack ({family.params[aa_run['name']].get('version', 'standard')})"
            if aa_run
            else "preview attacks only (" + ", ".join(a for a, k in family.kind.items() if k == "preview") + ")"
        ),
        "attacks": list(family.broken),
        "before_diagnostics": robust_rate(before),
    }
    if aa_run is not None:
        entry["autoattack"] = robust_rate(aa_run["robust"])
        names, counts = np.unique(aa_run["broken_by"][aa_run["broken_by"] != ""].astype(str), return_counts=True)
        entry["autoattack"]["broken_by"] = {str(k): int(v) for k, v in zip(names, counts, strict=True)}
    entry["lowered_by"] = float(before.mean() - worst.mean()) if worst.size else 0.0
    entry["validity_status"] = validity["status"] if validity else None
    return entry


_STATUS_ORDER = {"pass": 0, "warn": 1, "fail": 2}


def validity_section(
    config: RobustnessConfig, reports: dict[str, dict], self_check: dict, outcome: dict
) -> dict[str, Any]:
    """``summary["validity"]``: ``{"status": "pass" | "warn" | "fail", "checks": [...]}``, one entry per check.

    Checks: every check of the validity diagnostics (per norm), the previews' self-checks, the headline's
    availability, and the soundness of verification (verified ⇒ not broken; ``fail`` otherwise). The status is
    the worst of the checks'.
    """
    checks: list[dict] = []
    for report in reports.values():
        checks += report["checks"]
    if not config.validity:
        checks.append(
            {
                "name": "validity_diagnostics",
                "norm": None,
                "status": "warn",
                "message": "the validity diagnostics were switched off; the robust accuracy is unchecked",
            }
        )
    if config.headline == "autoattack" and any("AutoAttack is not available" in w for w in outcome["warnings"]):
        checks.append(
            {
                "name": "headline_attack",
                "norm": None,
                "status": "warn",
                "message": "AutoAttack did not run: the headline comes from the preview attacks",
            }
        )
    elif config.headline == "preview":
        checks.append(
            {
                "name": "headline_attack",
                "norm": None,
                "status": "warn",
                "message": "headline = 'preview': the robust accuracy comes from fast preview attacks only",
            }
        )
    failed = [name for name, c in self_check.get("attacks", {}).items() if not c["passed"]]
    suspicious = [norm for norm, m in self_check.get("masking", {}).items() if m.get("suspicious")]
    checks.append(
        {
            "name": "preview_attack_self_checks",
            "norm": None,
            "status": "warn" if failed or suspicious else "pass",
            "message": (
                "active test failed for " + ", ".join(failed)
                if failed
                else "every preview attack found the planted adversarial examples"
            )
            + ("; gradient-masking symptoms (" + ", ".join(suspicious) + ")" if suspicious else ""),
        }
    )
    for norm, entry in outcome.get("verification", {}).items():
        if entry.get("error"):
            checks.append({"name": "verified_not_broken", "norm": norm, "status": "warn", "message": entry["message"]})
        if not entry.get("supported"):
            continue
        bad = entry["violations"]
        checks.append(
            {
                "name": "verified_not_broken",
                "norm": norm,
                "status": "fail" if bad else "pass",
                "message": (
                    f"{bad} sample(s) verified robust yet broken by an attack (a verifier or attack bug)"
                    if bad
                    else f"no verified sample was broken by any attack "
                    f"({entry['n_samples']} samples, {len(entry['eps'])} budgets)"
                ),
            }
        )
    status = max((c.get("status", "pass") for c in checks), key=lambda s: _STATUS_ORDER.get(s, 1), default="pass")
    norms = {
        norm: {
            "status": r["status"],
            "robust_accuracy_before": float(r["before"].mean()),
            "robust_accuracy_after": float(r["after"].mean()),
            "report": r["report"],
        }
        for norm, r in reports.items()
    }
    return {"status": status, "checks": checks, "norms": norms}


def _stability(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    config: RobustnessConfig,
    timings: dict[str, float],
    warnings: list[str],
) -> dict | None:
    """Perturbation stability (ImageNet-P sequences, :mod:`.stability`) of the first ``stability_samples``:
    ``{"result": StabilityResult, "n_samples"}`` or ``None`` (skipped, or the module is unavailable)."""
    count = min(config.stability_samples, images.shape[0])
    if count == 0:
        return None
    module, why = _optional_module("stability")
    if module is None:
        warnings.append(f"perturbation stability skipped: {why}")
        return None
    clock = time.perf_counter()
    result = module.perturbation_stability(model, images[:count], labels[:count], random_state=config.random_state)
    timings["stability"] = time.perf_counter() - clock
    return {"result": result, "n_samples": count}


def _smoothing(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: np.ndarray,
    config: RobustnessConfig,
    progress: bool,
    timings: dict[str, float],
) -> dict | None:
    """Certification of the smoothing subset, or ``None`` when ``smoothing_samples`` is 0."""
    count = min(config.smoothing_samples, images.shape[0])
    if count == 0:
        return None
    clock = time.perf_counter()
    with tqdm(total=count, desc="Certifying", unit="img", disable=not progress) as bar:
        result = run_smoothing(model, images[:count], labels[:count], config, bar)
    timings["smoothing"] = time.perf_counter() - clock
    return result


def _slice_table(frame: pd.DataFrame, slices: list[dict], config: RobustnessConfig) -> pd.DataFrame:
    """The per-slice robustness table of the per-sample table ``frame``, at the reference budgets of the norms that
    were attacked (their ``rob_min_*_eps`` columns) and the reference radius when certification ran."""
    reference = SliceReference(
        linf_eps=config.reference_eps("linf") if "rob_min_linf_eps" in frame else None,
        l2_eps=config.reference_eps("l2") if "rob_min_l2_eps" in frame else None,
        radius=config.radius() if "rob_certified_radius" in frame else None,
    )
    return slice_robustness(frame, slices, reference, min_samples=config.min_slice_samples, top_k=config.worst_slices)


WORST_COLUMNS = (
    "worst_rank",
    "slice_id",
    "description",
    "kind",
    "n_samples",
    "n_attacked",
    "clean_accuracy",
    "corruption_accuracy",
    "robust_accuracy_linf",
    "robust_accuracy_l2",
    "certified_accuracy",
    "robust_accuracy_linf_ci_low",
    "robust_accuracy_linf_ci_high",
    "robust_accuracy_l2_ci_low",
    "robust_accuracy_l2_ci_high",
)


def _too_few(slice_table: pd.DataFrame) -> list[str]:
    """Descriptions of the slices not ranked because they hold too few attacked samples."""
    return slice_table.loc[slice_table["rank_note"].str.startswith(TOO_FEW), "description"].astype(str).tolist()


def _worst_list(slice_table: pd.DataFrame) -> list[dict]:
    worst = slice_table[slice_table["worst_rank"].notna()].sort_values("worst_rank")
    return records(worst, WORST_COLUMNS)


def _summary_body(
    workspace: Workspace,
    config: RobustnessConfig,
    ids: np.ndarray,
    clean_correct: np.ndarray,
    attacked: int,
    corruption: dict | None,
    families: dict[str, AttackFamily],
    attack_correct: np.ndarray,
    smoothing: dict | None,
    self_check: dict[str, Any],
    frame: pd.DataFrame,
    slice_table: pd.DataFrame,
    outcome: dict | None = None,
) -> dict:
    """Everything of ``robustness_summary.json`` except config, timings and fingerprints."""
    body: dict[str, Any] = {
        "num_samples": {
            "workspace": len(workspace.samples),
            "evaluated": int(ids.shape[0]),
            "attacked": attacked,
            "certified": 0 if smoothing is None else int(smoothing["radius"].shape[0]),
        },
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
        body["corruptions"]["mce"] = _mean_corruption_error(table, clean_correct)
    outcome = outcome or {"headline": {}, "validity": None, "verification": {}, "warnings": []}
    if outcome.get("validity") is not None:
        body["validity"] = {k: v for k, v in outcome["validity"].items()}
    body["headline"] = outcome.get("headline", {})
    body["attacks"] = {}
    n = int(attack_correct.size)
    for norm, family in families.items():
        curve = family.curve(attack_correct)
        correct = curve.n_correct
        entry = {
            "eps": family.eps.tolist(),
            "reference_eps": config.reference_eps(norm),
            "clean_accuracy": curve.clean_accuracy,
            "clean_accuracy_ci": _interval(robust_rate(attack_correct)),
            "n_samples": n,
            "attacks": {},
        }
        for name in family.broken:
            rate = curve.rates(name)
            ran = family.ran.get(name, np.ones(family.eps.size, dtype=bool))
            entry["attacks"][name] = {
                "kind": family.kind.get(name, "preview"),
                "params": family.params[name],
                "success_rate": rate["success_rate"].tolist() if correct else None,
                "robust_accuracy": rate["robust_accuracy"].tolist(),
                "robust_accuracy_ci": _intervals(rate),
                "ran_at_eps": ran.tolist(),
                **family.cost.get(name, {}),
            }
        rate = curve.rates("worst_case")
        entry["worst_case_robust_accuracy"] = rate["robust_accuracy"].tolist()
        entry["worst_case_robust_accuracy_ci"] = _intervals(rate)
        if norm == "l2" and np.isfinite(family.min_norm).any():
            entry["median_min_l2"] = float(np.nanmedian(family.min_norm))
        entry["min_perturbation"] = _min_perturbation(family, attack_correct)
        body["attacks"][norm] = entry
    stability = outcome.get("stability")
    if stability is not None:
        result = stability["result"]
        by_class = result.grouped(np.asarray(workspace.classes)[result.per_sample["label"].to_numpy()], "class")
        by_class = by_class[["class", "samples", "fp_mean", "t5d_mean"]]
        body["stability"] = {
            "n_samples": stability["n_samples"],
            **result.summary,
            "by_class": by_class.to_dict(orient="records"),
            "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        }
    body["attack_settings"] = {name: params for family in families.values() for name, params in family.params.items()}
    body["verification"] = {
        norm: {k: v for k, v in entry.items() if k != "verified"}
        for norm, entry in outcome.get("verification", {}).items()
    }
    if smoothing is not None:
        curve = certified_curve(smoothing["radius"], smoothing["correct"], config)
        radius = config.radius()
        body["certified"] = {
            "sigma": config.smoothing_sigma,
            "n0": config.smoothing_n0,
            "n": config.smoothing_n,
            "alpha": config.smoothing_alpha,
            "abstention_rate": float(smoothing["abstain"].mean()),
            "smoothed_accuracy": float(smoothing["correct"].mean()),
            "reference_radius": radius,
            "certified_accuracy_at_reference": float(
                certified_accuracy_curve(smoothing["radius"], smoothing["correct"], np.array([radius]))[0]
            ),
            "radius": curve["radius"].tolist(),
            "certified_accuracy": curve["certified_accuracy"].tolist(),
        }
    body["self_check"] = {k: self_check[k] for k in ("attacks", "masking", "passed")}
    body["warnings"] = list(self_check["warnings"]) + list(outcome.get("warnings", []))
    validity = outcome.get("validity")
    if validity is not None and validity["status"] != "pass":
        for norm, entry in body["headline"].items():
            body["warnings"].append(
                f"validity {validity['status']}: the {norm} robust accuracy "
                f"{100 * (entry['robust_accuracy'] or 0):.1f} % "
                f"at eps={entry['eps']:.4g} is an UPPER BOUND (the diagnostic attacks lowered it by "
                f"{100 * entry['lowered_by']:.1f} points)"
            )
    body["fragile"] = {
        "count": int(frame["rob_fragile"].sum()),
        "rate": float(frame["rob_fragile"].mean()),
        "rule": {
            "linf_eps": config.fragile_linf_eps,
            "l2": config.fragile_l2,
            "min_families": config.fragile_min_families,
        },
    }
    body["worst_slices"] = _worst_list(slice_table)
    body["slices_too_few"] = _too_few(slice_table)
    return json_safe(body)


def _interval(rate: dict) -> list[float]:
    """``[ci_low, ci_high]`` of a :func:`robust_rate` result."""
    return [float(rate["ci_low"]), float(rate["ci_high"])]


def _intervals(rate: dict[str, np.ndarray]) -> list[list[float]]:
    """``[[ci_low, ci_high], ...]`` per budget of a :meth:`~.attacks.RobustAccuracyCurve.rates` result."""
    return [[float(a), float(b)] for a, b in zip(rate["ci_low"], rate["ci_high"], strict=True)]


def _mean_corruption_error(table: pd.DataFrame, clean_correct: np.ndarray) -> dict[str, Any] | None:
    """mCE of the corruption table (ImageNet-C; no baseline model, so unnormalised and labelled so)."""
    module, _ = _optional_module("stability")
    if module is None or table.empty:
        return None
    errors = table.pivot_table(index="corruption", columns="severity", values="error", aggfunc="mean")
    return module.mean_corruption_error(errors, clean_error=float(1 - clean_correct.mean()))


def _min_perturbation(family: AttackFamily, clean_correct: np.ndarray) -> dict[str, Any]:
    """Per-sample minimal perturbation of one norm: from its minimal-norm attacks (DeepFool, C&W, FAB) when any ran,
    else the smallest grid budget that broke the sample (a grid-quantized upper bound)."""
    minimal = [a for a in family.broken if a in ATTACKS and ATTACKS[a].minimal]
    correct = int(clean_correct.sum())
    if minimal:
        found = family.min_norm[clean_correct]
        found = found[np.isfinite(found)]
        return {
            "source": "minimal-norm attacks (" + ", ".join(minimal) + ")",
            "median": float(np.median(found)) if found.size else None,
            "found": int(found.size),
            "of": correct,
            "success_rate": found.size / correct if correct else None,
        }
    budget = family.curve(clean_correct).breaking_eps[clean_correct]
    broken = budget[np.isfinite(budget)]
    # Unbroken samples need more than the largest ε: the median is only known when at least half were broken.
    ranked = np.sort(np.concatenate([broken, np.full(budget.size - broken.size, np.inf)]))
    median = float(ranked[(budget.size - 1) // 2]) if budget.size else None
    return {
        "source": "smallest grid budget that broke the sample (upper bound)",
        "median": median if median is not None and math.isfinite(median) else None,
        "found": int(broken.size),
        "of": correct,
        "success_rate": broken.size / correct if correct else None,
    }


# -- artifacts and skipping ---------------------------------------------------------------------------------------


def _current(context: StageContext, config: RobustnessConfig, inputs: str) -> bool:
    workspace = context.workspace
    return is_current(context, SUMMARY, config=config, inputs=inputs) and all(
        workspace.artifact_path(f"{name}.parquet").exists() for name in PARQUET_ARTIFACTS
    )


def _refresh_slices(
    context: StageContext, config: RobustnessConfig, inputs: str, slices: list[dict], slice_inputs: str
) -> dict:
    """A skipped run: rebuild only the slice table (from ``robustness_samples``) when the slices changed."""
    import json

    workspace = context.workspace
    summary = json.loads(workspace.artifact_path(f"{SUMMARY}.json").read_text(encoding="utf-8"))
    if summary.get("slice_inputs") == slice_inputs:
        return {**summary, "skipped": True}
    table = _slice_table(read_artifact(workspace, "robustness_samples"), slices, config)
    write_artifact(context, "robustness_slices", table, stage=STAGE, config=config, inputs=inputs)
    summary.update(
        worst_slices=json_safe(_worst_list(table)), slices_too_few=_too_few(table), slice_inputs=slice_inputs
    )
    storage.write_json(workspace.artifact_path(f"{SUMMARY}.json"), summary)
    record_artifact(context, SUMMARY, stage=STAGE, config=config, inputs=inputs)
    return {**summary, "skipped": "slices"}


def _write(
    context: StageContext,
    config: RobustnessConfig,
    inputs: str,
    artifacts: dict[str, pd.DataFrame],
    examples: dict | None,
    classes: list[str],
    summary: dict,
) -> None:
    """Write every artifact atomically; the summary last, so an interrupted run is never taken as current."""
    workspace = context.workspace
    for name, frame in artifacts.items():
        write_artifact(context, name, frame, stage=STAGE, config=config, inputs=inputs)
    path = workspace.artifact_path(f"{EXAMPLES}.npz")
    if examples is not None:
        payload = {**examples, "classes": np.array(classes, dtype=str)}

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, **payload)

        storage.atomic_write(path, save)
        record_artifact(
            context, EXAMPLES, stage=STAGE, config=config, inputs=inputs, extra={"count": int(examples["ids"].shape[0])}
        )
    elif path.exists():
        path.unlink()
    storage.write_json(workspace.artifact_path(f"{SUMMARY}.json"), summary)
    record_artifact(context, SUMMARY, stage=STAGE, config=config, inputs=inputs)
