"""The compiled path: apply(..., compile=True) hands the rewritten graphs to Inductor. Its tokens equal the eager
surgery's through generate(), and later decode steps reuse the compiled graphs (no recompiles). This module
holds the suite's Inductor compiles: prefill + decode of an H2O recipe (every core decode op) and of a KIVI recipe
(the quantized-store ops), about 10-40 s each on a 2-core CPU."""

import operator

import pytest
import torch
from torch._inductor import compile_fx as inductor

import kvsurgery
from kvsurgery.compiler.read_order import snapshot_early_reads
from kvsurgery.testing import left_padded_batch, tiny_model

RECIPE = "h2o(window=2)"  # decode-time eviction by accumulated attention: every decode op runs
QUANT_RECIPE = "snapkv(window=8)+kivi2(group=8,residual=8)"  # packed at prefill, a residual flush at decode
NEW_TOKENS = 8


def _generate(model, ids, mask):
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
        )
    return out[:, ids.shape[1] :]


def _count_compiles(monkeypatch) -> list[int]:
    """Inductor compiles from now on (one entry each)."""
    compiles = []
    real_compile_fx = inductor.compile_fx

    def counting_compile_fx(*args, **kwargs):  # compile_fx re-enters itself to apply config_patches
        compiles.extend([1] if "config_patches" in kwargs else [])
        return real_compile_fx(*args, **kwargs)

    monkeypatch.setattr(inductor, "compile_fx", counting_compile_fx)
    return compiles


@pytest.mark.slow
def test_compiled_surgery_matches_eager_and_never_recompiles(monkeypatch):
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2)
    ids, mask = left_padded_batch([13, 9], seed=3)
    kvsurgery.apply(model, RECIPE, budget=6)
    try:
        eager = _generate(model, ids, mask)
    finally:
        kvsurgery.restore(model)

    compiles = _count_compiles(monkeypatch)
    torch._dynamo.reset()
    kvsurgery.apply(model, RECIPE, budget=6, compile=True)
    try:
        compiled = _generate(model, ids, mask)
        assert len(compiles) == 2, "one Inductor graph for the prefill, one for every decode step"
        assert torch.equal(compiled, eager), "compiled surgery gives the eager surgery's tokens"
        store = model._kvsurgery.last_store
        assert all(t._dynamo_static_input_type for layer in store.layers for t in layer.tensors()), (
            "store tensors keep static addresses (CUDA graphs replay on them)"
        )
        with torch.compiler.set_stance("fail_on_recompile"):
            again = _generate(model, ids, mask)  # a fresh store: same graphs, no recompile at any step
        assert torch.equal(again, eager)
        assert len(compiles) == 2
    finally:
        kvsurgery.restore(model)


@pytest.mark.slow
def test_compiled_quantized_store_matches_eager_and_never_recompiles(monkeypatch):
    """KIVI 2-bit under Inductor: packed prefill, residual flushes and fused-dequantization attention inside the
    compiled decode graph give the eager tokens, and every decode step reuses that graph."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=32, seed=3)
    ids, mask = left_padded_batch([40, 29], seed=5)
    kvsurgery.apply(model, QUANT_RECIPE, budget=24)
    try:
        eager = _generate(model, ids, mask)
        assert int(model._kvsurgery.last_store.layers[0].planes["q_len"].min()) > 16, "a residual flush ran"
    finally:
        kvsurgery.restore(model)
    compiles = _count_compiles(monkeypatch)
    torch._dynamo.reset()
    kvsurgery.apply(model, QUANT_RECIPE, budget=24, compile=True)
    try:
        assert torch.equal(_generate(model, ids, mask), eager)
        assert len(compiles) == 2, "one Inductor graph for the prefill, one for every decode step"
        with torch.compiler.set_stance("fail_on_recompile"):
            assert torch.equal(_generate(model, ids, mask), eager)
        assert len(compiles) == 2
    finally:
        kvsurgery.restore(model)


def test_reads_before_a_store_mutation_go_through_a_snapshot():
    """Unit check of the ordering guard: the early read of `seen` is snapshotted, the late one is not."""

    def step(k_store, v_store, pos, slot_score, keep, cap, start, length, seen, k, v):
        early = seen + 1  # e.g. RoPE positions, computed before the op mutates `seen`
        torch.ops.kvsurgery.append_.default(
            k_store, v_store, pos, slot_score, keep, cap, start, length, seen, k, v, 0, 0, False, False, "position"
        )
        late = seen * 2  # reads the updated value
        return early, late

    graph = torch.fx.symbolic_trace(step).graph
    assert snapshot_early_reads(graph) == 1
    snap = next(n for n in graph.nodes if n.target is torch.ops.kvsurgery.snapshot.default)
    early = next(n for n in graph.nodes if n.target is operator.add)
    late = next(n for n in graph.nodes if n.target is operator.mul)
    assert early.args[0] is snap
    assert late.args[0].op == "placeholder" and late.args[0].name == "seen"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decode_on_cuda_uses_cuda_graphs_and_matches_eager():
    """On CUDA: the Triton kernels inside Inductor's decode graph, replayed as a CUDA graph (no skips)."""
    from torch._dynamo.utils import counters

    model = tiny_model("llama", layers=2, heads=8, kv_heads=2, head_dim=64).cuda()
    ids, mask = (t.cuda() for t in left_padded_batch([40, 29], seed=5))
    kvsurgery.apply(model, RECIPE, budget=16)
    try:
        eager = _generate(model, ids, mask)
    finally:
        kvsurgery.restore(model)
    torch._dynamo.reset()
    counters.clear()
    kvsurgery.apply(model, RECIPE, budget=16, compile=True)
    try:
        assert torch.equal(_generate(model, ids, mask), eager)
        with torch.compiler.set_stance("fail_on_recompile"):
            assert torch.equal(_generate(model, ids, mask), eager)
        assert counters["inductor"].get("cudagraph_skips", 0) == 0, "the decode graph runs as a CUDA graph"
    finally:
        kvsurgery.restore(model)
