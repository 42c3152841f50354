"""Stage ``quality_flags``: image-quality issues, judged against the dataset's own distribution.

Reads ``artifacts/metrics.parquet`` (stage ``metrics``) and writes ``artifacts/flags_quality.parquet`` in
long format: one row per (image, issue) with columns ``id``, ``issue``, ``severity`` (in ``[0, 1]``,
increasing with how extreme the image is) and ``explanation`` (the numbers behind the flag). Images
without issues have no rows.

Why relative thresholds: what is "dark" or "low information" depends on the dataset. Fashion-MNIST is
garments on a black background: mean brightness about 0.27 and a luminance entropy about 4 bits, which
fixed thresholds for natural photos call dark and low-information for most of the dataset. So each rule
compares an image with the dataset through a **robust z-score**

    z = (x - median(x)) / max(1.4826 · MAD(x), floor)

(median and median absolute deviation over all samples; ``floor`` keeps the scale meaningful when most
images share one value, e.g. every image 28×28) and pairs it with an **absolute guard**, so that an
image is only flagged when it is both unusual for this dataset *and* bad in absolute terms. A dark
garment on black is not dark: its highlights are as bright as everyone else's; an image dimmed to 8 %
is, because even its brightest pixels are dim.

Rules (every number is a :class:`Config` field; ``z`` is the robust z-score of the rule's statistic):

====================  ==============================  ============  =========================================
issue                 statistic (z-score floor)       relative      absolute guard(s), all required
====================  ==============================  ============  =========================================
dark                  ``highlight_level``: 99th pct   z ≤ -3        ``highlight_level`` ≤ 0.25 and
                      of luminance (0.05)                           ``brightness`` ≤ 0.15
light (over-exposed)  ``shadow_level``: 1st pct of    z ≥ +3        ``shadow_level`` ≥ 0.6 and
                      luminance (0.05)                              ``brightness`` ≥ 0.8
blurry                log10 ``high_frequency_ratio``  z ≤ -3        ``blur_score`` ≥ 0.4 and
                      (0.1 decades)                                 ``contrast`` > 0.01 (a blank image is
                                                                    low-information, not blurry)
low_information       (a) ``contrast``                none          ``contrast`` ≤ 0.01: blank or
                                                                    near-constant, flagged in any dataset
                      (b) ``entropy`` in bits (0.25)  z ≤ -3        ``entropy`` ≤ 3 bits
odd_aspect_ratio      log ``aspect_ratio`` (0.05)     abs(z) ≥ 3    ≥ 1.5× from the median aspect ratio
                                                                    (either way)
odd_size              log sqrt(``area``), the side    abs(z) ≥ 3    side ≥ 2× from the median side (either
                      length (0.05)                                 way; area 4×)
grayscale             ``channels`` = 1 or             share of      ``grayscale_content`` ≤ 0.02 (channels
                      ``grayscale_content`` ≤ 0.02    colour        equal within 5 levels)
                                                      images ≥ 0.8
====================  ==============================  ============  =========================================

Why these statistics: exposure is judged by the ends of the tonal range rather than the mean. A garment
on black has a low mean but bright highlights; an under-exposed image has dim highlights too (the same
reasoning makes an over-exposed image one whose shadows are light). Blur is judged by the share of the
variance in the finest detail (:func:`~robustlens.analysis.builtin_metrics.high_frequency_ratio`), which
unlike the raw Laplacian variance does not fall for a dim or low-contrast image, confirmed by the
perceptual ``blur_score``. Sizes are compared on a log scale, so 2× larger and 2× smaller are equally odd.

``low_information`` fires on (a) or (b). ``grayscale`` only fires in a colour dataset: when at least
80 % of the images have colour, the others are flagged; in a grayscale dataset nothing is.

Severity: ``tanh(|z| / (2k))`` for the z-score rules (0.46 at the threshold, 0.76 at 2k, → 1); for
blank images ``tanh(0.5 · 0.01 / contrast)`` (1 for a constant image), the larger of the two when both
parts of ``low_information`` fire; for ``grayscale`` the dataset's share of colour images. Each is
monotone in how extreme the image is.

A rule whose metrics were not computed (a ``metrics`` stage run with a subset) is skipped and listed
in the summary; the summary also gives each rule's effective absolute thresholds for this dataset.

Per-sample part and reduction: the per-sample metrics come from the metrics stage; the robust scales (median,
MAD) are a whole-dataset reduction, after which each rule is per-sample (:func:`flag_quality`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd

from robustlens.analysis.stages.base import (
    StageContext,
    StageResult,
    StageSpec,
    check_number,
    fingerprint,
    read_artifact,
    write_artifact,
)
from robustlens.errors import WorkspaceError

STAGE = "quality_flags"
ISSUES = ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "odd_size", "grayscale")
MAD_TO_SD = 1.4826


@dataclass
class Config:
    """Thresholds of every quality rule (see the module docstring's table)."""

    dark_z: float = -3.0
    dark_max_highlight: float = 0.25
    dark_max_brightness: float = 0.15
    light_z: float = 3.0
    light_min_shadow: float = 0.6
    light_min_brightness: float = 0.8
    level_scale_floor: float = 0.05
    blurry_z: float = -3.0
    blurry_min_blur_score: float = 0.4
    high_frequency_scale_floor: float = 0.1
    blank_max_contrast: float = 0.01
    low_information_z: float = -3.0
    low_information_max_entropy: float = 3.0
    entropy_scale_floor: float = 0.25
    odd_aspect_z: float = 3.0
    odd_aspect_min_factor: float = 1.5
    odd_size_z: float = 3.0
    odd_size_min_factor: float = 2.0
    log_scale_floor: float = 0.05
    grayscale_min_colour_share: float = 0.8
    grayscale_tolerance: float = 0.02

    def __post_init__(self) -> None:
        for item in fields(self):
            check_number(STAGE, self, item.name)


#: Metrics each rule reads.
REQUIRED = {
    "dark": ("highlight_level", "brightness"),
    "light": ("shadow_level", "brightness"),
    "blurry": ("high_frequency_ratio", "blur_score", "contrast"),
    "low_information": ("contrast", "entropy"),
    "odd_aspect_ratio": ("aspect_ratio",),
    "odd_size": ("area",),
    "grayscale": ("channels", "grayscale_content"),
}


@dataclass
class RobustScale:
    """Median and robust standard deviation of one statistic over the dataset."""

    median: float
    scale: float

    @classmethod
    def of(cls, values: np.ndarray, floor: float) -> RobustScale:
        median = float(np.nanmedian(values))
        mad = float(np.nanmedian(np.abs(values - median)))
        return cls(median=median, scale=max(MAD_TO_SD * mad, floor))

    def z(self, values: np.ndarray) -> np.ndarray:
        return (values - self.median) / self.scale

    def value_at(self, z: float) -> float:
        return self.median + z * self.scale


def z_severity(z: np.ndarray, threshold: float) -> np.ndarray:
    """``tanh(|z| / (2 |threshold|))``: 0.46 at the threshold, increasing towards 1."""
    return np.tanh(np.abs(z) / (2.0 * abs(threshold)))


@dataclass
class RuleResult:
    flagged: np.ndarray  # (N,) bool
    severity: np.ndarray  # (N,) float, meaningful where flagged
    explanation: list[str]  # one per flagged image, in order
    thresholds: dict


def flag_quality(metrics: pd.DataFrame, config: Config | None = None) -> tuple[pd.DataFrame, dict]:
    """Apply every rule to a metrics table (``id`` + metric columns).

    Returns
    -------
    flags:
        Long table ``id, issue, severity, explanation``, rows ordered by image (table order) then issue.
    details:
        ``thresholds`` (issue → effective thresholds for this dataset) and ``skipped`` (issue → missing
        metric columns).
    """
    config = config or Config()
    rules = {
        "dark": _dark,
        "light": _light,
        "blurry": _blurry,
        "low_information": _low_information,
        "odd_aspect_ratio": _odd_aspect_ratio,
        "odd_size": _odd_size,
        "grayscale": _grayscale,
    }
    frames, thresholds, skipped = [], {}, {}
    ids = metrics["id"].to_numpy()
    for issue in ISSUES:
        missing = [name for name in REQUIRED[issue] if name not in metrics.columns]
        if missing:
            skipped[issue] = missing
            continue
        if len(metrics) == 0:
            continue
        result = rules[issue](metrics, config)
        thresholds[issue] = result.thresholds
        rows = np.flatnonzero(result.flagged)
        frames.append(
            pd.DataFrame(
                {
                    "row": rows,
                    "id": ids[rows],
                    "issue": issue,
                    "severity": np.clip(result.severity[rows], 0.0, 1.0).astype(np.float64),
                    "explanation": result.explanation,
                }
            )
        )
    columns = {
        "id": pd.Series(dtype=str),
        "issue": pd.Series(dtype=str),
        "severity": pd.Series(dtype=np.float64),
        "explanation": pd.Series(dtype=str),
    }
    flags = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"row": [], **columns})
    if len(flags):
        flags["issue_order"] = flags["issue"].map({issue: i for i, issue in enumerate(ISSUES)})
        flags = flags.sort_values(["row", "issue_order"], kind="stable").drop(columns="issue_order")
    flags = flags.drop(columns="row").reset_index(drop=True)
    return flags[list(columns)], {"thresholds": thresholds, "skipped": skipped}


