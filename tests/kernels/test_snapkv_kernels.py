"""Triton prefill scoring reduction (SnapKV `score_window`) against the float64 reference: causal, padded (bool)
and additive masks, GQA, windows up to the prompt length, pooling. CPU: TRITON_INTERPRET=1 (fp32, tiny shapes);
the CUDA variants skip without a GPU."""

import contextlib
import os
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import example, given, settings

from kvsurgery.kernels import score_window, window_attention_mass
from kvsurgery.kernels import snapkv_window as scores_module
from kvsurgery.reference import snapkv as ref
from kvsurgery.reference.core import allowed_keys

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
cpu_interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1 (conftest)")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclass(frozen=True)
class ScoreCase:
    batch: int
    n_kv: int
    group: int
    t: int
    d: int
    window: int
    mask: str  # "causal" (None), "bool" (left padding), "additive" (left padding, float mask), "sliding"
    kernel: int
    pool: str
    block_n: int
    chunk: int
    seed: int


@st.composite
def score_cases(draw, max_t: int = 40, dims=(4, 8, 16), groups=(1, 2, 3, 4), blocks=(16, 32)):
    block_n = draw(st.sampled_from(blocks))
    return ScoreCase(
        batch=draw(st.integers(1, 2)),
        n_kv=draw(st.integers(1, 3)),
        group=draw(st.sampled_from(groups)),
        t=draw(st.integers(1, max_t)),
        d=draw(st.sampled_from(dims)),
        window=draw(st.integers(1, 12)),
        mask=draw(st.sampled_from(["causal", "bool", "additive", "sliding"])),
        kernel=draw(st.sampled_from([1, 3, 5])),
        pool=draw(st.sampled_from(["max", "avg"])),
        block_n=block_n,
        chunk=block_n * draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_inputs(c: ScoreCase, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(c.seed)
    q = torch.randn(c.batch, c.n_kv * c.group, c.t, c.d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(c.batch, c.n_kv, c.t, c.d, generator=g, dtype=torch.float64)
    mask = None
    if c.mask != "causal":
        pads = torch.randint(0, c.t, (c.batch,), generator=g)
        keys, queries = torch.arange(c.t)[None, None, :], torch.arange(c.t)[None, :, None]
        allowed = (keys <= queries) & (keys >= pads[:, None, None])
        if c.mask == "sliding":
            allowed &= keys > queries - 4
        mask = allowed[:, None]
        if c.mask == "additive":
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return q.to(device, dtype), k.to(device, dtype), None if mask is None else mask.to(device)


@contextlib.contextmanager
def poisoned_workspace():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scores_module, "_empty", lambda shape, dtype, device: torch.full(shape, torch.nan, device=device))
        yield


def check_scores(c: ScoreCase, dtype, device, block_n, chunk, tol):
    q, k, mask = build_inputs(c, dtype, device)
    scale = c.d**-0.5
    q64, k64, mask_cpu = q.double().cpu(), k.double().cpu(), None if mask is None else mask.cpu()
    expected = ref.window_scores(q64, k64, mask_cpu, scale, c.window, c.kernel, c.pool)
    w = min(c.window, c.t)
    allowed = allowed_keys(mask, c.t - w, c.t, c.t, c.batch).to(device)
    with poisoned_workspace():
        mass = window_attention_mass(q, k, allowed, scale, block_n=block_n, chunk=chunk)  # this case's launch shape
        out = score_window(q, k, mask, scale, c.window, c.kernel, c.pool)  # the op's CUDA implementation
    for got, want in ((mass, ref.window_scores(q64, k64, mask_cpu, scale, c.window, 1, "max")), (out, expected)):
        assert got.shape == want.shape and got.dtype == torch.float32
        assert not got.isnan().any(), "every output element is written"
        torch.testing.assert_close(got.double().cpu(), want.double(), rtol=tol, atol=tol * 1e-1)


@cpu_interpreter
@settings(max_examples=12)
@given(c=score_cases())
@example(c=ScoreCase(2, 2, 4, 37, 8, 12, "bool", 5, "max", 16, 16, 1))  # several chunks and row blocks, padding
@example(c=ScoreCase(1, 1, 1, 3, 4, 8, "causal", 3, "avg", 16, 32, 2))  # window longer than the prompt
def test_window_scores_match_reference_on_cpu(c):
    check_scores(c, torch.float32, "cpu", c.block_n, c.chunk, tol=1e-5)


def test_kernel_is_the_cuda_implementation_of_score_window():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("kvsurgery::score_window", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("kvsurgery::score_window", "CompositeExplicitAutograd")


@gpu
@settings(max_examples=20)
@given(c=score_cases(max_t=600, dims=(64, 128), groups=(1, 4, 8), blocks=(64,)))
def test_window_scores_match_reference_on_gpu_bf16(c):
    check_scores(c, torch.bfloat16, "cuda", 64, 1024, tol=2e-2)


@gpu
def test_score_window_op_dispatches_to_the_kernel_on_cuda():
    c = ScoreCase(2, 2, 4, 700, 64, 32, "bool", 7, "max", 64, 256, 3)
    q, k, mask = build_inputs(c, torch.bfloat16, "cuda")
    out = torch.ops.kvsurgery.score_window(q, k, mask, 0.125, 32, 7, "max")
    expected = ref.window_scores(q.double().cpu(), k.double().cpu(), mask.cpu(), 0.125, 32, 7, "max")
    assert (out.double().cpu() - expected).norm() / expected.norm() < 2e-2
    torch.library.opcheck(torch.ops.kvsurgery.score_window.default, (q, k, mask, 0.125, 32, 7, "max"))
