"""The compressed KV store: fixed-capacity buffers per layer, one segment per (batch row, KV head).

Memory is really freed: a layer allocates `slots = sum(keep per head) + n_kv_heads * room` token slots per
row, never the full prompt length. Shapes are static after allocation (CUDA-graph friendly); eviction and
appends overwrite slots in place. The store is a transformers `Cache`, so `generate()` drives it, but its
`update` only emits the `kvsurgery::kv_update` marker that the graph passes rewrite into real ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from kvsurgery.errors import CacheCapacityError, KVSurgeryError

# Every tensor a layer's store can hold, declared once: the ops take them in these orders (kvsurgery.ops.schema).
CORE_TENSORS = ("k_store", "v_store", "pos", "slot_score", "keep", "cap", "start", "length", "seen")
QUANT_TENSORS = ("qk_codes", "qk_scale", "qk_low", "qv_codes", "qv_scale", "qv_low", "q_start", "q_cap", "q_len")
LABEL_TENSORS = ("labels", "label_range")  # Double Sparsity's label cache; label_range only for quantized labels
STORE_TENSORS = {name: "Tensor" for name in (*CORE_TENSORS, *QUANT_TENSORS, "labels")} | {"label_range": "Tensor?"}


class LayerTensors:
    """A layer's store tensors by name (`s.k_store`, `s.q_len`): how references and kernel launchers take the store.

    Its fields are `STORE_TENSORS`. An op's flat store arguments are packed into one (`kvsurgery.ops.schema.by_name`)
    with only the tensors that op takes, so reading any other raises AttributeError: a reference cannot read what its
    op's schema does not declare. Read-only (ops mutate the tensors themselves, in place). Layouts:
    `kvsurgery.reference.core` (core), `kvsurgery.reference.quant_layout` (packed region),
    `kvsurgery.reference.doublesparse` (labels).
    """

    __slots__ = tuple(STORE_TENSORS)

    def __init__(self, **tensors: Tensor | None):
        unknown = sorted(set(tensors) - set(STORE_TENSORS))
        if unknown:
            raise TypeError(f"{unknown} are not store tensors (kvsurgery.store.STORE_TENSORS)")
        for name, tensor in tensors.items():
            object.__setattr__(self, name, tensor)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"LayerTensors is read-only (write into s.{name} in place)")

    @property
    def names(self) -> tuple[str, ...]:
        """The tensors it holds, in `STORE_TENSORS` order."""
        return tuple(name for name in STORE_TENSORS if hasattr(self, name))

    def take(self, names: tuple[str, ...]) -> tuple[Tensor | None, ...]:
        """The tensors `names`, in that order: an op's flat store arguments (e.g. `take(CORE_TENSORS)`)."""
        return tuple(getattr(self, name) for name in names)

    def map(self, fn) -> LayerTensors:
        """The same names, each tensor passed through `fn` (None stays None): copies, dtype or device moves."""
        names = self.names
        return LayerTensors(**{n: None if t is None else fn(t) for n, t in zip(names, self.take(names), strict=True)})

    def __repr__(self) -> str:
        return f"LayerTensors({', '.join(self.names)})"