def run(context: StageContext, config: Config) -> StageResult:
    """Flag quality issues from ``metrics.parquet`` (always rewritten: the rules are cheap).

    Summary: ``flagged`` (issue → count), ``images_flagged``, ``samples``, ``skipped`` (the rules whose metrics
    are missing — not a "current" flag), ``thresholds``, ``seconds``.
    """
    return SPEC.result(_run(context, config), current=False)


def _run(context: StageContext, config: Config) -> dict:
    start = time.perf_counter()
    metrics = read_artifact(context.workspace, "metrics")
    if metrics is None:
        raise WorkspaceError(
            f"{context.workspace.root} has no metrics yet; run the 'metrics' stage first "
            "('robustlens analyze --stages metrics')"
        )
    flags, details = flag_quality(metrics, config)
    write_artifact(
        context,
        "flags_quality",
        flags,
        stage=STAGE,
        config=config,
        inputs=fingerprint(metrics),
        extra={"thresholds": details["thresholds"]},
    )
    counts = flags["issue"].value_counts()
    summary = {
        "flagged": {issue: int(counts.get(issue, 0)) for issue in ISSUES if issue not in details["skipped"]},
        "images_flagged": int(flags["id"].nunique()),
        "samples": int(len(metrics)),
        "skipped": details["skipped"],
        "thresholds": details["thresholds"],
        "seconds": round(time.perf_counter() - start, 3),
    }
    context.log.append(f"quality_flags: {summary['images_flagged']} images flagged")
    return summary


