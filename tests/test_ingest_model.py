"""Model loading: TorchScript and factories, config validation, normalization inside the wrapper."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from robustlens.analysis.ingest.model import config_from_dict, load_model, load_model_config, prepare_images
from robustlens.errors import ValidationError
from tests.model_factories import MeanModel

CONFIG = {"input_size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.25]}


def _config(**changes):
    payload = dict(CONFIG)
    payload.update(changes)
    return config_from_dict(payload)


def test_torchscript_model_gets_normalized_input_and_eval_mode(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.script(MeanModel(3)).save(str(path))
    model = load_model(path, _config(), ["a", "b", "c"])
    assert not model.training
    model.train()  # must stay in eval mode: dropout would make results random
    assert not model.training
    images = torch.full((2, 1, 8, 8), 0.75)
    logits = model(images)
    expected_mean = (0.75 - 0.5) / 0.25
    torch.testing.assert_close(logits, torch.tensor([[1.0, 2.0, 3.0]] * 2) * expected_mean)
    torch.testing.assert_close(model(images), logits)  # deterministic: dropout is off


def test_factory_model(tmp_path):
    model = load_model("tests.model_factories:three_classes", _config(), ["a", "b", "c"])
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 3)


def test_model_classes_are_mapped_to_workspace_order(tmp_path):
    model = load_model("tests.model_factories:three_classes", _config(classes=["x", "y", "z"]), ["z", "x", "y"])
    logits = model(torch.ones(1, 1, 8, 8))
    torch.testing.assert_close(logits, torch.tensor([[3.0, 1.0, 2.0]]) * 2.0)


def test_output_size_mismatch(tmp_path):
    with pytest.raises(ValidationError, match=r"class-count mismatch: the model outputs shape \(2, 3\)"):
        load_model("tests.model_factories:three_classes", _config(), ["a", "b"])


def test_dataset_class_unknown_to_model():
    with pytest.raises(ValidationError, match=r"\['w'\] are not among the model's classes"):
        load_model("tests.model_factories:three_classes", _config(classes=["x", "y", "z"]), ["x", "w"])


def test_factory_returning_non_module():
    with pytest.raises(ValidationError, match="returned str, expected torch.nn.Module"):
        load_model("tests.model_factories:not_a_module", _config(), ["a", "b", "c"])


def test_unimportable_factory():
    with pytest.raises(ValidationError, match="cannot import model factory module 'no_such_module'"):
        load_model("no_such_module:make", _config(), ["a"])


def test_corrupt_torchscript_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ValidationError, match="not a loadable TorchScript file") as info:
        load_model(path, _config(), ["a", "b", "c"])
    assert info.value.file == str(path)


class _Flat64(torch.nn.Module):
    """Accepts exactly 64 input values per sample."""

    def forward(self, x):
        return torch.nn.functional.linear(x.flatten(1), torch.zeros(3, 64))


def test_config_input_size_that_the_model_rejects(tmp_path):
    path = tmp_path / "strict.pt"
    torch.jit.script(_Flat64()).save(str(path))
    assert load_model(path, _config(), ["a", "b", "c"])(torch.zeros(1, 1, 8, 8)).shape == (1, 3)
    with pytest.raises(ValidationError, match=r"the model failed on an input of shape \(2, 1, 4, 4\)"):
        load_model(path, _config(input_size=[4, 4]), ["a", "b", "c"])


@pytest.mark.parametrize(
    "payload,field",
    [
        ({"channels": 1, "mean": [0.5], "std": [0.2]}, "input_size"),
        ({"input_size": [8, 8], "channels": 2, "mean": [0.5, 0.5], "std": [1, 1]}, "channels"),
        ({"input_size": [8, 8], "channels": 3, "mean": [0.5], "std": [1, 1, 1]}, "mean"),
        ({"input_size": [8, -1], "channels": 1, "mean": [0.5], "std": [1]}, "input_size"),
        ({"input_size": [8, 8], "channels": 1, "mean": [0.5], "std": [0]}, "std"),
    ],
)
def test_config_validation_names_the_field(tmp_path, payload, field):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(ValidationError) as info:
        load_model_config(path)
    assert info.value.column == field and info.value.file == str(path)


def test_config_that_is_not_json(tmp_path):
    path = tmp_path / "model.json"
    path.write_text("{input_size: 28")
    with pytest.raises(ValidationError, match="not valid JSON"):
        load_model_config(path)


def test_prepare_images_converts_channels_and_size():
    rgb = np.zeros((16, 16, 3), dtype=np.float32)
    rgb[..., 0] = 1.0
    gray = np.full((8, 8, 1), 0.5, dtype=np.float32)
    batch = prepare_images([rgb, gray], _config())
    assert batch.shape == (2, 1, 8, 8)
    torch.testing.assert_close(batch[0], torch.full((1, 8, 8), 0.299))
    torch.testing.assert_close(batch[1], torch.full((1, 8, 8), 0.5))
    three = prepare_images([gray], _config(channels=3, mean=[0, 0, 0], std=[1, 1, 1]))
    assert three.shape == (1, 3, 8, 8)
