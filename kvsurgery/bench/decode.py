"""`kvsurgery bench`: decode speed and memory of recipes on a model, against HF's full cache in the same run.

The model is a named shape with random weights (`--shape`) or a real loadable model (`--model smollm2-135m`, any
name or folder `kvsurgery.models.load_model` takes). For every context x batch it times `generate()` (random
prompt, greedy, a fixed number of new tokens, after one warm-up call that compiles) for HF's full cache: the
default DynamicCache (eager) and the static cache (eager; compiled by generate itself on CUDA, and as an extra row
on CPU with --compile), for each recipe through kvsurgery, and for kvpress SnapKV when a separate environment with
kvpress is given. It reports prefill s, decode ms/token (the median step), tokens/s, peak GiB, cache GiB, the MB a
decode step reads (weights + cache, see `weight_bytes_per_step`), the bandwidth floor (those bytes over the
measured device copy bandwidth) and the speed-up over HF's default and static caches; prints a table and writes
JSON. `--attention` benchmarks the decode-attention kernel alone.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial

import torch

from kvsurgery.bench.attention import QUANT_RECIPES, attention_rows, split_recipes
from kvsurgery.compat import output_cache
from kvsurgery.errors import KVSurgeryError, RecipeError

GIB = 2**30
SHAPES = {
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    "tiny": dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # KIVI's default groups of 32 channels fit
        max_position_embeddings=131072,
    ),
}
DEFAULT_RECIPES = "full,snapkv,headkv,kivi2,headkv+quant1bit"


HF_DEFAULT = "full (dynamic cache)"
HF_STATIC = "full (static cache)"
HF_STATIC_COMPILED = "full (static cache, compiled)"


@dataclass
class Row:
    engine: str  # "hf", "kvsurgery" or "kvpress"
    recipe: str
    context: int
    batch: int
    status: str = "ok"  # ok | skipped | failed | oom
    reason: str = ""
    warmup_s: float | None = None  # the first, untimed call's wall time: it compiles
    prefill_s: float | None = None
    decode_ms: float | None = None  # the median step
    decode_mean_ms: float | None = None  # the mean step (it counts the rare slow steps, e.g. KIVI's flushes)
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    cache_gib: float | None = None
    step_mb: float | None = None  # bytes a decode step reads: weights + the cache it holds, in 1e6 bytes
    floor_ms: float | None = None
    of_floor: float | None = None  # floor_ms / decode_ms: 1.0 would be at the bandwidth floor
    vs_hf_default: float | None = None  # HF DynamicCache decode ms / this decode ms, same context and batch
    vs_hf_static: float | None = None  # the fastest HF static-cache row's decode ms / this decode ms
    rounds_ms: list[float] | None = None  # --rounds: the median step of each round's call


def _tokens(text: str) -> list[int]:
    """'16K,64K,300' -> [16384, 65536, 300]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        scale = 1024 if item[-1] in "kK" else 1
        out.append(int(item.rstrip("kK")) * scale)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES), help="model shape (random weights)")
    parser.add_argument("--model", default=None, help="a real model instead of --shape: packaged name or local folder")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="timed generate() calls per row (median step of all)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time the rows side by side: every engine on its own copy of the model (memory: one per row), then this "
        "many rounds that time each once; ratios are the median of the per-round ratios (for a machine whose speed "
        "drifts). Default: each row alone in turn",
    )
    parser.add_argument(
        "--calibration", default=None, help="artefact for recipes that need one (default: synthetic, speed only)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on CPU unless given")
    parser.add_argument("--contexts", default="16K,64K", help="prompt lengths, comma separated (K = 1024)")
    parser.add_argument("--batch", default="1,16", help="batch sizes, comma separated")
    parser.add_argument("--recipes", default=DEFAULT_RECIPES, help="kvsurgery recipes, comma separated")
    parser.add_argument("--budget", type=float, default=0.1, help="fraction of the prompt kept (recipes with a budget)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per timed call")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    parser.add_argument("--no-hf", action="store_true", help="skip HF's full-cache baseline")
    parser.add_argument("--kvpress-python", default=None, help="python of a venv with kvpress (transformers<5.3)")
    parser.add_argument("--attention", action="store_true", help="benchmark the decode-attention kernels alone")
    parser.add_argument(
        "--quant",
        default=",".join(QUANT_RECIPES),
        help="--attention: quantization recipes whose layouts get a fused-dequantization kernel row ('' = none)",
    )
    parser.add_argument("--out", default="kvsurgery-bench.json", help="JSON results file")
    parser.add_argument("--seed", type=int, default=0)


