"""``robustlens robustness WORKSPACE``: corruptions, adversarial attacks (AutoAttack headline, previews),
validity diagnostics, formal verification, perturbation stability, randomized-smoothing certification and attack
self-checks of the workspace model, written as artifacts the dashboard's Robustness page and the explorer read
(see :mod:`robustlens.analysis.robustness.run`).

The printed summary puts the validity section (status and every check that did not pass) above the headline;
every robust accuracy carries its Wilson 95 % interval; a headline whose validity is not "pass" is printed as an
UPPER BOUND with how much the diagnostic attacks lowered it. ``--attack-config FILE`` reads attack settings from
TOML (:func:`~robustlens.analysis.robustness.run.load_attack_config`).

Exit status: 0 written (also when a check warned, unless ``--strict``), 1 failure or a warning with
``--strict``, 2 usage or validation error (e.g. the workspace has no model, an unknown corruption or attack name,
a bad key or value in the attack-config file).
"""

from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction
from pathlib import Path

from robustlens.commands.common import (
    EXIT_FAILURE,
    EXIT_OK,
    add_device_option,
    add_quiet_option,
    add_workers_option,
    resolve_device,
)
from robustlens.errors import ValidationError


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``robustness`` on the CLI's subparsers."""
    from robustlens.analysis import robustness_defaults as defaults  # not run.py: it imports torch

    parser = subparsers.add_parser(
        "robustness",
        help="evaluate the model under corruptions and attacks, and certify it",
        description="Evaluate the workspace model on a stratified sample: common corruptions × severities; "
        "robust accuracy at the reference ε of L∞ and L2 from AutoAttack (standard), the per-sample worst "
        "case over every attack with Wilson 95 % intervals, fast preview attacks (FGSM, PGD, DeepFool, "
        "C&W, Square) on ε grids, validity diagnostics (gradient masking, black-box, transfer, EOT, BPDA; "
        "the headline is an upper bound when one warns), verified accuracy (IBP, CROWN), ImageNet-P "
        "perturbation stability, randomized-smoothing certification and attack self-checks. "
        "Writes WORKSPACE/artifacts/robustness_*, per-sample scores for the explorer and 'fragile' "
        "issue flags. A re-run with the same settings, samples and model is skipped.",
    )
    parser.add_argument("workspace", type=Path)
    parser.add_argument(
        "--corruptions", metavar="LIST", help="comma-separated corruption names, 'all' (default) or 'none'"
    )
    parser.add_argument(
        "--severities", metavar="LIST", help="comma-separated severities 1..5 or a range like 1-3 (default: 1-5)"
    )
    parser.add_argument("--attacks", metavar="LIST", help="comma-separated attack names, 'all' (default) or 'none'")
    parser.add_argument(
        "--eps",
        metavar="LIST",
        help="L∞ budgets in [0, 1] pixel units; fractions allowed (default: 1/255,2/255,4/255,"
        "8/255). The grid's upper median is the reference ε of the per-slice robust "
        "accuracy and of the attack self-checks",
    )
    parser.add_argument(
        "--l2-eps", metavar="LIST", help="L2 budgets (default: 0.1,0.25,0.5,1.0; reference: upper median)"
    )
    parser.add_argument(
        "--attack-config",
        type=Path,
        metavar="FILE",
        help="TOML file of attack settings: ε grids (linf_eps, l2_eps), and per attack "
        "([attacks.NAME]) steps, restarts, queries, loss, … (see "
        "robustlens.analysis.robustness.run.load_attack_config); --eps / --l2-eps / --attacks "
        "given on the command line win",
    )
    parser.add_argument(
        "--preview",
        action="store_true",
        help="skip AutoAttack: the headline is the fast preview attacks' worst case (labelled so)",
    )
    parser.add_argument(
        "--verify-samples",
        type=int,
        help=f"attacked images formally verified (IBP, CROWN), 0 to skip (default {defaults.VERIFY_SAMPLES})",
    )
    parser.add_argument(
        "--validity-budget",
        choices=("fast", "standard"),
        help="budget of the validity diagnostics (default: standard, or the attack-config file's)",
    )
    for flag, kind, default, what in (
        ("--smoothing-sigma", float, defaults.SMOOTHING_SIGMA, "randomized-smoothing noise σ in pixel units"),
        ("--smoothing-n", int, defaults.SMOOTHING_N, "CERTIFY estimation samples per image"),
        ("--smoothing-n0", int, defaults.SMOOTHING_N0, "CERTIFY selection samples per image"),
        ("--smoothing-samples", int, defaults.SMOOTHING_SAMPLES, "images certified, 0 to skip"),
        ("--attack-samples", int, defaults.ATTACK_SAMPLES, "images attacked, 0 to skip"),
        ("--max-samples", int, defaults.MAX_SAMPLES, "images evaluated, stratified by class"),
    ):
        parser.add_argument(flag, type=kind, default=default, help=f"{what} (default {default})")
    add_device_option(parser)
    parser.add_argument("--seed", type=int, default=0, help="random_state of the whole run (default 0)")
    add_workers_option(parser)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: half the CPU cores, at least 1: on busy cores more threads "
        "than free cores makes torch much slower)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 when a self-check fails or the validity status is not 'pass'",
    )
    add_quiet_option(parser)
    parser.set_defaults(handler=run)
    return parser


