"""``robustlens robustness WORKSPACE``: corruptions, adversarial attacks, randomized-smoothing certification
and attack self-checks of the workspace model, written as artifacts the dashboard's Robustness page and the
explorer read (see :mod:`robustlens.analysis.robustness.run`).

Exit status: 0 written (also when a self-check failed, unless ``--strict``), 1 failure or a failed
self-check with ``--strict``, 2 usage or validation error (e.g. the workspace has no model, an unknown
corruption or attack name).
"""

from __future__ import annotations

import argparse
import os
import sys
from fractions import Fraction
from pathlib import Path

from robustlens.errors import ValidationError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``robustness`` on the CLI's subparsers."""
    from robustlens.analysis.robustness.run import RobustnessConfig

    defaults = RobustnessConfig()
    parser = subparsers.add_parser(
        "robustness", help="evaluate the model under corruptions and attacks, and certify it",
        description="Evaluate the workspace model on a stratified sample: common corruptions × severities, "
                    "adversarial attacks on L∞ and L2 budget grids (worst case over attacks), randomized-smoothing "
                    "certification, and a self-check of every attack's strength plus gradient-masking checks. "
                    "Writes WORKSPACE/artifacts/robustness_*, per-sample scores for the explorer and 'fragile' "
                    "issue flags. A re-run with the same settings, samples and model is skipped.")
    parser.add_argument("workspace", type=Path)
    parser.add_argument("--corruptions", metavar="LIST",
                        help="comma-separated corruption names, 'all' (default) or 'none'")
    parser.add_argument("--severities", metavar="LIST",
                        help="comma-separated severities 1..5 or a range like 1-3 (default: 1-5)")
    parser.add_argument("--attacks", metavar="LIST",
                        help="comma-separated attack names, 'all' (default) or 'none'")
    parser.add_argument("--eps", metavar="LIST",
                        help="L∞ budgets in [0, 1] pixel units; fractions allowed (default: 1/255,2/255,4/255,"
                             "8/255). The grid's upper median is the reference ε of the per-slice robust "
                             "accuracy and of the attack self-checks")
    parser.add_argument("--l2-eps", metavar="LIST", help="L2 budgets (default: 0.1,0.25,0.5,1.0; reference: upper "
                                                         "median)")
    parser.add_argument("--smoothing-sigma", type=float, default=defaults.smoothing_sigma,
                        help=f"randomized-smoothing noise σ in pixel units (default {defaults.smoothing_sigma})")
    parser.add_argument("--smoothing-n", type=int, default=defaults.smoothing_n,
                        help=f"CERTIFY estimation samples per image (default {defaults.smoothing_n})")
    parser.add_argument("--smoothing-n0", type=int, default=defaults.smoothing_n0,
                        help=f"CERTIFY selection samples per image (default {defaults.smoothing_n0})")
    parser.add_argument("--smoothing-samples", type=int, default=defaults.smoothing_samples,
                        help=f"images certified, 0 to skip (default {defaults.smoothing_samples})")
    parser.add_argument("--attack-samples", type=int, default=defaults.attack_samples,
                        help=f"images attacked, 0 to skip (default {defaults.attack_samples})")
    parser.add_argument("--max-samples", type=int, default=defaults.max_samples,
                        help=f"images evaluated, stratified by class (default {defaults.max_samples})")
    parser.add_argument("--device", default="auto", help="torch device: auto (CUDA when present), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0, help="random_state of the whole run (default 0)")
    parser.add_argument("--workers", type=int, help="image-decoding threads (default: CPU cores)")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: half the CPU cores, at least 1: on busy cores more threads "
                             "than free cores makes torch much slower)")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a self-check fails")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
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
        raise ValidationError(f"{option}: unknown name(s) {unknown or [text]}; expected a comma-separated list of "
                              f"{', '.join(registry)} (or 'all' / 'none')")
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
    from robustlens.analysis.robustness.run import RobustnessConfig

    values = {"smoothing_sigma": args.smoothing_sigma, "smoothing_n": args.smoothing_n,
              "smoothing_n0": args.smoothing_n0, "smoothing_samples": args.smoothing_samples,
              "attack_samples": args.attack_samples, "max_samples": args.max_samples, "random_state": args.seed}
    optional = {"corruptions": parse_names(args.corruptions, CORRUPTIONS, "--corruptions"),
                "severities": parse_severities(args.severities),
                "attacks": parse_names(args.attacks, ATTACKS, "--attacks"),
                "linf_eps": parse_budgets(args.eps, "--eps"),
                "l2_eps": parse_budgets(args.l2_eps, "--l2-eps")}
    values.update({k: v for k, v in optional.items() if v is not None})
    # The reference budgets stay at their default, the upper median of whichever grid is used.
    return RobustnessConfig(**values)


