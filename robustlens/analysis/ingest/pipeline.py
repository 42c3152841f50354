"""``robustlens init``: validate every input, then write a new workspace.

Everything is read and validated before the first byte is written (the model is run on a batch of
the dataset's own images, and a ``--db`` URL is opened), so a bad input leaves no half-built
workspace. A new workspace is assembled in a hidden staging folder next to the target and renamed
into place at the end, so a failure mid-write (a full disk) leaves nothing behind either; a
``--force`` rebuild writes each file atomically and ``workspace.json`` last. The user's files are only
read (the model file is copied).
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from robustlens import __version__
from robustlens.analysis import storage
from robustlens.analysis.images import DEFAULT_MAX_PIXELS
from robustlens.analysis.ingest.dataset import DatasetScan, scan_dataset
from robustlens.analysis.ingest.embeddings import load_embeddings
from robustlens.analysis.ingest.model import ModelConfig, check_model_on_images, load_model, load_model_config
from robustlens.analysis.ingest.predictions import DEFAULT_SUM_TOLERANCE, PredictionSet, load_predictions
from robustlens.analysis.names import validate_name
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


#: Sample images the model is run on at init (shape, class count and NaN checks); two, like the probe
#: batch, because a torch.export archive may be specialised to the batch size it was exported with.
MODEL_CHECK_IMAGES = 2


def parse_prediction_arg(text: str) -> tuple[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after the file stem); the name must pass :func:`validate_name`."""
    if "=" in text and not Path(text).exists():
        name, _, path = text.partition("=")
        name = name.strip()
        if not name:
            raise ValidationError(f"--predictions '{text}': empty prediction-set name before '='")
        validate_name("--predictions: prediction-set name", name)
        return name, Path(path)
    name = Path(text).stem
    try:
        validate_name("--predictions: prediction-set name", name)
    except ValidationError as exc:
        raise ValidationError(f"{exc} (the name comes from the file name; give one with NAME=PATH)") from exc
    return name, Path(text)


def validate_options(options: InitOptions) -> None:
    """Reject option values that would fail late or poison the analysis (NaN tolerances, 0 workers …)."""
    tolerance = options.sum_tolerance
    if not isinstance(tolerance, int | float) or not math.isfinite(tolerance) or not 0 <= tolerance < 1:
        raise ValidationError(f"--sum-tolerance must be a finite number in [0, 1), got {tolerance!r}")
    if options.workers is not None and (
        isinstance(options.workers, bool) or not isinstance(options.workers, int) or options.workers < 1
    ):
        raise ValidationError(f"--workers must be a positive integer, got {options.workers!r}")
    if isinstance(options.max_pixels, bool) or not isinstance(options.max_pixels, int) or options.max_pixels < 1:
        raise ValidationError(f"--max-pixels must be a positive integer, got {options.max_pixels!r}")
    for name, _ in options.predictions:
        validate_name("--predictions: prediction-set name", name)


def init_workspace(root: str | Path, options: InitOptions) -> tuple[Workspace, list[str]]:
    """Create (or with ``force`` rebuild) the workspace at ``root``; returns it and the warnings."""
    root = Path(root)
    data = Path(options.data)
    validate_options(options)
    _check_destination(root, data, force=options.force)
    scan = scan_dataset(
        data, options.labels, max_pixels=options.max_pixels, workers=options.workers, progress=options.progress
    )
    warnings = list(scan.warnings)
    samples = scan.samples

    model_config = None
    model_entry = None
    if options.model is not None:
        config_path = options.model_config or _default_config_path(options.model)
        if config_path is None:
            raise ValidationError(
                f"--model {options.model} needs its preprocessing config (--model-config "
                "model.json with input_size, channels, mean, std)"
            )
        model_config = load_model_config(config_path)

    labels = set(samples["label"])
    classes = _class_order(
        options.classes, model_config.classes if model_config else None, labels, source=options.labels or data
    )
    samples.insert(
        samples.columns.get_loc("label") + 1,
        "label_index",
        samples["label"].map({c: i for i, c in enumerate(classes)}).astype(np.int32),
    )

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
        prediction_set = load_predictions(
            path,
            name=name,
            sample_ids=sample_ids,
            sample_paths=samples["path"].tolist(),
            classes=classes,
            order=scan.order,
            npy_classes=options.classes,
            skipped_ids=skipped_ids,
            scores=options.scores,
            sum_tolerance=options.sum_tolerance,
        )
        warnings.extend(prediction_set.warnings)
        prediction_sets.append(prediction_set)

    embeddings = None
    if options.embeddings is not None:
        embeddings = load_embeddings(options.embeddings, sample_ids=sample_ids, order=scan.order)

    if options.model is not None and model_config is not None:  # a model always comes with its config (above)
        model_entry = _validate_model(options.model, model_config, classes, data, samples)

    previous = _previous_manifest(root) if options.force else None
    db_url = options.db_url or (previous or {}).get("db_url")
    if db_url:
        check_db_url(
            db_url,
            option="--db"
            if options.db_url
            else f"the db_url kept from {root / MANIFEST_NAME} (pass --db URL to replace it)",
        )

    # Validation is over: write.
    rebuild = options.force and (root / MANIFEST_NAME).exists()
    write = _rebuild_workspace if rebuild else _write_new_workspace
    write(
        root,
        data,
        options,
        scan,
        samples,
        classes,
        prediction_sets,
        embeddings,
        model_entry,
        model_config,
        warnings,
        db_url,
    )
    workspace = Workspace(root)
    workspace.curation().close()  # creates / migrates the curation database now, not on first click
    return workspace, warnings


