"""Workspaces built from the shipped sample data, shared by the fixtures of several test modules."""

from __future__ import annotations

from pathlib import Path

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"


def build_sample_workspace(root: Path, *, model: bool = True) -> Path:
    """``robustlens init`` of the 2,000 shipped sample images at ``root``: their labels, the ``cnn`` prediction set
    and (unless ``model=False``) the sample CNN with its config. Returns ``root``."""
    from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace

    options = InitOptions(
        data=SAMPLE_DATA,
        labels=SAMPLE_DATA / "labels.csv",
        predictions=[("cnn", SAMPLE_DATA / "predictions.csv")],
        model=str(SAMPLE_DATA / "model.pt") if model else None,
        model_config=SAMPLE_DATA / "model.json" if model else None,
        progress=False,
    )
    init_workspace(root, options)
    return root