# -- measurement ------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + bytes written per second)."""
    nbytes = nbytes or (1 * GIB if device.type == "cuda" else 64 * 2**20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


class _StepClock:
    """A logits processor that timestamps every generation step (after the device finished it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        _sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def timed_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs) -> tuple[float, list[float], object]:
    """(prefill seconds, decode ms of every step, generate output) of one greedy generate call."""
    from transformers import LogitsProcessorList

    clock = _StepClock(ids.device)
    _sync(ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            return_dict_in_generate=True,
            **kwargs,
        )
    steps = clock.stamps
    return steps[0] - start, [(b - a) * 1e3 for a, b in itertools.pairwise(steps)], out


def random_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    """A Llama-architecture causal LM of the named shape with random weights, on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    model.generation_config.pad_token_id = 0
    return model


def real_model(name: str, device: torch.device, dtype: torch.dtype):
    """A real model loaded by `kvsurgery.models.load_model` (never downloads), on `device`."""
    from kvsurgery.models import load_model

    model, _ = load_model(name, dtype=dtype)
    model = model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.eos_token_id
    return model


def weight_bytes_per_step(model) -> int:
    """Parameter bytes a decode step reads: all weights except an untied input embedding (only B rows are read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    if embed is not model.get_output_embeddings().weight:
        total -= embed.numel() * embed.element_size()
    return total


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


Call = tuple[float, list[float], int]  # one timed generate call: prefill s, decode ms of every step, cache bytes


@dataclass
class Engine:
    """How one row generates: `once()` times a generate call; `close()` undoes its setup (`kvsurgery.restore`)."""

    row: Row
    once: Callable[[], Call]
    close: Callable[[], None] = lambda: None


def _fill(row: Row, calls: list[Call], floor_bytes_of, bandwidth: float) -> None:
    """The row's numbers from its timed calls (decode: the median and the mean step of all)."""
    steps = [ms for _, step_ms, _ in calls for ms in step_ms]
    cache_bytes = calls[-1][2]
    row.prefill_s = statistics.median(prefill for prefill, _, _ in calls)
    row.decode_ms = statistics.median(steps) if steps else float("nan")
    row.decode_mean_ms = statistics.fmean(steps) if steps else float("nan")
    row.tokens_per_s = row.batch * 1e3 / row.decode_ms
    row.cache_gib = cache_bytes / GIB
    row.step_mb = floor_bytes_of(cache_bytes) / 1e6
    row.floor_ms = floor_bytes_of(cache_bytes) / bandwidth * 1e3
    row.of_floor = row.floor_ms / row.decode_ms


def _warm_up(engine: Engine) -> None:
    start = time.perf_counter()
    engine.once()
    engine.row.warmup_s = time.perf_counter() - start


def measure_alone(engine: Engine, device: torch.device, floor_bytes_of, bandwidth: float, repeats: int) -> None:
    """Warm up (compiles), then time `repeats` calls of one engine; on CUDA also its peak memory."""
    _warm_up(engine)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _fill(engine.row, [engine.once() for _ in range(repeats)], floor_bytes_of, bandwidth)
    if device.type == "cuda":
        engine.row.peak_gib = torch.cuda.max_memory_allocated(device) / GIB


def measure_interleaved(engines: list[Engine], device: torch.device, floor_bytes_of, bandwidth: float,
                        rounds: int) -> None:  # fmt: skip
    """Warm every engine up (compiles), then `rounds` rounds that time each engine once, so that a drift of the
    machine's speed (a shared VM's neighbours, its clock) hits every engine alike; each row keeps its rounds' median
    steps (`rounds_ms`) for the per-round ratios. Peak memory is not measured: every engine's model is resident."""
    live = [e for e in engines if e.row.status == "ok"]
    for e in live:
        _guarded(e.row, device, lambda e=e: _warm_up(e), release=False)
        print(f"{e.row.engine} {e.row.recipe}: warm-up (compiles) {e.row.warmup_s or 0:.0f} s", flush=True)
    calls: dict[int, list[Call]] = {id(e): [] for e in live}
    for i in range(rounds):
        for e in live:
            if e.row.status == "ok":
                _guarded(e.row, device, lambda e=e: calls[id(e)].append(e.once()), release=False)
        medians = (f"{e.row.recipe} {statistics.median(calls[id(e)][-1][1]):.1f}" for e in live if e.row.status == "ok")
        print(f"round {i + 1}/{rounds}, median ms/token: " + ", ".join(medians), flush=True)
    for e in live:
        if e.row.status == "ok":
            _fill(e.row, calls[id(e)], floor_bytes_of, bandwidth)
            e.row.rounds_ms = [statistics.median(step_ms) for _, step_ms, _ in calls[id(e)]]


def _release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _guarded(row: Row, device: torch.device, body, release: bool = True) -> Row:
    """Run a step of a row; an out-of-memory or a kvsurgery error becomes the row's status, not a crash."""
    try:
        body()
    except torch.OutOfMemoryError as exc:
        row.status, row.reason = "oom", str(exc).splitlines()[0]
    except (KVSurgeryError, ValueError) as exc:
        row.status, row.reason = "failed", str(exc)
    finally:
        if release:
            _release(device)
    return row


def _budget_for(recipe: str, budget: float) -> float | None:
    """The budget a recipe takes: `budget`, or None for recipes that keep everything (e.g. 'full')."""
    from kvsurgery.manager import selects_tokens

    return budget if selects_tokens(recipe) else None


def _unregistered(recipe: str) -> str | None:
    """Why a recipe cannot be built in this installation (a pass not registered yet), or None."""
    from kvsurgery import registry
    from kvsurgery.recipe import parse

    for spec in parse(recipe):
        try:
            registry.get(spec.name)
        except RecipeError as exc:
            return f"pass '{spec.name}' is not registered in this installation ({exc})"
    return None


def speed_calibration(model, recipe: str, folder: pathlib.Path, seed: int) -> dict:
    """Options for recipes that need a calibration artefact, made up for a speed run on random weights.

    HeadKV's head scores are drawn log-normal (seeded): a few heads get most of the budget, as calibrated scores
    of real models do, which is what matters for speed (uneven per-head lengths). Never use them for accuracy.
    """
    from kvsurgery.calibration.artefact import Artefact, ModelIdentity, save
    from kvsurgery.recipe import parse

    names = {spec.name for spec in parse(recipe)}
    criterion = "reasoning" if "headkv-r2" in names else "retrieval" if "headkv" in names else None
    if criterion is None:
        return {}
    config = model.config
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(config.num_hidden_layers, config.num_attention_heads, generator=g, dtype=torch.float64)
    data = {"criterion": criterion, "scores": (2.0 * scores).exp().tolist()}
    params = {"synthetic": "log-normal head scores for speed measurements on random weights"}
    path = save(Artefact("headkv", ModelIdentity.of(model), params, data), folder / f"headkv-{criterion}.json")
    return {"calibration": str(path)}


def hf_engine(model, ids, args, kind: str) -> Engine:
    """HF generate with its full cache: `HF_DEFAULT` (DynamicCache, eager), `HF_STATIC` (static cache; generate
    compiles it on CUDA) or `HF_STATIC_COMPILED` (static cache, generate's compile forced on a CPU)."""
    from transformers import CompileConfig

    options = {} if kind == HF_DEFAULT else {"cache_implementation": "static"}
    if kind == HF_STATIC_COMPILED:
        config = CompileConfig(fullgraph=True, mode="default")
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told
        options["compile_config"] = config

    def once() -> Call:
        prefill, steps, out = timed_generate(model, ids, args.new_tokens, **options)
        return prefill, steps, _cache_bytes(output_cache(out))

    return Engine(Row("hf", kind, ids.shape[1], ids.shape[0]), once)


def surgery_engine(model, ids, recipe: str, args, compile: bool) -> Engine:
    """`recipe` applied to `model` (restored by `close`); a recipe this installation cannot build is a skipped row."""
    import kvsurgery

    def once() -> Call:
        prefill, decode, _ = timed_generate(model, ids, args.new_tokens)
        return prefill, decode, model._kvsurgery.last_store.nbytes

    engine = Engine(Row("kvsurgery", recipe, ids.shape[1], ids.shape[0]), once)
    reason = _unregistered(recipe)
    if reason:
        engine.row.status, engine.row.reason = "skipped", reason
        return engine
    with tempfile.TemporaryDirectory() as folder:
        options = speed_calibration(model, recipe, pathlib.Path(folder), args.seed)
        if options and args.calibration:
            options = {"calibration": args.calibration}
        kvsurgery.apply(model, recipe, _budget_for(recipe, args.budget), compile=compile, **options)
    engine.close = lambda: kvsurgery.restore(model)
    return engine


def _built(row: Row, device: torch.device, build: Callable[[], Engine]) -> Engine:
    """`build()`, or an engine of `row` saying why it could not be built (it is never timed)."""
    built: list[Engine] = []
    _guarded(row, device, lambda: built.append(build()), release=False)
    return built[0] if built else Engine(row, _never)


def _never() -> Call:
    raise AssertionError("an engine that was not built is never timed")


def kvpress_row(args, context: int, batch: int, dtype: torch.dtype, bandwidth: float, weights: int) -> Row:
    """kvpress SnapKV at the same compression, run by the python of a separate venv (it pins transformers<5.3)."""
    row = Row("kvpress", f"SnapKVPress(compression_ratio={1 - args.budget:g})", context, batch)
    if not args.kvpress_python:
        row.status = "skipped"
        row.reason = "kvpress pins transformers<5.3: install it in a separate venv and pass --kvpress-python"
        return row
    script = pathlib.Path(__file__).with_name("kvpress_peer.py")
    job = dict(
        config=SHAPES[args.shape], context=context, batch=batch, device=args.device, dtype=str(dtype).split(".")[-1],
        compression_ratio=1 - args.budget, new_tokens=args.new_tokens, seed=args.seed,
    )  # fmt: skip
    proc = subprocess.run([args.kvpress_python, str(script), json.dumps(job)], capture_output=True, text=True)
    if proc.returncode != 0:
        row.status, row.reason = "failed", (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return row
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    row.prefill_s, row.decode_ms, row.peak_gib = result["prefill_s"], result["decode_ms"], result["peak_gib"]
    row.cache_gib = result["cache_bytes"] / GIB
    row.tokens_per_s = batch * 1e3 / row.decode_ms
    row.step_mb = (weights + result["cache_bytes"]) / 1e6
    row.floor_ms = (weights + result["cache_bytes"]) / bandwidth * 1e3
    row.of_floor = row.floor_ms / row.decode_ms
    return row


# -- report -----------------------------------------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    head = ("engine", "recipe", "ctx", "B", "prefill s", "ms/tok", "mean ms", "tok/s", "peak GiB", "cache GiB",
            "step MB", "floor ms", "of floor", "vs HF default", "vs HF static")  # fmt: skip
    lines = [head]
    for r in rows:
        if r.status != "ok":
            lines.append((r.engine, r.recipe, str(r.context), str(r.batch), f"{r.status}: {r.reason}"))
            continue
        lines.append((r.engine, r.recipe, str(r.context), str(r.batch), _fmt(r.prefill_s, ".2f"),
                      _fmt(r.decode_ms, ".2f"), _fmt(r.decode_mean_ms, ".2f"), _fmt(r.tokens_per_s, ".1f"),
                      _fmt(r.peak_gib, ".2f"), _fmt(r.cache_gib, ".4f"), _fmt(r.step_mb, ".1f"),
                      _fmt(r.floor_ms, ".3f"), _fmt(r.of_floor, ".2f"), _fmt(r.vs_hf_default, ".2f"),
                      _fmt(r.vs_hf_static, ".2f")))  # fmt: skip
    widths = [max(len(line[i]) for line in lines if len(line) > i and len(line) == len(head)) for i in range(len(head))]
    out = []
    for line in lines:
        cells = [c.ljust(w) for c, w in zip(line, widths, strict=False)] if len(line) == len(head) else list(line)
        out.append("| " + " | ".join(cells) + " |")
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kvsurgery bench: --device cuda but no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.rounds < 1 or args.repeats < 1 or (args.rounds > 1 and args.repeats > 1):
        print("kvsurgery bench: --rounds and --repeats are >= 1, and only one of them above 1", file=sys.stderr)
        return 2
    contexts, batches = _tokens(args.contexts), _tokens(args.batch)
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth(device)
    meta = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, transformers=_version("transformers"), model=args.model or f"shape {args.shape}",
        dtype=str(dtype), budget=args.budget, new_tokens=args.new_tokens, repeats=args.repeats, rounds=args.rounds,
        threads=torch.get_num_threads(), cpu_count=_cpu_count(), copy_bandwidth_gbps=bandwidth / 1e9,
        command=" ".join(sys.argv),
    )  # fmt: skip
    print(f"kvsurgery bench: {meta['device']}, copy bandwidth {bandwidth / 1e9:.1f} GB/s, {meta['model']} {dtype}")
    if args.attention:
        quant = split_recipes(args.quant)
        results = attention_rows(SHAPES[args.shape], contexts, batches, device, dtype, bandwidth, quant)
        for result in results:
            if result["status"] != "ok":
                print(f"attention kernel: {result['status']}: {result['reason']}")
        _write(args.out, meta, results)
        return 0
    compile = device.type == "cuda" if args.compile is None else args.compile
    model = real_model(args.model, device, dtype) if args.model else random_model(args.shape, device, dtype, args.seed)
    weights = weight_bytes_per_step(model)
    meta["weight_bytes_per_step"] = weights

    def floor(cache_bytes: int) -> int:
        return weights + cache_bytes

    rows: list[Row] = []

    def report(group: list[Row], new: list[Row]) -> None:
        """Print and save rows as soon as they are measured (a long run keeps what it got)."""
        _ratios(group)
        for row in new:
            print(table([row]).splitlines()[-1], flush=True)
        _write(args.out, meta, [asdict(r) for r in rows + group], quiet=True)

    gen = torch.Generator().manual_seed(args.seed)
    for context in contexts:
        for batch in batches:
            ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=gen).to(device)
            kinds = [] if args.no_hf else [HF_DEFAULT, HF_STATIC]
            kinds += [HF_STATIC_COMPILED] if kinds and compile and device.type == "cpu" else []
            recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
            makers = [(Row("hf", k, context, batch), partial(hf_engine, ids=ids, args=args, kind=k)) for k in kinds]
            build = partial(surgery_engine, ids=ids, args=args, compile=compile)
            makers += [(Row("kvsurgery", r, context, batch), partial(build, recipe=r)) for r in recipes]
            if args.rounds > 1:
                group = interleaved_group(model, makers, device, floor, bandwidth, args.rounds, report)
            else:
                group = alone_group(model, makers, device, floor, bandwidth, args.repeats, report)
            group.append(kvpress_row(args, context, batch, dtype, bandwidth, weights))
            report(group, group[-1:])
            rows += group
    print(table(rows))
    _write(args.out, meta, [asdict(r) for r in rows])
    return 0


