"""Triton kernels of the quantized store and of Double Sparsity against their float64 references: the fused
1/2/4-bit dequantization decode attention (`attend_quantized`) and the top-k gather attention (`sparse_attend`).
On CPU they run under TRITON_INTERPRET=1 (fp32, tiny shapes); the CUDA variants skip without a GPU."""

import contextlib
import os
from dataclasses import dataclass

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import example, given, settings

from kvsurgery.kernels import append_quantized_without_sync, gather_attention, quantized_decode_attention
from kvsurgery.kernels import doublesparse_gather as gather_module
from kvsurgery.kernels import quant_attention as quant_module
from kvsurgery.kernels import sparse_attend as sparse_attend_kernel
from kvsurgery.kernels.quant_append import flush_residual_without_sync
from kvsurgery.reference import doublesparse as sa
from kvsurgery.reference import quant as qref
from kvsurgery.reference.quant_codes import QuantSpec
from kvsurgery.reference.quant_layout import QuantLayout
from kvsurgery.store import LABEL_TENSORS, QUANT_TENSORS, LayerTensors

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
cpu_interpreter = pytest.mark.skipif(not INTERPRETED, reason="CPU kernel tests need TRITON_INTERPRET=1 (conftest)")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextlib.contextmanager
def poisoned(module):
    """Every output and workspace buffer of `module`'s launches starts as NaN: unwritten elements show up."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "_empty", lambda shape, dtype, device: torch.full(shape, torch.nan, device=device))
        mp.setattr(module, "_empty_like", lambda t: torch.full_like(t, torch.nan))
        yield


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.double().cpu() - expected.cpu()).norm() / expected.norm().clamp_min(1e-30))


# -- fused dequantization decode attention --------------------------------------------------------------------


@dataclass(frozen=True)
class QuantCase:
    batch: int
    n_kv: int
    group: int  # query heads per KV head
    d: int
    layout: QuantLayout
    packed_caps: tuple[int, ...]  # packed slots per KV head (multiples of the layout's alignment)
    packed_lens: tuple[tuple[int, ...], ...]  # packed tokens per (row, KV head)
    dense_caps: tuple[int, ...]
    dense_lens: tuple[tuple[int, ...], ...]
    holes: bool  # some dense slots are empty (pos = -1)
    squeeze: float
    n_splits: int
    block_n: int
    seed: int


@st.composite
def specs(draw, bits: int, d: int) -> QuantSpec:
    axis = draw(st.sampled_from(["channel", "token"]))
    if axis == "token":
        return QuantSpec(bits, "token", draw(st.sampled_from([g for g in (2, 4, 8) if d % g == 0])))
    return QuantSpec(bits, "channel", draw(st.sampled_from([0, 2, 4])))


@st.composite
def quant_cases(draw, max_tokens: int = 14, dims=(8, 16), groups=(1, 2, 3, 4), splits=(1, 2, 3), blocks=(4, 8)):
    n_kv, batch, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.sampled_from(dims))
    k_bits, v_bits = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    layout = QuantLayout(draw(specs(k_bits, d)), draw(specs(v_bits, d)))
    align = layout.align
    packed_caps = tuple(align * draw(st.integers(0, max_tokens // align + 1)) for _ in range(n_kv))
    dense_caps = tuple(draw(st.integers(0, max_tokens)) for _ in range(n_kv))
    if not sum(dense_caps):
        dense_caps = (1, *dense_caps[1:])
    packed_lens = [tuple(draw(st.integers(0, c)) for c in packed_caps) for _ in range(batch)]
    dense_lens = [tuple(draw(st.integers(0, c)) for c in dense_caps) for _ in range(batch)]
    if draw(st.booleans()):  # a padding row: nothing stored at all
        row = draw(st.integers(0, batch - 1))
        packed_lens[row], dense_lens[row] = (0,) * n_kv, (0,) * n_kv
    return QuantCase(
        batch=batch,
        n_kv=n_kv,
        group=draw(st.sampled_from(groups)),
        d=d,
        layout=layout,
        packed_caps=packed_caps,
        packed_lens=tuple(packed_lens),
        dense_caps=dense_caps,
        dense_lens=tuple(dense_lens),
        holes=draw(st.booleans()),
        squeeze=draw(st.sampled_from([0.0, 0.0, 0.7, 3.0])),
        n_splits=draw(st.sampled_from(splits)),
        block_n=draw(st.sampled_from(blocks)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _starts(caps: tuple[int, ...], batch: int) -> torch.Tensor:
    caps_t = torch.tensor(caps, dtype=torch.int32)
    return (caps_t.cumsum(0) - caps_t).to(torch.int32).expand(batch, -1).contiguous()


def build_quant_store(c: QuantCase, dtype: torch.dtype, device: str) -> dict:
    """Random packed planes (any byte is a valid set of codes; statistics are random), random dense segments.
    Slots past each length hold garbage that must be ignored."""
    g = torch.Generator().manual_seed(c.seed)
    packed_slots, dense_slots = sum(c.packed_caps), sum(c.dense_caps)
    t = {}
    for prefix, spec in (("qk", c.layout.k), ("qv", c.layout.v)):
        rows, width = QuantLayout.stats_rows(spec, c.n_kv, packed_slots, c.d)
        t[f"{prefix}_codes"] = torch.randint(0, 256, (c.batch, packed_slots, spec.packed_width(c.d)), generator=g)
        t[f"{prefix}_codes"] = t[f"{prefix}_codes"].to(torch.uint8)
        t[f"{prefix}_scale"] = torch.rand(c.batch, rows, width, generator=g, dtype=torch.float64) * 0.8
        t[f"{prefix}_low"] = torch.randn(c.batch, rows, width, generator=g, dtype=torch.float64)
    seen = max(sum(row) for row in c.dense_lens) + 4
    k = torch.randn(c.batch, dense_slots, c.d, generator=g, dtype=torch.float64)
    v = torch.randn(c.batch, dense_slots, c.d, generator=g, dtype=torch.float64)
    pos = torch.randint(0, seen, (c.batch, dense_slots), generator=g, dtype=torch.int32)
    start = _starts(c.dense_caps, c.batch)
    for b in range(c.batch):
        for h in range(c.n_kv):
            n, s0 = c.dense_lens[b][h], int(start[b, h])
            pos[b, s0 : s0 + n] = torch.randperm(seen, generator=g)[:n].to(torch.int32)
            if c.holes and n > 1:
                pos[b, s0 + int(torch.randint(0, n, (1,), generator=g))] = -1
    q = torch.randn(c.batch, c.n_kv * c.group, 1, c.d, generator=g, dtype=torch.float64) * 2
    t = dict(
        q=q,
        k_store=k,
        v_store=v,
        pos=pos,
        start=start,
        length=torch.tensor(c.dense_lens, dtype=torch.int32),
        seen=torch.tensor(seen),
        **t,
        q_start=_starts(c.packed_caps, c.batch),
        q_len=torch.tensor(c.packed_lens, dtype=torch.int32),
    )
    return {n: x.to(device=device, dtype=dtype if x.dtype == torch.float64 else x.dtype) for n, x in t.items()}


def reference_quant_attention(t: dict, scale: float, layout: str, squeeze: float) -> torch.Tensor:
    as64 = {n: x.cpu().double() if x.is_floating_point() else x.cpu() for n, x in t.items()}
    q = as64.pop("q")
    return qref.attend_quantized(q, LayerTensors(**as64), scale, layout, squeeze)


def check_quant_attention(c: QuantCase, dtype, device, n_splits, block_n, tol):
    t = build_quant_store(c, dtype, device)
    scale = c.d**-0.5
    expected = reference_quant_attention(t, scale, c.layout.text(), c.squeeze)
    store = LayerTensors(**{n: x for n, x in t.items() if n not in ("q", "seen")})  # the kernel reads no `seen`
    with poisoned(quant_module):
        out = quantized_decode_attention(t["q"], store, scale, c.layout.text(), c.squeeze, n_splits, block_n)
    assert out.shape == t["q"].shape and out.dtype == dtype
    assert not out.isnan().any(), "every output element is written"
    err = relative_error(out, expected)
    assert err <= tol or (expected.norm() == 0 and out.norm() == 0), f"relative error {err:.2e} > {tol}"


@cpu_interpreter
@settings(max_examples=14)
@given(c=quant_cases())
@example(  # KIVI-like 2-bit layout, long packed span over several blocks and splits, calibrated logits, GQA 4
    c=QuantCase(
        2,
        2,
        4,
        16,
        QuantLayout(QuantSpec(2, "channel", 4), QuantSpec(2, "token", 8)),
        (16, 12),
        ((13, 12), (0, 5)),
        (6, 3),
        ((6, 2), (0, 3)),
        True,
        3.0,
        3,
        4,
        1,
    )
)
@example(  # CalibQuant-like 1-bit layout: per-channel statistics over each head's span, logit squeeze
    c=QuantCase(
        1,
        2,
        2,
        8,
        QuantLayout(QuantSpec(1, "channel", 0), QuantSpec(1, "channel", 0)),
        (9, 5),
        ((9, 4),),
        (2, 2),
        ((1, 2),),
        False,
        0.7,
        2,
        4,
        2,
    )
)
def test_quantized_attention_matches_reference_on_cpu(c):
    check_quant_attention(c, torch.float32, "cpu", c.n_splits, c.block_n, tol=1e-5)


@cpu_interpreter
@pytest.mark.parametrize("recipe_layout", ["kivi", "calibquant"])
def test_quantized_attention_over_a_store_the_quant_ops_wrote(recipe_layout):
    """The kernel reads the layout `select_quantized_`/`append_quantized_` write (not only random planes)."""
    from kvsurgery.store import LayerPlan, StoreLayer

    if recipe_layout == "kivi":
        lay = QuantLayout(QuantSpec(2, "channel", 4), QuantSpec(2, "token", 4), residual=8)
    else:
        lay = QuantLayout(QuantSpec(1, "channel", 0, shrink=0.5), QuantSpec(1, "channel", 0, shrink=0.3), recent=3)
    batch, n_kv, group, d, t_len, keep, room = 2, 2, 3, 16, 23, [17, 9], 11
    packed, dense = lay.allocation(keep, room, False)
    plan = LayerPlan(0, tuple(keep), room, False, d, d, planes=tuple(lay.planes(n_kv, packed, d, d)), dense_slots=dense)
    layer = StoreLayer(plan, batch, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(11)
    k, v = (torch.randn(batch, n_kv, t_len, d, generator=g) for _ in range(2))
    scores = torch.rand(batch, n_kv, t_len, generator=g)
    qref.select_quantized_(layer.named(), k, v, scores, None, None, None, 1, 2, lay.text())
    squeeze = 0.0 if recipe_layout == "kivi" else 3.0
    for _ in range(6):  # KIVI flushes its residual during these steps
        k_new, v_new = (torch.randn(batch, n_kv, 1, d, generator=g) for _ in range(2))
        qref.append_quantized_(layer.named(), k_new, v_new, lay.text())
        q = torch.randn(batch, n_kv * group, 1, d, generator=g)
        wide = layer.named().map(lambda x: x.double() if x.is_floating_point() else x)
        expected = qref.attend_quantized(q.double(), wide, 0.25, lay.text(), squeeze)
        with poisoned(quant_module):
            out = quantized_decode_attention(q, layer.named(), 0.25, lay.text(), squeeze, n_splits=2, block_n=4)
        assert relative_error(out, expected) <= 1e-5
    assert int(layer.planes["q_len"].min()) > 0, "the store holds packed tokens"


def test_kernels_are_the_cuda_implementations_of_attend_quantized_and_sparse_attend():
    for op in ("attend_quantized", "sparse_attend"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kvsurgery::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"kvsurgery::{op}", "CompositeExplicitAutograd"), op


# -- sync-free append (the CUDA implementation of append_quantized_) ---------------------------------------------


def quant_store_after_prefill(lay: QuantLayout, seed: int, batch=2, n_kv=3, d=16, t=30, room=20):
    from kvsurgery.store import LayerPlan, StoreLayer

    g = torch.Generator().manual_seed(seed)
    keep = [int(x) for x in torch.randint(1, t, (n_kv,), generator=g)]
    packed, dense = lay.allocation(keep, room, False)
    planes = tuple(lay.planes(n_kv, packed, d, d))
    plan = LayerPlan(0, tuple(keep), room, False, d, d, planes=planes, dense_slots=dense)
    layer = StoreLayer(plan, batch, torch.float32, torch.device("cpu"))
    k, v = (torch.randn(batch, n_kv, t, d, generator=g) for _ in range(2))
    scores = torch.rand(batch, n_kv, t, generator=g)
    qref.select_quantized_(layer.named(), k, v, scores, None, None, None, 1, 2, lay.text())
    return layer, g


@settings(max_examples=8)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([2, 4]),
    groups_in_residual=st.integers(1, 3),
    steps=st.integers(1, 20),
)
def test_sync_free_append_equals_the_reference_bit_for_bit(seed, bits, group, groups_in_residual, steps):
    """KIVI decode steps (flushes of some heads and not others) through the CUDA implementation, run on CPU."""
    lay = QuantLayout(
        QuantSpec(bits, "channel", group), QuantSpec(bits, "token", group), residual=group * groups_in_residual
    )
    expected, g = quant_store_after_prefill(lay, seed)
    got = expected.named().map(torch.clone)
    for _ in range(steps):
        k_new, v_new = (torch.randn(2, 3, 1, 16, generator=g) for _ in range(2))
        qref.append_quantized_(expected.named(), k_new, v_new, lay.text())
        append_quantized_without_sync(got, k_new, v_new, lay.text())
    names = expected.plan.tensor_names
    for name, want, have in zip(names, expected.tensors(), got.take(names), strict=True):
        assert torch.equal(want, have), f"{name} differs from the reference"


def test_sync_free_append_never_reads_device_values_on_the_host():
    """Under FakeTensorMode a host read of a tensor (or a data-dependent shape) raises: the flush has none."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    lay = QuantLayout(QuantSpec(2, "channel", 4), QuantSpec(2, "token", 4), residual=8)
    layer, _ = quant_store_after_prefill(lay, 3)
    names = ("k_store", "v_store", "pos", "start", "length", *QUANT_TENSORS)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        store = layer.named()
        fake = LayerTensors(**{n: mode.from_tensor(t) for n, t in zip(names, store.take(names), strict=True)})
        flush_residual_without_sync(fake, lay)
        with pytest.raises(DataDependentOutputException):
            qref.flush_residual_(fake, lay)  # the reference syncs (it runs on CPU)


