"""A static KV cache for the member engine: one slot per sequence, and a one-token step that a GPU replays.

Layout. Every layer's keys (and values) are one tensor [max_slots, kv_heads, capacity + 1, head_dim],
allocated up front: the token at position p of the sequence in slot s lives in column p of row s. No
left padding and no holes, so a crop is only a new length (the columns past it are overwritten by the
next tokens), a remove frees the slot and a fork copies a prefix of columns into another slot. The last
column (index `capacity`) is scratch: batch rows that only pad a forward write their K/V there, where
no real query looks (a query at position q attends columns <= q < capacity).

A forward over slots runs on the first `rows` slots and attends over their first `length` columns,
both views of the buffers (no gather): before it the engine places the forward's sequences in slots
0..n-1 (`SlotCache.place`, which moves K/V between slots when the set of sequences changes and evicts
the least recently used sequence when every slot is taken; an evicted sequence is recomputed from
its tokens). Masks come from positions: causal, and for sliding layers the window, as the engine's
dynamic path measures them.

The one-token decode step has fixed shapes per (batch bucket, length bucket) and reads its inputs from
device buffers that are written before each step, so on CUDA it is captured once per bucket pair as a
`torch.cuda.CUDAGraph` and replayed: one launch instead of one per kernel, which is most of a small
model's decode time on a GPU. Manual capture rather than `torch.compile`: no compile step or Triton,
no recompiles, and the replay runs the eager step's own kernels, so it matches the uncaptured step.

No Ray, pydantic or HTTP here: the GPU benchmark imports this module on a machine that has only torch
and transformers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

log = logging.getLogger(__name__)

# Smallest attended length of the decode step: shorter buckets would only add graphs, not speed.
_LENGTH_FLOOR = 64
# Warm-up runs before a capture, on a side stream, as the torch CUDA-graph docs do (lazy inits,
# cuBLAS workspaces and autotuning happen there and not inside the capture).
_WARMUP_RUNS = 3


@dataclass(frozen=True)
class StaticCacheOptions:
    """How the member engine sizes and runs its static KV cache.

    Memory: max_slots × capacity × layers × 2 × kv_heads × head_dim elements, where the capacity
    starts at `initial_len` and doubles (up to `max_len`) when a sequence needs more.
    """

    max_slots: int = 32  # sequences holding K/V at once; past it the least recently stepped is evicted
    max_len: int | None = None  # longest sequence a slot holds; None: the engine's context window
    cuda_graphs: bool | None = None  # capture the decode step; None: when the model is on CUDA
    initial_len: int = 256  # first capacity of every slot

    def __post_init__(self) -> None:
        if self.max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {self.max_slots}")
        if self.max_len is not None and self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if self.initial_len < 1:
            raise ValueError(f"initial_len must be >= 1, got {self.initial_len}")


def batch_buckets(max_slots: int) -> tuple[int, ...]:
    """The decode step's batch sizes: powers of two below `max_slots`, then `max_slots` itself.

    Each bucket is one captured graph per length bucket; powers of two keep the padding under half.
    """
    if max_slots < 1:
        raise ValueError(f"max_slots must be >= 1, got {max_slots}")
    sizes = []
    size = 1
    while size < max_slots:
        sizes.append(size)
        size *= 2
    sizes.append(max_slots)
    return tuple(sizes)


def choose_bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `n` rows (the rows past `n` pad the batch and are discarded)."""
    if n < 1:
        raise ValueError(f"a batch needs at least one row, got {n}")
    for size in sorted(buckets):
        if size >= n:
            return size
    raise ValueError(f"{n} rows exceed the largest batch bucket, {max(buckets)}: raise max_slots")


def length_bucket(needed: int, capacity: int, floor: int = _LENGTH_FLOOR) -> int:
    """Columns the decode step attends over: the smallest power of two >= `needed` (and >= `floor`),
    at most `capacity`. Attending over every slot's whole capacity would cost what the longest
    possible sequence costs at every step; buckets bound the waste to half at few graphs."""
    if not 1 <= needed <= capacity:
        raise ValueError(f"cannot attend over {needed} columns of a slot of capacity {capacity}")
    return min(capacity, max(floor, 1 << (needed - 1).bit_length()))


def grown_capacity(needed: int, max_len: int) -> int:
    """Capacity to grow to when a sequence needs `needed` columns: doubling keeps regrowths (each one
    a copy of the cache and a recapture of the graphs) to a logarithmic number."""
    if needed > max_len:
        raise ValueError(f"a sequence of {needed} tokens does not fit a static slot of {max_len}")
    return min(max_len, 1 << (needed - 1).bit_length())


