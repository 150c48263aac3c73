"""`torch.library.opcheck` on every kvsurgery op, on CPU with small inputs: schema (aliasing and mutation),
fake tensor, autograd registration and AOT dispatch with dynamic shapes agree with the real implementation."""

import pytest
import torch

import kvsurgery
from kvsurgery.errors import SurgeryNotAppliedError
from kvsurgery.kernels import CUDA_KERNELS
from kvsurgery.ops import OPS
from kvsurgery.ops.schema import by_name
from kvsurgery.reference.doublesparse import label_width
from kvsurgery.reference.quant_codes import QuantSpec
from kvsurgery.reference.quant_layout import QuantLayout
from kvsurgery.store import LayerPlan, Plane, StoreLayer

B, N_KV, G, D, T = 2, 2, 2, 8, 6
HQ = N_KV * G
SCALE = D**-0.5
KIVI = QuantLayout(QuantSpec(2, "channel", 2), QuantSpec(2, "token", 4), residual=2)
CHANNELS = [c % D for c in range(HQ * 2)]  # r = 2 outlier channels per query head


def new_tokens(t: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, t, D, generator=g)
    return q, torch.randn(B, N_KV, t, D, generator=g), torch.randn(B, N_KV, t, D, generator=g)


def store(planes=(), dense_slots=None, score_slots=True) -> dict[str, torch.Tensor]:
    """A layer store holding the prompt (prefill done by the reference), by tensor name."""
    plan = LayerPlan(0, (4, 4), 2, False, D, D, score_slots=score_slots, planes=tuple(planes), dense_slots=dense_slots)
    layer = StoreLayer(plan, B, torch.float32, torch.device("cpu"))
    return dict(zip(plan.tensor_names, layer.tensors(), strict=True))


def filled(s: dict) -> dict:
    _, k, v = new_tokens(T, 1)
    torch.ops.kvsurgery.select_compact_(*list(s.values())[:9], k, v, None, None, None, 1, 1)
    return s


def core(s: dict) -> list[torch.Tensor]:
    return list(s.values())[:9]


def quant_store() -> dict:
    packed, dense = KIVI.allocation([4, 4], 2, False)
    return store(KIVI.planes(N_KV, packed, D, D), dense_slots=dense)


def label_store() -> dict:
    planes = [Plane("labels", (G, label_width(2, 4)), torch.uint8), Plane("label_range", (G, 2), torch.float16)]
    return filled(store(planes))


def cases() -> dict[str, tuple]:
    q, k, v = new_tokens(T)
    q1, k1, v1 = new_tokens(1, 2)
    mask = torch.ones(B, 1, T, T, dtype=torch.bool).tril()
    keep = torch.full((B, N_KV), 4, dtype=torch.int32)
    scores = torch.rand(B, N_KV, T)
    s = filled(store())
    dense = [s[n] for n in ("k_store", "v_store", "pos", "start", "length", "seen")]
    qs = quant_store()
    torch.ops.kvsurgery.select_quantized_(*qs.values(), k, v, None, None, None, None, 1, 1, KIVI.text())
    packed = [qs[n] for n in ("qk_codes", "qk_scale", "qk_low", "qv_codes", "qv_scale", "qv_low", "q_start", "q_len")]
    qdense = [qs[n] for n in ("k_store", "v_store", "pos", "start", "length", "seen")]
    ls = label_store()
    labels = (ls["labels"], ls["label_range"])
    visual = torch.zeros(B, T, dtype=torch.bool)
    visual[:, 1:4] = True
    return {
        "score_window": (q, k, mask, SCALE, 3, 3, "avg"),
        "score_accumulated": (q, k, None, SCALE),
        "score_recency": (k,),
        "budget_adakv": (scores, None, keep, 1, 1, 0.2, True),
        "select_compact_": (*core(store()), k, v, scores, None, mask, 1, 1),
        "append_": (*core(s), k1, v1, 1, 1, True, True, "position"),
        "attend": (q1, *dense, SCALE, 0),
        "attend_accumulate_": (q1, *dense[:3], s["slot_score"], *dense[3:], SCALE, 0),
        "snapshot": (keep,),
        "select_quantized_": (*quant_store().values(), k, v, scores, None, None, None, 1, 1, KIVI.text()),
        "append_quantized_": (*qs.values(), k1, v1, KIVI.text()),
        "flush_quantized_": (*qs.values(), KIVI.text()),
        "attend_quantized": (q1, *qdense, *packed, SCALE, KIVI.text(), 0.0),
        "attend_packed": (q1[:, :, 0], *packed, SCALE, KIVI.text()),
        "prefixkv_scores": (q, k, mask, SCALE),
        "prefixkv_append_": (*core(s), k1, v1, 0.5, 1),
        "label_fill_": (*labels, ls["k_store"], ls["start"], ls["cap"], CHANNELS, 4),
        "label_append_": (*labels, k1, ls["start"], ls["length"], CHANNELS, 4),
        "sparse_attend": (q1, *[ls[n] for n in ("k_store", "v_store", "pos", "keep", "start", "length", "seen")],
                          *labels, CHANNELS, SCALE, 2, 0.0, 4),
        "score_csp": (q, k, mask, visual, keep, SCALE, 2, 0.5, 1),
    }  # fmt: skip


