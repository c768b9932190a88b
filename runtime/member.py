"""The member engine: one model, many sequences, one batched forward per step.

Each sequence keeps its own KV cache, which is never recomputed: a step feeds only
the tokens a sequence has not yet been run on (a prefill, a catch-up of several
tokens or one decode token, mixed in the same call) and returns the distribution
of the next token. `crop` rolls a cache back exactly, which is what alignment
(DESIGN.md, "keeping members on the same text") and ME's lazy catch-up need.

Two places a sequence's KV can live:

* solo: its own `DynamicCache`, batch 1. A step over one sequence hands that cache
  straight to the model, with no mask and no copy: the same work as
  `model.generate` at batch 1.
* packed: a row of one batched `DynamicCache` shared by the sequences of the last
  multi-sequence step. Columns are left-padded and may hold holes (ragged feeds,
  crops); `positions[row, col]` is the token position stored there, -1 for none.
  The attention masks are built from those positions, so causality and Gemma-3's
  sliding window are measured in token positions, not columns, and the result is
  the single-sequence result. The pack stays alive while the same set of
  sequences steps again (the steady state of decoding) and is rebuilt when the set
  changes.

All caches use plain `DynamicLayer`s, even for sliding-window layers: the
transformers sliding layer drops old positions, which would make `crop` past the
window impossible; the mask does the windowing instead. The price: sliding layers
keep (and attend over, masked) every position, so past the window they cost what a
full-attention layer costs.

A third, opt-in (`static_cache=StaticCacheOptions(...)`; the config's `kv_cache`): slots of a
static cache (runtime/static_cache.py), one per sequence, the token at position p in column p.
Every forward then runs over slots: prefills, catch-ups, echoes and riders eagerly (one batched
forward, K/V written straight into the slots' columns), and the plain decode step, one new token
per sequence, as one fixed-shape forward over a batch bucket that a GPU replays as a CUDA graph.
`crop` is a new length, `fork` a copy of columns; when every slot is taken, the least recently
stepped sequence is evicted and recomputed from its tokens when it next steps. The outputs are the
dynamic path's (same masks in positions, same output code), to float rounding.

Costs to know: `echo` keeps the logits of every fed position of the step
(batch × widest feed × vocabulary floats); a forward that raises drops the caches of
the sequences involved (they are recomputed from their tokens next step) and
re-raises.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from consort.runtime.errors import InvalidRequest, PromptTooLong
from consort.runtime.static_cache import (
    SlotCache,
    SlotDecoder,
    StaticCacheOptions,
    batch_buckets,
    choose_bucket,
    length_bucket,
    slot_masks,
)

_SUPPORTED_ATTENTION = ("sdpa", "eager")
_SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
# A pack is rebuilt when rebuilding would remove more empty cells (columns every row
# has a hole in, times rows) than it holds real tokens, and at least this many, so
# attention never runs over mostly empty columns for long yet repacks stay rare.
_MIN_EXCESS_TO_REPACK = 256
# Padding slots (batch × widest feed − real tokens) below which a step is not split in two.
_MIN_PADDING_TO_SPLIT = 64
# Block width of `top_k_exact`; 512 divides both real vocabularies (49,152 and 262,144).
_TOP_K_BLOCK = 512


@dataclass
class StepOutput:
    """One sequence's result of a step: the next-token distribution after its last token."""

    top_ids: torch.Tensor  # [k] int64, CPU, by descending log-prob
    top_logprobs: torch.Tensor  # [k] float32, CPU, log_softmax values
    logprobs: torch.Tensor | None = None  # [V] float32, CPU, only when asked
    echo_logprobs: list[float] | None = None  # log p(token i | tokens < i) for the tokens fed this step
    echo_top: tuple[torch.Tensor, torch.Tensor] | None = None  # [n, echo_top_k] ids and log-probs there
    echo_masses: list[float] | None = None  # log of the summed probability of each asked-for id set
    echo_full: torch.Tensor | None = None  # [n, V] log-probs at every echoed position, only when asked


@dataclass
class EngineStats:
    """Counters for metrics and benchmarks."""

    steps: int = 0
    forward_seconds: float = 0.0  # cumulative wall time of the forwards, cache packing included
    last_batch_size: int = 0
    max_batch_size: int = 0
    tokens_fed: int = 0  # tokens run through the model, re-fed ones included
    repacks: int = 0  # batched caches built
    shared_prompts: int = 0  # prefills saved by copying another new sequence's identical prompt cache
    static_decodes: int = 0  # static cache: one-token steps over a batch bucket (replayed or eager)
    graph_captures: int = 0  # static cache: CUDA graphs captured (one per batch and length bucket)
    graph_replays: int = 0
    slot_moves: int = 0  # static cache: K/V copied slot to slot (placement, forks, shared prompts)
    evictions: int = 0  # static cache: sequences whose K/V was dropped for want of a slot

    def as_dict(self) -> dict[str, int | float]:
        return asdict(self)


@dataclass
class _Sequence:
    tokens: list[int]
    cached: int = 0  # tokens[:cached] have K/V in a cache (their slot, in static mode)
    cache: DynamicCache | None = None  # solo cache; None while packed or empty, always None in static mode