def slot_masks(
    query_positions: torch.Tensor,
    length: int,
    *,
    window: int | None,
    layer_types: Sequence[str] | None,
    attention: str,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """4-D masks [rows, 1, width, length] for queries at `query_positions` [rows, width] over slot columns.

    In a slot column index = token position, and columns 0..q of the row are all real at query q (its
    cached prefix and this forward's tokens, written before attention), so causality is `column <= q`
    and the window `q - column < window`, exactly as the engine's dynamic masks measure them. Padding
    queries (position -1) attend column 0 only: an all-masked softmax row is NaN in SDPA, and their
    outputs are discarded anyway.
    """
    q = query_positions[:, None, :, None]
    k = torch.arange(length, device=query_positions.device)[None, None, None, :]
    causal = k <= q
    padding = (q < 0) & (k == 0)

    def formatted(mask: torch.Tensor) -> torch.Tensor:
        mask = mask | padding
        if attention == "sdpa":
            return mask
        # eager attention adds the mask to the scores.
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)

    # A sliding layer without a window attends like a full one (Qwen2 with use_sliding_window off).
    windowed = causal if window is None else causal & (q - k < window)
    if layer_types is None:
        return formatted(windowed)
    return {kind: formatted(windowed if kind == "sliding_attention" else causal) for kind in set(layer_types)}


class _View:
    """What the next forward runs over; shared by every layer of a `SlotCache`."""

    def __init__(self, row_ids: torch.Tensor) -> None:
        self.rows = 0
        self.length = 0
        self.write_rows = row_ids  # [rows, 1]
        self.write_columns = row_ids  # [rows, width]: the column each fed token's K/V goes to


class SlotLayer(CacheLayerMixin):
    """One layer's slots. `update` writes the forward's new K/V at their own columns, then returns
    views of the first `rows` slots and `length` columns: fixed shapes, no allocation, capturable."""

    is_compileable = True
    is_croppable = False  # a crop is the engine's business (a slot's length), not a layer's
    # The window is the mask's job: a sliding layer keeps every position, so crops are exact.
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, view: _View) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.view = view
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("slot layers are allocated up front, never lazily")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        view = self.view
        assert self.keys is not None and self.values is not None
        # [rows, heads, width, dim] -> [rows, width, heads, dim], the shape of keys[rows_idx, :, columns_idx].
        self.keys[view.write_rows, :, view.write_columns] = key_states.transpose(1, 2)
        self.values[view.write_rows, :, view.write_columns] = value_states.transpose(1, 2)
        return self.keys[: view.rows, :, : view.length], self.values[: view.rows, :, : view.length]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.view.length, 0

    def get_seq_length(self) -> int:
        raise NotImplementedError("slot lengths differ per row: a forward over slots must pass position_ids")

    def get_max_length(self) -> int:
        assert self.keys is not None
        return self.keys.shape[2] - 1


