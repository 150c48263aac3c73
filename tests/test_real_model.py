"""The real SmolLM2-135M (CPU): `full` is token-identical; SnapKV at a 20% budget still finds a passkey.

SnapKV runs with the 8-token observation window of the PyramidKV/HeadKV/Ada-KV repos: on this ~800-token prompt
the default 32-token window is mostly filler and dilutes the question's attention (measured: it answers " 60.").
"""

import random

import pytest
import torch

import kvsurgery

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(key: int, repeats: int, depth: float) -> str:
    before = int(repeats * depth)
    return (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        + FILLER * before
        + f"The pass key is {key}. Remember it. {key} is the pass key. "
        + FILLER * (repeats - before)
        + "What is the pass key? The pass key is"
    )


def test_full_is_token_identical_and_snapkv_keeps_the_passkey(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=16, do_sample=False)
    key = random.Random(0).randint(10000, 99999)
    prompt = tokenizer(passkey_prompt(key, repeats=30, depth=0.3), return_tensors="pt").input_ids
    assert 600 < prompt.shape[1] < 1000

    kvsurgery.apply(model, "full")
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False), expected)
    finally:
        kvsurgery.restore(model)

    kvsurgery.apply(model, "snapkv(window=8,kernel=7,pool=max)", budget=0.2)
    try:
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
        answer = tokenizer.decode(out[0, prompt.shape[1] :])
        assert str(key) in answer, answer
        store = model._kvsurgery.last_store
        assert int(store.layers[0].keep[0, 0]) == -(-prompt.shape[1] // 5)  # ceil(20% of the prompt)
    finally:
        kvsurgery.restore(model)


def test_gemma3_sliding_layers_are_exact_and_compressed_runs_find_the_passkey(gemma3):
    """Real hybrid model: 512-token sliding layers + global layers, a prompt longer than the window."""
    model, tokenizer = gemma3
    key = random.Random(2).randint(10000, 99999)
    prompt = tokenizer(passkey_prompt(key, repeats=40, depth=0.3), return_tensors="pt").input_ids
    assert prompt.shape[1] > model.config.sliding_window
    expected = model.generate(prompt, max_new_tokens=8, do_sample=False)
    kvsurgery.apply(model, "full")
    try:
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)
    finally:
        kvsurgery.restore(model)
    kvsurgery.apply(model, "pyramidkv", budget=0.2)
    try:
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
        assert str(key) in tokenizer.decode(out[0, prompt.shape[1] :])
    finally:
        kvsurgery.restore(model)
