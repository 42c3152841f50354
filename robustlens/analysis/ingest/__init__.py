"""Ingestion: validate a dataset, prediction sets, embeddings and a model, never touching the user's files."""

from robustlens.analysis.ingest.dataset import DatasetScan, scan_dataset
from robustlens.analysis.ingest.embeddings import load_embeddings
from robustlens.analysis.ingest.model import ModelConfig, NormalizedModel, load_model, load_model_config
from robustlens.analysis.ingest.predictions import PredictionSet, load_predictions

__all__ = [
    "DatasetScan",
    "scan_dataset",
    "PredictionSet",
    "load_predictions",
    "load_embeddings",
    "ModelConfig",
    "NormalizedModel",
    "load_model",
    "load_model_config",
]
