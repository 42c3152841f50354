"""Materialise all 70,000 Fashion-MNIST images as a robustlens dataset for benchmarks.

Reads the IDX files of Debian's ``dataset-fashion-mnist`` (through ``sample_data/build.py``'s reader) and
writes ``<dest>/images/{train,test}_NNNNN.png``, ``labels.csv`` (path, label, split, source_index) and
``predictions.csv`` (the sample CNN's probabilities; in-sample for the 60,000 training images). Done once;
later calls find the finished folder (marked by ``.complete``) and return at once.
"""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEST = REPO / "benchmarks" / ".cache" / "fashion-mnist-70k"


def _build_module():
    spec = importlib.util.spec_from_file_location("sample_data_build", REPO / "sample_data" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepare(dest: Path = DEFAULT_DEST, source: Path | None = None) -> Path:
    """Write the dataset into ``dest`` unless it is already complete; returns ``dest``."""
    dest = Path(dest)
    if (dest / ".complete").exists():
        return dest
    build = _build_module()
    data = build.load_fashion_mnist(Path(source) if source else build.DEFAULT_SOURCE)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    rows, images = [], []
    for split in ("train", "test"):
        for index, (image, label) in enumerate(zip(data[f"{split}_images"], data[f"{split}_labels"], strict=True)):
            rows.append([f"images/{split}_{index:05d}.png", build.CLASSES[int(label)], split, str(index)])
            images.append(image)

    def save(item):
        row, image = item
        Image.fromarray(np.ascontiguousarray(image)).save(dest / row[0], format="PNG")

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(save, zip(rows, images, strict=True), chunksize=512))
    build.write_csv(dest / "labels.csv", ["path", "label", "split", "source_index"], rows)

    config = json.loads((REPO / "sample_data" / "model.json").read_text())
    model = torch.jit.load(str(REPO / "sample_data" / "model.pt"))
    stacked = np.stack(images)
    logits = build.predict_logits(model, build.to_input(stacked, config["mean"][0], config["std"][0]))
    probs = torch.softmax(logits, dim=1).numpy()
    build.write_csv(
        dest / "predictions.csv",
        ["path", *build.CLASSES],
        [[row[0], *values] for row, values in zip(rows, build.format_probs(probs), strict=True)],
    )
    (dest / ".complete").write_text("ok\n")
    return dest


if __name__ == "__main__":
    print(prepare())