Maker = tuple[Row, Callable[..., Engine]]  # the row a failed build reports, and the engine's builder (takes the model)


def alone_group(model, makers: list[Maker], device, floor, bandwidth: float, repeats: int, report) -> list[Row]:
    """Each engine in turn on the one model: built, timed (`measure_alone`), closed and released before the next."""
    group: list[Row] = []
    for row, make in makers:
        engine = _built(row, device, lambda make=make: make(model))
        if engine.row.status == "ok":

            def body(engine=engine) -> None:
                try:
                    measure_alone(engine, device, floor, bandwidth, repeats)
                finally:
                    engine.close()

            _guarded(engine.row, device, body)
        group.append(engine.row)
        report(group, group[-1:])
    return group


def interleaved_group(model, makers: list[Maker], device, floor, bandwidth: float, rounds: int, report) -> list[Row]:
    """Every engine on its own copy of the model, timed round by round (`measure_interleaved`)."""
    engines = [_built(row, device, lambda make=make: make(copy.deepcopy(model))) for row, make in makers]
    try:
        measure_interleaved(engines, device, floor, bandwidth, rounds)
    finally:
        for engine in engines:
            engine.close()
        _release(device)
    group = [e.row for e in engines]
    report(group, group)
    return group


def _ratios(group: list[Row]) -> None:
    """Fill each row's speed-up over HF's default cache and over its fastest static-cache row."""
    hf = {r.recipe: r for r in group if r.engine == "hf" and r.status == "ok"}
    static = [hf[k] for k in (HF_STATIC, HF_STATIC_COMPILED) if k in hf]
    for r in group:
        if r.decode_ms:
            r.vs_hf_default = _speedup([hf[HF_DEFAULT]] if HF_DEFAULT in hf else [], r)
            r.vs_hf_static = _speedup(static, r)


def _speedup(base: list[Row], row: Row) -> float | None:
    """The fastest `base` row's decode ms over `row`'s; for rows timed in rounds, the median of the per-round ratios
    (each round's median steps), which a drift of the machine's speed between rounds leaves alone."""
    if not base:
        return None
    n = len(row.rounds_ms or ())
    if n and all(len(b.rounds_ms or ()) == n for b in base):
        return statistics.median(min(b.rounds_ms[i] for b in base) / ms for i, ms in enumerate(row.rounds_ms))
    return min(b.decode_ms for b in base) / row.decode_ms


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _write(path: str, meta: dict, rows: list[dict], quiet: bool = False) -> None:
    pathlib.Path(path).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if not quiet:
        print(f"wrote {path}")
