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
    products = frozenset({"scores"})
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


def test_a_typo_in_a_declared_capability_or_product_is_refused_at_registration():
    class TypoProvides(Pass):
        """Test pass whose `provides` misspells a capability."""

        name = "typo_provides_test"
        phase = "score"
        provides = frozenset({"score"})

    with pytest.raises(RecipeError, match=r"TypoProvides.provides names 'score' \(did you mean 'scores'\?\)"):
        kvsurgery.register_pass(TypoProvides)

    class TypoProducts(Pass):
        """Test pass whose `products` misspells one."""

        name = "typo_products_test"
        phase = "budget"
        provides = frozenset({"budget"})
        products = frozenset({"budget"})

    with pytest.raises(RecipeError, match=r"TypoProducts.products names 'budget' \(did you mean 'budgets'\?\)"):
        kvsurgery.register_pass(TypoProducts)
    assert "typo_provides_test" not in kvsurgery.recipes() and "typo_products_test" not in kvsurgery.recipes()


@kvsurgery.register_pass
class UndeclaredProductTest(Pass):
    """Test scorer that hands on a product it does not declare."""

    name = "undeclared_product_test"
    phase = "score"
    provides = frozenset({"scores"})
    needs_budget = True

    def rewrite(self, rw: SiteRewrite) -> None:
        if rw.phase == "prefill":
            rw.products["scores"] = rw.call(self.name, torch.linalg.vector_norm, (rw.k, 2, -1))


def test_a_product_handed_on_without_declaring_it_is_refused():
    model = tiny_model("llama")
    kvsurgery.apply(model, "undeclared_product_test", budget=8)  # passes rewrite when the first forward is captured
    ids, _ = left_padded_batch([12])
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as failed:  # raised inside the Dynamo backend
        greedy(model, ids, new=1)
    assert isinstance(failed.value.inner_exception, RecipeError)
    assert "'undeclared_product_test' handed on product 'scores' without declaring it" in str(failed.value)
    kvsurgery.restore(model)