CASES = cases()


def test_every_op_has_a_case():
    assert set(CASES) | {"kv_update"} == set(OPS)
    assert all(hasattr(torch.ops.kvsurgery, name) for name in OPS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.kvsurgery, name).default, CASES[name])


def test_kv_update_marker():
    """`kv_update`'s real implementation refuses by design (it must be rewritten away), so opcheck cannot run it:
    its fake gives the k/v shapes Dynamo traces through, and running it raises."""
    _, k, v = new_tokens(T)
    s = store()
    names = ",".join(s)
    with torch._subclasses.FakeTensorMode() as mode:
        fk, fv = mode.from_tensor(k), mode.from_tensor(v)
        out_k, out_v = torch.ops.kvsurgery.kv_update(
            fk, fv, [mode.from_tensor(t) for t in s.values()], names, 0, True, False
        )
    assert out_k.shape == k.shape and out_v.shape == v.shape
    with pytest.raises(SurgeryNotAppliedError, match="never falls back"):
        torch.ops.kvsurgery.kv_update(k, v, list(s.values()), names, 3, True, False)
    assert kvsurgery.ops.OPS["kv_update"].writes == ()


def clone(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("name", sorted(CUDA_KERNELS))
def test_cuda_kernels_take_the_op_arguments_by_name(name):
    """Each CUDA kernel, bound to its op's arguments as `ops.register()` binds it, matches the CPU implementation on
    the same inputs (run here by Triton's interpreter): outputs and every mutated tensor."""
    op = OPS[name]
    kernel = by_name(CUDA_KERNELS[name], op.names, name)
    got_args, want_args = clone(CASES[name]), clone(CASES[name])
    got = kernel(*got_args)
    want = getattr(torch.ops.kvsurgery, name)(*want_args)
    if want is not None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for param, g, w in zip(op.names, got_args, want_args, strict=True):
        if param in op.writes and g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=f"{name} wrote {param} differently")


def test_a_mutating_op_bumps_the_version_of_each_argument_it_declares_written():
    """Version counters are how autograd notices in-place writes; kvsurgery's own ADInplaceOrView kernel
    (`schema._lean_version_bump`) must bump what custom_op's would. A flush with no full residual writes nothing
    itself, so only that kernel bumps: each declared-written tensor once, no other."""
    qs = quant_store()
    assert not bool((qs["length"] >= KIVI.residual).any())
    before = {name: t._version for name, t in qs.items()}
    torch.ops.kvsurgery.flush_quantized_(*qs.values(), KIVI.text())
    writes = OPS["flush_quantized_"].writes
    assert {name: t._version - before[name] for name, t in qs.items()} == {n: int(n in writes) for n in qs}
