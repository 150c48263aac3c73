"""Calibration artefacts: what a method learned about one model, saved as JSON (small data) or safetensors
(tensors, with the same header in its metadata). Never pickle.

Every artefact records its format version, the method, the parameters used, and the identity of the model
(class, shapes and a fingerprint of its weights), so loading one for another model is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from dataclasses import asdict, dataclass, field

import torch

from kvsurgery.errors import CalibrationError

FORMAT = "kvsurgery-calibration"
VERSION = 1


@dataclass(frozen=True)
class ModelIdentity:
    """Enough of a model to tell whether an artefact belongs to it."""

    model_class: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    fingerprint: str  # sha256 of the first rows of the input embeddings

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelIdentity:
        text = model.config.get_text_config(decoder=True)
        n_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
        weights = model.get_input_embeddings().weight.detach()
        if hasattr(weights, "full_tensor"):  # a DTensor, sharded by tensor parallelism: the whole table (collective)
            weights = weights.full_tensor()
        weights = weights[:64].float().cpu().contiguous()
        return cls(
            model_class=type(model).__name__,
            n_layers=text.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            vocab_size=text.vocab_size,
            fingerprint=hashlib.sha256(weights.numpy().tobytes()).hexdigest()[:16],
        )

    def mismatch(self, other: ModelIdentity) -> list[str]:
        """Fields that differ, as 'field: artefact vs model' strings."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]


@dataclass
class Artefact:
    method: str
    model: ModelIdentity
    params: dict = field(default_factory=dict)  # how it was calibrated (seed, lengths, ...)
    data: dict = field(default_factory=dict)  # JSON-able results (lists, numbers, strings)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # only in .safetensors files

    def header(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": self.method,
            "model": asdict(self.model),
            "params": self.params,
            "data": self.data,
        }

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise if this artefact was calibrated on another model."""
        diff = self.model.mismatch(ModelIdentity.of(model))
        if diff:
            raise CalibrationError(
                f"this {self.method} calibration was made for another model ({'; '.join(diff)}); "
                f"recalibrate on this model: kvsurgery calibrate {self.method} --model ... --out ..."
            )


def save(artefact: Artefact, path: str | pathlib.Path) -> pathlib.Path:
    """Write `.json` (no tensors) or `.safetensors` (tensors + the JSON header as metadata)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = artefact.header()
    if path.suffix == ".json":
        if artefact.tensors:
            raise CalibrationError(f"{path}: artefacts with tensors must be saved as .safetensors")
        path.write_text(json.dumps(header, indent=1))
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in artefact.tensors.items()}
        save_file(tensors, str(path), metadata={"kvsurgery": json.dumps(header)})
    else:
        raise CalibrationError(f"{path}: calibration artefacts are .json or .safetensors files")
    return path


def _read_header(path: pathlib.Path) -> tuple[dict, dict[str, torch.Tensor]]:
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text()), {}
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = (f.metadata() or {}).get("kvsurgery")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta is None:
                raise CalibrationError(f"{path} is a safetensors file without a kvsurgery calibration header")
            return json.loads(meta), tensors
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, ValueError) as exc:
        if isinstance(exc, CalibrationError):
            raise
        raise CalibrationError(f"calibration file {path} is corrupt or truncated ({exc}); recalibrate") from exc
    raise CalibrationError(f"{path}: calibration artefacts are .json or .safetensors files")


def load(path: str | pathlib.Path, method: str, model: torch.nn.Module | None = None) -> Artefact:
    """Read and validate an artefact: format, version, method, and (given `model`) that it belongs to it."""
    path = pathlib.Path(path)
    header, tensors = _read_header(path)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CalibrationError(f"{path} is not a kvsurgery calibration artefact")
    if header.get("version") != VERSION:
        raise CalibrationError(
            f"{path} has calibration format version {header.get('version')}, this kvsurgery reads version "
            f"{VERSION}; recalibrate with this version"
        )
    if header.get("method") != method:
        raise CalibrationError(f"{path} holds a '{header.get('method')}' calibration, not '{method}'")
    try:
        identity = ModelIdentity(**header["model"])
        artefact = Artefact(method, identity, dict(header["params"]), dict(header["data"]), tensors)
    except (KeyError, TypeError) as exc:
        raise CalibrationError(f"{path} is missing calibration fields ({exc}); recalibrate") from exc
    if model is not None:
        artefact.check_model(model)
    return artefact
