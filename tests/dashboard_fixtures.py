"""Workspaces for dashboard, filter and export tests, produced by the real analysis stages.

:func:`write_planted_inputs` writes the *input* of a workspace: a copy of the 2,000 shipped sample images in which
some files are replaced by planted issues, a manifest with train/test splits, the sample CNN's predictions and a
weaker second prediction set. :func:`build_analysed_workspace` runs ``robustlens init`` and every analysis stage
(:func:`robustlens.analysis.analyze.analyze`) on it, so the dashboard tests read exactly the artifacts the stages
write (an artifact whose schema changes changes what the tests see). What the dashboard tests rely on is planted
in the input, never written into an artifact:

==============================  ===========================================================================
planted                         how
==============================  ===========================================================================
splits                          ``train`` with probability 0.75, else ``test`` (seeded)
prediction set ``cnn_v2``       the CNN's probabilities softened (``p ** 0.6``) with 6 % of rows' classes
                                shuffled: accuracy 86.40 % (``cnn``: 91.75 %)
dark images                     pixels × 0.08; four each of ``coat``, ``sandal``, ``shirt`` and four others
blurry images                   Gaussian blur, σ uniform in [1.5, 2.0]; twelve images
light images                    0.85 + 0.15 · pixels (over-exposed); eight images
blank images (low information)  a constant level uniform in [0.3, 0.7], every other one with Gaussian noise
                                σ = 1.5/255; eight images
near duplicates                 a copy of another image of the same class with Gaussian noise σ = 2/255;
                                four pairs across splits (leakage), two within one split
==============================  ===========================================================================

Every issue type has at least six samples (the overview shows six examples of each). Planted images keep their own
rows of the prediction files, so accuracies are those of the shipped predictions.

:func:`write_analysis_artifacts` runs the stages on an existing workspace (as it is). :func:`synthetic_workspace`
builds a large workspace (70k … 1M rows) from arrays for benchmarks; its artifacts have the stages' columns
(``tests/test_end_to_end.py`` compares them).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from robustlens.analysis import storage
from robustlens.analysis.workspace import Workspace

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
SECOND_SET = "cnn_v2"
#: Classes that get four planted dark images each (filters and collections in the tests ask for them).
DARK_CLASSES = ("coat", "sandal", "shirt")


@dataclass(frozen=True)
class PlantedInputs:
    """The input files of the analysed workspace and the ground truth planted in them (sample ids).

    ``near_pairs`` / ``leaking_pairs``: ``(original, copy)`` within one split / across splits.
    """

    data: Path
    labels: Path
    predictions: dict[str, Path]
    dark: frozenset[str]
    light: frozenset[str]
    blurry: frozenset[str]
    low_information: frozenset[str]
    near_pairs: tuple[tuple[str, str], ...]
    leaking_pairs: tuple[tuple[str, str], ...]

    def init_options(self, **overrides):
        """:class:`~robustlens.analysis.ingest.pipeline.InitOptions` of a workspace of these inputs (with the
        sample CNN)."""
        from robustlens.analysis.ingest.pipeline import InitOptions

        options = dict(
            data=self.data,
            labels=self.labels,
            predictions=list(self.predictions.items()),
            model=str(SAMPLE_DATA / "model.pt"),
            model_config=SAMPLE_DATA / "model.json",
            progress=False,
        )
        return InitOptions(**(options | overrides))


def copy_workspace(source: Path, destination: Path) -> Path:
    """Copy a workspace directory (its curation DB included) to ``destination``."""
    shutil.copytree(source, destination)
    return destination


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255.0


def _save(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8), "L").save(path)


def second_predictions(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A weaker second model ``(N, K)``: softened probabilities with 6 % of rows' classes shuffled."""
    softened = probabilities**0.6
    rows = rng.random(len(softened)) < 0.06
    softened[rows] = softened[rows][:, rng.permutation(softened.shape[1])]
    return (softened / softened.sum(axis=1, keepdims=True)).astype(np.float32)


def write_planted_inputs(directory: Path, *, seed: int = 0) -> PlantedInputs:
    """Write the planted dataset, manifest and prediction files under ``directory`` (see the module docstring).

    The shipped ``sample_data`` is only read.
    """
    directory = Path(directory)
    labels = pd.read_csv(SAMPLE_DATA / "labels.csv")
    predictions = pd.read_csv(SAMPLE_DATA / "predictions.csv").set_index("path").loc[labels["path"]]
    rng = np.random.default_rng(seed)
    labels["split"] = np.where(rng.random(len(labels)) < 0.75, "train", "test")
    second = second_predictions(predictions.to_numpy(dtype=np.float32), rng)

    data = directory / "data"
    shutil.copytree(SAMPLE_DATA / "images", data / "images")
    plant = np.random.default_rng(seed + 1)
    unused = pd.Series(True, index=labels.index)

    def take(mask: np.ndarray, count: int) -> list[int]:
        chosen = plant.choice(np.flatnonzero(mask & unused.to_numpy()), size=count, replace=False).tolist()
        unused[chosen] = False
        return chosen

    label = labels["label"].to_numpy()
    split = labels["split"].to_numpy()
    dark = [i for c in DARK_CLASSES for i in take(label == c, 4)] + take(~np.isin(label, DARK_CLASSES), 4)
    for i in dark:
        _save(data / labels["path"][i], _load(data / labels["path"][i]) * 0.08)
    blurry = take(np.ones(len(labels), dtype=bool), 12)
    for i in blurry:
        path = data / labels["path"][i]
        _save(path, ndimage.gaussian_filter(_load(path), plant.uniform(1.5, 2.0)))
    light = take(np.ones(len(labels), dtype=bool), 8)
    for i in light:
        _save(data / labels["path"][i], 0.85 + 0.15 * _load(data / labels["path"][i]))
    blank = take(np.ones(len(labels), dtype=bool), 8)
    for number, i in enumerate(blank):
        level = np.full((28, 28), plant.uniform(0.3, 0.7))
        _save(data / labels["path"][i], level + (plant.normal(0.0, 1.5 / 255.0, level.shape) if number % 2 else 0.0))
    pairs: dict[bool, list[tuple[int, int]]] = {True: [], False: []}
    for leaking in (True,) * 4 + (False,) * 2:
        (original,) = take(np.ones(len(labels), dtype=bool), 1)
        other_split = split != split[original] if leaking else split == split[original]
        (copy,) = take((label == label[original]) & other_split, 1)
        noisy = _load(data / labels["path"][original]) + plant.normal(0.0, 2.0 / 255.0, (28, 28))
        _save(data / labels["path"][copy], noisy)
        pairs[leaking].append((original, copy))

    labels = labels[["path", "label", "split", "source_index"]]
    labels.to_csv(directory / "labels.csv", index=False)
    predictions.reset_index().to_csv(directory / "cnn.csv", index=False, float_format="%.6f")
    second_frame = pd.DataFrame(second, columns=predictions.columns)
    second_frame.insert(0, "path", labels["path"].to_numpy())
    second_frame.to_parquet(directory / f"{SECOND_SET}.parquet", index=False)
    ids = labels["path"].to_numpy()
    return PlantedInputs(
        data=data,
        labels=directory / "labels.csv",
        predictions={"cnn": directory / "cnn.csv", SECOND_SET: directory / f"{SECOND_SET}.parquet"},
        dark=frozenset(ids[dark]),
        light=frozenset(ids[light]),
        blurry=frozenset(ids[blurry]),
        low_information=frozenset(ids[blank]),
        near_pairs=tuple((ids[a], ids[b]) for a, b in pairs[False]),
        leaking_pairs=tuple((ids[a], ids[b]) for a, b in pairs[True]),
    )


def build_analysed_workspace(root: Path, inputs: PlantedInputs, *, random_state: int = 0) -> Workspace:
    """``robustlens init`` of ``inputs`` at ``root``, then every analysis stage; returns the workspace."""
    from robustlens.analysis.ingest.pipeline import init_workspace

    init_workspace(root, inputs.init_options())
    return write_analysis_artifacts(root, random_state=random_state)


def write_analysis_artifacts(root: Path, *, random_state: int = 0) -> Workspace:
    """Run every analysis stage (:func:`robustlens.analysis.analyze.analyze`, robustness not included) on the
    workspace at ``root`` as it is; returns the reopened workspace."""
    from robustlens.analysis.analyze import analyze

    analyze(Workspace(root), progress=False, random_state=random_state)
    return Workspace(root)


