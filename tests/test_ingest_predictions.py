"""Prediction files: formats, detection of logits, alignment, and every bad value."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustlens.analysis.ingest.predictions import load_predictions
from robustlens.errors import ValidationError

IDS = ["s0", "s1", "s2", "s3"]
PATHS = ["a/0.png", "a/1.png", "b/2.png", "b/3.png"]
CLASSES = ["a", "b", "c"]
PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.25, 0.25, 0.5]])


def _load(path, **kwargs):
    params = dict(name="m", sample_ids=IDS, sample_paths=PATHS, classes=CLASSES, order=IDS)
    params.update(kwargs)
    return load_predictions(path, **params)


def _table(tmp_path, matrix, *, key="id", keys=None, columns=None, suffix=".csv"):
    frame = pd.DataFrame(matrix, columns=columns or CLASSES)
    frame.insert(0, key, keys if keys is not None else (IDS if key == "id" else PATHS))
    path = tmp_path / f"preds{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


def test_csv_by_id(tmp_path):
    result = _load(_table(tmp_path, PROBS))
    np.testing.assert_allclose(result.probabilities, PROBS, rtol=1e-6)
    assert result.score_kind == "probabilities" and result.probabilities.dtype == np.float32


def test_parquet_by_path_in_other_row_and_column_order(tmp_path):
    order = [2, 0, 3, 1]
    frame_columns = ["c", "a", "b"]
    shuffled = PROBS[order][:, [2, 0, 1]]
    path = _table(
        tmp_path, shuffled, key="path", keys=[PATHS[i] for i in order], columns=frame_columns, suffix=".parquet"
    )
    np.testing.assert_allclose(_load(path).probabilities, PROBS, rtol=1e-6)


def test_logits_are_detected_and_softmaxed(tmp_path):
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0], [1.0, 1.0, 1.0], [-5.0, 4.0, 0.0]])
    result = _load(_table(tmp_path, logits))
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert result.score_kind == "logits"
    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5)


def test_forced_logits_even_when_values_look_like_probabilities(tmp_path):
    result = _load(_table(tmp_path, PROBS), scores="logits")
    assert result.score_kind == "logits"
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(result.probabilities, PROBS)


def test_npy_in_manifest_order_with_class_order(tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, PROBS[:, [1, 0, 2]])
    result = _load(path, npy_classes=["b", "a", "c"])
    np.testing.assert_allclose(result.probabilities, PROBS, rtol=1e-6)


def test_npy_skips_rows_of_images_skipped_at_ingest(tmp_path):
    path = tmp_path / "p.npy"
    full = np.vstack([PROBS[:2], [[1.0, 0.0, 0.0]], PROBS[2:]])
    np.save(path, full)
    result = _load(path, order=IDS[:2] + ["broken"] + IDS[2:], npy_classes=CLASSES, skipped_ids={"broken"})
    np.testing.assert_allclose(result.probabilities, PROBS, rtol=1e-6)
    assert result.dropped_rows == 1


def test_npy_without_class_order_is_an_error(tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, PROBS)
    with pytest.raises(ValidationError, match="needs the class order"):
        _load(path)


def test_npy_class_count_mismatch(tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, PROBS[:, :2])
    with pytest.raises(ValidationError, match="class-count mismatch"):
        _load(path, npy_classes=CLASSES)


def test_npy_row_count_mismatch(tmp_path):
    path = tmp_path / "p.npy"
    np.save(path, PROBS[:3])
    with pytest.raises(ValidationError, match="3 rows but the dataset lists 4"):
        _load(path, npy_classes=CLASSES)


def test_label_not_in_dataset(tmp_path):
    path = _table(tmp_path, np.hstack([PROBS * 0.9, np.full((4, 1), 0.1)]), columns=CLASSES + ["zebra"])
    with pytest.raises(ValidationError, match=r"labels \['zebra'\] are not classes of the dataset") as info:
        _load(path)
    assert info.value.column == "zebra"


def test_class_missing_from_predictions(tmp_path):
    two = PROBS[:, :2] / PROBS[:, :2].sum(axis=1, keepdims=True)
    with pytest.raises(ValidationError, match=r"class-count mismatch: 2 class columns for 3 .* missing \['c'\]"):
        _load(_table(tmp_path, two, columns=["a", "b"]))


@pytest.mark.parametrize("value,message", [(np.nan, "NaN"), (np.inf, "infinite")])
def test_non_finite_values_name_row_and_column(tmp_path, value, message):
    bad = PROBS.copy()
    bad[2, 1] = value
    with pytest.raises(ValidationError, match=message) as info:
        _load(_table(tmp_path, bad))
    assert (info.value.row, info.value.column) == (3, "b")


def test_negative_probability_is_rejected_not_read_as_logits(tmp_path):
    bad = PROBS.copy()
    bad[1] = [1.1, -0.1, 0.0]  # sums to 1 but is not a probability vector
    with pytest.raises(ValidationError, match="negative probability") as info:
        _load(_table(tmp_path, bad))
    assert (info.value.row, info.value.column) == (2, "b")


def test_negative_value_with_declared_probabilities(tmp_path):
    logits = np.array([[2.0, -1.0, 0.5]] * 4)
    with pytest.raises(ValidationError, match="negative probability"):
        _load(_table(tmp_path, logits), scores="probabilities")


def test_rows_slightly_off_are_renormalised_with_a_warning(tmp_path):
    off = PROBS.copy()
    off[0] *= 1.02
    result = _load(_table(tmp_path, off))
    assert result.renormalized_rows == 1
    assert "renormalised" in result.warnings[0]
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(result.probabilities[0], PROBS[0], rtol=1e-6)


def test_rows_far_off_are_rejected(tmp_path):
    off = PROBS.copy()
    off[3] = [0.2, 0.2, 0.2]
    with pytest.raises(ValidationError, match="sum to 0.6000") as info:
        _load(_table(tmp_path, off))
    assert info.value.row == 4


def test_duplicate_ids(tmp_path):
    with pytest.raises(ValidationError, match="duplicate ids: 's1' appears in rows \\[2, 3\\]"):
        _load(_table(tmp_path, PROBS, keys=["s0", "s1", "s1", "s3"]))


def test_missing_predictions_for_some_samples(tmp_path):
    path = _table(tmp_path, PROBS[:3], keys=IDS[:3])
    with pytest.raises(ValidationError, match=r"missing for 1 of 4 samples \(first: \['s3'\]\)"):
        _load(path)


def test_rows_for_unknown_samples(tmp_path):
    with pytest.raises(ValidationError, match="not in the dataset .*'ghost'") as info:
        _load(_table(tmp_path, PROBS, keys=["s0", "s1", "s2", "ghost"]))
    assert info.value.row == 4


def test_non_numeric_value(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("id,a,b,c\ns0,0.5,0.5,0\ns1,high,0.5,0.5\n")
    with pytest.raises(ValidationError, match="non-numeric value 'high'") as info:
        _load(path)
    assert (info.value.row, info.value.column) == (2, "a")


def test_no_key_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("name,a,b,c\ns0,0.5,0.5,0\n")
    with pytest.raises(ValidationError, match="needs an 'id' or 'path' column"):
        _load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValidationError, match="file not found"):
        _load(tmp_path / "nope.csv")