@dataclass(frozen=True)
class Plane:
    """An extra per-slot tensor a pass adds to a layer's store: [B, slots // slots_per_row, *shape] of `dtype`.

    E.g. Double Sparsity's label cache ("labels", (r,), bf16) or packed low-bit codes ("k_codes", (D // 8,), uint8).
    `slots_per_row` > 1 stores one row per group of slots (e.g. per-group quantization scales); `rows` sets the row
    count outright (a region the pass sizes itself, or per-KV-head tables). `dtype=None` is the model's dtype.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    slots_per_row: int = 1
    rows: int | None = None


@dataclass(frozen=True)
class LayerPlan:
    """Static allocation of one layer: per-KV-head prefill budgets, decode room and eviction policy."""

    layer: int
    keep: tuple[int, ...]  # tokens kept per KV head at prefill (sinks + window included); the max over rows
    room: int  # slots per head for decoded tokens; 0 when decoding evicts instead
    evict: bool  # evict one token per step when a segment is full
    head_dim: int
    v_head_dim: int
    sliding_window: int | None = None
    score_slots: bool = False  # keep a per-slot score (H2O accumulated attention, recency)
    planes: tuple[Plane, ...] = field(default_factory=tuple)
    row_keep: tuple[tuple[int, ...], ...] | None = None  # per batch row when rows differ (own prompt length)
    dense_slots: int | None = None  # slots of the full-precision k/v/pos when a pass packs the other tokens (quant)
    storage: str = ""  # how the tokens are stored when not all in full precision (shown by explain)
    # every KV head of every row has the same planned capacity, so head h's segments start at h x (slots / heads);
    # the CPU lowering then attends per head (`compiler.cpu_lowering`)
    uniform_heads: bool = False

    @property
    def n_kv_heads(self) -> int:
        return len(self.keep)

    @property
    def slots(self) -> int:
        return sum(self.keep) + self.n_kv_heads * self.room

    @property
    def max_segment(self) -> int:
        return max(self.keep) + self.room

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """Names of the store tensors, in the order the marker carries them."""
        return CORE_TENSORS + tuple(p.name for p in self.planes)


class StoreLayer:
    """The tensors of one layer's compressed store (see `kvsurgery.reference.core` for their layout)."""

    def __init__(self, plan: LayerPlan, batch: int, dtype: torch.dtype, device: torch.device):
        self.plan = plan
        n_slots = plan.slots if plan.dense_slots is None else plan.dense_slots
        self.k = torch.zeros(batch, n_slots, plan.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, n_slots, plan.v_head_dim, dtype=dtype, device=device)
        self.pos = torch.full((batch, n_slots), -1, dtype=torch.int32, device=device)
        shape = (batch, n_slots) if plan.score_slots else (0,)
        self.slot_score = torch.zeros(shape, dtype=torch.float32, device=device)
        rows = plan.row_keep if plan.row_keep is not None else (plan.keep,) * batch
        self.keep = torch.tensor(rows, dtype=torch.int32, device=device)
        self.cap = self.keep + plan.room
        self.start = (self.cap.cumsum(-1) - self.cap).to(torch.int32)
        self.length = torch.zeros(batch, plan.n_kv_heads, dtype=torch.int32, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        self.planes = {
            p.name: torch.zeros(
                batch,
                p.rows if p.rows is not None else -(-plan.slots // p.slots_per_row),
                *p.shape,
                dtype=p.dtype or dtype,
                device=device,
            )
            for p in plan.planes
        }
        if not torch.compiler.is_compiling():
            for t in self.tensors():
                torch._dynamo.mark_static_address(t)

    def tensors(self) -> list[Tensor]:
        """Core tensors (in `CORE_TENSORS` order, the order the core ops take them), then the extra planes."""
        core = [self.k, self.v, self.pos, self.slot_score, self.keep, self.cap, self.start, self.length, self.seen]
        return core + list(self.planes.values())

    def slot_axis_tensors(self) -> list[Tensor]:
        """The tensors whose axis 1 counts slots, so grows with the prompt: k, v, pos, slot scores, the planes."""
        return [self.k, self.v, self.pos, self.slot_score, *self.planes.values()]

    def named(self) -> LayerTensors:
        """The core tensors and the planes that are store tensors, by name; an optional store tensor ("Tensor?" in
        `STORE_TENSORS`) the layer does not hold is None, as its ops are passed."""
        tensors = dict(zip(self.plan.tensor_names, self.tensors(), strict=True))
        held = {name: t for name, t in tensors.items() if name in STORE_TENSORS}
        return LayerTensors(**{name: None for name, kind in STORE_TENSORS.items() if kind == "Tensor?"} | held)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class KVStore(Cache):
    """A transformers `Cache` backed by kvsurgery's fixed-capacity compressed layers.

    Create it through the rewritten model (`generate()` does it for you); it is allocated on the first
    (prefill) forward, when the prompt length is known.
    """

    def __init__(self, surgery, max_new_tokens: int):
        super().__init__(layers=[])
        self.surgery = surgery
        self.max_new_tokens = max_new_tokens
        self.prefilled = False
        self.prompt_len = 0
        self.decoded = 0

    # -- allocation and bookkeeping (outside the compiled graph) -------------------------------------
    def allocate(self, batch: int, prompt_len: int, row_lengths: list[int] | None = None) -> None:
        """Allocate for a prompt batch; `row_lengths` (tokens without padding) let each row get its own budget."""
        plans = self.surgery.plan(row_lengths or [prompt_len] * batch, self.max_new_tokens)
        self.prompt_len = prompt_len
        self.layers = [
            StoreLayer(plan, batch, self.surgery.dtype_of(plan.layer), self.surgery.device_of(plan.layer))
            for plan in plans
        ]

    def check_room(self, new_tokens: int) -> None:
        """Fail before a decode step would overflow a non-evicting store (never overwrite silently)."""
        if new_tokens != 1:
            raise KVSurgeryError(
                f"kvsurgery decodes one token per step after the prefill; got {new_tokens} new tokens. "
                "Chunked prefill and multi-token steps (assisted generation) are not supported: "
                "pass the whole prompt in the first call."
            )
        needs_room = [layer.plan for layer in self.layers if not layer.plan.evict]
        if needs_room and self.decoded + new_tokens > needs_room[0].room:
            raise CacheCapacityError(
                f"the compressed cache was allocated with room for {needs_room[0].room} decoded tokens and is full. "
                "Create it with a larger max_new_tokens (generate() uses its own max_new_tokens), or use a recipe "
                "that evicts while decoding (e.g. 'streaming', 'h2o')."
            )

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the store holds (what it really allocates)."""
        return sum(layer.nbytes for layer in self.layers)

    # -- what transformers calls ---------------------------------------------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if not self.layers:
            raise KVSurgeryError(
                "the model wrote to a kvsurgery cache that was never allocated: call the rewritten model "
                "(model(...) or model.generate(...)), which allocates the cache it is given on the prefill"
            )
        layer = self.layers[layer_idx]
        names = ",".join(layer.plan.tensor_names)
        return torch.ops.kvsurgery.kv_update(
            key_states, value_states, layer.tensors(), names, layer_idx, not self.prefilled, layer.plan.uniform_heads
        )

    def get_seq_length(self, layer_idx: int = 0):
        """Tokens seen so far (a 0-d tensor, so decode steps never recompile); positions keep counting them."""
        if not self.layers:
            return 0
        return self.layers[layer_idx].seen

    def get_query_offset(self, layer_idx: int = 0):
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0, *args) -> tuple[int, int]:
        # Only the prefill attention uses the model's mask (over the prompt itself); decode attention over
        # the store is rewritten and masks by stored positions, so the model's decode mask is never read.
        return query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False  # kvsurgery compiles the forward itself; transformers must not wrap it again

    @property
    def is_initialized(self) -> bool:
        return bool(self.layers)

    @property
    def is_sliding(self) -> list[bool]:
        return [layer.plan.sliding_window is not None for layer in self.layers]

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.layers)

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0] if self.layers else -1

    def reset(self) -> None:
        raise KVSurgeryError("a kvsurgery store holds one sequence batch; create a new one instead of resetting it")

    def _unsupported(self, *args, **kwargs):
        raise KVSurgeryError(
            "beam search, contrastive search and cache cropping are not supported by kvsurgery's compressed cache; "
            "use greedy decoding or sampling (do_sample=True)."
        )

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported
