"""``robustlens init``: validate every input, then write a new workspace.

Everything is read and validated before the first byte is written, so a bad input leaves no
half-built workspace; each file is written atomically and ``workspace.json`` last, so a workspace
without it is not a workspace. The user's files are only read (the model file is copied).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from robustlens import __version__
from robustlens.analysis import storage
from robustlens.analysis.images import DEFAULT_MAX_PIXELS
from robustlens.analysis.ingest.dataset import scan_dataset
from robustlens.analysis.ingest.embeddings import load_embeddings
from robustlens.analysis.ingest.model import load_model, load_model_config
from robustlens.analysis.ingest.predictions import DEFAULT_SUM_TOLERANCE, PredictionSet, load_predictions
from robustlens.analysis.workspace import FORMAT_VERSION, MANIFEST_NAME, Workspace
from robustlens.errors import ValidationError, WorkspaceError


@dataclass
class InitOptions:
    """Inputs of :func:`init_workspace` (the CLI flags of ``robustlens init``)."""

    data: Path
    labels: Path | None = None
    predictions: list[tuple[str, Path]] = field(default_factory=list)
    #: Names of prediction sets made by a model that saw these images in training (not out-of-sample):
    #: label-issue detection then uses cross-validated probabilities instead.
    in_sample: list[str] = field(default_factory=list)
    classes: list[str] | None = None
    model: str | None = None
    model_config: Path | None = None
    embeddings: Path | None = None
    db_url: str | None = None
    scores: str = "auto"
    sum_tolerance: float = DEFAULT_SUM_TOLERANCE
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int | None = None
    force: bool = False
    progress: bool = True


def parse_prediction_arg(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after the file stem)."""
    if "=" in text and not Path(text).exists():
        name, _, path = text.partition("=")
        name = name.strip()
        if not name:
            raise ValidationError(f"--predictions '{text}': empty prediction-set name before '='")
        return name, Path(path)
    return Path(text).stem, Path(text)


def init_workspace(root: str | Path, options: InitOptions) -> tuple[Workspace, list[str]]:
    """Create (or with ``force`` rebuild) the workspace at ``root``; returns it and the warnings."""
    root = Path(root)
    data = Path(options.data)
    _check_destination(root, data, force=options.force)
    scan = scan_dataset(data, options.labels, max_pixels=options.max_pixels, workers=options.workers,
                        progress=options.progress)
    warnings = list(scan.warnings)
    samples = scan.samples

    model_config = None
    model_entry = None
    if options.model is not None:
        config_path = options.model_config or _default_config_path(options.model)
        if config_path is None:
            raise ValidationError(f"--model {options.model} needs its preprocessing config (--model-config "
                                  "model.json with input_size, channels, mean, std)")
        model_config = load_model_config(config_path)

    labels = set(samples["label"])
    classes = _class_order(options.classes, model_config.classes if model_config else None, labels,
                           source=options.labels or data)
    samples.insert(samples.columns.get_loc("label") + 1, "label_index",
                   samples["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int32))

    sample_ids = samples["id"].tolist()
    prediction_sets: list[PredictionSet] = []
    names = [name for name, _ in options.predictions]
    if len(set(names)) != len(names):
        raise ValidationError(f"prediction-set names must be unique, got {names}; use NAME=PATH")
    unknown_in_sample = sorted(set(options.in_sample) - set(names))
    if unknown_in_sample:
        raise ValidationError(f"--in-sample names {unknown_in_sample} are not prediction sets (have: {names})")
    skipped_ids = {entry["id"] for entry in scan.skipped}
    for name, path in options.predictions:
        prediction_set = load_predictions(path, name=name, sample_ids=sample_ids,
                                          sample_paths=samples["path"].tolist(), classes=classes, order=scan.order,
                                          npy_classes=options.classes, skipped_ids=skipped_ids,
                                          scores=options.scores, sum_tolerance=options.sum_tolerance)
        warnings.extend(prediction_set.warnings)
        prediction_sets.append(prediction_set)

    embeddings = None
    if options.embeddings is not None:
        embeddings = load_embeddings(options.embeddings, sample_ids=sample_ids, order=scan.order)

    if options.model is not None:
        model_entry = _validate_model(options.model, model_config, classes)

    # Validation is over: write.
    root.mkdir(parents=True, exist_ok=True)
    samples = _parquet_safe(samples)
    storage.write_parquet(root / "samples.parquet", samples)
    manifest_sets = {}
    for prediction_set in prediction_sets:
        relative = f"predictions/{prediction_set.name}.npy"
        storage.write_npy(root / relative, prediction_set.probabilities)
        manifest_sets[prediction_set.name] = {
            "file": relative, "source": str(Path(prediction_set.source).resolve()),
            "score_kind": prediction_set.score_kind, "renormalized_rows": prediction_set.renormalized_rows,
            "dropped_rows": prediction_set.dropped_rows, "in_sample": prediction_set.name in options.in_sample}
    embeddings_entry = None
    if embeddings is not None:
        storage.write_npy(root / "embeddings/imported.npy", embeddings)
        embeddings_entry = {"file": "embeddings/imported.npy", "source": str(Path(options.embeddings).resolve()),
                            "dim": int(embeddings.shape[1])}
    if model_entry is not None and model_entry["kind"] == "torchscript":
        source = Path(model_entry.pop("source_file"))
        # Keep the suffix: it tells the loader whether the copy is TorchScript (.pt) or torch.export (.pt2).
        copied = f"model/model{source.suffix or '.pt'}"
        storage.atomic_write(root / copied, lambda tmp: shutil.copyfile(source, tmp))
        model_entry["file"] = copied
        model_entry["source"] = str(source.resolve())
    if model_entry is not None:
        model_entry["config"] = model_config.to_dict()
        storage.write_json(root / "model/config.json", model_entry["config"])

    report = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dataset_kind": scan.kind,
        "listed": len(scan.order),
        "ingested": len(samples),
        "skipped": scan.skipped,
        "ignored_files": scan.ignored_files,
        "warnings": warnings,
    }
    storage.write_json(root / "ingest_report.json", report)
    previous = _previous_manifest(root)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_with": f"robustlens {__version__}",
        "created_at": report["created_at"],
        "dataset": {"root": str(data.resolve()), "kind": scan.kind,
                    "manifest": str(Path(options.labels).resolve()) if options.labels else None},
        "classes": classes,
        "splits": sorted(samples["split"].unique().tolist()),
        "metadata_columns": [c for c in samples.columns if c.startswith("meta.")],
        "num_samples": int(len(samples)),
        "prediction_sets": manifest_sets,
        "embeddings": embeddings_entry,
        "model": model_entry,
        "db_url": options.db_url or (previous or {}).get("db_url"),
    }
    storage.write_json(root / MANIFEST_NAME, manifest)
    workspace = Workspace(root)
    workspace.curation().close()  # creates / migrates the curation database now, not on first click
    return workspace, warnings


def _check_destination(root: Path, data: Path, *, force: bool) -> None:
    real_root = Path(os.path.realpath(root))
    real_data = Path(os.path.realpath(data))
    if real_root == real_data or real_data in real_root.parents:
        raise ValidationError("the workspace must not be inside the dataset folder (robustlens never writes "
                              "into the user's data); choose another workspace path", file=root)
    if (root / MANIFEST_NAME).exists():
        if not force:
            raise ValidationError("already a robustlens workspace; pass --force to rebuild its artifacts "
                                  "(tags, collections and review decisions are kept)", file=root)
    elif root.exists() and any(root.iterdir()):
        raise ValidationError("directory exists and is not empty; choose a new workspace path", file=root)


def _previous_manifest(root: Path) -> dict | None:
    try:
        return Workspace(root).manifest
    except (WorkspaceError, OSError):  # an unreadable old manifest is simply replaced
        return None


def _default_config_path(model: str) -> Path | None:
    path = Path(model)
    for candidate in (path.with_suffix(".json"), path.parent / "model.json"):
        if path.exists() and candidate.exists():
            return candidate
    return None


def _class_order(explicit: list[str] | None, model_classes: list[str] | None, labels: set[str],
                 *, source: Path) -> list[str]:
    if explicit is not None:
        if len(set(explicit)) != len(explicit):
            raise ValidationError(f"--classes has repeated names: {explicit}")
        missing = sorted(labels - set(explicit))
        if missing:
            raise ValidationError(f"dataset labels {missing} are not in --classes {explicit}", file=source,
                                  column="label")
        extra = [c for c in explicit if c not in labels]
        if extra:
            raise ValidationError(f"class-count mismatch: --classes names {len(explicit)} classes, the dataset "
                                  f"has {len(labels)}; not in the dataset: {extra}")
        return list(explicit)
    if model_classes is not None:
        ordered = [c for c in model_classes if c in labels]
        missing = sorted(labels - set(ordered))
        if missing:
            raise ValidationError(f"dataset labels {missing} are not among the model's classes {model_classes}",
                                  file=source, column="label")
        return ordered
    return sorted(labels)


def _validate_model(spec: str, config, classes: list[str]) -> dict:
    path = Path(spec)
    if path.exists():
        load_model(path, config, classes)
        return {"kind": "torchscript", "source_file": str(path)}
    base_dir = str(Path.cwd())
    load_model(spec, config, classes, base_dir=base_dir)
    return {"kind": "factory", "factory": spec, "base_dir": base_dir}


def _parquet_safe(samples: pd.DataFrame) -> pd.DataFrame:
    """Metadata columns of mixed Python types are stored as text so Parquet accepts them."""
    samples = samples.copy()
    for column in samples.columns:
        if column.startswith("meta.") and samples[column].dtype == object:
            kinds = {type(v) for v in samples[column].dropna()}
            if len(kinds) > 1:
                samples[column] = samples[column].map(lambda v: None if pd.isna(v) else str(v))
    return samples
