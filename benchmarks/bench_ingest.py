"""Time `robustlens init` (ingest + validation) on the sample data.

Usage: .venv/bin/python benchmarks/bench_ingest.py [--repeats 5] [--copies 1]

``--copies N`` replicates the 2,000 sample images N times into a temporary ImageFolder tree to measure
throughput at a larger scale. Prints the median wall time and images per second.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd

from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.copies == 1:
            options = dict(
                data=SAMPLE,
                labels=SAMPLE / "labels.csv",
                predictions=[("cnn", SAMPLE / "predictions.csv")],
                model=str(SAMPLE / "model.pt"),
                model_config=SAMPLE / "model.json",
            )
            count = 2000
        else:
            labels = pd.read_csv(SAMPLE / "labels.csv")
            for copy in range(args.copies):
                for path, label in zip(labels["path"], labels["label"], strict=True):
                    target = tmp / "data" / label / f"{copy}_{Path(path).name}"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(SAMPLE / path, target)
            options = dict(data=tmp / "data")
            count = 2000 * args.copies
        times = []
        for repeat in range(args.repeats):
            start = time.perf_counter()
            init_workspace(tmp / f"ws{repeat}", InitOptions(progress=False, **options))
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(
        f"init on {count:,} images: median {median:.2f} s over {args.repeats} runs "
        f"({count / median:,.0f} images/s); all: {', '.join(f'{t:.2f}' for t in times)}"
    )


if __name__ == "__main__":
    main()