# -- Double Sparsity: top-k gather attention -------------------------------------------------------------------


@dataclass(frozen=True)
class GatherCase:
    batch: int
    n_kv: int
    group: int
    d: int
    slots: int  # store slots per row
    width: int  # selected slots per KV head
    dropped: bool  # some selections are masked out (ok = False)
    n_splits: int
    block_n: int
    seed: int


@st.composite
def gather_cases(draw, max_width: int = 20, dims=(4, 8, 16), groups=(1, 2, 3, 4), splits=(1, 2, 3), blocks=(4, 8)):
    slots = draw(st.integers(1, 40))
    return GatherCase(
        batch=draw(st.integers(1, 3)),
        n_kv=draw(st.integers(1, 3)),
        group=draw(st.sampled_from(groups)),
        d=draw(st.sampled_from(dims)),
        slots=slots,
        width=draw(st.integers(0, max_width)),
        dropped=draw(st.booleans()),
        n_splits=draw(st.sampled_from(splits)),
        block_n=draw(st.sampled_from(blocks)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_gather(c: GatherCase, dtype, device, n_splits, block_n, tol):
    g = torch.Generator().manual_seed(c.seed)
    k = torch.randn(c.batch, c.slots, c.d, generator=g, dtype=torch.float64)
    v = torch.randn(c.batch, c.slots, c.d, generator=g, dtype=torch.float64)
    q = torch.randn(c.batch, c.n_kv * c.group, 1, c.d, generator=g, dtype=torch.float64)
    chosen = torch.randint(0, c.slots, (c.batch, c.n_kv, c.width), generator=g)
    ok = torch.rand(c.batch, c.n_kv, c.width, generator=g) < (0.7 if c.dropped else 1.0)
    scale = c.d**-0.5
    expected = sa.attend_selected(q, k, v, chosen, ok, scale)
    with poisoned(gather_module):
        out = gather_attention(
            *(x.to(device, dtype) for x in (q, k, v)), chosen.to(device), ok.to(device), scale, n_splits, block_n
        )
    assert out.shape == q.shape and out.dtype == dtype
    assert not out.isnan().any(), "every output element is written"
    err = relative_error(out, expected)
    assert err <= tol or (expected.norm() == 0 and out.norm() == 0), f"relative error {err:.2e} > {tol}"


@cpu_interpreter
@settings(max_examples=12)
@given(c=gather_cases())
@example(c=GatherCase(2, 2, 4, 16, 30, 19, True, 3, 4, 5))  # several splits and blocks, GQA 4, masked picks
@example(c=GatherCase(1, 1, 1, 8, 5, 0, False, 2, 4, 6))  # nothing selected: zeros, as the reference
def test_gather_attention_matches_reference_on_cpu(c):
    check_gather(c, torch.float32, "cpu", c.n_splits, c.block_n, tol=1e-5)


def sparse_store(seed: int, bits: int):
    """A Double Sparsity layer: equal per-head capacities within a row (rows differ, as their prompts do), every
    stored key labelled, random lengths and prompt sizes; returns the `sparse_attend` arguments before `scale`."""
    g = torch.Generator().manual_seed(seed)
    batch, n_kv, group, d, r, widest = 2, 2, 2, 16, 4, 13
    slots = n_kv * widest
    caps = torch.tensor([widest, int(torch.randint(2, widest + 1, (), generator=g))], dtype=torch.int32)
    cap = caps[:, None].expand(batch, n_kv).contiguous()
    start = (cap.cumsum(-1) - cap).to(torch.int32)
    length = (torch.rand(batch, n_kv, generator=g) * cap).long().clamp_min(1).to(torch.int32)
    pos = torch.full((batch, slots), -1, dtype=torch.int32)
    for b in range(batch):
        for h in range(n_kv):
            s0, n = int(start[b, h]), int(length[b, h])
            pos[b, s0 : s0 + n] = torch.arange(n, dtype=torch.int32)
    k_store, v_store = (torch.randn(batch, slots, d, generator=g) for _ in range(2))
    channels = torch.stack([torch.randperm(d, generator=g)[:r] for _ in range(n_kv * group)])
    label_dtype = torch.bfloat16 if bits == 16 else torch.uint8
    labels = torch.zeros(batch, slots, group, sa.label_width(r, bits), dtype=label_dtype)
    label_range = None if bits == 16 else torch.zeros(batch, slots, group, 2, dtype=torch.float16)
    keep = (cap - 1).clamp_min(1)  # the rows' prompt lengths
    seen = torch.tensor(int(length.max()))
    store = LayerTensors(
        k_store=k_store,
        v_store=v_store,
        pos=pos,
        keep=keep,
        cap=cap,
        start=start,
        length=length,
        seen=seen,
        labels=labels,
        label_range=label_range,
    )
    sa.label_fill_(store, channels, bits)
    q = torch.randn(batch, n_kv * group, 1, d, generator=g)
    return q, store, channels


@cpu_interpreter
@settings(max_examples=8)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([2, 4, 8, 16]),
    tokens=st.sampled_from([0, 1, 3, 12]),
    fraction=st.sampled_from([0.2, 0.7]),
)
def test_sparse_attend_kernel_path_matches_the_reference_op(seed, bits, tokens, fraction):
    """The CUDA implementation (sync-free selection + gather kernel), run on CPU: the reference op's picks and
    output, for token counts and fractions of each row's prompt."""
    q, store, channels = sparse_store(seed, bits)
    budget = (0.25, tokens, 0.0 if tokens else fraction, bits)
    op_store = store.take(("k_store", "v_store", "pos", "keep", "start", "length", "seen", *LABEL_TENSORS))
    as_op = (q, *op_store, channels.flatten().tolist(), *budget)
    expected = torch.ops.kvsurgery.sparse_attend(*as_op)  # CPU: the reference (fp32, the same picks)
    with poisoned(gather_module):
        out = sparse_attend_kernel(q, store, channels.flatten().tolist(), *budget)
    assert relative_error(out, expected) <= 1e-5

    score, slots, valid = sa.approximate_scores(q, store, channels, 0.25, bits)
    ref_slots, ref_ok = sa.select_tokens(score, slots, valid, sa.attended_tokens(store.keep, tokens, budget[2]))
    got_slots, got_ok = sa.select_without_sync(q, store, channels, *budget)
    for b in range(q.shape[0]):
        for h in range(store.start.shape[1]):
            assert got_slots[b, h][got_ok[b, h]].tolist() == ref_slots[b, h][ref_ok[b, h]].tolist()


def test_sparse_selection_never_reads_device_values_on_the_host():
    """Under FakeTensorMode any .item()/int()/tolist() of a tensor, or a data-dependent shape, raises: the CUDA
    selection has none, so CUDA graphs can capture it."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    q, store, channels = sparse_store(0, 4)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = store.map(mode.from_tensor)
        fake_q, fake_channels = mode.from_tensor(q), mode.from_tensor(channels)
        for tokens, fraction in ((3, 0.0), (0, 0.5)):
            slots, ok = sa.select_without_sync(fake_q, fake, fake_channels, 0.25, tokens, fraction, 4)
            assert slots.shape == ok.shape == (2, 2, 3 if tokens else 7)
        with pytest.raises(DataDependentOutputException, match="_local_scalar_dense"):
            sa.attended_tokens(fake.keep, 0, 0.5)  # the reference's selection does sync (it runs on CPU)


# -- CUDA: bf16, real launch shapes, through the ops ----------------------------------------------------------


@gpu
@settings(max_examples=20)
@given(c=quant_cases(max_tokens=300, dims=(64, 128), groups=(1, 4, 8), splits=(None,), blocks=(64,)))
def test_quantized_attention_matches_reference_on_gpu_bf16(c):
    check_quant_attention(c, torch.bfloat16, "cuda", None, 64, tol=2e-2)


@gpu
@settings(max_examples=10)
@given(c=quant_cases(max_tokens=200, dims=(64,), groups=(1, 4), splits=(1, 7), blocks=(16, 64)))
def test_quantized_attention_matches_reference_on_gpu_fp32(c):
    check_quant_attention(c, torch.float32, "cuda", c.n_splits, c.block_n, tol=1e-5)


@gpu
@settings(max_examples=20)
@given(c=gather_cases(max_width=300, dims=(64, 128), groups=(1, 4, 8), splits=(None,), blocks=(64,)))
def test_gather_attention_matches_reference_on_gpu_bf16(c):
    check_gather(c, torch.bfloat16, "cuda", None, 64, tol=2e-2)


@gpu
def test_attend_quantized_op_dispatches_to_the_kernel_on_cuda():
    lay = QuantLayout(QuantSpec(2, "channel", 32), QuantSpec(2, "token", 32), residual=128)
    c = QuantCase(
        2, 2, 4, 128, lay, (512, 256), ((500, 256), (31, 0)), (128, 128), ((128, 7), (0, 90)), True, 0.0, 1, 64, 9
    )
    t = build_quant_store(c, torch.bfloat16, "cuda")
    args = (*t.values(), 0.088, lay.text(), 0.0)
    out = torch.ops.kvsurgery.attend_quantized(*args)
    assert relative_error(out, reference_quant_attention(t, 0.088, lay.text(), 0.0)) < 2e-2
    torch.library.opcheck(torch.ops.kvsurgery.attend_quantized.default, args)
