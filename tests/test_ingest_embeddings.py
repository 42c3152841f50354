"""Imported embeddings: .npy in manifest order and Parquet keyed by id."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustlens.analysis.ingest.embeddings import load_embeddings
from robustlens.errors import ValidationError

IDS = ["a", "b", "c"]
VECTORS = np.arange(12, dtype=np.float64).reshape(3, 4)


def test_npy_keeps_rows_of_ingested_samples(tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, VECTORS)
    result = load_embeddings(path, sample_ids=["a", "c"], order=IDS)
    np.testing.assert_array_equal(result, VECTORS[[0, 2]].astype(np.float32))


def test_parquet_list_column_by_id(tmp_path):
    path = tmp_path / "e.parquet"
    pd.DataFrame({"id": ["c", "a", "b"], "embedding": [VECTORS[2], VECTORS[0], VECTORS[1]]}).to_parquet(path)
    np.testing.assert_array_equal(load_embeddings(path, sample_ids=IDS, order=IDS), VECTORS.astype(np.float32))


def test_parquet_wide_columns(tmp_path):
    path = tmp_path / "e.parquet"
    frame = pd.DataFrame(VECTORS, columns=[f"d{i}" for i in range(4)])
    frame.insert(0, "id", IDS)
    frame.to_parquet(path)
    np.testing.assert_array_equal(load_embeddings(path, sample_ids=IDS, order=IDS), VECTORS.astype(np.float32))


def test_row_count_mismatch(tmp_path):
    path = tmp_path / "e.npy"
    np.save(path, VECTORS[:2])
    with pytest.raises(ValidationError, match="2 rows but the dataset lists 3"):
        load_embeddings(path, sample_ids=IDS, order=IDS)


def test_non_finite(tmp_path):
    bad = VECTORS.copy()
    bad[1, 2] = np.nan
    path = tmp_path / "e.npy"
    np.save(path, bad)
    with pytest.raises(ValidationError, match="non-finite value for sample 'b'") as info:
        load_embeddings(path, sample_ids=IDS, order=IDS)
    assert info.value.row == 2


def test_missing_samples(tmp_path):
    path = tmp_path / "e.parquet"
    pd.DataFrame({"id": ["a"], "embedding": [VECTORS[0]]}).to_parquet(path)
    with pytest.raises(ValidationError, match="missing for 2 samples"):
        load_embeddings(path, sample_ids=IDS, order=IDS)