# -- rules ---------------------------------------------------------------------------------------------
def _column(metrics: pd.DataFrame, name: str) -> np.ndarray:
    return metrics[name].to_numpy(dtype=np.float64)


def _level_rule(
    level: np.ndarray,
    brightness: np.ndarray,
    config: Config,
    *,
    dark: bool,
    z_threshold: float,
    level_bound: float,
    brightness_bound: float,
    describe: str,
    keys: tuple[str, str],
) -> RuleResult:
    """Shared by ``dark`` (``dark=True``: a luminance level far below the dataset's, at or under its bound, and
    brightness at or under its bound) and its mirror ``light`` (far above, at or over the bounds). ``describe``
    names the level in the explanation; ``keys`` name the two thresholds reported (level, brightness)."""
    compare, extreme, direction, operator, sign = (
        (np.less_equal, min, "below", "<=", -1.0) if dark else (np.greater_equal, max, "above", ">=", 1.0)
    )
    stats = RobustScale.of(level, config.level_scale_floor)
    z = stats.z(level)
    limit = extreme(stats.value_at(z_threshold), level_bound)
    flagged = compare(z, z_threshold) & compare(level, level_bound) & compare(brightness, brightness_bound)
    explanation = [
        f"{describe} {v:.3f} are {sign * zz:.1f} robust SD {direction} the dataset median "
        f"{stats.median:.3f} (flagged at {operator} {limit:.3f}) and brightness {b:.3f} {operator} "
        f"{brightness_bound}"
        for v, zz, b in zip(level[flagged], z[flagged], brightness[flagged], strict=True)
    ]
    return RuleResult(flagged, z_severity(z, z_threshold), explanation, {keys[0]: limit, keys[1]: brightness_bound})


