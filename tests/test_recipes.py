"""Recipe parsing, the registry, and the pass manager's validation (no model needed)."""

import pytest

import kvsurgery
from kvsurgery.errors import BudgetError, RecipeError
from kvsurgery.manager import build_recipe
from kvsurgery.recipe import parse


def test_parse_names_and_inline_options():
    specs = parse("snapkv(window=16, kernel=7, pool=max)+kivi2")
    assert [s.name for s in specs] == ["snapkv", "kivi2"]
    assert specs[0].options == {"window": 16, "kernel": 7, "pool": "max"}
    assert parse("headkv(calibration=~/runs/head-kv.json)")[0].options == {"calibration": "~/runs/head-kv.json"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "non-empty"),
        ("snapkv+", "empty pass name"),
        ("snapkv(window=16", "unbalanced"),
        ("snapkv(window)", "expected key=value"),
        ("snap kv", "cannot parse"),
        ("headkv(calibration=my scores.json)", "a path without spaces"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(RecipeError, match=message):
        parse(text)


def test_unknown_pass_suggests_the_closest_name():
    with pytest.raises(RecipeError, match=r"unknown pass 'snapvk'.*Did you mean 'snapkv'"):
        build_recipe("snapvk", budget=64)


def test_two_scorers_conflict_and_the_message_names_both():
    with pytest.raises(RecipeError, match="'snapkv' and 'h2o' both provide scores"):
        build_recipe("snapkv+h2o", budget=64)


def test_two_budget_passes_conflict():
    with pytest.raises(RecipeError, match="'pyramidkv' and 'adakv' both provide budget"):
        build_recipe("pyramidkv+adakv", budget=64)


def test_full_cannot_be_combined():
    with pytest.raises(RecipeError, match="'full' keeps the whole cache and cannot be combined with 'snapkv'"):
        build_recipe("full+snapkv", budget=64)


def test_duplicate_pass():
    with pytest.raises(RecipeError, match="appears twice"):
        build_recipe("snapkv+snapkv", budget=64)


def test_defaults_fill_requirements_and_are_reported():
    recipe = build_recipe("pyramidkv", budget=64)
    assert recipe.text == "snapkv(window=8,kernel=7,pool=max)+pyramidkv"
    assert any("required by pyramidkv" in a for a in recipe.added)
    assert [p.name for p in recipe.passes] == ["snapkv", "pyramidkv", "select", "attend"]


def test_scoring_pass_gets_uniform_budgets():
    recipe = build_recipe("snapkv", budget=64)
    assert [p.name for p in recipe.passes] == ["snapkv", "uniform", "select", "attend"]


def test_keyword_options_route_to_their_pass():
    recipe = build_recipe("pyramidkv", budget=64, beta=10)
    assert recipe.passes[1].options.beta == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"windw": 3}, "no pass in this recipe takes option 'windw'"),
        ({"window": 0}, "window >= 1"),
        ({"pool": "median"}, "pool must be 'avg' or 'max'"),
    ],
)
def test_option_errors(kwargs, message):
    with pytest.raises(RecipeError, match=message):
        build_recipe("snapkv", budget=64, **kwargs)


def test_unknown_inline_option_lists_the_valid_ones():
    expected = "'snapkv' has no option 'beta'; its options are: window, kernel, pool, sinks"
    with pytest.raises(RecipeError, match=expected):
        build_recipe("snapkv(beta=3)", budget=64)


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        (0, "budget must be > 0"),
        (-5, "budget must be > 0"),
        (1.5, "must be <= 1"),
        ("256", "budget must be an int"),
        (True, "budget must be an int"),
    ],
)
def test_bad_budgets(budget, message):
    with pytest.raises(BudgetError, match=message):
        build_recipe("snapkv", budget=budget)


def test_missing_budget_says_how_to_pass_one():
    with pytest.raises(BudgetError, match=r"needs a budget.*budget=256.*budget=0.2"):
        build_recipe("snapkv")


def test_budget_below_sinks_plus_window():
    with pytest.raises(BudgetError, match="below the 4 sinks \\+ 32-token window"):
        build_recipe("snapkv(sinks=4)", budget=20)


def test_full_takes_no_budget():
    with pytest.raises(BudgetError, match="takes no budget"):
        build_recipe("full", budget=64)


def test_registry_lists_every_recipe_name():
    names = kvsurgery.recipes()
    assert {"full", "streaming", "h2o", "snapkv", "pyramidkv", "adakv"} <= set(names)
    assert "select" not in names  # core passes are not recipe names
    assert all(isinstance(doc, str) and doc for doc in names.values())