@dataclass
class _Packed:
    rows: list[str | None]  # None: the sequence was removed
    cache: DynamicCache
    positions: torch.Tensor  # [B, T] int64 token position per column, -1 for padding/holes
    row_of: dict[str, int] = field(default_factory=dict)

    def holds_exactly(self, seq_ids: Sequence[str]) -> bool:
        return None not in self.rows and len(self.rows) == len(seq_ids) and set(self.rows) == set(seq_ids)

    def is_wasteful(self, cached: list[int]) -> bool:
        """Whether a fresh pack would be much narrower (left padding is not waste: a fresh pack has it too)."""
        excess = (self.positions.shape[1] - max(cached)) * len(cached)
        return excess > max(sum(cached), _MIN_EXCESS_TO_REPACK)


@dataclass
class _Feed:
    seq_id: str
    start: int  # position of the first fed token
    tokens: list[int]
    echo_from: int | None  # first position whose log-prob is reported; None: no echo


def _as_layer(keys: torch.Tensor, values: torch.Tensor) -> DynamicLayer:
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    # Built without the model config on purpose: no sliding layers (see module doc).
    cache = DynamicCache()
    cache.layers.extend(_as_layer(k, v) for k, v in layers)
    return cache


def _kv(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def top_k_exact(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k, dim=-1)` of a [rows, V] tensor, about 3x faster for a large V.

    torch.topk over 262k entries costs more than the log-softmax (≈4% of a batch-8
    Gemma step on one CPU thread). Exact shortcut: the k largest entries all lie in the
    k blocks with the largest maxima (each block holding one of them has a maximum at
    least as large as the k-th largest), so only those k blocks need a real top-k.
    """
    rows, width = scores.shape
    blocks = -(-width // _TOP_K_BLOCK)
    if k == 0 or rows == 0 or blocks <= 2 * k:
        return scores.topk(k, dim=-1)
    if width % _TOP_K_BLOCK:
        scores = torch.nn.functional.pad(scores, (0, blocks * _TOP_K_BLOCK - width), value=-torch.inf)
    by_block = scores.view(rows, blocks, _TOP_K_BLOCK)
    chosen = by_block.amax(dim=-1).topk(k, dim=-1).indices  # [rows, k]
    candidates = by_block.gather(1, chosen[:, :, None].expand(rows, k, _TOP_K_BLOCK)).view(rows, -1)
    values, flat = candidates.topk(k, dim=-1)
    ids = chosen.gather(1, flat // _TOP_K_BLOCK) * _TOP_K_BLOCK + flat % _TOP_K_BLOCK
    return values, ids


def _id_set(values: Any) -> set[int]:
    if values is None:
        return set()
    if isinstance(values, int):
        return {values}
    return {int(v) for v in values}


class MemberEngine:
    """Steps many sequences of one model together; see the module docstring."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str = "member",
        device: str = "cpu",
        max_context: int | None = None,
        static_cache: StaticCacheOptions | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._config = model.config.get_text_config(decoder=True)
        self._check_supported(self._config)
        self.vocab_size: int = int(model.get_output_embeddings().weight.shape[0])
        self.max_context: int = int(max_context or self._config.max_position_embeddings)
        self.eos_token_ids: frozenset[int] = self._eos_ids(model, tokenizer)
        self.stats = EngineStats()
        self._dtype = next(model.parameters()).dtype
        self._pad_id = int(getattr(tokenizer, "pad_token_id", None) or 0)
        self._seqs: dict[str, _Sequence] = {}
        self._packed: _Packed | None = None
        # Models that scale their logits some other way get the whole output layer and keep the rows they need.
        self._head_on_rows = not any(hasattr(self._config, a) for a in ("logits_scaling", "logit_scale"))
        self._slots: SlotCache | None = None
        self._decoder: SlotDecoder | None = None
        self._buckets: tuple[int, ...] = ()
        if static_cache is not None:
            self._init_static(static_cache)

    def _init_static(self, options: StaticCacheOptions) -> None:
        cuda_graphs = self.device.type == "cuda" if options.cuda_graphs is None else options.cuda_graphs
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(
                f"member {self.name!r}: cuda_graphs=True needs a CUDA device, the engine runs on {self.device}; "
                "leave cuda_graphs unset (None) to capture only on CUDA"
            )
        # A slot holds at most max_len tokens: the member's context window shrinks to it, so a longer
        # sequence is refused up front (PromptTooLong) rather than failing mid-step.
        self.max_context = min(self.max_context, options.max_len or self.max_context)
        self._slots = SlotCache(
            self._config,
            max_slots=options.max_slots,
            max_len=self.max_context,
            initial_len=options.initial_len,
            device=self.device,
            dtype=self._dtype,
        )
        self._decoder = SlotDecoder(
            self.model,
            self._slots,
            pad_id=self._pad_id,
            vocab_size=int(self.model.get_output_embeddings().weight.shape[0]),
            masks=self._slot_masks,
            cuda_graphs=cuda_graphs,
        )
        self._buckets = batch_buckets(options.max_slots)

    @property
    def kv_cache(self) -> str:
        """Where this engine keeps its sequences' K/V: "static" (slots) or "dynamic"."""
        return "dynamic" if self._slots is None else "static"

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps are replayed as CUDA graphs (static mode on CUDA, no failed capture)."""
        return self._decoder is not None and self._decoder.cuda_graphs and self._decoder.capture_error is None

    @property
    def graph_error(self) -> str | None:
        """Why a CUDA graph capture failed (decode steps then run eagerly, same numbers); None if none did."""
        return None if self._decoder is None else self._decoder.capture_error

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _check_supported(config: Any) -> None:
        attention = config._attn_implementation
        if attention not in _SUPPORTED_ATTENTION:
            raise NotImplementedError(
                f"the member engine builds its own attention masks for {_SUPPORTED_ATTENTION}; "
                f"this model uses {attention!r}: load it with attn_implementation='sdpa'"
            )
        layer_types = getattr(config, "layer_types", None) or []
        unsupported = set(layer_types) - _SUPPORTED_LAYER_TYPES
        if unsupported:
            raise NotImplementedError(f"attention layer types {sorted(unsupported)} are not supported")
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError("bidirectional attention models cannot be stepped causally")

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
        generation_config = getattr(model, "generation_config", None)
        ids = _id_set(getattr(generation_config, "eos_token_id", None))
        ids |= _id_set(getattr(model.config, "eos_token_id", None))
        ids |= _id_set(getattr(tokenizer, "eos_token_id", None))
        return frozenset(ids)

    # ------------------------------------------------------------ sequences

    @property
    def seq_ids(self) -> list[str]:
        return list(self._seqs)

    def add(self, seq_id: str, prompt_ids: Sequence[int]) -> None:
        """Register a sequence; its tokens are fed at its next step."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists in member {self.name!r}")
        tokens = self._checked_ids(prompt_ids)
        if not tokens:
            raise ValueError(f"sequence {seq_id!r}: the prompt is empty")
        self._check_length(seq_id, len(tokens))
        self._seqs[seq_id] = _Sequence(tokens=tokens)

    def extend(self, seq_id: str, token_ids: Sequence[int]) -> None:
        """Append tokens; they are fed at the sequence's next step."""
        seq = self._get(seq_id)
        tokens = self._checked_ids(token_ids)
        self._check_length(seq_id, len(seq.tokens) + len(tokens))
        seq.tokens.extend(tokens)

    @torch.inference_mode()
    def crop(self, seq_id: str, n: int) -> None:
        """Keep only the first `n` tokens; the cache keeps its K/V for them (no recomputation)."""
        seq = self._get(seq_id)
        if not 0 <= n <= len(seq.tokens):
            raise ValueError(f"cannot crop sequence {seq_id!r} of {len(seq.tokens)} tokens to {n}")
        del seq.tokens[n:]
        if n < seq.cached:
            self._drop_cached(seq_id, seq.cached - n)

    def remove(self, seq_id: str) -> None:
        """Forget a sequence and free its cache; unknown ids are ignored (cancellation may race)."""
        if self._seqs.pop(seq_id, None) is None:
            return
        if self._slots is not None:
            self._slots.free(seq_id)
        packed = self._packed
        if packed is not None and seq_id in packed.row_of:
            packed.rows[packed.row_of.pop(seq_id)] = None
            if not packed.row_of:
                self._packed = None

    @torch.inference_mode()
    def fork(self, seq_id: str, new_id: str, keep: int) -> None:
        """A new sequence holding the first `keep` tokens of `seq_id`, with a copy of their K/V.

        Scoring a text under DeePEn needs a member's distribution after its own tokenization of
        every prefix; where that differs from its tokenization of the whole text only in the last
        token or two, a fork of the whole text's cache plus those tokens gives it in one batched
        forward, instead of a forward per prefix.
        """
        source = self._get(seq_id)
        if new_id in self._seqs:
            raise ValueError(f"sequence {new_id!r} already exists in member {self.name!r}")
        if not 0 <= keep <= len(source.tokens):
            raise ValueError(
                f"cannot fork {keep} tokens of sequence {seq_id!r}, which holds {len(source.tokens)}"
            )
        if self._slots is not None:
            self._fork_static(seq_id, new_id, keep)
            return
        if self._packed is not None and seq_id in self._packed.row_of:
            self._unpack()
        cached = min(keep, source.cached) if source.cache is not None else 0
        cache = None
        if cached:
            assert source.cache is not None
            cache = _cache_of(
                [(k[:, :, :cached].clone(), v[:, :, :cached].clone()) for k, v in _kv(source.cache)]
            )
        self._seqs[new_id] = _Sequence(tokens=source.tokens[:keep], cached=cached, cache=cache)

    def _fork_static(self, seq_id: str, new_id: str, keep: int) -> None:
        source = self._seqs[seq_id]
        seq = _Sequence(tokens=source.tokens[:keep])
        self._seqs[new_id] = seq
        cached = min(keep, source.cached)
        if cached and self._copy_cache(seq_id, new_id, cached, protect={seq_id}):
            seq.cached = cached
        # Else no slot was free without evicting the source: the fork is recomputed at its first step.

    def _copy_cache(self, source_id: str, dest_id: str, count: int, protect: set[str]) -> bool:
        """Give `dest_id` a copy of the first `count` cached tokens of `source_id`; False if it could not
        (static mode with every slot held by `protect`): `dest_id` then stays uncached."""
        if self._slots is None:
            source = self._seqs[source_id]
            assert source.cache is not None
            self._seqs[dest_id].cache = _cache_of(
                [(k[:, :, :count].clone(), v[:, :, :count].clone()) for k, v in _kv(source.cache)]
            )
            return True
        evicted = self._slots.allocate(dest_id, protect={source_id, *protect})
        if evicted is None:
            return False
        self._uncache(evicted)
        self._slots.copy_prefix(source_id, dest_id, count)
        self._sync_slot_stats()
        return True

    def _uncache(self, seq_ids: Collection[str]) -> None:
        """Static mode: these sequences lost their slot; their tokens are recomputed at their next step."""
        for seq_id in seq_ids:
            self._seqs[seq_id].cached = 0

    def token_ids(self, seq_id: str) -> list[int]:
        return list(self._get(seq_id).tokens)

    def num_cached(self, seq_id: str) -> int:
        return self._get(seq_id).cached

    def _get(self, seq_id: str) -> _Sequence:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"member {self.name!r} has no sequence {seq_id!r}") from None

    def _checked_ids(self, ids: Sequence[int]) -> list[int]:
        tokens = [int(t) for t in ids]
        if tokens and (min(tokens) < 0 or max(tokens) >= self.vocab_size):
            raise InvalidRequest(f"token ids must lie in [0, {self.vocab_size}) for member {self.name!r}")
        return tokens

    def _check_length(self, seq_id: str, length: int) -> None:
        if length > self.max_context:
            raise PromptTooLong(
                f"sequence {seq_id!r} would hold {length} tokens; member {self.name!r} "
                f"has a context window of {self.max_context}"
            )

    def _drop_cached(self, seq_id: str, count: int) -> None:
        """Forget the K/V of the last `count` cached tokens (they become pending again if kept)."""
        seq = self._seqs[seq_id]
        seq.cached -= count
        if self._slots is not None:
            return  # the slot's columns past `cached` are dead: masked, then overwritten by the next tokens
        packed = self._packed
        if packed is not None and seq_id in packed.row_of:
            row = packed.positions[packed.row_of[seq_id]]
            row[row >= seq.cached] = -1
        elif seq.cached == 0:
            seq.cache = None
        elif seq.cache is not None:
            seq.cache.crop(-count)

    # ----------------------------------------------------------------- step

    @torch.inference_mode()
    def step(
        self,
        seq_ids: Sequence[str],
        *,
        top_k: int = 64,
        full: bool | Collection[str] = False,
        echo: Collection[str] = (),
        echo_top_k: int = 0,
        kv_only: Collection[str] = (),
        echo_masses: Mapping[str, Sequence[tuple[int, torch.Tensor]]] | None = None,
        echo_full: Collection[str] = (),
    ) -> dict[str, StepOutput]:
        """One batched forward over `seq_ids`; returns each one's next-token distribution.

        `kv_only` sequences ride along in the same forward to take in their new tokens
        without an output: a batch that keeps the same sequences keeps its packed cache,
        and their text does not pile up into a wide catch-up later. `echo_masses`: per echoed
        sequence, (j, ids) pairs: the log of the total probability of `ids` in the distribution
        of its j-th echoed position (text-level scoring: every token that goes on with a text).
        `echo_full`: echoed sequences that also get the whole distribution at every echoed position.
        """
        ids = list(seq_ids)
        self._check_step_args(ids, top_k, echo_top_k)
        wanted = set(ids)
        echo_set = set(echo)
        feeds = [self._plan(seq_id, seq_id in echo_set) for seq_id in ids]
        # A rider with nothing new has nothing to do (re-running its last token would only cost).
        feeds += [self._rider_feed(s) for s in dict.fromkeys(kv_only) if s not in wanted and self._has_new(s)]
        keep = max(len(f.tokens) for f in feeds) if echo_set & wanted else 1
        try:
            if not echo_set & wanted:
                feeds = self._catch_up(self._share_prompts(feeds))
            logits, rows = self._forward(feeds, keep, head=wanted)
        except BaseException:
            # A failed catch-up leaves the whole step's sequences to recompute.
            self._forget_caches([f.seq_id for f in feeds])
            raise
        self.stats.steps += 1
        self.stats.last_batch_size = len(feeds)
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(feeds))
        full_set = wanted if full is True else set(full or ())
        answered = [(row, f) for row, f in zip(rows, feeds, strict=True) if f.seq_id in wanted]
        return self._outputs(
            [f for _, f in answered],
            logits,
            [r for r, _ in answered],
            top_k,
            full_set,
            echo_top_k,
            echo_masses or {},
            set(echo_full),
        )

    def _has_new(self, seq_id: str) -> bool:
        seq = self._get(seq_id)
        return seq.cached < len(seq.tokens)

    def _rider_feed(self, seq_id: str) -> _Feed:
        seq = self._seqs[seq_id]
        return _Feed(seq_id, seq.cached, seq.tokens[seq.cached :], None)

    def _forward(
        self, feeds: list[_Feed], keep: int, head: set[str] | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Logits of the last `keep` positions of the feeds in `head` (None: all), and each feed's row in them (-1: none)."""
        ids = [f.seq_id for f in feeds]
        if self._slots is not None:
            try:
                return self._forward_static(feeds, keep, head)
            except BaseException:
                self._forget_caches(ids)
                raise
        started = time.perf_counter()
        try:
            if len(feeds) == 1:
                wanted = head is None or feeds[0].seq_id in head
                logits, rows = self._forward_solo(feeds[0], keep if wanted else 0), [0 if wanted else -1]
            else:
                logits, rows = self._forward_packed(feeds, keep, head)
        except BaseException:
            self._forget_caches(ids)
            raise
        self._record(feeds, time.perf_counter() - started)
        return logits, rows

    def _share_prompts(self, feeds: list[_Feed]) -> list[_Feed]:
        """New sequences with the same prompt prefill it once and copy the cache.

        Scoring a question asks for one sequence per answer choice and strategy, all with
        the question as prompt: on a CPU the prefills are most of an evaluation's work.
        """
        groups: dict[tuple[int, ...], list[_Feed]] = defaultdict(list)
        for feed in feeds:
            if feed.start == 0 and len(feed.tokens) > 1 and self._seqs[feed.seq_id].cache is None:
                groups[tuple(feed.tokens[:-1])].append(feed)
        shared = [group for group in groups.values() if len(group) > 1]
        if not shared:
            return feeds
        self._forward([_Feed(g[0].seq_id, 0, g[0].tokens[:-1], None) for g in shared], 0)
        if len(shared) > 1:
            self._unpack()  # the prompts were packed together: each needs a cache of its own to copy
        last_only = set()
        step_ids = {f.seq_id for f in feeds}
        for group in shared:
            source = self._seqs[group[0].seq_id]
            last_only.add(group[0].seq_id)
            for feed in group[1:]:
                if self._copy_cache(group[0].seq_id, feed.seq_id, source.cached, protect=step_ids):
                    self._seqs[feed.seq_id].cached = source.cached
                    last_only.add(feed.seq_id)
                    self.stats.shared_prompts += 1
        return [
            _Feed(f.seq_id, len(f.tokens) - 1, f.tokens[-1:], None) if f.seq_id in last_only else f
            for f in feeds
        ]

    def _catch_up(self, feeds: list[_Feed]) -> list[_Feed]:
        """Feed the pending tokens of wide rows, all but their last, in a forward of their own.

        A batch is padded to its widest feed: one sequence catching up ten tokens
        (a prefill, or `me`'s lazy catch-up) would make every one-token row of the
        step pay for ten. Running the wide rows' prefixes first leaves a step of
        width one, so the padding is paid only among the wide rows.
        """
        wide = [f for f in feeds if len(f.tokens) > 1]
        if len(feeds) == 1 or not wide:
            return feeds
        tokens = sum(len(f.tokens) for f in feeds)
        padded = len(feeds) * max(len(f.tokens) for f in feeds)
        # A second forward re-reads every weight: worth it only when padding would cost more than that
        # (a prefill joining decodes), not for `me`'s catch-ups of a token or two.
        if padded < 2 * tokens or padded - tokens < _MIN_PADDING_TO_SPLIT:
            return feeds
        self._forward([_Feed(f.seq_id, f.start, f.tokens[:-1], None) for f in wide], 0)
        return [
            _Feed(f.seq_id, f.start + len(f.tokens) - 1, f.tokens[-1:], None) if len(f.tokens) > 1 else f
            for f in feeds
        ]

    def _forget_caches(self, seq_ids: list[str]) -> None:
        """After a failed forward: some layers may hold the new K/V and others not, so the only
        trustworthy cache is none. The sequences keep their tokens and are recomputed next step."""
        affected = set(seq_ids)
        if self._slots is not None:
            for seq_id in affected & self._seqs.keys():
                self._seqs[seq_id].cached = 0
                self._slots.free(seq_id)
            return
        if self._packed is not None and affected & self._packed.row_of.keys():
            affected |= self._packed.row_of.keys()
            self._packed = None
        for seq_id in affected:
            seq = self._seqs[seq_id]
            seq.cached, seq.cache = 0, None

    def _check_step_args(self, ids: list[str], top_k: int, echo_top_k: int) -> None:
        if not ids:
            raise ValueError("step needs at least one sequence")
        if len(set(ids)) != len(ids):
            raise ValueError("step got the same sequence twice")
        if top_k < 0 or echo_top_k < 0:
            raise ValueError("top_k and echo_top_k must be >= 0")
        for seq_id in ids:
            if not self._get(seq_id).tokens:
                raise ValueError(f"sequence {seq_id!r} has no tokens to step on")

    def _plan(self, seq_id: str, echo: bool) -> _Feed:
        """Decide what this sequence feeds, rolling its cache back where the output needs it."""
        seq = self._seqs[seq_id]
        if seq.cached == len(seq.tokens):
            # Nothing new: re-run the last token so the output is still the next-token distribution.
            self._drop_cached(seq_id, 1)
        echo_from = None
        if echo:
            echo_from = max(seq.cached, 1)
            if seq.cached > 0:
                # The first new token's log-prob comes from the previous token's logits: recompute them.
                self._drop_cached(seq_id, 1)
        return _Feed(seq_id, seq.cached, seq.tokens[seq.cached :], echo_from)

    def _forward_solo(self, feed: _Feed, keep: int) -> torch.Tensor:
        """Batch of one: the sequence's own cache goes straight to the model (no copy, no mask)."""
        if self._packed is not None and feed.seq_id in self._packed.row_of:
            self._unpack()
        seq = self._seqs[feed.seq_id]
        cache = seq.cache if seq.cache is not None else DynamicCache()
        input_ids = torch.tensor([feed.tokens], dtype=torch.long, device=self.device)
        out = self._run(keep, input_ids=input_ids, cache=cache, use_cache=True)
        seq.cache = cache
        return out

    def _left_padded(self, feeds: list[_Feed]) -> tuple[torch.Tensor, torch.Tensor]:
        """The feeds' new tokens as rows right-aligned to the widest, and each token's position
        (padding: the pad id at position -1, which the masks never let anything attend to)."""
        width = max(len(f.tokens) for f in feeds)
        input_ids = torch.full((len(feeds), width), self._pad_id, dtype=torch.long)
        positions = torch.full((len(feeds), width), -1, dtype=torch.long)
        for row, feed in enumerate(feeds):
            n = len(feed.tokens)
            input_ids[row, width - n :] = torch.tensor(feed.tokens, dtype=torch.long)
            positions[row, width - n :] = torch.arange(feed.start, feed.start + n)
        return input_ids, positions

    def _forward_packed(
        self, feeds: list[_Feed], keep: int, head: set[str] | None
    ) -> tuple[torch.Tensor, list[int]]:
        """Returns the logits of the rows in `head` (pack order) and each feed's row in them."""
        packed = self._packed_for([f.seq_id for f in feeds])
        order = sorted(feeds, key=lambda f: packed.row_of[f.seq_id])
        input_ids, new_positions = self._left_padded(order)
        new_positions = new_positions.to(self.device)
        all_positions = torch.cat([packed.positions, new_positions], dim=1)
        batch_rows = [row for row, f in enumerate(order) if head is None or f.seq_id in head]
        logits = self._run(
            keep,
            head_rows=batch_rows if len(batch_rows) < len(order) else None,
            input_ids=input_ids.to(self.device),
            attention_mask=self._masks(new_positions, all_positions),
            position_ids=new_positions.clamp(min=0),
            cache=packed.cache,
            use_cache=True,
        )
        packed.positions = all_positions
        logits_row = {order[row].seq_id: i for i, row in enumerate(batch_rows)}
        return logits, [logits_row.get(f.seq_id, -1) for f in feeds]

    def _run(self, keep: int, head_rows: list[int] | None = None, **inputs: Any) -> torch.Tensor:
        """The model's logits for the last `keep` positions; keep=0 fills the KV caches only,
        skipping the output layer (for Gemma-3 the 262k-wide projection is half a decode step).
        With `head_rows`, only those batch rows get logits: the others only fill their caches."""
        if keep == 0:
            self.model.base_model(**inputs)
            return torch.empty(0)
        if head_rows is None or not self._head_on_rows:
            logits = self.model(**inputs, logits_to_keep=keep).logits
            return logits if head_rows is None else logits[head_rows]
        hidden = self.model.base_model(**inputs).last_hidden_state
        return self._head(hidden[head_rows, -keep:])

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the CausalLM forward does after the decoder: the output layer, and Gemma's soft-capping."""
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self._config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _record(self, feeds: list[_Feed], seconds: float) -> None:
        for feed in feeds:
            self._seqs[feed.seq_id].cached += len(feed.tokens)
        stats = self.stats
        stats.forward_seconds += seconds
        stats.tokens_fed += sum(len(f.tokens) for f in feeds)

    # -------------------------------------------------------------- packing

    def _packed_for(self, seq_ids: list[str]) -> _Packed:
        packed = self._packed
        if packed is not None and packed.holds_exactly(seq_ids):
            if not packed.is_wasteful([self._seqs[s].cached for s in seq_ids]):
                return packed
        self._unpack()
        return self._pack(seq_ids)

    def _pack(self, seq_ids: list[str]) -> _Packed:
        """One batched cache of these sequences, each right-aligned (left padding), moving their K/V in."""
        seqs = [self._seqs[s] for s in seq_ids]
        width = max(seq.cached for seq in seqs)
        positions = torch.full((len(seqs), width), -1, dtype=torch.long)
        for row, seq in enumerate(seqs):
            positions[row, width - seq.cached :] = torch.arange(seq.cached)
        sources = [_kv(seq.cache) if seq.cache is not None else None for seq in seqs]
        template = next((s for s in sources if s is not None), None)
        layers = []
        for layer_idx, (k0, v0) in enumerate(template or []):
            keys = k0.new_zeros((len(seqs), k0.shape[1], width, k0.shape[3]))
            values = v0.new_zeros((len(seqs), v0.shape[1], width, v0.shape[3]))
            for row, (seq, source) in enumerate(zip(seqs, sources, strict=True)):
                if source is not None:
                    keys[row, :, width - seq.cached :] = source[layer_idx][0][0]
                    values[row, :, width - seq.cached :] = source[layer_idx][1][0]
            layers.append((keys, values))
        for seq in seqs:
            seq.cache = None
        packed = _Packed(
            rows=list(seq_ids),
            cache=_cache_of(layers),
            positions=positions.to(self.device),
            row_of={s: i for i, s in enumerate(seq_ids)},
        )
        self._packed = packed
        self.stats.repacks += 1
        return packed

    def _unpack(self) -> None:
        """Give every packed sequence its own compact cache again."""
        packed = self._packed
        if packed is None:
            return
        layers = _kv(packed.cache)
        for seq_id, row in packed.row_of.items():
            seq = self._seqs[seq_id]
            columns = (packed.positions[row] >= 0).nonzero().squeeze(1)
            if len(columns) != seq.cached:
                raise RuntimeError(
                    f"packed cache of {seq_id!r} holds {len(columns)} tokens, expected {seq.cached}"
                )
            if seq.cached == 0:
                seq.cache = None
                continue
            seq.cache = _cache_of(
                [
                    (k[row : row + 1].index_select(2, columns), v[row : row + 1].index_select(2, columns))
                    for k, v in layers
                ]
            )
        self._packed = None

    # --------------------------------------------------------- static cache

    def _forward_static(
        self, feeds: list[_Feed], keep: int, head: set[str] | None
    ) -> tuple[torch.Tensor, list[int]]:
        """`_forward` over slots, in chunks of at most max_slots sequences, each recorded as it ends
        (a later chunk may evict an earlier one's sequences, which must then read as uncached)."""
        assert self._slots is not None
        size = self._slots.max_slots
        chunks = [feeds[i : i + size] for i in range(0, len(feeds), size)]
        results = []
        for chunk in chunks:
            started = time.perf_counter()
            # An earlier chunk may have evicted some of this one's sequences since the step planned their
            # feeds: they feed again from what they still hold (the same last tokens, so the same outputs).
            chunk = [self._refed(f) for f in chunk]
            logits, rows = self._forward_slots(chunk, keep, head)
            self._record(chunk, time.perf_counter() - started)
            # The decode step returns a view of a buffer the next chunk overwrites.
            results.append((logits.clone() if len(chunks) > 1 else logits, rows))
        if len(results) == 1:
            return results[0]
        parts, rows, offset = [], [], 0
        for logits, chunk_rows in results:
            rows.extend(-1 if r < 0 else r + offset for r in chunk_rows)
            if logits.numel():
                parts.append(logits)
                offset += logits.shape[0]
        return (torch.cat(parts) if parts else torch.empty(0)), rows

    def _refed(self, feed: _Feed) -> _Feed:
        seq = self._seqs[feed.seq_id]
        if feed.start <= seq.cached:
            return feed
        return _Feed(
            feed.seq_id, seq.cached, seq.tokens[seq.cached : feed.start + len(feed.tokens)], feed.echo_from
        )

    def _forward_slots(
        self, feeds: list[_Feed], keep: int, head: set[str] | None
    ) -> tuple[torch.Tensor, list[int]]:
        """One forward of at most max_slots feeds, placed in slots 0..n-1 (so batch row = slot)."""
        slots, decoder = self._slots, self._decoder
        assert slots is not None and decoder is not None
        self._uncache(slots.place([f.seq_id for f in feeds], lambda s: self._seqs[s].cached))
        self._sync_slot_stats()
        needed = max(f.start + len(f.tokens) for f in feeds)
        slots.ensure_capacity(needed)
        order = sorted(feeds, key=lambda f: slots.slot_of[f.seq_id])
        in_head = [head is None or f.seq_id in head for f in order]
        width = max(len(f.tokens) for f in feeds)
        if width == 1 and keep == 1:
            # The plain decode step: fixed shapes per bucket, a CUDA graph replay on a GPU.
            rows = choose_bucket(len(order), self._buckets)
            length = length_bucket(needed, slots.capacity)
            logits = decoder.run([f.tokens[0] for f in order], [f.start for f in order], rows, length)
            self.stats.static_decodes += 1
            self.stats.graph_captures, self.stats.graph_replays = decoder.captures, decoder.replays
            row_of = {
                f.seq_id: row for row, (f, wanted) in enumerate(zip(order, in_head, strict=True)) if wanted
            }
            return logits, [row_of.get(f.seq_id, -1) for f in feeds]
        # Anything wider (a prefill, a catch-up, an echo) runs eagerly, once, at its exact shape.
        input_ids, positions = self._left_padded(order)
        write_columns = torch.where(positions >= 0, positions, slots.scratch_column).to(self.device)
        positions = positions.to(self.device)
        slots.set_view(len(order), needed, write_columns)
        batch_rows = [row for row, wanted in enumerate(in_head) if wanted]
        logits = self._run(
            keep,
            head_rows=batch_rows if len(batch_rows) < len(order) else None,
            input_ids=input_ids.to(self.device),
            attention_mask=self._slot_masks(positions, needed),
            position_ids=positions.clamp(min=0),
            cache=slots.cache,
            use_cache=True,
        )
        logits_row = {order[row].seq_id: i for i, row in enumerate(batch_rows)}
        return logits, [logits_row.get(f.seq_id, -1) for f in feeds]

    def _slot_masks(
        self, query_positions: torch.Tensor, length: int
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        return slot_masks(
            query_positions,
            length,
            window=getattr(self._config, "sliding_window", None),
            layer_types=getattr(self._config, "layer_types", None),
            attention=self._config._attn_implementation,
            dtype=self._dtype,
        )

    def _sync_slot_stats(self) -> None:
        assert self._slots is not None
        self.stats.slot_moves, self.stats.evictions = self._slots.moves, self._slots.evictions

    # --------------------------------------------------------------- masks

    def _masks(
        self, query_positions: torch.Tensor, key_positions: torch.Tensor
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """4-D masks from token positions: causal (and windowed) in positions, not columns.

        Padding queries (position -1) attend to their own column only, so no row of the
        softmax is empty (an all-masked row gives NaN in SDPA).
        """
        width, total = query_positions.shape[1], key_positions.shape[1]
        q = query_positions[:, None, :, None]
        k = key_positions[:, None, None, :]
        causal = (k >= 0) & (k <= q)
        columns = torch.arange(total, device=q.device)
        own_column = columns[None, None, None, :] == (columns[total - width :])[None, None, :, None]
        padding_self = (q < 0) & own_column
        window = getattr(self._config, "sliding_window", None)
        layer_types = getattr(self._config, "layer_types", None)
        if layer_types is None:
            mask = causal if window is None else causal & (q - k < window)
            return self._mask_format(mask | padding_self)
        masks = {}
        for layer_type in set(layer_types):
            # A sliding layer without a window attends like a full one (Qwen2 with use_sliding_window off).
            windowed = layer_type == "sliding_attention" and window is not None
            mask = causal & (q - k < window) if windowed else causal
            masks[layer_type] = self._mask_format(mask | padding_self)
        return masks

    def _mask_format(self, mask: torch.Tensor) -> torch.Tensor:
        if self._config._attn_implementation == "sdpa":
            return mask
        # eager attention adds the mask to the scores.
        zero = torch.zeros((), dtype=self._dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(self._dtype).min)

    # -------------------------------------------------------------- outputs

    def _outputs(
        self,
        feeds: list[_Feed],
        logits: torch.Tensor,
        rows: list[int],
        top_k: int,
        full_set: set[str],
        echo_top_k: int,
        echo_masses: Mapping[str, Sequence[tuple[int, torch.Tensor]]],
        echo_full: set[str],
    ) -> dict[str, StepOutput]:
        last = logits[:, -1, :].float()
        # log-softmax = logits - logsumexp: the full [rows, V] log-probs are only built when asked.
        normaliser = last.logsumexp(dim=-1, keepdim=True)
        top_values, top_ids = top_k_exact(last, min(top_k, self.vocab_size))
        top_values, top_ids = (top_values - normaliser).cpu(), top_ids.cpu()
        results = {}
        for row, feed in zip(rows, feeds, strict=True):
            out = StepOutput(top_ids=top_ids[row].clone(), top_logprobs=top_values[row].clone())
            if feed.seq_id in full_set:
                out.logprobs = (last[row] - normaliser[row]).cpu()
            if feed.echo_from is not None:
                out.echo_logprobs, out.echo_top, out.echo_masses, out.echo_full = self._echo(
                    feed, logits[row], echo_top_k, echo_masses.get(feed.seq_id, ()), feed.seq_id in echo_full
                )
            results[feed.seq_id] = out
        return results

    def _echo(
        self,
        feed: _Feed,
        row_logits: torch.Tensor,
        echo_top_k: int,
        masses: Sequence[tuple[int, torch.Tensor]] = (),
        full: bool = False,
    ) -> tuple[
        list[float], tuple[torch.Tensor, torch.Tensor] | None, list[float] | None, torch.Tensor | None
    ]:
        """Log-probs of the fed tokens from `echo_from` on, each given the tokens before it."""
        assert feed.echo_from is not None
        end = feed.start + len(feed.tokens)
        targets = list(range(feed.echo_from, end))
        # The row's last len(tokens) columns hold the fed tokens; column c predicts position start + c' + 1.
        first_column = row_logits.shape[0] - len(feed.tokens)
        columns = [first_column + (t - 1 - feed.start) for t in targets]
        logprobs = row_logits[columns].float().log_softmax(dim=-1)
        target_ids = torch.tensor([feed.tokens[t - feed.start] for t in targets], dtype=torch.long)
        picked = logprobs.gather(1, target_ids.to(logprobs.device)[:, None]).squeeze(1)
        echo_top = None
        if echo_top_k > 0:
            values, ids = top_k_exact(logprobs, min(echo_top_k, self.vocab_size))
            echo_top = (ids.cpu(), values.cpu())
        summed = None
        if masses:
            summed = [
                float(logprobs[j, ids.to(logprobs.device)].logsumexp(0)) if ids.numel() else -math.inf
                for j, ids in masses
            ]
        return picked.cpu().tolist(), echo_top, summed, logprobs.cpu() if full else None