def check_db_url(url: str, *, option: str = "--db") -> None:
    """Open (and create / migrate) the curation database at ``url``; a :class:`ValidationError` if it fails."""
    from sqlalchemy.exc import SQLAlchemyError

    from robustlens.analysis.curation import CurationStore

    try:
        CurationStore(url).close()
    except WorkspaceError as exc:
        # The store's own CurationDatabaseError already says what failed (not a URL, no driver, unreachable).
        raise ValidationError(f"{option} {_redact(url)!r}: {exc}") from exc
    except (SQLAlchemyError, ImportError, OSError, ValueError) as exc:
        lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise ValidationError(
            f"{option} {_redact(url)!r}: cannot open the curation database "
            f"({type(exc).__name__}: {lines[0] if lines else ''}); expected a SQLAlchemy URL such "
            "as sqlite:////abs/path/curation.db or postgresql+psycopg://user@host/db"
        ) from exc


def _redact(url: str) -> str:
    """``url`` without its password (messages may end up in logs)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is shown as given
        return url


def _write_new_workspace(root: Path, data: Path, options: InitOptions, *parts: Any) -> None:
    """Assemble the workspace in a staging folder beside ``root``, then rename it into place."""
    root.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes a 0700 folder): the workspace gets the usual umask permissions.
    staging = root.parent / f".{root.name}.init-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        _write_workspace(staging, data, options, *parts)
        if root.exists():
            root.rmdir()  # checked empty by _check_destination; rename() needs it gone on every OS
        os.rename(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _rebuild_workspace(root: Path, data: Path, options: InitOptions, *parts: Any) -> None:
    """``--force``: write the new files in a staging folder inside ``root``, then rename each into place.

    The slow part (writing) cannot leave a mix of old and new files: until every new file is complete the
    old workspace is untouched; the renames that follow cannot run out of space, and ``workspace.json``
    is renamed last.
    """
    staging = root / f".rebuild-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        _write_workspace(staging, data, options, *parts)
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == MANIFEST_NAME)
        for source in files:
            target = root / source.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_workspace(
    root: Path,
    data: Path,
    options: InitOptions,
    scan: DatasetScan,
    samples: pd.DataFrame,
    classes: list[str],
    prediction_sets: list[PredictionSet],
    embeddings: np.ndarray | None,
    model_entry: dict | None,
    model_config: ModelConfig | None,
    warnings: list[str],
    db_url: str | None,
) -> None:
    root.mkdir(parents=True, exist_ok=True)
    samples = _parquet_safe(samples)
    storage.write_parquet(root / "samples.parquet", samples)
    manifest_sets = {}
    for prediction_set in prediction_sets:
        relative = f"predictions/{prediction_set.name}.npy"
        storage.write_npy(root / relative, prediction_set.probabilities)
        manifest_sets[prediction_set.name] = {
            "file": relative,
            "source": str(Path(prediction_set.source).resolve()),
            "score_kind": prediction_set.score_kind,
            "renormalized_rows": prediction_set.renormalized_rows,
            "dropped_rows": prediction_set.dropped_rows,
            "in_sample": prediction_set.name in options.in_sample,
        }
    embeddings_entry = None
    if embeddings is not None and options.embeddings is not None:
        storage.write_npy(root / "embeddings/imported.npy", embeddings)
        embeddings_entry = {
            "file": "embeddings/imported.npy",
            "source": str(Path(options.embeddings).resolve()),
            "dim": int(embeddings.shape[1]),
        }
    if model_entry is not None and model_entry["kind"] == "torchscript":
        source = Path(model_entry.pop("source_file"))
        # Keep the suffix: it tells the loader whether the copy is TorchScript (.pt) or torch.export (.pt2).
        copied = f"model/model{source.suffix or '.pt'}"
        storage.atomic_write(root / copied, lambda tmp: shutil.copyfile(source, tmp))
        model_entry["file"] = copied
        model_entry["source"] = str(source.resolve())
    if model_entry is not None and model_config is not None:
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
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_with": f"robustlens {__version__}",
        "created_at": report["created_at"],
        "dataset": {
            "root": str(data.resolve()),
            "kind": scan.kind,
            "manifest": str(Path(options.labels).resolve()) if options.labels else None,
        },
        "classes": classes,
        "splits": sorted(samples["split"].unique().tolist()),
        "metadata_columns": [c for c in samples.columns if c.startswith("meta.")],
        "num_samples": int(len(samples)),
        "prediction_sets": manifest_sets,
        "embeddings": embeddings_entry,
        "model": model_entry,
        "db_url": db_url,
    }
    storage.write_json(root / MANIFEST_NAME, manifest)


def _check_destination(root: Path, data: Path, *, force: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ValidationError("the workspace path is a file, not a folder; choose a new workspace path", file=root)
    for parent in Path(os.path.abspath(root)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValidationError(f"the workspace path is under {parent}, which is a file, not a folder", file=root)
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValidationError(f"cannot create the workspace: {parent} is not writable", file=root)
            break
    real_root = Path(os.path.realpath(root))
    real_data = Path(os.path.realpath(data))
    if real_root == real_data or real_data in real_root.parents:
        raise ValidationError(
            "the workspace must not be inside the dataset folder (robustlens never writes "
            "into the user's data); choose another workspace path",
            file=root,
        )
    if (root / MANIFEST_NAME).exists():
        if not force:
            raise ValidationError(
                "already a robustlens workspace; pass --force to rebuild its artifacts "
                "(tags, collections and review decisions are kept)",
                file=root,
            )
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


def _class_order(
    explicit: list[str] | None, model_classes: list[str] | None, labels: set[str], *, source: Path
) -> list[str]:
    if explicit is not None:
        if len(set(explicit)) != len(explicit):
            raise ValidationError(f"--classes has repeated names: {explicit}")
        missing = sorted(labels - set(explicit))
        if missing:
            raise ValidationError(
                f"dataset labels {missing} are not in --classes {explicit}", file=source, column="label"
            )
        extra = [c for c in explicit if c not in labels]
        if extra:
            raise ValidationError(
                f"class-count mismatch: --classes names {len(explicit)} classes, the dataset "
                f"has {len(labels)}; not in the dataset: {extra}"
            )
        return list(explicit)
    if model_classes is not None:
        ordered = [c for c in model_classes if c in labels]
        missing = sorted(labels - set(ordered))
        if missing:
            raise ValidationError(
                f"dataset labels {missing} are not among the model's classes {model_classes}",
                file=source,
                column="label",
            )
        return ordered
    return sorted(labels)


def _validate_model(spec: str, config: ModelConfig, classes: list[str], data: Path, samples: pd.DataFrame) -> dict:
    """Load the model and run it on a few dataset images (shape, class count, finite output)."""
    path = Path(spec)
    if path.exists():
        model = load_model(path, config, classes)
        entry = {"kind": "torchscript", "source_file": str(path)}
    else:
        base_dir = str(Path.cwd())
        model = load_model(spec, config, classes, base_dir=base_dir)
        entry = {"kind": "factory", "factory": spec, "base_dir": base_dir}
    from robustlens.analysis.images import ImageProblem, read_pixels

    paths, pixels = [], []
    for relative in samples["path"].head(MODEL_CHECK_IMAGES):
        with suppress(ImageProblem):  # verified moments ago; a file that vanished since is not the model's fault
            pixels.append(read_pixels(data / relative))
            paths.append(relative)
    check_model_on_images(model, pixels, classes, paths=paths)
    return entry


def _parquet_safe(samples: pd.DataFrame) -> pd.DataFrame:
    """Metadata columns of mixed Python types are stored as text so Parquet accepts them."""
    samples = samples.copy()
    for column in samples.columns:
        if column.startswith("meta.") and samples[column].dtype == object:
            kinds = {type(v) for v in samples[column].dropna()}
            if len(kinds) > 1:
                samples[column] = samples[column].map(lambda v: None if pd.isna(v) else str(v))
    return samples
