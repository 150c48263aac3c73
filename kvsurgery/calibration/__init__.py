"""Offline calibration: small, versioned artefacts (JSON or safetensors) bound to the model they describe."""

from kvsurgery.calibration.artefact import Artefact, ModelIdentity, load, save

__all__ = ["Artefact", "ModelIdentity", "load", "save"]
