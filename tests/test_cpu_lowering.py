"""The CPU lowering of the decode ops (`kvsurgery.compiler.cpu_lowering`): on CPU with compile=True the decode graph
handed to Inductor holds aten ops in place of the lowered kvsurgery ops, and it gives the eager surgery's tokens.

Most tests stand a capturing stub in for Inductor (the lowered FX graph runs as Python: seconds, not an Inductor
compile); one compiles with Inductor for real."""

import pytest
import torch
from torch._inductor import compile_fx as inductor

import kvsurgery
from kvsurgery.fx_utils import op_name
from kvsurgery.testing import left_padded_batch, tiny_model

NEW_TOKENS = 10
# (recipe, budget): every lowered op — non-evicting and evicting appends (oldest, lowest score), accumulated
# attention, a sliding window's attention, KIVI flushes with a residual larger than the group (tokens move forward)
CASES = [
    ("full", None),
    ("snapkv(window=4)", 12),
    ("streaming(sinks=2)", 10),
    ("h2o(window=2)", 8),
    ("adakv", 12),  # per-head budgets decided at prefill: segments of different sizes
    ("snapkv(window=8)+kivi2(group=8,residual=16)", 24),
    ("kivi4(group=8,residual=8)", None),
    ("adakv+kivi2(group=8,residual=16)", 24),  # packed segments of different sizes per head
]


def _generate(model, ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(new tokens [B, NEW_TOKENS], their logits [NEW_TOKENS, B, vocab]) of a greedy generate."""
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits)


def _kvsurgery_ops(gm: torch.fx.GraphModule) -> set[str]:
    return {name for node in gm.graph.nodes if (name := op_name(node)).startswith("kvsurgery.")}


@pytest.fixture
def captured_graphs(monkeypatch):
    """The graphs kvsurgery hands to Inductor, run as plain FX instead of being compiled."""
    graphs = []

    def capture(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(inductor, "compile_fx", capture)
    return graphs


@pytest.mark.parametrize("lengths", [(40, 29), (40, 40)], ids=["rows-differ", "rows-equal"])
@pytest.mark.parametrize(("recipe", "budget"), CASES)
def test_lowered_decode_graph_has_no_lowered_op_and_gives_eager_tokens(recipe, budget, lengths, captured_graphs):
    """Rows of different lengths give segments of different sizes (attention over the whole store, masked); equal
    rows give every KV head an equal segment (attention per head, its layout asserted in the graph)."""
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=32, seed=3)
    ids, mask = left_padded_batch(list(lengths), seed=5)
    kvsurgery.apply(model, recipe, budget)
    try:
        eager, eager_logits = _generate(model, ids, mask)
    finally:
        kvsurgery.restore(model)
    torch._dynamo.reset()
    kvsurgery.apply(model, recipe, budget, compile=True)
    try:
        lowered, lowered_logits = _generate(model, ids, mask)
        report = model._kvsurgery.reports["decode"]
        uniform = {layer.plan.uniform_heads for layer in model._kvsurgery.last_store.layers}
    finally:
        kvsurgery.restore(model)
    assert len(captured_graphs) == 2, "one prefill and one decode graph"
    decode = captured_graphs[1]
    inserted = {op for site in report.sites for ops in site.inserted.values() for op in ops}
    assert {"kvsurgery.attend", "kvsurgery.attend_accumulate_", "kvsurgery.attend_quantized"} & inserted
    left = _kvsurgery_ops(decode) & inserted
    assert not left, f"decode ops still opaque in the graph Inductor gets: {sorted(left)}"
    assert any(n.target == "index_put_" for n in decode.graph.nodes), "appends write the store in place"
    flushes = "kvsurgery.flush_quantized_" in _kvsurgery_ops(decode)
    assert flushes == ("kivi" in recipe), "KIVI's flush stays an op that returns at once on steps that do not flush"
    by_kernel = "kvsurgery.attend_packed" in _kvsurgery_ops(decode)
    assert by_kernel == ("kivi" in recipe), "KIVI's packed region is attended by the C++ kernel"
    if lengths[0] == lengths[1] or recipe == "full":  # every head keeps a row's whole prompt, unless Ada-KV splits it
        assert uniform == {lengths[0] == lengths[1] and not recipe.startswith("adakv")}
    per_head = any(n.target is torch._assert_async for n in decode.graph.nodes)
    assert {per_head} == uniform, "attention per head exactly where the plan says the heads' segments are equal"
    assert torch.equal(lowered, eager), "the lowered decode graph gives the eager (reference) tokens"
    # every decode step's logits, not only the argmax: a wrong statistic or slot moves them far beyond rounding
    torch.testing.assert_close(lowered_logits, eager_logits, rtol=1e-4, atol=1e-4)
