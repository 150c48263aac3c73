"""RULER-style synthetic long-context tasks, generated from a seed (no downloads) at a target length measured
in tokens of the model's tokenizer.

    samples = generate(tokenizer, "niah_single", length=2048, n=50, seed=0)
    score(samples[0].scoring, prediction, samples[0].answers)   # 0.0 .. 1.0

Each task renders a prompt from `n` haystack units (filler words, JSON pairs, list entries); a binary search
picks the largest `n` whose prompt fits the target, so prompts land a few tokens under it. Everything random
is drawn from `random.Random(seed)` in a fixed order (answers first), so a sample does not depend on the
length search, and the same seed gives the same prompts on every machine.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

# The RULER / passkey "noise" haystack (also used by the passkey papers), repeated sentence by sentence.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_ADJECTIVES = (
    "ancient bitter brave calm clever cold crisp curious damp eager early faint fancy fierce gentle golden "
    "hollow honest humble icy jolly late lively lucky mellow narrow noisy odd pale plain proud quiet rapid "
    "rough rusty shiny silent simple sleepy smooth solid spicy steady sticky stormy sweet swift tall tender "
    "tidy tiny vivid warm wicked wild windy wise young"
).split()
_NOUNS = (
    "anchor apple badge basket beach bicycle blanket bottle bread bridge brush button cabin camera candle "
    "canyon carpet castle chair cloud coffee comet cookie cottage crayon desert diamond dragon drum engine "
    "feather fence forest garden glacier guitar hammer harbor helmet island jacket kettle ladder lantern "
    "lemon library magnet marble meadow mirror monkey mountain needle ocean orchard painter parrot pencil "
    "pepper piano pillow planet pocket pumpkin rabbit river rocket saddle scarf shadow shovel silver spider "
    "statue stone teapot tiger tower trumpet tunnel umbrella valley violin wagon window wizard"
).split()
_VERBS = (
    "admires builds carries chases cleans describes discovers follows gathers guards holds imagines joins "
    "measures moves notices opens paints protects reaches remembers repairs shapes studies visits watches"
).split()
_PLACES = "above across behind beside beyond inside near under".split()


@dataclass(frozen=True)
class Sample:
    """One prompt with its expected answer(s) and the rule that scores a prediction against them."""

    task: str
    length: int  # target length in tokens
    index: int
    seed: int
    prompt: str
    answers: tuple[str, ...]
    scoring: str  # "substring" (any answer), "all" (fraction of answers present) or "set" (word overlap)
    max_new_tokens: int
    question_first: bool
    n_tokens: int  # actual prompt length in tokens


@dataclass(frozen=True)
class _Parts:
    """A rendered task: instructions, the haystack, the question and the answer prefix the model continues."""

    intro: str
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]

    def prompt(self, question_first: bool) -> str:
        if question_first:
            return f"{self.intro}\n{self.question}\n\n{self.context}\n\n{self.answer_prefix}"
        return f"{self.intro}\n\n{self.context}\n\n{self.question} {self.answer_prefix}"


@dataclass(frozen=True)
class TaskSpec:
    build: Callable[[random.Random, int], _Parts]  # (rng, haystack units) -> parts
    scoring: str
    max_new_tokens: int
    max_units: int  # an upper bound for the length search (units are at least one token each)


# ---- haystack pieces ------------------------------------------------------------------------------------


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _uuid(rng: random.Random) -> str:
    h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _key_words(rng: random.Random, count: int) -> list[str]:
    """Distinct 'adjective-noun' keys (hyphenated, so never present in the filler)."""
    keys: list[str] = []
    while len(keys) < count:
        key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if key not in keys:
            keys.append(key)
    return keys


def _essay_words(rng: random.Random, n_words: int) -> list[str]:
    """Plain English-like sentences (no digits, no hyphens) as a word stream; sentences end with '.'."""
    words: list[str] = []
    while len(words) < n_words:
        a, b = rng.sample(_NOUNS, 2)
        words += f"The {rng.choice(_ADJECTIVES)} {a} {rng.choice(_VERBS)} the {b} {rng.choice(_PLACES)} the".split()
        words += (
            [f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}."] if rng.random() < 0.5 else [f"{rng.choice(_NOUNS)}."]
        )
    return words[:n_words]


def _noise_words(n_words: int) -> list[str]:
    base = NOISE.split()
    return [base[i % len(base)] for i in range(n_words)]


def _insert(words: list[str], needles: list[str], depths: list[float]) -> str:
    """Join words into text with each needle sentence placed at a depth (fraction), on a sentence boundary."""
    cuts = [0] + [i + 1 for i, w in enumerate(words) if w.endswith(".")]
    pieces: dict[int, list[str]] = {}
    for needle, depth in zip(needles, depths, strict=True):
        target = depth * len(words)
        cut = min(cuts, key=lambda c: abs(c - target))
        pieces.setdefault(cut, []).append(needle)
    out: list[str] = []
    for i, word in enumerate(words):
        out += pieces.get(i, [])
        out.append(word)
    out += pieces.get(len(words), [])
    return " ".join(out)


def _depths(rng: random.Random, count: int) -> list[float]:
    return [rng.uniform(0.05, 0.95) for _ in range(count)]


# ---- the tasks ------------------------------------------------------------------------------------------

_NIAH_INTRO = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)


def _passkey(rng: random.Random, n: int) -> _Parts:
    key = _number(rng, 5)
    depth = rng.uniform(0.05, 0.95)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _Parts(
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.",
        _insert(_noise_words(n), [needle], [depth]),
        "What is the pass key?",
        "The pass key is",
        (key,),
    )


def _niah(rng: random.Random, n: int, n_keys: int, n_values: int) -> _Parts:
    keys = _key_words(rng, n_keys)
    values = [_number(rng, 7) for _ in range(n_keys * n_values)]
    depths = _depths(rng, n_keys * n_values)
    needles = [
        f"One of the special magic numbers for {keys[i // n_values]} is: {value}." for i, value in enumerate(values)
    ]
    order = list(range(len(needles)))
    rng.shuffle(order)
    context = _insert(_essay_words(rng, n), [needles[i] for i in order], depths)
    key = keys[0]
    if n_values == 1:
        question = f"What is the special magic number for {key} mentioned in the provided text?"
        prefix = f"The special magic number for {key} mentioned in the provided text is"
    else:
        question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
        prefix = f"The special magic numbers for {key} mentioned in the provided text are"
    return _Parts(_NIAH_INTRO, context, question, prefix, tuple(values[:n_values]))


def _kv_retrieval(rng: random.Random, n: int) -> _Parts:
    target_key, target_value = _uuid(rng), _uuid(rng)
    position = rng.randint(0, max(0, n - 1))
    pairs = [f'"{_uuid(rng)}": "{_uuid(rng)}"' for _ in range(max(0, n - 1))]
    pairs.insert(position, f'"{target_key}": "{target_value}"')
    return _Parts(
        "Extract the value corresponding to the specified key in the JSON object below.",
        "JSON data:\n{" + ", ".join(pairs) + "}",
        f'Key: "{target_key}"',
        "The value associated with the specified key is:",
        (target_value,),
    )


def _variable_tracking(rng: random.Random, n: int, hops: int = 4) -> _Parts:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = _number(rng, 5)
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(_depths(rng, len(chain)))
    return _Parts(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.",
        _insert(_noise_words(n), chain, depths),
        f"Question: Find all variables that are assigned the value {value} in the text above.",
        f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
        f"assigned the value {value}, they are:",
        tuple(names),
    )


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 3)))


def _common_words(rng: random.Random, n: int, n_common: int = 10) -> _Parts:
    """A numbered word list in which `n_common` words repeat often and all others appear once."""
    vocabulary: list[str] = []
    while len(vocabulary) < n_common + n:
        word = _pseudo_word(rng)
        if word not in vocabulary:
            vocabulary.append(word)
    common, rare = vocabulary[:n_common], vocabulary[n_common:]
    repeats = max(3, n // (4 * n_common))  # common words fill about a quarter of the list
    entries = common * repeats + rare[: max(0, n - n_common * repeats)]
    rng.shuffle(entries)
    listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries))
    return _Parts(
        "Below is a numbered list of words. In these words, some appear more often than others. "
        "Memorize the ones that appear most often.",
        listing,
        f"Question: What are the {n_common} most common words in the above list?",
        f"Answer: The top {n_common} words that appear most often in the list are:",
        tuple(common),
    )


TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec(_passkey, "substring", 10, 1 << 16),
    "niah_single": TaskSpec(lambda rng, n: _niah(rng, n, 1, 1), "substring", 12, 1 << 16),
    "niah_multikey": TaskSpec(lambda rng, n: _niah(rng, n, 4, 1), "substring", 12, 1 << 16),
    "niah_multivalue": TaskSpec(lambda rng, n: _niah(rng, n, 1, 4), "all", 40, 1 << 16),
    "kv_retrieval": TaskSpec(_kv_retrieval, "substring", 40, 1 << 12),
    "vt": TaskSpec(_variable_tracking, "all", 30, 1 << 16),
    "cwe": TaskSpec(_common_words, "set", 60, 1 << 13),
}


# ---- generation and scoring -----------------------------------------------------------------------------


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)


def generate(tokenizer, task: str, length: int, n: int, seed: int = 0, question_first: bool = False) -> list[Sample]:
    """`n` samples of `task` whose prompts are at most `length` tokens (and as close to it as the units allow)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    spec = TASKS[task]
    out = []
    for index in range(n):
        sample_seed = _sample_seed(seed, task, length, index)

        def render(units: int, _seed: int = sample_seed) -> _Parts:
            return spec.build(random.Random(_seed), units)

        def fits(units: int) -> bool:
            return _count(tokenizer, render(units).prompt(question_first)) <= length

        if not fits(1):
            raise ValueError(f"task {task!r} needs more than {length} tokens even with a minimal haystack")
        lo, hi = 1, spec.max_units  # invariant: fits(lo); the answer is < hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        parts = render(lo)
        prompt = parts.prompt(question_first)
        out.append(
            Sample(
                task=task,
                length=length,
                index=index,
                seed=sample_seed,
                prompt=prompt,
                answers=parts.answers,
                scoring=spec.scoring,
                max_new_tokens=spec.max_new_tokens,
                question_first=question_first,
                n_tokens=_count(tokenizer, prompt),
            )
        )
    return out


def _sample_seed(seed: int, task: str, length: int, index: int) -> int:
    """A per-sample seed independent of Python's hash randomization."""
    return random.Random(f"{seed}/{task}/{length}/{index}").getrandbits(63)


def score(rule: str, prediction: str, answers: tuple[str, ...] | list[str]) -> float:
    """RULER's metrics: 'substring' = 1 if any answer occurs in the prediction; 'all' = fraction of answers that
    occur (string_match_all); 'set' = fraction of answers among the prediction's words (order-free)."""
    pred = prediction.lower()
    refs = [a.lower() for a in answers]
    if rule == "substring":
        return float(any(r in pred for r in refs))
    if rule == "all":
        return sum(r in pred for r in refs) / len(refs)
    if rule == "set":
        words = set(re.findall(r"[a-z0-9]+", pred))
        return len(words & set(refs)) / len(refs)
    raise ValueError(f"unknown scoring rule {rule!r}: use 'substring', 'all' or 'set'")