def _dark(metrics: pd.DataFrame, config: Config) -> RuleResult:
    return _level_rule(
        _column(metrics, "highlight_level"),
        _column(metrics, "brightness"),
        config,
        dark=True,
        z_threshold=config.dark_z,
        level_bound=config.dark_max_highlight,
        brightness_bound=config.dark_max_brightness,
        describe="highlights (99th pct luminance)",
        keys=("highlight_level_max", "brightness_max"),
    )


def _light(metrics: pd.DataFrame, config: Config) -> RuleResult:
    return _level_rule(
        _column(metrics, "shadow_level"),
        _column(metrics, "brightness"),
        config,
        dark=False,
        z_threshold=config.light_z,
        level_bound=config.light_min_shadow,
        brightness_bound=config.light_min_brightness,
        describe="shadows (1st pct luminance)",
        keys=("shadow_level_min", "brightness_min"),
    )


def _blurry(metrics: pd.DataFrame, config: Config) -> RuleResult:
    ratio = _column(metrics, "high_frequency_ratio")
    blur, contrast = _column(metrics, "blur_score"), _column(metrics, "contrast")
    log_ratio = np.log10(np.maximum(ratio, 1e-12))
    stats = RobustScale.of(log_ratio, config.high_frequency_scale_floor)
    z = stats.z(log_ratio)
    flagged = (z <= config.blurry_z) & (blur >= config.blurry_min_blur_score) & (contrast > config.blank_max_contrast)
    limit = 10.0 ** stats.value_at(config.blurry_z)
    explanation = [
        f"high-frequency ratio {r:.2e} is {-zz:.1f} robust SD (log scale) below the dataset median "
        f"{10.0**stats.median:.2e} (limit {limit:.2e}) and blur score {b:.2f} >= "
        f"{config.blurry_min_blur_score}"
        for r, zz, b in zip(ratio[flagged], z[flagged], blur[flagged], strict=True)
    ]
    return RuleResult(
        flagged,
        z_severity(z, config.blurry_z),
        explanation,
        {
            "high_frequency_ratio_max": limit,
            "blur_score_min": config.blurry_min_blur_score,
            "contrast_above": config.blank_max_contrast,
        },
    )