def default_threads() -> int:
    """Torch threads of a run: half the CPU cores, at least 1 (leaves room for decoding and other work)."""
    return max(1, (os.cpu_count() or 2) // 2)


def resolve_device(requested: str) -> str:
    """``auto`` → ``cuda`` when available else ``cpu``; a CUDA device must exist."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValidationError(f"--device {requested}: CUDA is not available on this machine")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise ValidationError(f"--device must be auto, cpu or cuda[:N]; got {requested!r}")
    return requested


# -- the command -----------------------------------------------------------------------------------------------

def run(args) -> int:
    """Handler of ``robustlens robustness``; returns the exit status (errors are raised for the CLI to map)."""
    from robustlens.analysis.robustness.run import run_robustness
    from robustlens.analysis.workspace import Workspace

    workspace = Workspace(args.workspace)
    if not workspace.has_model:
        print(f"error: {workspace.root} has no model, so there is nothing to attack or certify. Create the "
              "workspace with a model: robustlens init WS --data DIR --model model.pt --model-config model.json",
              file=sys.stderr)
        return EXIT_USAGE
    config = config_from_args(args)
    summary = run_robustness(workspace, config, progress=not args.quiet, device=resolve_device(args.device),
                             workers=args.workers, threads=args.threads or default_threads())
    refreshed = refresh_issues(workspace, progress=not args.quiet)
    print(format_summary(summary, workspace.root, issues_refreshed=refreshed))
    if summary.get("warnings"):
        for warning in summary["warnings"]:
            print(f"WARNING: {warning}", file=sys.stderr)
        if args.strict:
            return EXIT_FAILURE
    return EXIT_OK


def refresh_issues(workspace, *, progress: bool) -> bool:
    """Re-run the (cheap) issues stage when the workspace was analysed, so ``fragile`` flags show at once."""
    from robustlens.analysis.stages import issues
    from robustlens.analysis.stages.base import StageContext

    if not workspace.artifact_path("issue_matrix.parquet").exists():
        return False
    issues.run(StageContext(workspace=workspace, progress=progress), issues.Config())
    return True


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
    lines.append(f"Robustness of {root}" + (" (unchanged: results of the previous run)" if skipped is True else "")
                 + (" (unchanged; slice table rebuilt)" if skipped == "slices" else ""))
    lines.append(f"  samples      {counts['evaluated']:,} evaluated (of {counts['workspace']:,}), "
                 f"{counts['attacked']:,} attacked, {counts['certified']:,} certified")
    lines.append(f"  clean        accuracy {_pct(summary.get('clean_accuracy'))}")
    corruptions = summary.get("corruptions")
    if corruptions:
        worst = sorted(corruptions["by_corruption"], key=lambda r: r["accuracy"])[:3]
        lines.append(f"  corruptions  mean accuracy {_pct(corruptions['mean_accuracy'])}, mean flip rate "
                     f"{_pct(corruptions['mean_flip_rate'])}; worst: "
                     + ", ".join(f"{r['corruption']} {100 * r['accuracy']:.1f} %" for r in worst))
        lines.append("               by severity: " + ", ".join(
            f"{k}: {100 * v:.1f} %" for k, v in corruptions["by_severity"].items()))
    for norm, entry in summary.get("attacks", {}).items():
        label = "L∞" if norm == "linf" else "L2"
        header = "  ".join(f"{_eps_label(norm, e):>8}" for e in entry["eps"])
        lines.append(f"  {label} attacks   robust accuracy at ε = {header}")
        for name, result in entry["attacks"].items():
            cells = "  ".join(f"{_pct(v):>8}" for v in result["robust_accuracy"])
            lines.append(f"    {name:<14}                {cells}")
        cells = "  ".join(f"{_pct(v):>8}" for v in entry["worst_case_robust_accuracy"])
        lines.append(f"    {'worst case':<14}                {cells}")
        if entry.get("median_min_l2") is not None:
            lines.append(f"    median minimal L2 perturbation (DeepFool / C&W): {entry['median_min_l2']:.3f}")
    certified = summary.get("certified")
    if certified:
        lines.append(f"  certified    σ = {certified['sigma']}, n = {certified['n']}: certified accuracy "
                     f"{_pct(certified['certified_accuracy_at_reference'])} at radius "
                     f"{certified['reference_radius']:.3g}"
                     f", smoothed accuracy {_pct(certified['smoothed_accuracy'])}, abstains on "
                     f"{_pct(certified['abstention_rate'])}")
    lines += _self_check_lines(summary.get("self_check", {}))
    fragile = summary.get("fragile", {})
    lines.append(f"  fragile      {fragile.get('count', 0):,} samples ({_pct(fragile.get('rate'))}) flagged as issue "
                 f"'fragile'" + (" (issues table refreshed)" if issues_refreshed else
                                 f"; run 'robustlens analyze {root} --stages issues' to add them to the issue table"))
    worst = summary.get("worst_slices") or []
    if worst:
        lines.append("  least robust slices (robust accuracy at the reference ε):")
        for row in worst[:5]:
            value = row.get("robust_accuracy_linf")
            value = row.get("robust_accuracy_l2") if value is None else value
            lines.append(f"    {row['description']}: {row['n_attacked']} attacked, robust {_pct(value)}, "
                         f"clean {_pct(row.get('clean_accuracy'))}")
    timings = summary.get("timings", {})
    lines.append("  time         " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    lines.append(f"  artifacts    {root / 'artifacts'}/robustness_*")
    return "\n".join(lines)


def _self_check_lines(self_check: dict) -> list[str]:
    checks = self_check.get("attacks", {})
    masking = self_check.get("masking", {})
    if not checks and not masking:
        return ["  self-checks  none (no attacks ran)"]
    failed = [name for name, c in checks.items() if not c["passed"]]
    suspicious = [norm for norm, m in masking.items() if m["suspicious"]]
    status = "PASSED" if not failed and not suspicious else "FAILED"
    detail = ", ".join(f"{name} {'ok' if c['passed'] else 'FAIL'} ({100 * (c['success_rate'] or 0):.0f} %)"
                       for name, c in checks.items())
    lines = [f"  self-checks  {status}: attack strength {detail}"]
    lines.append("               gradient masking: " + ", ".join(
        f"{norm} {'SUSPICIOUS' if m['suspicious'] else 'no symptoms'}" for norm, m in masking.items()))
    return lines
