#!/usr/bin/env python
"""Build the robustlens sample data set and reference model from Fashion-MNIST.

Run from the repository root:

    .venv/bin/python sample_data/build.py

Outputs (in --out, default: the folder this script lives in):

    model.pt          TorchScript CNN (input already normalised, output logits)
    model.json        preprocessing / model config
    images/*.png      2,000 test-split images (200 per class), 8-bit grayscale
    labels.csv        path,label,split,source_index
    predictions.csv   path + one softmax-probability column per class
    README.md         provenance, licence, recipe and figures

Only numpy, torch, pillow and the standard library are used.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import shutil
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASSES = [
    "tshirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
]
PER_CLASS = 200
SELECTION_SEED = 0
TRAIN_SEED = 0
BATCH_SIZE = 128
LR = 3e-3
WEIGHT_DECAY = 1e-4
DEFAULT_EPOCHS = 12


def log(msg: str) -> None:
    print(f"[build] {msg}", flush=True)


# --------------------------------------------------------------------------- #
# IDX parsing
# --------------------------------------------------------------------------- #
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse a (gzipped) IDX file into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unsupported IDX data type 0x{dtype_code:02x}")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: payload is {len(data) - offset} bytes, expected {expected}")
    arr = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def load_fashion_mnist(source: Path) -> dict[str, np.ndarray]:
    missing = [name for name in FILES.values() if not (source / name).is_file()]
    if missing:
        sys.exit(
            f"error: Fashion-MNIST files not found in {source}: {', '.join(missing)}\n"
            "Install the Debian package 'dataset-fashion-mnist' (files land in "
            "/usr/share/datasets/fashion-mnist/) or pass --source DIR pointing at a folder "
            "with the four original *-ubyte.gz files."
        )
    out = {key: read_idx(source / name) for key, name in FILES.items()}
    for split, n in (("train", 60000), ("test", 10000)):
        imgs, labs = out[f"{split}_images"], out[f"{split}_labels"]
        if imgs.shape != (n, 28, 28) or labs.shape != (n,) or imgs.dtype != np.uint8:
            raise ValueError(f"unexpected {split} shapes: {imgs.shape} / {labs.shape}")
        if labs.min() < 0 or labs.max() > 9:
            raise ValueError(f"{split} labels out of range")
    return out


# --------------------------------------------------------------------------- #
# Model
# --------------------------------------------------------------------------- #
class FashionCNN(nn.Module):
    """Small CNN. forward(x) == classifier(features(x)); features -> (B, 64)."""

    def __init__(self, num_classes: int = 10, embed_dim: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=False),  # 28x28
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(32, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 3x3
            nn.Flatten(),  # 576
            nn.Dropout(0.2),
            nn.Linear(64 * 3 * 3, embed_dim),
            nn.ReLU(inplace=True),  # 64-d penultimate embedding
        )
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def to_input(images_u8: np.ndarray, mean: float, std: float) -> torch.Tensor:
    x = torch.from_numpy(images_u8.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - mean) / std


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def train(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, x_test: torch.Tensor, y_test: torch.Tensor
) -> None:
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(x) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        perm = torch.randperm(len(x), generator=gen)
        flips = torch.rand(len(x), generator=gen) < 0.5
        total_loss, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * BATCH_SIZE : (i + 1) * BATCH_SIZE]
            xb, yb = x[idx], y[idx]
            fb = flips[idx].view(-1, 1, 1, 1)
            xb = torch.where(fb, xb.flip(3), xb)  # random horizontal flip
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        test_acc = (predict_logits(model, x_test).argmax(1) == y_test).float().mean().item()
        log(
            f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(x):.4f}, "
            f"train acc {correct / len(x):.4f}, test acc {test_acc:.4f}, {time.time() - t0:.0f}s"
        )


# --------------------------------------------------------------------------- #
# Subset selection / outputs
# --------------------------------------------------------------------------- #
def select_subset(test_labels: np.ndarray) -> np.ndarray:
    """200 test indices per class with numpy default_rng(0), sorted by original index."""
    rng = np.random.default_rng(SELECTION_SEED)
    chosen = []
    for c in range(len(CLASSES)):
        pool = np.flatnonzero(test_labels == c)
        chosen.append(rng.choice(pool, size=PER_CLASS, replace=False))
    return np.sort(np.concatenate(chosen))


def rel_path(idx: int) -> str:
    return f"images/test_{idx:05d}.png"


def write_pngs(out: Path, images: np.ndarray, indices: np.ndarray) -> None:
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    wanted = {Path(rel_path(int(i))).name for i in indices}
    for stale in img_dir.glob("*.png"):
        if stale.name not in wanted:
            stale.unlink()
    for i in indices:
        Image.fromarray(np.ascontiguousarray(images[i], dtype=np.uint8)).save(
            out / rel_path(int(i)), format="PNG", optimize=False
        )


def read_pngs(out: Path, indices: np.ndarray) -> np.ndarray:
    arrs = []
    for i in indices:
        with Image.open(out / rel_path(int(i))) as im:
            if im.mode != "L" or im.size != (28, 28):
                raise ValueError(f"unexpected PNG {rel_path(int(i))}: {im.mode} {im.size}")
            arrs.append(np.asarray(im, dtype=np.uint8))
    return np.stack(arrs)


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def format_probs(probs: np.ndarray) -> list[list[str]]:
    """Round to 6 decimals; push any rounding residual onto the largest entry."""
    out = []
    for p in probs.astype(np.float64):
        p = p / p.sum()
        r = np.round(p, 6)
        resid = round(1.0 - float(r.sum()), 6)
        if resid != 0.0:
            r[int(np.argmax(r))] += resid
        r = np.clip(r, 0.0, 1.0)
        vals = [f"{v:.6f}" for v in r]
        assert abs(sum(float(v) for v in vals) - 1.0) <= 1e-5, vals
        out.append(vals)
    return out


def human(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def write_readme(out: Path, info: dict) -> None:
    img_bytes = sum(p.stat().st_size for p in (out / "images").glob("*.png"))
    sizes = {
        name: (out / name).stat().st_size
        for name in ("model.pt", "model.json", "labels.csv", "predictions.csv", "build.py")
        if (out / name).exists()
    }
    size_lines = "\n".join(f"| `{k}` | {human(v)} ({v:,} bytes) |" for k, v in sizes.items())
    per_class = "\n".join(f"| {i} | `{c}` | {info['subset_class_acc'][i]:.3f} |" for i, c in enumerate(CLASSES))
    text = f"""# robustlens sample data