def _low_information(metrics: pd.DataFrame, config: Config) -> RuleResult:
    contrast, entropy = _column(metrics, "contrast"), _column(metrics, "entropy")
    blank = contrast <= config.blank_max_contrast
    stats = RobustScale.of(entropy, config.entropy_scale_floor)
    z = stats.z(entropy)
    sparse = (z <= config.low_information_z) & (entropy <= config.low_information_max_entropy)
    blank_severity = np.tanh(0.5 * config.blank_max_contrast / np.maximum(contrast, 1e-12))
    severity = np.maximum(
        np.where(blank, blank_severity, 0.0), np.where(sparse, z_severity(z, config.low_information_z), 0.0)
    )
    flagged = blank | sparse
    limit = stats.value_at(config.low_information_z)
    explanation = []
    for c, e, zz, is_blank, is_sparse in zip(
        contrast[flagged], entropy[flagged], z[flagged], blank[flagged], sparse[flagged], strict=True
    ):
        parts = []
        if is_blank:
            parts.append(f"near-constant: luminance SD {c:.4f} <= {config.blank_max_contrast}")
        if is_sparse:
            parts.append(
                f"entropy {e:.2f} bits is {-zz:.1f} robust SD below the dataset median {stats.median:.2f} "
                f"(limit {limit:.2f}) and <= {config.low_information_max_entropy} bits"
            )
        explanation.append("; ".join(parts))
    return RuleResult(
        flagged,
        severity,
        explanation,
        {"contrast_max": config.blank_max_contrast, "entropy_max": min(limit, config.low_information_max_entropy)},
    )


def _odd_ratio_rule(
    values: np.ndarray, *, z_threshold: float, min_factor: float, floor: float, what: str, unit: str
) -> RuleResult:
    """Shared by the size rules: ``values`` > 0, judged on a log scale in both directions."""
    logs = np.log(values)
    stats = RobustScale.of(logs, floor)
    z = stats.z(logs)
    factor = np.exp(np.abs(logs - stats.median))
    flagged = (np.abs(z) >= abs(z_threshold)) & (factor >= min_factor)
    typical = float(np.exp(stats.median))
    explanation = [
        f"{what} {v:.3g}{unit} is {f:.2f}x {'above' if zz > 0 else 'below'} the dataset's typical "
        f"{typical:.3g}{unit} ({abs(zz):.1f} robust SD on a log scale; flagged from {min_factor}x)"
        for v, f, zz in zip(values[flagged], factor[flagged], z[flagged], strict=True)
    ]
    low = float(np.exp(min(stats.value_at(-abs(z_threshold)), stats.median - np.log(min_factor))))
    high = float(np.exp(max(stats.value_at(abs(z_threshold)), stats.median + np.log(min_factor))))
    return RuleResult(flagged, z_severity(z, z_threshold), explanation, {"below": low, "above": high})


def _odd_aspect_ratio(metrics: pd.DataFrame, config: Config) -> RuleResult:
    return _odd_ratio_rule(
        _column(metrics, "aspect_ratio"),
        z_threshold=config.odd_aspect_z,
        min_factor=config.odd_aspect_min_factor,
        floor=config.log_scale_floor,
        what="aspect ratio (width/height)",
        unit="",
    )


def _odd_size(metrics: pd.DataFrame, config: Config) -> RuleResult:
    side = np.sqrt(_column(metrics, "area"))
    return _odd_ratio_rule(
        side,
        z_threshold=config.odd_size_z,
        min_factor=config.odd_size_min_factor,
        floor=config.log_scale_floor,
        what="side length sqrt(width*height)",
        unit=" px",
    )


def _grayscale(metrics: pd.DataFrame, config: Config) -> RuleResult:
    gray = (_column(metrics, "channels") == 1) | (_column(metrics, "grayscale_content") <= config.grayscale_tolerance)
    colour_share = float(1.0 - gray.mean())
    flagged = gray & (colour_share >= config.grayscale_min_colour_share)
    explanation = [
        f"grayscale content (channels equal within {config.grayscale_tolerance}) in a dataset where "
        f"{colour_share:.0%} of the images have colour"
    ] * int(flagged.sum())
    return RuleResult(
        flagged,
        np.full(len(gray), colour_share),
        explanation,
        {"colour_share": colour_share, "min_colour_share": config.grayscale_min_colour_share},
    )


SPEC = StageSpec(
    name=STAGE,
    config=Config,
    run=run,
    reads=("metrics",),
    writes=("flags_quality",),
    description="dark, light, blurry, low-information, odd-size and grayscale images (rules on metrics)",
)
