"""Robustness benchmarks: attack and corruption throughput against reference libraries, and the whole
``robustlens robustness`` run on the sample workspace.

Usage::

    .venv/bin/python benchmarks/bench_robustness.py                 # all three parts
    .venv/bin/python benchmarks/bench_robustness.py --parts pgd,corruptions --repeats 3

Parts (all on the shipped Fashion-MNIST sample and its CNN, torch limited to ``--threads``, default 1):

* ``pgd`` — PGD-10 (L∞, ε = 8/255, step 2/255, no random start) on one batch of ``--batch`` images: ours
  vs the Adversarial Robustness Toolbox (ART) vs torchattacks (when installed), images/s and ratios, plus
  the floor = 10 forward+backward passes of the model on the batch (what any PGD-10 must at least spend).
* ``corruptions`` — per-image time of every corruption both we and ``imagecorruptions`` (imagecorruptions-
  imaug; HxWxC uint8 numpy, one image at a time, needs >= 32 px) implement, severities 1–5, on the sample
  images resized to 32×32 RGB: ours batched in torch, theirs per image; ratio = theirs / ours.
* ``run`` — ``robustlens robustness WS`` with its defaults on a fresh sample workspace (2,000 images), in a
  subprocess: wall time and the run's own stage breakdown.

Medians over ``--repeats``. Prints markdown tables. The project machine is shared and noisy: compare ratios
measured in one run, not absolute numbers across days.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
EPS = 8 / 255
STEPS = 10
STEP_SIZE = 2.5 * EPS / STEPS


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (after one warm-up call)."""
    return interleaved_medians({"fn": fn}, repeats)["fn"]


