"""apply(..., compile=True) compiles the prompt-length axis symbolically from the first call: a second and a third
distinct prompt length reuse the prefill and decode graphs (no Dynamo recompile), with the eager surgery's tokens."""

import pytest
import torch

import kvsurgery
from kvsurgery.testing import tiny_model

RECIPE, BUDGET = "snapkv(window=4)", 0.5  # a fractional budget: the store's slot count follows the prompt length
LENGTHS = (21, 30, 44)


def _generate(model, ids):
    with torch.no_grad():
        mask = torch.ones_like(ids)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    return out[:, ids.shape[1] :]


@pytest.mark.slow
def test_new_prompt_lengths_never_recompile():
    model = tiny_model("llama", layers=1, heads=4, kv_heads=2)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (1, n), generator=gen) for n in LENGTHS]
    kvsurgery.apply(model, RECIPE, budget=BUDGET)
    try:
        eager = [_generate(model, ids) for ids in prompts]
    finally:
        kvsurgery.restore(model)
    torch._dynamo.reset()
    kvsurgery.apply(model, RECIPE, budget=BUDGET, compile=True)
    try:
        assert torch.equal(_generate(model, prompts[0]), eager[0])  # compiles the prefill and the decode graph
        with torch.compiler.set_stance("fail_on_recompile"):  # raises on any recompile
            for ids, expected in zip(prompts[1:], eager[1:], strict=True):
                assert torch.equal(_generate(model, ids), expected)
    finally:
        kvsurgery.restore(model)
