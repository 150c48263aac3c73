"""A pass registered by a user plugs into recipes and composes with the built-ins, no core edit needed."""

import pytest
import torch

import kvsurgery
from kvsurgery.errors import RecipeError
from kvsurgery.pass_base import Pass, Selection, SiteRewrite
from kvsurgery.testing import greedy, left_padded_batch, tiny_model


@kvsurgery.register_pass
class KeyNormTest(Pass):
    """Test scorer: keeps the keys with the smallest L2 norm (K-norm)."""

    name = "keynorm_test"
    phase = "score"
    provides = frozenset({"scores"})
    needs_budget = True

    def selection(self) -> Selection:
        return Selection(window=2)

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase == "prefill":
            norms = rw.call(self.name, torch.linalg.vector_norm, (rw.k, 2, -1))
            rw.products["scores"] = rw.call(self.name, torch.neg, (norms,))


def test_user_pass_runs_and_composes():
    assert "keynorm_test" in kvsurgery.recipes()
    model = tiny_model("llama", layers=3)
    ids, _ = left_padded_batch([24], seed=7)
    kvsurgery.apply(model, "keynorm_test+pyramidkv", budget=8)
    greedy(model, ids, new=2)
    text = str(kvsurgery.explain(model))
    assert "keynorm_test: linalg_vector_norm, neg; select: kvsurgery.select_compact_" in text
    store = model._kvsurgery.last_store
    k = store.layers[0]
    kept = sorted(k.pos[0, : int(k.length[0, 0])].tolist())
    assert 22 in kept and 23 in kept  # the 2-token window survives
    assert [layer.plan.keep[0] for layer in store.layers] == sorted(
        (layer.plan.keep[0] for layer in store.layers), reverse=True
    )


@kvsurgery.register_pass
class NeedsLabelsTest(Pass):
    """Test pass requiring a capability no pass provides and with no default."""

    name = "needs_labels_test"
    phase = "budget"
    provides = frozenset({"budget"})
    requires = frozenset({"scores", "channel_labels"})
    needs_budget = True


def test_an_incomplete_recipe_names_what_is_missing():
    with pytest.raises(RecipeError, match="'needs_labels_test' requires channel_labels but nothing in"):
        kvsurgery.apply(tiny_model("llama"), "snapkv+needs_labels_test", budget=16)