def interleaved_medians(functions: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function, timed in round-robin rounds so that load drifting on a shared
    machine hits every contender alike (one warm-up call each first)."""
    for fn in functions.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def sample_batch(count: int, size: int | None = None, channels: int | None = None):
    """``(images (count, C, H, W) in [0, 1], labels (count,) int64, model)`` from the sample workspace files."""
    import pandas as pd

    from robustlens.analysis.images import read_image
    from robustlens.analysis.ingest.model import ModelConfig, load_model, load_model_config, prepare_images

    config = load_model_config(SAMPLE / "model.json")
    model = load_model(SAMPLE / "model.pt", config, config.classes)
    table = pd.read_csv(SAMPLE / "labels.csv").iloc[:count]
    pixels = [read_image(SAMPLE / p).pixels for p in table["path"]]
    layout = (
        config
        if size is None
        else ModelConfig(
            input_size=(size, size),
            channels=channels or config.channels,
            mean=[0.0] * (channels or 1),
            std=[1.0] * (channels or 1),
        )
    )
    images = prepare_images(pixels, layout)
    labels = torch.as_tensor([config.classes.index(c) for c in table["label"]], dtype=torch.int64)
    return images, labels, model


# -- (a) PGD ---------------------------------------------------------------------------------------------------
def bench_pgd(batch: int, repeats: int) -> list[dict]:
    from robustlens.analysis.robustness.attacks import pgd

    x, y, model = sample_batch(batch)

    def floor() -> None:
        for _ in range(STEPS):
            z = x.clone().requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(model(z), y, reduction="sum")
            torch.autograd.grad(loss, z)

    outputs: dict[str, torch.Tensor | np.ndarray] = {}

    def ours() -> None:
        outputs["robustlens pgd"] = pgd(model, x, y, EPS, norm="linf", steps=STEPS, step_size=STEP_SIZE)

    contenders = {
        "floor: 10 × forward+backward": floor,
        "robustlens pgd": ours,
        "ART 1.20 ProjectedGradientDescent": _art_pgd(model, x, y, outputs),
    }
    torchattacks_run = _torchattacks_pgd(model, x, y, outputs)
    if torchattacks_run is not None:
        contenders[torchattacks_run[0]] = torchattacks_run[1]
    seconds = interleaved_medians(contenders, repeats)
    rows = [
        {"implementation": name, "seconds": value, **({"adv": outputs[name]} if name in outputs else {})}
        for name, value in seconds.items()
    ]
    ours_adv = {"x": outputs["robustlens pgd"]}
    with torch.no_grad():
        reference = model(ours_adv["x"]).argmax(1)
        for row in rows:
            row["images_per_s"] = batch / row["seconds"]
            if "adv" in row:
                adv = torch.as_tensor(row.pop("adv"))
                predicted = model(adv).argmax(1)
                row["robust_accuracy"] = float((predicted == y).float().mean())
                row["same_prediction_as_ours"] = float((predicted == reference).float().mean())
    return rows


def _art_pgd(model, x, y, outputs: dict):
    """ART's PGD as a no-argument callable storing its adversarials in ``outputs``."""
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    name = "ART 1.20 ProjectedGradientDescent"
    classifier = PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    attack = ProjectedGradientDescent(
        classifier,
        norm=np.inf,
        eps=EPS,
        eps_step=STEP_SIZE,
        max_iter=STEPS,
        num_random_init=0,
        batch_size=x.shape[0],
        verbose=False,
    )
    inputs, labels = x.numpy(), y.numpy()

    def run() -> None:
        outputs[name] = attack.generate(inputs, y=labels)

    return run


def _torchattacks_pgd(model, x, y, outputs: dict):
    """``(name, callable)`` of torchattacks' PGD, or ``None`` when torchattacks is not installed."""
    try:
        import torchattacks
    except ImportError:
        return None
    name = f"torchattacks {torchattacks.__version__} PGD"
    attack = torchattacks.PGD(model, eps=EPS, alpha=STEP_SIZE, steps=STEPS, random_start=False)

    def run() -> None:
        outputs[name] = attack(x, y)

    return name, run


# -- (b) corruptions -----------------------------------------------------------------------------------------
def bench_corruptions(ours_images: int, theirs_images: int, repeats: int) -> list[dict]:
    from imagecorruptions import corrupt as reference_corrupt
    from imagecorruptions import get_corruption_names

    from robustlens.analysis.robustness._common import make_generator
    from robustlens.analysis.robustness.corruptions import CORRUPTIONS, SEVERITIES

    x, _, _ = sample_batch(max(ours_images, theirs_images), size=32, channels=3)
    ours_x = x[:ours_images]
    theirs_x = [
        np.ascontiguousarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in x[:theirs_images]
    ]
    shared = [name for name in CORRUPTIONS if name in set(get_corruption_names("all"))]
    rows = []
    for name in shared:

        def ours(name: str = name) -> None:
            for severity in SEVERITIES:
                CORRUPTIONS[name](ours_x, severity, make_generator(0, name, severity))

        def theirs(name: str = name) -> None:
            for severity in SEVERITIES:
                for image in theirs_x:
                    reference_corrupt(image, severity=severity, corruption_name=name)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # imagecorruptions' own deprecation warnings
            seconds = interleaved_medians({"ours": ours, "theirs": theirs}, repeats)
        ours_s = seconds["ours"] / (ours_images * len(SEVERITIES))
        theirs_s = seconds["theirs"] / (theirs_images * len(SEVERITIES))
        rows.append(
            {"corruption": name, "ours_ms": 1000 * ours_s, "theirs_ms": 1000 * theirs_s, "ratio": theirs_s / ours_s}
        )
    return rows


# -- (c) the whole run ----------------------------------------------------------------------------------------
RUN = textwrap.dedent("""
    import argparse, sys, time
    from robustlens import cli
    from robustlens.commands import robustness
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "robustness" not in sub.choices:
        robustness.add_parser(sub)
    args = parser.parse_args(sys.argv[1:])
    start = time.perf_counter()
    status = args.handler(args)
    print(f"WALL {time.perf_counter() - start:.2f}", file=sys.stderr)
    sys.exit(status)
""")


def bench_run(threads: int) -> dict:
    from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        init_workspace(
            root,
            InitOptions(
                data=SAMPLE,
                labels=SAMPLE / "labels.csv",
                predictions=[("cnn", SAMPLE / "predictions.csv")],
                model=str(SAMPLE / "model.pt"),
                model_config=SAMPLE / "model.json",
                progress=False,
            ),
        )
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", RUN, "robustness", str(root), "--quiet", "--threads", str(threads)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"robustness run failed ({result.returncode}):\n{result.stderr[-4000:]}")
        summary = json.loads((root / "artifacts" / "robustness_summary.json").read_text())
    return {
        "wall": wall,
        "timings": summary["timings"],
        "stdout": result.stdout,
        "samples": summary["num_samples"],
        "warnings": summary["warnings"],
    }


# -- report -----------------------------------------------------------------------------------------------------
def print_pgd(rows: list[dict], batch: int) -> None:
    ours = next(r for r in rows if r["implementation"] == "robustlens pgd")
    floor = rows[0]
    print(f"\n### PGD-10 L∞ (ε = 8/255, step 2/255), batch of {batch} sample images, 28×28, sample CNN\n")
    print(
        "| implementation | median time | images/s | ours is × faster | × the floor | robust acc. "
        "| same pred. as ours |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        faster = row["seconds"] / ours["seconds"]
        extra = (
            f"{row['robust_accuracy']:.1%} | {row['same_prediction_as_ours']:.1%}"
            if "robust_accuracy" in row
            else "— | —"
        )
        print(
            f"| {row['implementation']} | {row['seconds']:.3f} s | {row['images_per_s']:,.0f} | {faster:.2f} | "
            f"{row['seconds'] / floor['seconds']:.2f} | {extra} |"
        )


def print_corruptions(rows: list[dict], ours_images: int, theirs_images: int) -> None:
    print(
        f"\n### Corruptions, 32×32 RGB, severities 1–5 (ours: batch of {ours_images}; imagecorruptions: "
        f"{theirs_images} images one by one)\n"
    )
    print("| corruption | ours ms/image | imagecorruptions ms/image | ours is × faster |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['corruption']} | {row['ours_ms']:.4f} | {row['theirs_ms']:.4f} | {row['ratio']:.1f} |")
    ratios = [r["ratio"] for r in rows]
    print(f"| **median** | | | **{statistics.median(ratios):.1f}** |")


def print_run(result: dict, threads: int) -> None:
    samples = result["samples"]
    print(
        f"\n### `robustlens robustness WS` defaults on the sample workspace ({samples['evaluated']} evaluated, "
        f"{samples['attacked']} attacked, {samples['certified']} certified; torch threads {threads})\n"
    )
    print("| stage | seconds |")
    print("|---|---|")
    for stage, seconds in result["timings"].items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| wall (process, incl. start-up) | {result['wall']:.1f} |")
    if result["warnings"]:
        print("\nWARNINGS: " + "; ".join(result["warnings"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="pgd,corruptions,run", help="comma-separated: pgd, corruptions, run")
    parser.add_argument("--batch", type=int, default=256, help="PGD batch size")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ours-images", type=int, default=256, help="images per corruption batch (ours)")
    parser.add_argument("--theirs-images", type=int, default=64, help="images corrupted one by one (imagecorruptions)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: the project machine's 2 cores are shared)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"pgd", "corruptions", "run"}
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; expected pgd, corruptions, run")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {time.strftime('%Y-%m-%d')}")
    if "pgd" in parts:
        print_pgd(bench_pgd(args.batch, args.repeats), args.batch)
    if "corruptions" in parts:
        print_corruptions(
            bench_corruptions(args.ours_images, args.theirs_images, args.repeats), args.ours_images, args.theirs_images
        )
    if "run" in parts:
        print_run(bench_run(args.threads), args.threads)


if __name__ == "__main__":
    main()
