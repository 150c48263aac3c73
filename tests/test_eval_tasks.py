"""The task generator: seeded determinism, token lengths at the target, answers placed where intended, scoring."""

import re
from types import SimpleNamespace

import pytest

from kvsurgery.eval import tasks
from kvsurgery.eval.cli import _split


class WordTokenizer:
    """A stand-in tokenizer without downloads: one token per word or punctuation mark."""

    def __call__(self, text):
        return SimpleNamespace(input_ids=re.findall(r"\w+|[^\w\s]", text))


@pytest.fixture(scope="module")
def tokenizers():
    """The stand-in tokenizer, plus SmolLM2's real one when the model is installed (the converted folder)."""
    from kvsurgery import models

    out = {"words": WordTokenizer()}
    if models.available("smollm2-135m"):
        from transformers import AutoTokenizer

        path = models.cache_dir() / "smollm2-135m" / "hf"
        if not path.exists():
            models.load_model("smollm2-135m")  # converts once
        out["smollm2"] = AutoTokenizer.from_pretrained(str(path))
    return out


@pytest.mark.parametrize("task", list(tasks.TASKS))
def test_seeded_determinism_and_lengths(task, tokenizers):
    for name, tok in tokenizers.items():
        for length in (300, 700):
            a = tasks.generate(tok, task, length, n=2, seed=3)
            b = tasks.generate(tok, task, length, n=2, seed=3)
            assert a == b, name
            assert a[0].prompt != a[1].prompt
            assert tasks.generate(tok, task, length, n=1, seed=4)[0].prompt != a[0].prompt
            for s in a:
                assert s.n_tokens == len(tok(s.prompt).input_ids)
                # list-shaped haystacks move in steps of a whole unit: a JSON pair of two UUIDs is 64-76 SmolLM2
                # tokens, a numbered word a few
                slack = {"kv_retrieval": 80, "cwe": 60}.get(task, 8)
                assert length - slack <= s.n_tokens <= length, (name, task, s.n_tokens)


@pytest.mark.parametrize("task", ["passkey", "niah_single", "niah_multikey", "niah_multivalue", "kv_retrieval"])
def test_answers_appear_where_intended(task, tokenizers):
    tok = tokenizers["words"]
    for s in tasks.generate(tok, task, 700, n=4, seed=1):
        expected = 2 if task == "passkey" else 1  # the passkey needle states the key twice
        for answer in s.answers:
            assert s.prompt.count(answer) == expected, (answer, s.prompt)
        assert s.prompt.rstrip().endswith(("is", "are", "is:"))


def test_multikey_distractors_and_variable_chain():
    tok = WordTokenizer()
    s = tasks.generate(tok, "niah_multikey", 800, n=1, seed=2)[0]
    assert s.prompt.count("One of the special magic numbers for") == 4
    vt = tasks.generate(tok, "vt", 800, n=1, seed=2)[0]
    first, *rest = vt.answers
    assert re.search(rf"VAR {first} = \d{{5}}\.", vt.prompt)
    for prev, name in zip(vt.answers, rest, strict=False):
        assert f"VAR {name} = VAR {prev}." in vt.prompt
    cwe = tasks.generate(tok, "cwe", 800, n=1, seed=2)[0]
    words = re.findall(r"^\d+\. (\w+)$", cwe.prompt, flags=re.M)
    counts = {w: words.count(w) for w in set(words)}
    assert min(counts[w] for w in cwe.answers) > max(c for w, c in counts.items() if w not in cwe.answers)


def test_question_first_places_the_question_before_the_context():
    tok = WordTokenizer()
    after = tasks.generate(tok, "niah_single", 600, n=1, seed=5)[0]
    first = tasks.generate(tok, "niah_single", 600, n=1, seed=5, question_first=True)[0]
    question = "What is the special magic number for"
    assert after.prompt.index(question) > after.prompt.index("One of the special")
    assert first.prompt.index(question) < first.prompt.index("One of the special")
    assert first.answers == after.answers


def test_scoring_rules():
    assert tasks.score("substring", " 12345. The", ("12345",)) == 1.0
    assert tasks.score("substring", " 1234", ("12345",)) == 0.0
    assert tasks.score("all", "AAAAA and CCCCC", ("AAAAA", "BBBBB", "CCCCC", "DDDDD")) == 0.5
    assert tasks.score("all", "aaaaa", ("AAAAA",)) == 1.0  # case-insensitive, as RULER
    assert tasks.score("set", "1. lusi 2. zafa, bobo", ("lusi", "zafa", "kemo", "nigu")) == 0.5
    assert tasks.score("set", "lusizafa", ("lusi", "zafa")) == 0.0  # whole words only
    with pytest.raises(ValueError, match="scoring rule"):
        tasks.score("exact", "x", ("x",))
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate(WordTokenizer(), "ruler", 100, 1)
    with pytest.raises(ValueError, match="more than 10 tokens"):
        tasks.generate(WordTokenizer(), "passkey", 10, 1)


def test_cli_splits_recipes_outside_parentheses():
    assert _split("full, snapkv(window=8,kernel=7),pyramidkv") == ["full", "snapkv(window=8,kernel=7)", "pyramidkv"]