# -- large synthetic workspaces (benchmarks) ----------------------------------------------------------
def synthetic_workspace(
    root: Path, num_samples: int, *, image_source: Path, seed: int = 0, num_classes: int = 10, images: int = 64
) -> Workspace:
    """A workspace of ``num_samples`` rows built from arrays (no decoding), with every dashboard artifact.

    Rows cycle over ``images`` real image files copied from ``image_source`` (a folder of images). Too large for
    the stages to run in a benchmark's setup, its artifacts are random values under the stages' column names
    (the metric names come from the metric registry).
    """
    from robustlens.analysis.metric_registry import available_metrics

    rng = np.random.default_rng(seed)
    root = Path(root)
    data = root.parent / f"{root.name}-data"
    data.mkdir(parents=True, exist_ok=True)
    files = sorted(Path(image_source).glob("*.png"))[:images]
    for file in files:
        shutil.copyfile(file, data / file.name)
    classes = [f"class_{k}" for k in range(num_classes)]
    label_index = rng.integers(0, num_classes, num_samples).astype(np.int32)
    which = np.arange(num_samples) % len(files)
    names = np.array([f.name for f in files])
    ids = np.char.add("s", np.arange(num_samples).astype(str)).astype(object)
    samples = pd.DataFrame(
        {
            "id": ids,
            "path": names[which],
            "label": np.array(classes)[label_index],
            "label_index": label_index,
            "split": np.where(rng.random(num_samples) < 0.8, "train", "test"),
            "width": 28,
            "height": 28,
            "mode": "L",
            "channels": 1,
            "bit_depth": 8,
            "file_size": rng.integers(300, 700, num_samples),
            "content_hash": np.char.add("h", which.astype(str)).astype(object),
            "meta.camera": np.array(["a", "b", "c"])[rng.integers(0, 3, num_samples)],
        }
    )
    root.mkdir(parents=True, exist_ok=True)
    storage.write_parquet(root / "samples.parquet", samples)
    logits = rng.normal(size=(num_samples, num_classes)).astype(np.float32)
    logits[np.arange(num_samples), label_index] += 3.0
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    storage.write_npy(root / "predictions/model.npy", probabilities.astype(np.float32))
    manifest = {
        "format_version": 1,
        "created_with": "benchmark",
        "created_at": "2026-01-01T00:00:00+00:00",
        "dataset": {"root": str(data.resolve()), "kind": "manifest", "manifest": None},
        "classes": classes,
        "splits": ["test", "train"],
        "metadata_columns": ["meta.camera"],
        "num_samples": num_samples,
        "prediction_sets": {
            "model": {
                "file": "predictions/model.npy",
                "source": "synthetic",
                "score_kind": "probabilities",
                "renormalized_rows": 0,
                "dropped_rows": 0,
            }
        },
        "embeddings": None,
        "model": None,
        "db_url": None,
    }
    storage.write_json(root / "workspace.json", manifest)
    storage.write_json(root / "ingest_report.json", {"skipped": [], "warnings": []})
    workspace = Workspace(root)
    metric_values = {name: rng.random(num_samples).astype(np.float32) for name in available_metrics()}
    storage.write_parquet(workspace.artifact_path("metrics.parquet"), pd.DataFrame({"id": ids, **metric_values}))
    issue_names = ("dark", "light", "blurry", "near_duplicate", "outlier", "label_issue")
    matrix = pd.DataFrame({"id": ids})
    for name in issue_names:
        matrix[name] = np.where(rng.random(num_samples) < 0.03, rng.random(num_samples), 0.0)
    matrix["issue_count"] = (matrix[list(issue_names)] > 0).sum(axis=1)
    matrix["max_severity"] = matrix[list(issue_names)].max(axis=1)
    storage.write_parquet(workspace.artifact_path("issue_matrix.parquet"), matrix)
    flagged = matrix.melt(id_vars="id", value_vars=list(issue_names), var_name="issue", value_name="severity")
    flagged = flagged[flagged["severity"] > 0].assign(explanation="synthetic", stage="synthetic")
    storage.write_parquet(workspace.artifact_path("issues.parquet"), flagged)
    storage.write_parquet(
        workspace.artifact_path("projection.parquet"),
        pd.DataFrame({"id": ids, "x": rng.normal(size=num_samples) + label_index, "y": rng.normal(size=num_samples)}),
    )
    quality = probabilities[np.arange(num_samples), label_index]
    suggested = probabilities.argmax(axis=1)
    rank = np.empty(num_samples, dtype=int)
    rank[np.argsort(quality)] = np.arange(1, num_samples + 1)
    storage.write_parquet(
        workspace.artifact_path("label_issues.parquet"),
        pd.DataFrame(
            {
                "id": ids,
                "given_label": samples["label"],
                "suggested_label": np.array(classes)[suggested],
                "given_label_probability": quality,
                "suggested_label_probability": probabilities.max(axis=1),
                "label_quality": quality,
                "is_label_issue": (suggested != label_index) & (quality < 0.1),
                "rank": rank,
            }
        ),
    )
    near = np.full(num_samples, -1)
    paired = rng.choice(num_samples, size=(num_samples // 100) * 2, replace=False)
    near[paired] = np.arange(len(paired)) // 2  # 1% of the samples in near-duplicate pairs
    first = np.zeros(num_samples, dtype=bool)
    first[paired[::2]] = True
    splits = samples["split"].to_numpy()
    cross = np.zeros(num_samples, dtype=bool)
    cross[paired] = np.repeat(splits[paired[::2]] != splits[paired[1::2]], 2)
    storage.write_parquet(
        workspace.artifact_path("duplicates.parquet"),
        pd.DataFrame(
            {
                "id": ids,
                "exact_group": -1,
                "near_group": near,
                "group_size": np.where(near >= 0, 2, 1),
                "is_representative": (near < 0) | first,
                "cross_split": cross,
            }
        ),
    )
    embeddings = rng.normal(size=(num_samples, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    storage.write_npy(workspace.artifact_path("embeddings.npy"), embeddings)
    workspace.curation().close()
    return workspace


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# -- pytest fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def planted_inputs(tmp_path_factory) -> PlantedInputs:
    """The planted input files of :func:`analysed_template` and their ground truth (session-wide, read-only)."""
    return write_planted_inputs(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def analysed_template(planted_inputs, tmp_path_factory) -> Path:
    """A workspace of the planted sample data with every analysis stage run (session-wide; copy it before
    writing)."""
    root = tmp_path_factory.mktemp("analysed") / "ws"
    build_analysed_workspace(root, planted_inputs)
    return root


@pytest.fixture
def analysed_workspace(analysed_template, tmp_path) -> Path:
    """A private copy of :func:`analysed_template` (own curation database) for a test that writes."""
    return copy_workspace(analysed_template, tmp_path / "ws")