# -- argument parsing ----------------------------------------------------------------------------------------


def parse_names(text: str | None, registry, option: str) -> tuple[str, ...] | None:
    """``"a,b"`` → ``("a", "b")`` checked against ``registry``; ``all`` → ``None`` (default); ``none`` → ``()``"""
    if text is None or text.strip().lower() == "all":
        return None
    if text.strip().lower() == "none":
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in registry]
    if unknown or not names:
        raise ValidationError(
            f"{option}: unknown name(s) {unknown or [text]}; expected a comma-separated list of "
            f"{', '.join(registry)} (or 'all' / 'none')"
        )
    return names


def parse_budget(text: str, option: str) -> float:
    """``"0.03"`` or ``"8/255"`` → a positive float."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError) as exc:
        raise ValidationError(f"{option}: expected a positive number or fraction like 8/255, got {text!r}") from exc
    if value <= 0:
        raise ValidationError(f"{option}: budgets must be > 0, got {text!r}")
    return value


def parse_budgets(text: str | None, option: str) -> tuple[float, ...] | None:
    """Comma-separated budgets (``None`` when the option was not given)."""
    if text is None:
        return None
    values = tuple(parse_budget(part, option) for part in text.split(",") if part.strip())
    if not values:
        raise ValidationError(f"{option}: expected at least one budget, got {text!r}")
    return tuple(sorted(set(values)))


def parse_severities(text: str | None) -> tuple[int, ...] | None:
    """``"1,3,5"`` or ``"1-3"`` → severities in 1..5 (``None`` when not given)."""
    if text is None:
        return None
    chosen: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError as exc:
            raise ValidationError(f"--severities: expected integers 1..5 like 1,3,5 or 1-3, got {text!r}") from exc
        if not 1 <= first <= last <= 5:
            raise ValidationError(f"--severities: severities are 1..5, got {part!r}")
        chosen.update(range(first, last + 1))
    if not chosen:
        raise ValidationError(f"--severities: expected at least one severity, got {text!r}")
    return tuple(sorted(chosen))


def config_from_args(args):
    """The :class:`RobustnessConfig` described by the parsed arguments."""
    from robustlens.analysis.robustness import ATTACKS, CORRUPTIONS
    from robustlens.analysis.robustness.run import RobustnessConfig, load_attack_config

    values = load_attack_config(args.attack_config) if getattr(args, "attack_config", None) else {}
    if getattr(args, "preview", False):
        values["headline"] = "preview"
    if getattr(args, "verify_samples", None) is not None:
        values["verify_samples"] = args.verify_samples
    if getattr(args, "validity_budget", None):
        values["validity_budget"] = args.validity_budget
    values |= {
        "smoothing_sigma": args.smoothing_sigma,
        "smoothing_n": args.smoothing_n,
        "smoothing_n0": args.smoothing_n0,
        "smoothing_samples": args.smoothing_samples,
        "attack_samples": args.attack_samples,
        "max_samples": args.max_samples,
        "random_state": args.seed,
    }
    optional = {
        "corruptions": parse_names(args.corruptions, CORRUPTIONS, "--corruptions"),
        "severities": parse_severities(args.severities),
        "attacks": parse_names(args.attacks, ATTACKS, "--attacks"),
        "linf_eps": parse_budgets(args.eps, "--eps"),
        "l2_eps": parse_budgets(args.l2_eps, "--l2-eps"),
    }
    values.update({k: v for k, v in optional.items() if v is not None})
    # The reference budgets stay at their default, the upper median of whichever grid is used.
    return RobustnessConfig(**values)


def default_threads() -> int:
    """Torch threads of a run: half the CPU cores, at least 1 (leaves room for decoding and other work)."""
    return max(1, (os.cpu_count() or 2) // 2)


# -- the command -----------------------------------------------------------------------------------------------


def run(args) -> int:
    """Handler of ``robustlens robustness``; returns the exit status (errors are raised for the CLI to map).

    A shortcut for ``robustlens analyze WS --stages robustness`` with the settings given as flags: the
    orchestrator runs the robustness stage, then re-runs the stages that read its ``fragile`` flags (``issues``,
    ``slices``) when the workspace was analysed, and lets robustness re-rank its slice table when the slices
    changed.
    """
    from robustlens.analysis.analyze import analyze
    from robustlens.analysis.workspace import Workspace

    workspace = Workspace(args.workspace)
    if not workspace.has_model:
        raise ValidationError(
            f"{workspace.root} has no model, so there is nothing to attack or certify. Create the "
            "workspace with a model: robustlens init WS --data DIR --model model.pt "
            "--model-config model.json"
        )
    config = config_from_args(args)
    report = analyze(
        workspace,
        stages=["robustness"],
        configs={"robustness": config},
        progress=not args.quiet,
        device=resolve_device(args.device),
        workers=args.workers,
        threads=args.threads or default_threads(),
    )
    summary = robustness_summary(report)
    print(format_summary(summary, workspace.root, issues_refreshed="issues" in report.summaries))
    if summary.get("warnings"):
        for warning in summary["warnings"]:
            print(f"WARNING: {warning}", file=sys.stderr)
        if args.strict:
            return EXIT_FAILURE
    return EXIT_OK


def robustness_summary(report) -> dict:
    """The summary to print from an orchestrator run that included robustness: its first run's summary, with the
    worst slices of its last run (when the slices stage re-ran after it, robustness re-ranked its slice table)."""
    runs = [result for result in report.runs if result.stage == "robustness"]
    summary = dict(runs[0])
    if len(runs) > 1:
        summary.update(
            {key: runs[-1][key] for key in ("worst_slices", "slices_too_few", "slice_inputs") if key in runs[-1]}
        )
    return summary


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:5.1f} %"


def _eps_label(norm: str, eps: float) -> str:
    if norm == "linf":
        scaled = eps * 255
        return f"{scaled:.3g}/255" if abs(scaled - round(scaled)) < 1e-6 or scaled < 10 else f"{eps:.4g}"
    return f"{eps:.3g}"


def format_summary(summary: dict, root: Path, *, issues_refreshed: bool = False) -> str:
    """Human-readable result of a run (the CLI's stdout)."""
    counts = summary["num_samples"]
    lines = []
    if summary.get("warnings"):
        lines.append("!" * 100)
        lines += [f"!! WARNING: {w}" for w in summary["warnings"]]
        lines.append("!" * 100)
    skipped = summary.get("skipped")
    lines.append(
        f"Robustness of {root}"
        + (" (unchanged: results of the previous run)" if skipped is True else "")
        + (" (unchanged; slice table rebuilt)" if skipped == "slices" else "")
    )
    lines.append(
        f"  samples      {counts['evaluated']:,} evaluated (of {counts['workspace']:,}), "
        f"{counts['attacked']:,} attacked, {counts['certified']:,} certified"
    )
    lines.append(f"  clean        accuracy {_pct(summary.get('clean_accuracy'))}")
    lines += validity_lines(summary.get("validity"))
    lines += headline_lines(summary.get("headline") or {}, summary.get("validity"))
    lines += verification_lines(summary.get("verification") or {})
    corruptions = summary.get("corruptions")
    if corruptions:
        worst = sorted(corruptions["by_corruption"], key=lambda r: r["accuracy"])[:3]
        lines.append(
            f"  corruptions  mean accuracy {_pct(corruptions['mean_accuracy'])}, mean flip rate "
            f"{_pct(corruptions['mean_flip_rate'])}; worst: "
            + ", ".join(f"{r['corruption']} {100 * r['accuracy']:.1f} %" for r in worst)
        )
        lines.append(
            "               by severity: "
            + ", ".join(f"{k}: {100 * v:.1f} %" for k, v in corruptions["by_severity"].items())
        )
        mce = corruptions.get("mce")
        if mce:
            lines.append(f"               mCE {100 * mce['mce']:.1f} % (baseline: {mce['baseline']})")
    stability = summary.get("stability")
    if stability:
        lines.append(
            f"  stability    ImageNet-P sequences on {stability['n_samples']} samples: mean flip probability "
            f"{100 * stability['mean_flip_probability']:.2f} %, mean top-5 distance "
            f"{stability['mean_top5_distance']:.3f}"
        )
    for norm, entry in summary.get("attacks", {}).items():
        lines += attack_table_lines(norm, entry)
    certified = summary.get("certified")
    if certified:
        lines.append(
            f"  certified    σ = {certified['sigma']}, n = {certified['n']}: certified accuracy "
            f"{_pct(certified['certified_accuracy_at_reference'])} at radius "
            f"{certified['reference_radius']:.3g}"
            f", smoothed accuracy {_pct(certified['smoothed_accuracy'])}, abstains on "
            f"{_pct(certified['abstention_rate'])}"
        )
    lines += _self_check_lines(summary.get("self_check", {}))
    fragile = summary.get("fragile", {})
    lines.append(
        f"  fragile      {fragile.get('count', 0):,} samples ({_pct(fragile.get('rate'))}) flagged as issue "
        f"'fragile'"
        + (
            " (issues table refreshed)"
            if issues_refreshed
            else f"; run 'robustlens analyze {root} --stages issues' to add them to the issue table"
        )
    )
    worst = summary.get("worst_slices") or []
    if worst:
        lines.append("  least robust slices (robust accuracy at the reference ε):")
        for row in worst[:5]:
            norm = "linf" if row.get("robust_accuracy_linf") is not None else "l2"
            value = row.get(f"robust_accuracy_{norm}")
            lines.append(
                f"    {row['description']}: {row['n_attacked']} attacked, robust {_pct(value)} "
                f"{_ci(row.get(f'robust_accuracy_{norm}_ci_low'), row.get(f'robust_accuracy_{norm}_ci_high'))}"
                f", clean {_pct(row.get('clean_accuracy'))}"
            )
    few = summary.get("slices_too_few") or []
    if few:
        smallest = summary["config"]["min_slice_samples"]
        lines.append(
            f"  not ranked   {len(few)} slice(s) with too few samples (< {smallest} "
            "attacked): " + ", ".join(few[:6]) + (" …" if len(few) > 6 else "")
        )
    timings = summary.get("timings", {})
    # An unchanged run did no work: its stored timings belong to the run that computed the results.
    when = " (the run that computed these results)" if skipped else ""
    lines.append("  time         " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + when)
    lines.append(f"  artifacts    {root / 'artifacts'}/robustness_*")
    return "\n".join(lines)


def _ci(low, high) -> str:
    """``[95 % CI a–b %]`` of two fractions (empty when unknown)."""
    if low is None or high is None:
        return ""
    return f"[95 % CI {100 * low:.1f}–{100 * high:.1f} %]"


def validity_lines(validity: dict | None) -> list[str]:
    """The validity section (printed above the headline): status, then every check that did not pass."""
    if not validity:
        return []
    checks = validity.get("checks", [])
    status = validity.get("status", "warn").upper()
    counts = {s: sum(c.get("status") == s for c in checks) for s in ("pass", "warn", "fail")}
    lines = [
        f"  validity     {status}: {counts['pass']} passed, {counts['warn']} warned, {counts['fail']} failed "
        f"(of {len(checks)} checks)"
    ]
    for check in checks:
        if check.get("status") != "pass":
            where = f" ({check['norm']})" if check.get("norm") else ""
            lines.append(
                f"    {check.get('status', '?').upper():<4} {check.get('name')}{where}: {check.get('message', '')}"
            )
    return lines


def headline_lines(headline: dict, validity: dict | None) -> list[str]:
    """The headline robust accuracy per norm with its interval, what produced it, and whether it is an upper bound."""
    lines = []
    for norm, entry in headline.items():
        label = "L∞" if norm == "linf" else "L2"
        kind = "PREVIEW (not AutoAttack-grade)" if entry.get("preview") else entry.get("label", "AutoAttack")
        interval = _ci(entry.get("ci_low"), entry.get("ci_high"))
        lines.append(
            f"  ROBUST {label:<5} {_pct(entry.get('robust_accuracy'))} {interval} "
            f"at ε = {_eps_label(norm, entry['eps'])}, n = {entry.get('n', 0)}: {kind}, per-sample worst case "
            f"over {len(entry.get('attacks', []))} attack runs"
        )
        autoattack = entry.get("autoattack")
        if autoattack:
            broken = ", ".join(f"{k} {v}" for k, v in autoattack.get("broken_by", {}).items() if k != "clean")
            lines.append(
                f"               AutoAttack alone {_pct(autoattack['robust_accuracy'])} "
                f"{_ci(autoattack['ci_low'], autoattack['ci_high'])}" + (f"; broken by {broken}" if broken else "")
            )
        if entry.get("upper_bound"):
            status = (validity or {}).get("status", "warn")
            lines.append(
                f"               UPPER BOUND (validity {status}): the diagnostic attacks lowered it by "
                f"{100 * entry.get('lowered_by', 0.0):.1f} points (from "
                f"{_pct(entry.get('before_diagnostics', {}).get('robust_accuracy'))})"
            )
    return lines


def verification_lines(verification: dict) -> list[str]:
    """Verified accuracy (IBP, CROWN) per ε beside the empirical robust accuracy of the same samples."""
    lines = []
    for norm, entry in verification.items():
        label = "L∞" if norm == "linf" else "L2"
        if not entry.get("supported"):
            lines.append(f"  verification {label}: {entry.get('message', 'not supported')}")
            continue
        header = "  ".join(f"{_eps_label(norm, e):>8}" for e in entry["eps"])
        lines.append(f"  verified {label:<4} {entry['n_samples']} samples, accuracy at ε = {header}")
        for method, values in entry["methods"].items():
            cells = "  ".join(f"{_pct(v):>8}" for v in values["verified_accuracy"])
            lines.append(f"    {method.upper() + ' (verified)':<28} {cells}")
        cells = "  ".join(f"{_pct(v):>8}" for v in entry["empirical_robust_accuracy"])
        lines.append(f"    {'empirical (worst case)':<28} {cells}")
    return lines


def attack_table_lines(norm: str, entry: dict) -> list[str]:
    """The ε sweep of one norm: every attack (preview / headline) with its robust accuracy, the worst case with its
    Wilson interval, the minimal perturbation, and every attack's settings, time and model passes per sample."""
    label = "L∞" if norm == "linf" else "L2"
    header = "  ".join(f"{_eps_label(norm, e):>8}" for e in entry["eps"])
    lines = [f"  {label} ε sweep   robust accuracy at ε = {header}"]
    for name, result in entry["attacks"].items():
        ran = result.get("ran_at_eps") or [True] * len(entry["eps"])
        cells = "  ".join(f"{_pct(v) if r else '·':>8}" for v, r in zip(result["robust_accuracy"], ran, strict=True))
        tag = {"preview": " (preview)", "diagnostic": " (diagnostic)"}.get(result.get("kind", "preview"), "")
        lines.append(f"    {(name + tag)[:28]:<28} {cells}")
    cells = "  ".join(f"{_pct(v):>8}" for v in entry["worst_case_robust_accuracy"])
    lines.append(f"    {'worst case':<28} {cells}")
    intervals = entry.get("worst_case_robust_accuracy_ci")
    if intervals:
        cells = "  ".join(f"{f'{100 * lo:.0f}–{100 * hi:.0f}':>8}" for lo, hi in intervals)
        lines.append(f"    {'  95 % CI (%)':<28} {cells}")
    if entry.get("median_min_l2") is not None:
        lines.append(f"    median minimal L2 perturbation (DeepFool / C&W): {entry['median_min_l2']:.3f}")
    minimal = entry.get("min_perturbation")
    if minimal and minimal.get("median") is not None and norm == "linf":
        lines.append(f"    median minimal L∞ perturbation: {_eps_label(norm, minimal['median'])} ({minimal['source']})")
    for name, result in entry["attacks"].items():
        settings = ", ".join(
            f"{k}={v}" for k, v in (result.get("params") or {}).items() if not isinstance(v, dict | list)
        )
        cost = ""
        if "seconds" in result:
            cost = (
                f" — {result['seconds']:.1f} s, {result.get('forward_passes_per_sample', 0):.0f} forward / "
                f"{result.get('backward_passes_per_sample', 0):.0f} backward passes per sample"
            )
        lines.append(f"      {name}: {settings or 'defaults'}{cost}")
    return lines


def _self_check_lines(self_check: dict) -> list[str]:
    checks = self_check.get("attacks", {})
    masking = self_check.get("masking", {})
    if not checks and not masking:
        return ["  self-checks  none (no attacks ran)"]
    failed = [name for name, c in checks.items() if not c["passed"]]
    suspicious = [norm for norm, m in masking.items() if m["suspicious"]]
    status = "PASSED" if not failed and not suspicious else "FAILED"
    detail = ", ".join(
        f"{name} {'ok' if c['passed'] else 'FAIL'} ({100 * (c['success_rate'] or 0):.0f} %)"
        for name, c in checks.items()
    )
    lines = [f"  self-checks  {status}: attack strength {detail}"]
    lines.append(
        "               gradient masking: "
        + ", ".join(f"{norm} {'SUSPICIOUS' if m['suspicious'] else 'no symptoms'}" for norm, m in masking.items())
    )
    return lines