A small, self-contained image-classification bundle for trying robustlens:
2,000 Fashion-MNIST test images (PNG), their labels, a reference CNN
(TorchScript) with its preprocessing config, and the model's out-of-sample
predictions on those images. Everything here is generated by `build.py`.

## Contents

| Path | What |
|---|---|
| `images/test_NNNNN.png` | 2,000 grayscale 28x28 8-bit PNGs; `NNNNN` = original Fashion-MNIST **test** index |
| `labels.csv` | `path,label,split,source_index` (path relative to this folder; split is always `test`) |
| `model.pt` | TorchScript CNN; input `(B,1,28,28)` float **already normalised** `(x-mean)/std` with `x` in [0,1]; output logits `(B,10)` |
| `model.json` | preprocessing config: input size, channels, mean/std, class names, test accuracy |
| `predictions.csv` | `path` + one softmax-probability column per class (class order), 6 decimals, rows sum to 1 |
| `build.py` | the script that produced all of the above |

Class index order: {", ".join(f"{i} `{c}`" for i, c in enumerate(CLASSES))}.

## Provenance

* Data: **Fashion-MNIST** by Zalando Research
  (<https://github.com/zalandoresearch/fashion-mnist>), Xiao, Rasul & Vollgraf,
  *Fashion-MNIST: a Novel Image Dataset for Benchmarking Machine Learning
  Algorithms*, arXiv:1708.07747, 2017.
* Read from the Debian package `dataset-fashion-mnist`
  (version {info["deb_version"]}), directory `/usr/share/datasets/fashion-mnist/`,
  files `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
  `t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz` (original IDX format,
  parsed with a small numpy/gzip reader in `build.py`).
* Pixel values are copied unchanged (uint8) into the PNGs; no resizing or
  colour conversion.

### Licence

Fashion-MNIST is distributed under the MIT licence:

```
The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in
all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
```

The images, labels and the model trained on them are derived from
Fashion-MNIST and are redistributed under the same terms.

## How the subset was chosen

From the 10,000-image **test** split, 200 images per class (2,000 in total)
were drawn without replacement with `numpy.random.default_rng({SELECTION_SEED})`,
one `rng.choice` call per class in class-index order 0..9, then all selected
indices were sorted ascending. `labels.csv` and `predictions.csv` follow that
sorted order. The model never saw any test image, so `predictions.csv` is
out-of-sample.

## Model

* Architecture (`model.features` produces the 64-d penultimate embedding,
  `model.classifier` is the final layer; `forward(x) = classifier(features(x))`):
  `Conv(1->16,3x3,pad 1)-BN-ReLU-MaxPool2` -> `Conv(16->32,3x3)-BN-ReLU-MaxPool2`
  -> `Conv(32->64,3x3)-BN-ReLU-MaxPool2` -> `Flatten(576)` -> `Dropout(0.2)`
  -> `Linear(576->64)-ReLU` -> `classifier: Linear(64->10)`.
* Parameters: **{info["n_params"]:,}**. Saved with `torch.jit.script`
  (`model.pt`, {human(sizes["model.pt"])}); submodules `features` and `classifier`
  are callable on the loaded scripted module, e.g.
  `emb = torch.jit.load("model.pt").features(x)`.
* Normalisation is **not** inside the model: apply `(x/255 - mean)/std` with
  mean = {info["mean"]}, std = {info["std"]} (from `model.json`; computed over
  all 60,000 training images in [0,1]).
* Training: all 60,000 training images, {info["epochs"]} epochs, batch
  {BATCH_SIZE}, Adam (weight decay {WEIGHT_DECAY:g}), one-cycle LR schedule with
  peak {LR:g}, cross-entropy, random horizontal flip (p=0.5) as the only
  augmentation, CPU with `torch.set_num_threads(2)`, seeds
  `torch.manual_seed({TRAIN_SEED})` / `np.random.seed({TRAIN_SEED})` and a seeded
  `torch.Generator` for shuffling/flips. Training took {info["train_time"]}
  on 2 CPU cores with torch {info["torch_version"]}.

### Accuracy

| Evaluation set | Accuracy |
|---|---|
| Full Fashion-MNIST test split (10,000 images) | **{info["test_acc"]:.4f}** |
| This 2,000-image subset (`predictions.csv` argmax vs `labels.csv`) | **{info["subset_acc"]:.4f}** |

Per-class accuracy on the 2,000-image subset:

| Index | Class | Accuracy |
|---|---|---|
{per_class}

## File sizes

| File | Size |
|---|---|
| `images/` ({info["n_images"]} PNGs) | {human(img_bytes)} ({img_bytes:,} bytes) |
{size_lines}

## Regenerating

From the repository root:

```
.venv/bin/python sample_data/build.py
```

Options: `--epochs N` (default {info["default_epochs"]}), `--source DIR` (folder with
the four `*-ubyte.gz` files; default `/usr/share/datasets/fashion-mnist`),
`--out DIR` (default: this folder), `--reuse-model PATH` (skip training and use
an existing TorchScript model).

Reproducibility: the subset selection, `images/*.png` and `labels.csv` do not
depend on training and are byte-identical across runs (uint8 pixels, Pillow PNG
encoder with `optimize=False`, no timestamps/metadata). Training is seeded and
single-process; with the same torch version (built with torch
{info["torch_version"]}) on the same kind of CPU it reproduces the same weights,
and hence the same `model.json` accuracy and `predictions.csv` (verified
byte-identical; the `model.pt` archive itself may differ in a few
serialisation bytes even when the weights are equal). Other torch
versions or CPU instruction sets may give slightly different weights and
probabilities (accuracy within a few tenths of a percent).
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def deb_version() -> str:
    status = Path("/var/lib/dpkg/status")
    try:
        block = None
        for chunk in status.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if chunk.startswith("Package: dataset-fashion-mnist\n"):
                block = chunk
                break
        if block:
            for line in block.splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "0.0~git20200523.55506a9-1"


# --------------------------------------------------------------------------- #
def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs (default {DEFAULT_EPOCHS})")
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help=f"IDX .gz folder (default {DEFAULT_SOURCE})")
    ap.add_argument("--out", type=Path, default=here, help="output folder (default: this script's folder)")
    ap.add_argument(
        "--reuse-model",
        type=Path,
        default=None,
        help="skip training; load this TorchScript model instead (copied to OUT/model.pt)",
    )
    args = ap.parse_args(argv)

    torch.manual_seed(TRAIN_SEED)
    np.random.seed(TRAIN_SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    log(f"reading Fashion-MNIST from {args.source}")
    data = load_fashion_mnist(args.source)
    train_x_u8, train_y = data["train_images"], data["train_labels"].astype(np.int64)
    test_x_u8, test_y = data["test_images"], data["test_labels"].astype(np.int64)
    log(f"train {train_x_u8.shape}, test {test_x_u8.shape}")

    pix = train_x_u8.astype(np.float64) / 255.0
    mean, std = round(float(pix.mean()), 4), round(float(pix.std()), 4)
    del pix
    log(f"train mean {mean}, std {std}")

    x_train, y_train = to_input(train_x_u8, mean, std), torch.from_numpy(train_y)
    x_test, y_test = to_input(test_x_u8, mean, std), torch.from_numpy(test_y)

    if args.reuse_model is not None:
        log(f"reusing model {args.reuse_model} (no training)")
        if args.reuse_model.resolve() != (out / "model.pt"):
            shutil.copyfile(args.reuse_model, out / "model.pt")
        scripted = torch.jit.load(str(out / "model.pt"), map_location="cpu")
        train_time = "n/a (model reused, not retrained)"
        n_params = sum(p.numel() for p in scripted.parameters())
    else:
        model = FashionCNN(num_classes=len(CLASSES))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"training FashionCNN ({n_params:,} params) for {args.epochs} epochs")
        t0 = time.time()
        train(model, x_train, y_train, args.epochs, x_test, y_test)
        secs = time.time() - t0
        train_time = f"about {secs / 60:.1f} minutes ({secs:.0f} s)"
        log(f"training done in {secs:.0f}s")
        model.eval()
        scripted = torch.jit.script(model)
        scripted.save(str(out / "model.pt"))
        scripted = torch.jit.load(str(out / "model.pt"), map_location="cpu")
    scripted.eval()
    log(f"model.pt: {(out / 'model.pt').stat().st_size:,} bytes")

    test_pred = predict_logits(scripted, x_test).argmax(1)
    test_acc = round(float((test_pred == y_test).float().mean()), 4)
    log(f"test accuracy (10,000 images): {test_acc:.4f}")

    cfg = {
        "format": "torchscript",
        "file": "model.pt",
        "input_size": [28, 28],
        "channels": 1,
        "mean": [mean],
        "std": [std],
        "classes": CLASSES,
        "trained_on": "Fashion-MNIST train split (60,000 images)",
        "test_accuracy": test_acc,
    }
    (out / "model.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    indices = select_subset(test_y)
    log(f"selected {len(indices)} test images ({PER_CLASS} per class)")
    write_pngs(out, test_x_u8, indices)
    write_csv(
        out / "labels.csv",
        ["path", "label", "split", "source_index"],
        [[rel_path(int(i)), CLASSES[test_y[i]], "test", str(int(i))] for i in indices],
    )
    log("wrote images/ and labels.csv")

    # Predictions from the PNGs as read back from disk (exactly what users see).
    back = read_pngs(out, indices)
    if not np.array_equal(back, test_x_u8[indices]):
        raise RuntimeError("PNG round-trip changed pixel values")
    logits = predict_logits(scripted, to_input(back, mean, std))
    probs = torch.softmax(logits.double(), dim=1).numpy()
    rows = format_probs(probs)
    write_csv(
        out / "predictions.csv",
        ["path", *CLASSES],
        [[rel_path(int(i)), *r] for i, r in zip(indices, rows, strict=True)],
    )
    sub_pred = probs.argmax(1)
    sub_true = test_y[indices]
    subset_acc = float((sub_pred == sub_true).mean())
    class_acc = [float((sub_pred[sub_true == c] == c).mean()) for c in range(len(CLASSES))]
    log(f"wrote predictions.csv; subset accuracy (2,000 images): {subset_acc:.4f}")

    write_readme(
        out,
        {
            "n_params": n_params,
            "mean": mean,
            "std": std,
            "epochs": args.epochs if args.reuse_model is None else "(reused model)",
            "default_epochs": DEFAULT_EPOCHS,
            "train_time": train_time,
            "torch_version": torch.__version__,
            "test_acc": test_acc,
            "subset_acc": subset_acc,
            "subset_class_acc": class_acc,
            "n_images": len(indices),
            "deb_version": deb_version(),
        },
    )
    log(f"wrote README.md; all done in {time.time() - t_start:.0f}s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
