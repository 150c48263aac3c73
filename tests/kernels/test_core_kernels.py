"""Triton kernels against the float64 reference: decode attention (split-KV, GQA, sliding window, H2O
accumulation) and the sync-free append/evict. On CPU they run under TRITON_INTERPRET=1 (fp32, tiny shapes);
the CUDA variants (bf16 tolerances, real launch shapes) skip without a GPU."""

import contextlib
import os
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import example, given, settings

from kvsurgery.kernels import append, decode_attention
from kvsurgery.kernels import split_kv_attention as attention_module
from kvsurgery.reference import core as ref
from kvsurgery.store import LayerTensors

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
cpu_interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1 (conftest)")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclass(frozen=True)
class StoreCase:
    batch: int
    n_kv: int
    group: int  # query heads per KV head
    d: int
    caps: tuple[int, ...]  # segment capacity per KV head
    lengths: tuple[tuple[int, ...], ...]  # filled slots per (row, KV head); a row of zeros is a padding row
    holes: bool  # some filled slots are empty (pos = -1)
    extra: int  # seen - longest segment
    window: int  # sliding window (0 = none)
    n_splits: int
    block_n: int
    seed: int


@st.composite
def store_cases(draw, max_cap: int = 12, dims=(4, 8), groups=(1, 2, 3, 4), splits=(1, 2, 3), blocks=(4, 8)):
    n_kv = draw(st.integers(1, 3))
    batch = draw(st.integers(1, 3))
    caps = tuple(draw(st.integers(0, max_cap)) for _ in range(n_kv))
    if not sum(caps):
        caps = (1, *caps[1:])
    lengths = [tuple(draw(st.integers(0, c)) for c in caps) for _ in range(batch)]
    if draw(st.booleans()):
        lengths[draw(st.integers(0, batch - 1))] = (0,) * n_kv  # a padding row: nothing stored
    return StoreCase(
        batch=batch,
        n_kv=n_kv,
        group=draw(st.sampled_from(groups)),
        d=draw(st.sampled_from(dims)),
        caps=caps,
        lengths=tuple(lengths),
        holes=draw(st.booleans()),
        extra=draw(st.integers(0, 8)),
        window=draw(st.sampled_from([0, 0, 1, 3, 7])),
        n_splits=draw(st.sampled_from(splits)),
        block_n=draw(st.sampled_from(blocks)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def build_store(c: StoreCase, dtype: torch.dtype, device: str):
    """Random store tensors; slots past `length` hold garbage keys and plausible positions (must be ignored)."""
    g = torch.Generator().manual_seed(c.seed)
    n_slots = sum(c.caps)
    seen = max(max(row) for row in c.lengths) + c.extra
    k = torch.randn(c.batch, n_slots, c.d, generator=g, dtype=torch.float64)
    v = torch.randn(c.batch, n_slots, c.d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, max(seen, 1), (c.batch, n_slots), generator=g, dtype=torch.int32)
    caps = torch.tensor(c.caps, dtype=torch.int32)
    start = (caps.cumsum(0) - caps).to(torch.int32).expand(c.batch, -1).contiguous()
    length = torch.tensor(c.lengths, dtype=torch.int32)
    for b in range(c.batch):
        for h in range(c.n_kv):
            n, s0 = c.lengths[b][h], int(start[b, h])
            pos[b, s0 : s0 + n] = torch.randperm(seen, generator=g)[:n].to(torch.int32)
            if c.holes and n > 1:
                pos[b, s0 + int(torch.randint(0, n, (1,), generator=g))] = -1
    q = torch.randn(c.batch, c.n_kv * c.group, 1, c.d, generator=g, dtype=torch.float64)
    score = torch.rand(c.batch, n_slots, generator=g)
    tensors = dict(q=q, k_store=k, v_store=v, pos=pos, start=start, length=length, seen=torch.tensor(seen))
    tensors = {
        name: t.to(device=device, dtype=dtype if t.dtype == torch.float64 else t.dtype) for name, t in tensors.items()
    }
    return tensors, score.to(device)


@contextlib.contextmanager
def poisoned_workspace():
    """Every output and workspace buffer starts as NaN: anything the kernels leave unwritten shows up."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention_module, "_empty", lambda shape, dtype, device: torch.full(shape, torch.nan, device=device))
        mp.setattr(attention_module, "_empty_like", lambda t: torch.full_like(t, torch.nan))
        yield


def reference_attention(t: dict, scale: float, window: int, score: torch.Tensor | None = None):
    as64 = {name: x.double() if x.is_floating_point() else x for name, x in t.items()}
    q = as64.pop("q")
    if score is None:
        return ref.attend(q, LayerTensors(**as64), scale, window), None
    score = score.clone()
    return ref.attend_accumulate_(q, LayerTensors(**as64, slot_score=score), scale, window), score


def check_attention(c: StoreCase, dtype, device, accumulate: bool, n_splits, block_n, tol):
    t, score = build_store(c, dtype, device)
    scale = c.d**-0.5
    expected, expected_score = reference_attention(t, scale, c.window, score if accumulate else None)
    got_score = score.clone() if accumulate else None
    store = LayerTensors(**{n: x for n, x in t.items() if n != "q"}, slot_score=got_score)
    with poisoned_workspace():
        out = decode_attention(t["q"], store, scale, c.window, accumulate, n_splits=n_splits, block_n=block_n)
    assert out.shape == t["q"].shape and out.dtype == dtype
    assert not out.isnan().any(), "every output element is written"
    err = (out.double() - expected.to(out.device)).norm() / expected.norm().clamp_min(1e-30)
    assert err <= tol or (expected.norm() == 0 and out.norm() == 0), f"relative error {err:.2e} > {tol}"
    if accumulate:
        torch.testing.assert_close(got_score, expected_score, rtol=tol, atol=tol)


@cpu_interpreter
@settings(max_examples=10)
@given(c=store_cases(), accumulate=st.booleans())
@example(  # one long segment over several splits and blocks, GQA 4, sliding window, one empty head
    c=StoreCase(2, 2, 4, 8, (3, 12), ((3, 12), (0, 11)), False, 5, 7, 3, 4, 0), accumulate=True
)
def test_decode_attention_matches_reference_on_cpu(c, accumulate):
    check_attention(c, torch.float32, "cpu", accumulate, c.n_splits, c.block_n, tol=1e-5)


@cpu_interpreter
def test_empty_segments_give_zero_output_like_the_reference():
    c = StoreCase(1, 2, 2, 4, (2, 3), ((0, 0),), False, 3, 0, 2, 4, 1)
    t, _ = build_store(c, torch.float32, "cpu")
    with poisoned_workspace():
        q = t.pop("q")
        out = decode_attention(q, LayerTensors(**t), 0.5, 0, n_splits=2, block_n=4)
    assert torch.equal(out, torch.zeros_like(out))


@dataclass(frozen=True)
class AppendCase:
    batch: int
    keep: tuple[int, ...]
    room: int
    d: int
    t: int  # prompt length
    sinks: int
    window: int
    evict: bool
    by_score: bool
    score_new: str
    steps: int
    block: int
    tied: bool  # slot scores with many ties (broken by slot order)
    seed: int


@st.composite
def append_cases(draw):
    n_kv = draw(st.integers(1, 3))
    evict = draw(st.booleans())
    return AppendCase(
        batch=draw(st.integers(1, 2)),
        keep=tuple(draw(st.integers(1, 7)) for _ in range(n_kv)),
        room=0 if evict else draw(st.integers(3, 4)),
        d=draw(st.sampled_from([4, 8])),
        t=draw(st.integers(2, 10)),
        sinks=draw(st.integers(0, 3)),
        window=draw(st.integers(0, 3)),
        evict=evict,
        by_score=evict and draw(st.booleans()),
        score_new=draw(st.sampled_from(["position", "zero"])),
        steps=draw(st.integers(1, 3)),
        block=draw(st.sampled_from([2, 4, 16])),
        tied=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_append(c: AppendCase, dtype, device):
    """Prefill a store with the reference, then decode `steps` tokens with kernel and reference: bit-equal."""
    from kvsurgery.store import LayerPlan, StoreLayer

    g = torch.Generator().manual_seed(c.seed)
    plan = LayerPlan(0, c.keep, c.room, c.evict, c.d, c.d, score_slots=c.by_score or c.score_new == "position")
    expected = StoreLayer(plan, c.batch, dtype, torch.device("cpu"))
    n_kv = len(c.keep)
    k = torch.randn(c.batch, n_kv, c.t, c.d, generator=g).to(dtype)
    scores = torch.rand(c.batch, n_kv, c.t, generator=g)
    ref.select_compact_(expected.named(), k, k, scores, None, None, c.sinks, c.window)
    got = expected.named().map(lambda x: x.clone().to(device))
    for _ in range(c.steps):
        k_new = torch.randn(c.batch, n_kv, 1, c.d, generator=g).to(dtype)
        v_new = torch.randn(c.batch, n_kv, 1, c.d, generator=g).to(dtype)
        if expected.slot_score.numel():  # decode-time score changes (as H2O's accumulation makes)
            bump = torch.rand(expected.slot_score.shape, generator=g)
            if c.tied:
                expected.slot_score.copy_((bump * 2).floor())
            else:
                expected.slot_score.add_(bump)
            got.slot_score.copy_(expected.slot_score)
        policy = (c.sinks, c.window, c.evict, c.by_score, c.score_new)
        ref.append_(expected.named(), k_new, v_new, *policy)
        append(got, k_new.to(device), v_new.to(device), *policy, block=c.block)
    for name, want, have in zip(plan.tensor_names, expected.tensors(), got.take(plan.tensor_names), strict=True):
        assert torch.equal(want, have.cpu()), f"{name} differs from the reference"


@cpu_interpreter
@settings(max_examples=10)
@given(c=append_cases())
@example(c=AppendCase(2, (3, 5), 0, 4, 9, 2, 2, True, True, "zero", 3, 2, False, 7))  # H2O-like, multi-block
@example(c=AppendCase(1, (6, 7), 0, 4, 9, 0, 0, True, True, "zero", 2, 2, True, 3))  # tied scores across blocks
def test_append_matches_reference_bit_for_bit_on_cpu(c):
    check_append(c, torch.float32, "cpu")


def test_kernels_are_the_cuda_implementations_of_the_decode_ops():
    for op in ("attend", "attend_accumulate_", "append_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kvsurgery::{op}", "CUDA"), op
        # CPU (and everything else) keeps the reference, registered as the op's default implementation
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kvsurgery::{op}", "CompositeExplicitAutograd"), op


# -- CUDA: bf16, real launch shapes (default splits and block), and through the ops ---------------------------


@gpu
@settings(max_examples=20)
@given(
    c=store_cases(max_cap=300, dims=(64, 128), groups=(1, 4, 8), splits=(None,), blocks=(64,)),
    accumulate=st.booleans(),
)
def test_decode_attention_matches_reference_on_gpu_bf16(c, accumulate):
    check_attention(c, torch.bfloat16, "cuda", accumulate, None, 64, tol=2e-2)


@gpu
@settings(max_examples=10)
@given(c=store_cases(max_cap=200, dims=(64,), groups=(1, 4), splits=(1, 7), blocks=(16, 64)))
def test_decode_attention_matches_reference_on_gpu_fp32(c):
    check_attention(c, torch.float32, "cuda", False, c.n_splits, c.block_n, tol=1e-5)


@gpu
@settings(max_examples=10)
@given(c=append_cases())
def test_append_matches_reference_on_gpu(c):
    check_append(c, torch.bfloat16, "cuda")


@gpu
def test_ops_dispatch_to_the_kernels_on_cuda():
    c = StoreCase(2, 2, 4, 64, (40, 90), ((40, 77), (3, 0)), False, 9, 0, 1, 64, 3)
    t, score = build_store(c, torch.bfloat16, "cuda")
    args = [t[n] for n in ("q", "k_store", "v_store", "pos")]
    tables = [t[n] for n in ("start", "length", "seen")]
    out = torch.ops.kvsurgery.attend(*args, *tables, 0.125, 0)
    expected, _ = reference_attention(t, 0.125, 0)
    assert (out.double() - expected).norm() / expected.norm() < 2e-2
    got_score = score.clone()
    torch.ops.kvsurgery.attend_accumulate_(*args, got_score, *tables, 0.125, 0)
    _, expected_score = reference_attention(t, 0.125, 0, score)
    torch.testing.assert_close(got_score, expected_score, rtol=2e-2, atol=2e-3)
    torch.library.opcheck(torch.ops.kvsurgery.attend.default, (*args, *tables, 0.125, 0))
