"""AutoAttack benchmark: robustlens' cascade vs the reference (pyautoattack = fra31/auto-attack) and torchattacks.

Usage::

    .venv/bin/python benchmarks/bench_autoattack.py                       # defaults below
    .venv/bin/python benchmarks/bench_autoattack.py --samples 200 --repeats 3 --configs linf:8/255,l2:0.5

On the first ``--samples`` images of the shipped Fashion-MNIST sample and its CNN (torch limited to
``--threads``, default 1: the project machine is shared), for each threat model of ``--configs``:

* ours (:func:`robustlens.analysis.robustness.autoattack.auto_attack`, standard version: APGD-CE, APGD-T with
  9 targets, FAB-T with 9 targets, Square 5,000 queries, 100 iterations) and the reference's
  ``AutoAttack(version="standard").run_standard_evaluation`` at the same settings, on the same batch (all
  samples in one batch), timed in interleaved rounds (ours, reference, ours, reference, ...) — medians;
* torchattacks' ``AutoAttack`` (its own defaults: 10-step APGD / APGD-T / FAB, Square 5,000) once, as a speed
  and strength comparison at its settings (skipped when torchattacks is not importable);
* model passes per sample, counted by one wrapper around the model for all three (forwards, and backwards
  that reach the input), and robust accuracies (re-scored here from the returned images: clean-correct and
  not misclassified within ε).

Prints a markdown table. Compare ratios measured in one run, not absolute times across days.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from fractions import Fraction
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from robustlens.analysis.robustness.autoattack import auto_attack  # noqa: E402
from tests.robustness.counting import CountingModel  # noqa: E402
from tests.robustness.sample_cnn import load_sample_cnn, robust_of  # noqa: E402


def run_ours(model, x, y, eps, norm):
    return auto_attack(model, x, y, eps, norm=norm, seed=0).adv


def run_reference(model, x, y, eps, norm):
    import pyautoattack

    ref = pyautoattack.AutoAttack(
        model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard", seed=0, device="cpu"
    )
    ref.verbose = False
    out = ref.run_standard_evaluation(x, y, batch_size=len(x))
    return out[0] if isinstance(out, tuple) else out


def run_torchattacks(model, x, y, eps, norm):
    import torchattacks

    return torchattacks.AutoAttack(
        model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard", n_classes=10, seed=0
    )(x, y)


def parse_configs(text: str) -> list[tuple[str, float, str]]:
    out = []
    for part in text.split(","):
        norm, value = part.split(":")
        out.append((norm, float(Fraction(value)), value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved timed rounds of ours vs reference")
    ap.add_argument("--configs", default="linf:8/255,l2:0.5", help="comma-separated norm:eps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-torchattacks", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y = load_sample_cnn(args.samples)
    counted = CountingModel(model)
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    print(f"sample CNN, {args.samples} images, clean accuracy {clean:.3f}, torch threads {args.threads}\n", flush=True)
    rows = []
    for norm, eps, label in parse_configs(args.configs):
        contenders = {"robustlens": run_ours, "pyautoattack": run_reference}
        times: dict[str, list[float]] = {k: [] for k in contenders}
        robust: dict[str, float] = {}
        passes: dict[str, tuple[float, float]] = {}
        for rep in range(args.repeats):
            for name, fn in contenders.items():
                counted.reset()
                with torch.random.fork_rng(devices=[]):
                    start = time.perf_counter()
                    adv = fn(counted, x, y, eps, norm)
                    times[name].append(time.perf_counter() - start)
                robust[name] = float(robust_of(model, x, y, adv, eps, norm).mean())
                passes[name] = (counted.forward_count / len(x), counted.backward_count / len(x))
                print(
                    f"  {norm} {label} round {rep} {name}: {times[name][-1]:.1f} s, robust {robust[name]:.3f}, "
                    f"passes/sample fwd {passes[name][0]:.0f} bwd {passes[name][1]:.0f}",
                    flush=True,
                )
        if not args.no_torchattacks:
            try:
                import torchattacks  # noqa: F401
            except ImportError:
                print("  torchattacks not importable: skipped", flush=True)
            else:
                counted.reset()
                with torch.random.fork_rng(devices=[]):
                    start = time.perf_counter()
                    adv = run_torchattacks(counted, x, y, eps, norm)
                    times["torchattacks (own defaults)"] = [time.perf_counter() - start]
                robust["torchattacks (own defaults)"] = float(robust_of(model, x, y, adv, eps, norm).mean())
                passes["torchattacks (own defaults)"] = (
                    counted.forward_count / len(x),
                    counted.backward_count / len(x),
                )
                print(
                    f"  {norm} {label} torchattacks: {times['torchattacks (own defaults)'][0]:.1f} s, "
                    f"robust {robust['torchattacks (own defaults)']:.3f}",
                    flush=True,
                )
        ours_t = statistics.median(times["robustlens"])
        for name in times:
            med = statistics.median(times[name])
            rows.append((f"{norm} ε={label}", name, med, med / ours_t, robust[name], *passes[name], len(times[name])))
    print(
        "\n| threat model | implementation | median wall s | time ÷ ours | robust acc. | fwd passes / sample "
        "| bwd passes / sample | runs |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for tm, name, med, ratio, rob, fw, bw, n in rows:
        print(f"| {tm} | {name} | {med:.1f} | {ratio:.2f} | {rob:.3f} | {fw:.0f} | {bw:.0f} | {n} |")


if __name__ == "__main__":
    main()
