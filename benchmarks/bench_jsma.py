"""JSMA (L0) speed: our batched attack vs torchattacks' per-image JSMA, same model, inputs and settings.

Usage::

    .venv/bin/python benchmarks/bench_jsma.py                  # 64 sample images, 3 interleaved repeats
    .venv/bin/python benchmarks/bench_jsma.py --images 128 --repeats 5

Both attack the shipped Fashion-MNIST sample CNN towards ``(label + 1) mod 10`` (torchattacks' default target),
``theta = 1``, ``gamma = 80/784`` (so torchattacks' ``ceil(γn/2)`` and our ``floor(γn/2)`` allow the same 40 steps).
Runs alternate (ours, theirs, ours, …) so that machine load hits both alike; prints medians, the ratio, success
rates, median L0 and whether the adversarial images are identical. torch is limited to ``--threads`` (default 1).
torchattacks must be installed with ``--no-deps`` (the Makefile does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from robustlens.analysis.ingest.model import NormalizedModel, load_model_config, load_network  # noqa: E402
from robustlens.analysis.robustness.jsma import jsma  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torchattacks

    torch.set_num_threads(args.threads)
    data = REPO / "sample_data"
    config = load_model_config(data / "model.json")
    model = NormalizedModel(load_network("model.pt", base_dir=data), config).eval()
    labels = pd.read_csv(data / "labels.csv").iloc[: args.images]
    x = torch.from_numpy(np.stack([np.asarray(Image.open(data / p)) for p in labels.path]).astype(np.float32) / 255)
    x = x[:, None]
    y = torch.tensor([config.classes.index(c) for c in labels.label])
    gamma = 80 / 784
    target = (y + 1) % 10
    ours_t, theirs_t = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        ours = jsma(model, x, y, gamma=gamma, target="next")
        ours_t.append(time.perf_counter() - start)
        start = time.perf_counter()
        ref = torchattacks.JSMA(model, theta=1.0, gamma=gamma)(x, y)
        theirs_t.append(time.perf_counter() - start)
    with torch.no_grad():
        ref_success = (model(ref).argmax(1) == target).float().mean().item()
    ref_l0 = (ref != x).flatten(1).sum(1).float()
    mo, mt = statistics.median(ours_t), statistics.median(theirs_t)
    print(
        "| images | ours median s | torchattacks median s | ratio | success ours / theirs | median L0 ours / theirs"
        " | identical adversarials |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.images} | {mo:.2f} | {mt:.2f} | **{mt / mo:.1f}×** | {ours.success.mean():.3f} / {ref_success:.3f}"
        f" | {np.median(ours.l0):.0f} / {ref_l0.median().item():.0f} | {torch.equal(ours.adv, ref)} |"
    )
    print(f"runs (s): ours {[round(t, 2) for t in ours_t]}, torchattacks {[round(t, 2) for t in theirs_t]}")


if __name__ == "__main__":
    main()
