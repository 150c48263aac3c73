"""Calibration artefacts: round trips, versioning, corruption and model-identity checks."""

import json

import pytest
import torch

from kvsurgery.calibration import Artefact, ModelIdentity, load, save
from kvsurgery.errors import CalibrationError
from kvsurgery.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


def _artefact(model) -> Artefact:
    return Artefact("headkv", ModelIdentity.of(model), {"seed": 0}, {"scores": [[0.5, 0.25], [0.125, 0.125]]})


def test_json_round_trip_and_identity(tmp_path, model):
    path = save(_artefact(model), tmp_path / "scores.json")
    loaded = load(path, "headkv", model)
    assert loaded.data == {"scores": [[0.5, 0.25], [0.125, 0.125]]} and loaded.params == {"seed": 0}
    assert loaded.model == ModelIdentity.of(model)


def test_safetensors_round_trip(tmp_path, model):
    art = _artefact(model)
    art.tensors = {"channels": torch.arange(12, dtype=torch.int32).view(3, 4)}
    path = save(art, tmp_path / "channels.safetensors")
    assert torch.equal(load(path, "headkv", model).tensors["channels"], art.tensors["channels"])
    with pytest.raises(CalibrationError, match=r"must be saved as \.safetensors"):
        save(art, tmp_path / "channels.json")


def test_another_model_is_refused(tmp_path, model):
    path = save(_artefact(model), tmp_path / "scores.json")
    other_weights = tiny_model("llama", seed=1)
    with pytest.raises(CalibrationError, match=r"made for another model.*fingerprint"):
        load(path, "headkv", other_weights)
    other_shape = tiny_model("llama", layers=3)
    with pytest.raises(CalibrationError, match="n_layers: 2 vs 3"):
        load(path, "headkv", other_shape)


def test_corrupt_wrong_version_wrong_method(tmp_path, model):
    path = save(_artefact(model), tmp_path / "scores.json")
    with pytest.raises(CalibrationError, match="holds a 'headkv' calibration, not 'prefixkv'"):
        load(path, "prefixkv", model)
    header = json.loads(path.read_text())
    header["version"] = 99
    path.write_text(json.dumps(header))
    with pytest.raises(CalibrationError, match="format version 99"):
        load(path, "headkv", model)
    path.write_text(path.read_text()[:40])
    with pytest.raises(CalibrationError, match="corrupt or truncated"):
        load(path, "headkv", model)
    (tmp_path / "x.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(CalibrationError, match=r"\.json or \.safetensors"):
        load(tmp_path / "x.pkl", "headkv", model)
    with pytest.raises(CalibrationError, match="does not exist"):
        load(tmp_path / "missing.json", "headkv", model)