class SlotCache:
    """The slots' K/V buffers, which sequence holds which slot, and the view of the next forward."""

    def __init__(
        self,
        config: Any,
        *,
        max_slots: int,
        max_len: int,
        initial_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.max_slots = max_slots
        self.max_len = max_len
        self.capacity = min(max_len, initial_len)
        # Bumped when the buffers are reallocated: a graph captured before refers to the old ones.
        self.generation = 0
        self.device = device
        heads = int(config.num_key_value_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        self._row_ids = torch.arange(max_slots, device=device)[:, None]
        self.view = _View(self._row_ids)
        shape = (max_slots, heads, self.capacity + 1, head_dim)
        self.layers = [
            SlotLayer(
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
                self.view,
            )
            for _ in range(int(config.num_hidden_layers))
        ]
        self.cache = Cache(layers=list(self.layers))
        self.slot_of: dict[str, int] = {}
        self._owner: list[str | None] = [None] * max_slots
        self._last_used: dict[str, int] = {}
        self._clock = 0
        self.moves = 0  # slot-to-slot copies of K/V (placement and forks)
        self.evictions = 0

    # ------------------------------------------------------------------ view

    @property
    def scratch_column(self) -> int:
        return self.capacity

    def set_view(self, rows: int, length: int, write_columns: torch.Tensor) -> None:
        """The next forward runs on slots 0..rows-1 over columns 0..length-1 and writes its [rows, width]
        tokens' K/V at `write_columns` (the scratch column for padding)."""
        if not 1 <= rows <= self.max_slots or not 1 <= length <= self.capacity:
            raise ValueError(
                f"a view of {rows} rows × {length} columns does not fit {self.max_slots} × {self.capacity}"
            )
        view = self.view
        view.rows, view.length = rows, length
        view.write_rows = self._row_ids[:rows]
        view.write_columns = write_columns

    def ensure_capacity(self, needed: int) -> None:
        """Grow every slot to hold `needed` columns (copying the K/V over), if it does not already."""
        if needed <= self.capacity:
            return
        capacity = grown_capacity(needed, self.max_len)
        for layer in self.layers:
            assert layer.keys is not None and layer.values is not None
            for name in ("keys", "values"):
                old = getattr(layer, name)
                new = old.new_zeros((old.shape[0], old.shape[1], capacity + 1, old.shape[3]))
                new[:, :, : self.capacity] = old[:, :, : self.capacity]
                setattr(layer, name, new)
        self.capacity = capacity
        self.generation += 1

    # ------------------------------------------------------------ slots

    def free(self, seq_id: str) -> None:
        slot = self.slot_of.pop(seq_id, None)
        self._last_used.pop(seq_id, None)
        if slot is not None:
            self._owner[slot] = None

    def allocate(self, seq_id: str, protect: Collection[str] = ()) -> list[str] | None:
        """Give `seq_id` a slot (the lowest free one, else the least recently used sequence's, which is
        evicted); returns the evicted ids, or None when every slot is held by `protect` or `seq_id`."""
        if seq_id in self.slot_of:
            return []
        evicted: list[str] = []
        slot = self._free_slot(0)
        if slot is None:
            kept = {seq_id, *protect}
            victim = self._least_recent([s for s in self.slot_of if s not in kept])
            if victim is None:
                return None
            slot = self._evict(victim)
            evicted.append(victim)
        self._assign(seq_id, slot)
        self._touch([seq_id])
        return evicted

    def copy_prefix(self, source_id: str, dest_id: str, count: int) -> None:
        """Copy the first `count` columns of `source_id`'s slot into `dest_id`'s (a fork, a shared prompt)."""
        if count <= 0:
            return
        self._copy([(self.slot_of[source_id], self.slot_of[dest_id])], count)

    def place(self, seq_ids: Sequence[str], length_of: Callable[[str], int]) -> list[str]:
        """Put these sequences in slots 0..n-1, moving K/V and evicting others as needed.

        `length_of(seq_id)` is the number of columns a sequence holds (what a move copies). Returns the
        evicted ids: their K/V is gone and the caller must mark them uncached.
        """
        n = len(seq_ids)
        if n > self.max_slots:
            raise ValueError(f"{n} sequences in one forward exceed the static cache's {self.max_slots} slots")
        step = set(seq_ids)
        self._touch(seq_ids)
        targets = [slot for slot in range(n) if self._owner[slot] not in step]
        outsiders = [s for s in seq_ids if self.slot_of.get(s, n) >= n]
        moves: list[tuple[int, int]] = []
        lengths: list[int] = []
        evicted: list[str] = []
        for seq_id, target in zip(outsiders, targets, strict=True):
            source = self.slot_of.get(seq_id)
            if source is not None:
                moves.append((source, target))
                lengths.append(length_of(seq_id))
                self._owner[source] = None  # before the occupant may move in
            occupant = self._owner[target]
            if occupant is not None:
                # The occupant (not in this forward) goes where the outsider was, else to a free slot
                # past n, else to the slot past n of the least recently used sequence, which is
                # evicted (past n: a slot below n is a target still to fill), or it is evicted itself.
                home = source if source is not None else self._free_slot(n)
                if home is None:
                    candidates = [s for s, slot in self.slot_of.items() if slot >= n and s not in step]
                    victim = self._least_recent([*candidates, occupant])
                    if victim is None or victim == occupant:
                        self._evict(occupant)
                        evicted.append(occupant)
                    else:
                        home = self._evict(victim)
                        evicted.append(victim)
                if home is not None:
                    moves.append((target, home))
                    lengths.append(length_of(occupant))
                    self._assign(occupant, home)
            self._assign(seq_id, target)
        if moves:
            self._copy(moves, max(lengths))
        return evicted

    # ---------------------------------------------------------- internals

    def _assign(self, seq_id: str, slot: int) -> None:
        self.slot_of[seq_id] = slot
        self._owner[slot] = seq_id

    def _evict(self, seq_id: str) -> int:
        slot = self.slot_of.pop(seq_id)
        self._last_used.pop(seq_id, None)
        self._owner[slot] = None
        self.evictions += 1
        return slot

    def _free_slot(self, start: int) -> int | None:
        return next((slot for slot in range(start, self.max_slots) if self._owner[slot] is None), None)

    def _least_recent(self, candidates: Sequence[str]) -> str | None:
        return min(candidates, key=lambda s: self._last_used.get(s, -1), default=None)

    def _touch(self, seq_ids: Sequence[str]) -> None:
        self._clock += 1
        for seq_id in seq_ids:
            self._last_used[seq_id] = self._clock

    def _copy(self, moves: list[tuple[int, int]], count: int) -> None:
        """Copy the first `count` columns slot to slot. The sources are gathered (copied) before the
        destinations are written, so a swap or any permutation is one op per buffer."""
        self.moves += len(moves)
        if count <= 0:
            return
        sources = torch.tensor([s for s, _ in moves], device=self.device)
        dests = torch.tensor([d for _, d in moves], device=self.device)
        for layer in self.layers:
            assert layer.keys is not None and layer.values is not None
            layer.keys[dests, :, :count] = layer.keys[sources, :, :count]
            layer.values[dests, :, :count] = layer.values[sources, :, :count]


class SlotDecoder:
    """The one-token step over a batch bucket of slots: eager, or a CUDA graph per (rows, length).

    Its inputs live in one device buffer (token ids, query positions, write columns), written from the
    host before each step; its output is written to a float32 logits buffer. Both are allocated here,
    outside any graph's memory pool, so a replay reads and writes the same memory as the capture did.
    """

    def __init__(
        self,
        model: Any,
        slots: SlotCache,
        *,
        pad_id: int,
        vocab_size: int,
        masks: Callable[[torch.Tensor, int], torch.Tensor | dict[str, torch.Tensor]],
        cuda_graphs: bool,
    ) -> None:
        if cuda_graphs and slots.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this cache is on {slots.device}")
        self.model = model
        self.slots = slots
        self.pad_id = pad_id
        self.masks = masks
        self.cuda_graphs = cuda_graphs
        self._inputs = torch.zeros((3, slots.max_slots, 1), dtype=torch.long, device=slots.device)
        self._logits = torch.zeros((slots.max_slots, vocab_size), dtype=torch.float32, device=slots.device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._graphs_generation = slots.generation
        self._pool: Any = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.captures = 0
        self.replays = 0
        self.capture_error: str | None = None

    def run(self, tokens: Sequence[int], positions: Sequence[int], rows: int, length: int) -> torch.Tensor:
        """Feed tokens[i] at positions[i] to slot i (i < n <= rows); the [n, 1, V] float32 logits after them.

        The result is a view of a buffer the next step overwrites: read it (or clone it) first.
        """
        n = len(tokens)
        host = torch.empty((3, rows, 1), dtype=torch.long)
        host[0, :n, 0] = torch.tensor(tokens, dtype=torch.long)
        host[1, :n, 0] = torch.tensor(positions, dtype=torch.long)
        host[2, :n, 0] = host[1, :n, 0]
        host[0, n:] = self.pad_id
        host[1, n:] = -1
        host[2, n:] = self.slots.scratch_column
        self._inputs[:, :rows].copy_(host)
        graph = self._graph(rows, length) if self.cuda_graphs else None
        if graph is not None:
            graph.replay()
            self.replays += 1
        else:
            self._forward(rows, length)
        return self._logits[:n, None]

    def _forward(self, rows: int, length: int) -> None:
        ids, query, write = self._inputs[0, :rows], self._inputs[1, :rows], self._inputs[2, :rows]
        self.slots.set_view(rows, length, write)
        logits = self.model(
            input_ids=ids,
            position_ids=query.clamp(min=0),
            attention_mask=self.masks(query, length),
            cache=self.slots.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        self._logits[:rows].copy_(logits[:, -1])

    def _graph(self, rows: int, length: int) -> torch.cuda.CUDAGraph | None:
        """The captured step for this bucket pair, capturing it on first use; None after a failed capture
        (the step then runs eagerly: slower, same numbers)."""
        if self.capture_error is not None:
            return None
        if self._graphs_generation != self.slots.generation:
            self._graphs.clear()  # they write into buffers that `ensure_capacity` replaced
            self._graphs_generation = self.slots.generation
        graph = self._graphs.get((rows, length))
        if graph is not None:
            return graph
        device = self.slots.device
        # Warm-up on a side stream, as the torch docs do before a capture. It writes the same K/V
        # at the same columns as the replay that follows (same inputs), so it changes nothing.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(_WARMUP_RUNS):
                self._forward(rows, length)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # One memory pool for every bucket's graph: they never run at once, and their outputs are
            # copied into `_logits` (outside the pool) before another replay can reuse the memory.
            with torch.cuda.graph(graph, pool=self._pool):
                self._forward(rows, length)
        except RuntimeError as error:
            self.capture_error = f"{type(error).__name__}: {error}"
            log.warning(
                "CUDA graph capture failed, decode steps run eagerly from now on: %s", self.capture_error
            )
            torch.cuda.synchronize(device)
            return None
        self._graphs[(rows, length)] = graph
        self.captures += 1
        return graph
