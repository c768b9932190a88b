"""The member engine's static KV cache (runtime/static_cache.py) against its dynamic path.

Every scenario runs twice on the same tiny model, once through the default dynamic caches and once
through slots of a static cache, and the outputs must agree: the same greedy tokens and top ids,
log-probs within 1e-4. The scenarios cover what the slots do differently: ragged prompts and the
bucketed decode step (padding rows), crops (a new length, no copy), remove and add (a freed slot
reused), forks (a copy of columns), placement moves and evictions when sequences outnumber slots,
steps wider than the cache, echo and riders (the eager forward over slots), Gemma-3's sliding
window measured in positions, and whole ensembles (deepen, mean, vote) on static members. On a GPU,
the CUDA-graph replay must equal both.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from consort.runtime import member as member_module
from consort.runtime.errors import PromptTooLong
from consort.runtime.member import MemberEngine, StepOutput
from consort.runtime.static_cache import (
    SlotCache,
    StaticCacheOptions,
    batch_buckets,
    choose_bucket,
    grown_capacity,
    length_bucket,
    slot_masks,
)
from consort.runtime.testing.tiny import build_tiny

# llama (SmolLM2), gemma3 (sliding and full layers), qwen2 (Qwen2.5-Coder)
ALIASES = ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"]
ATOL = 1e-4
# Small enough that the prompts below run well past it, so the window is exercised.
GEMMA_WINDOW = 8
# Small slots and a small first capacity, so buckets pad, slots fill up and capacities grow.
SMALL = StaticCacheOptions(max_slots=4, initial_len=16)

Scenario = Callable[[MemberEngine], list[dict[str, StepOutput]]]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(alias: str, device: str = "cpu") -> tuple[Any, Any]:
    model, tokenizer = build_tiny(alias)
    config = copy.deepcopy(model.config)
    if alias.startswith("gemma"):
        config.sliding_window = GEMMA_WINDOW
    else:
        return model.to(device), tokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model.to(device), tokenizer


@pytest.fixture(scope="module", params=ALIASES)
def tiny(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return _tiny(request.param)


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    # Ids below 5000 are ordinary tokens in every packaged vocabulary.
    return [[rng.randrange(10, 5000) for _ in range(n)] for n in lengths]


def greedy(engine: MemberEngine, ids: list[str], steps: int, **step_args: Any) -> list[dict[str, StepOutput]]:
    """Step `ids` together `steps` times, each taking its own greedy token."""
    outputs = []
    for _ in range(steps):
        out = engine.step(ids, top_k=8, full=True, **step_args)
        for seq_id in ids:
            engine.extend(seq_id, [int(out[seq_id].top_ids[0])])
        outputs.append(out)
    return outputs


def assert_same_outputs(dynamic: list[dict[str, StepOutput]], static: list[dict[str, StepOutput]]) -> None:
    assert len(dynamic) == len(static)
    for step, (want, got) in enumerate(zip(dynamic, static, strict=True)):
        assert want.keys() == got.keys(), step
        for seq_id, expected in want.items():
            actual = got[seq_id]
            assert actual.top_ids.tolist() == expected.top_ids.tolist(), (step, seq_id)
            torch.testing.assert_close(actual.top_logprobs, expected.top_logprobs, atol=ATOL, rtol=0)
            for name in ("logprobs", "echo_full"):
                a, e = getattr(actual, name), getattr(expected, name)
                assert (a is None) == (e is None), (step, seq_id, name)
                if e is not None:
                    torch.testing.assert_close(a, e, atol=ATOL, rtol=0)
            for name in ("echo_logprobs", "echo_masses"):
                a, e = getattr(actual, name), getattr(expected, name)
                assert (a is None) == (e is None), (step, seq_id, name)
                if e is not None:
                    assert a == pytest.approx(e, abs=ATOL), (step, seq_id, name)
            if expected.echo_top is not None:
                assert actual.echo_top is not None
                assert actual.echo_top[0].tolist() == expected.echo_top[0].tolist()


def compare(
    tiny: tuple[Any, Any], scenario: Scenario, options: StaticCacheOptions = SMALL
) -> tuple[MemberEngine, MemberEngine]:
    """Run `scenario` on a dynamic and a static engine of the same model; their outputs must agree."""
    model, tokenizer = tiny
    dynamic = MemberEngine(model, tokenizer, name="dynamic")
    static = MemberEngine(model, tokenizer, name="static", static_cache=options)
    assert dynamic.kv_cache == "dynamic" and static.kv_cache == "static"
    assert_same_outputs(scenario(dynamic), scenario(static))
    for seq_id in dynamic.seq_ids:
        assert static.token_ids(seq_id) == dynamic.token_ids(seq_id)
    return dynamic, static


# ------------------------------------------------------------------ pure functions


def test_batch_buckets_and_their_choice() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)
    buckets = batch_buckets(32)
    assert [choose_bucket(n, buckets) for n in (1, 2, 3, 4, 5, 9, 16, 17, 32)] == [
        1,
        2,
        4,
        4,
        8,
        16,
        16,
        32,
        32,
    ]
    assert choose_bucket(17, batch_buckets(24)) == 24
    with pytest.raises(ValueError, match="max_slots"):
        choose_bucket(33, buckets)
    with pytest.raises(ValueError, match="at least one row"):
        choose_bucket(0, buckets)


def test_length_buckets_and_growth() -> None:
    assert [length_bucket(n, 1024) for n in (1, 64, 65, 128, 129, 1000)] == [64, 64, 128, 128, 256, 1024]
    assert length_bucket(20, 16 + 8) == 24  # never past the capacity
    assert length_bucket(5, 16, floor=1) == 8
    with pytest.raises(ValueError, match="capacity"):
        length_bucket(300, 256)
    assert [grown_capacity(n, 1000) for n in (17, 256, 257, 999)] == [32, 256, 512, 1000]
    with pytest.raises(ValueError, match="does not fit"):
        grown_capacity(1001, 1000)


def test_static_masks_keep_the_sliding_window_in_positions() -> None:
    """Query at position 20 in a row of slots: the sliding layers see columns 13..20 (window 8), the
    full layers 0..20; a padding query (-1) sees column 0 only."""
    query = torch.tensor([[20], [-1]])
    masks = slot_masks(
        query,
        32,
        window=8,
        layer_types=["sliding_attention", "full_attention"],
        attention="sdpa",
        dtype=torch.float32,
    )
    assert isinstance(masks, dict)
    sliding, full = masks["sliding_attention"][:, 0, 0], masks["full_attention"][:, 0, 0]
    assert sliding[0].nonzero().squeeze(1).tolist() == list(range(13, 21))
    assert full[0].nonzero().squeeze(1).tolist() == list(range(21))
    assert sliding[1].nonzero().squeeze(1).tolist() == [0] == full[1].nonzero().squeeze(1).tolist()
    # A sliding layer without a window (Qwen2 with use_sliding_window off) attends like a full one.
    unwindowed = slot_masks(
        query, 32, window=None, layer_types=["sliding_attention"], attention="sdpa", dtype=torch.float32
    )
    assert isinstance(unwindowed, dict)
    assert torch.equal(unwindowed["sliding_attention"], full[:, None, None, :])
    eager = slot_masks(query, 32, window=8, layer_types=None, attention="eager", dtype=torch.float32)
    assert isinstance(eager, torch.Tensor)
    assert eager[0, 0, 0, 13] == 0 and eager[0, 0, 0, 12] == torch.finfo(torch.float32).min


def test_slot_bookkeeping_keeps_every_sequence_on_its_own_columns() -> None:
    """Random placements, forks, crops and removes over a 4-slot cache whose columns hold values unique
    to each written token: after every operation each sequence with a slot finds its own values in it."""
    config = SimpleNamespace(num_key_value_heads=1, head_dim=1, num_hidden_layers=1)
    cpu = torch.device("cpu")
    slots = SlotCache(config, max_slots=4, max_len=64, initial_len=64, device=cpu, dtype=torch.float32)
    rng = random.Random(0)
    names = [f"s{i}" for i in range(8)]
    content: dict[str, list[float]] = {}  # what each sequence's slot must hold, column by column
    counter = iter(range(1, 10**6))

    def buffers() -> list[torch.Tensor]:
        layer = slots.layers[0]
        assert layer.keys is not None and layer.values is not None
        return [layer.keys, layer.values]

    def forget(evicted: list[str] | None) -> None:
        for seq_id in evicted or []:
            content[seq_id] = []

    for _ in range(400):
        live = sorted(content)
        action = rng.choice(["place", "place", "place", "fork", "crop", "remove"])
        if action == "place":
            ids = rng.sample(names, rng.randint(1, 4))
            for seq_id in ids:
                content.setdefault(seq_id, [])
            forget(slots.place(ids, lambda s: len(content[s])))
            assert sorted(slots.slot_of[s] for s in ids) == list(range(len(ids)))
            for seq_id in ids:
                new = [float(next(counter)) for _ in range(rng.randint(1, 3))]
                start = len(content[seq_id])
                for buffer in buffers():
                    buffer[slots.slot_of[seq_id], 0, start : start + len(new), 0] = torch.tensor(new)
                content[seq_id] += new
        elif action == "fork" and live:
            source = rng.choice(live)
            dest = rng.choice([s for s in names if s != source])
            if source in slots.slot_of and content[source]:
                slots.free(dest)
                content[dest] = []
                evicted = slots.allocate(dest, protect={source})
                if evicted is not None:
                    forget(evicted)
                    keep = rng.randint(1, len(content[source]))
                    slots.copy_prefix(source, dest, keep)
                    content[dest] = content[source][:keep]
        elif action == "crop" and live:
            seq_id = rng.choice(live)
            del content[seq_id][rng.randint(0, len(content[seq_id])) :]
        elif action == "remove" and live:
            seq_id = rng.choice(live)
            slots.free(seq_id)
            del content[seq_id]
        for seq_id, values in content.items():
            if seq_id not in slots.slot_of:
                assert not values, seq_id
                continue
            for buffer in buffers():
                held = buffer[slots.slot_of[seq_id], 0, : len(values), 0]
                assert held.tolist() == values, seq_id
    assert slots.moves > 0 and slots.evictions > 0


# ---------------------------------------------------------------- static == dynamic


def test_ragged_greedy_decoding_with_a_crop_mid_way(tiny: tuple[Any, Any]) -> None:
    """Three ragged prompts (longer than Gemma's window), 12 greedy steps, one sequence cropped by three
    tokens after the sixth (the alignment's case): the static engine decodes exactly what the dynamic does."""

    def scenario(engine: MemberEngine) -> list[dict[str, StepOutput]]:
        ids = ["a", "b", "c"]
        for seq_id, tokens in zip(ids, prompts(1, [5, 11, 17]), strict=True):
            engine.add(seq_id, tokens)
        outputs = greedy(engine, ids, 6)
        engine.crop("a", len(engine.token_ids("a")) - 3)
        return outputs + greedy(engine, ids, 6)

    _, static = compare(tiny, scenario)
    assert static.stats.static_decodes >= 10  # the decode steps went through the bucketed step
    assert static.stats.evictions == 0


def test_remove_then_add_reuses_the_freed_slot(tiny: tuple[Any, Any]) -> None:
    def scenario(engine: MemberEngine) -> list[dict[str, StepOutput]]:
        first, second, third = prompts(2, [7, 12, 9])
        engine.add("a", first)
        engine.add("b", second)
        outputs = greedy(engine, ["a", "b"], 4)
        engine.remove("a")
        engine.add("c", third)
        return outputs + greedy(engine, ["b", "c"], 6)

    _, static = compare(tiny, scenario, StaticCacheOptions(max_slots=2, initial_len=16))
    assert static.stats.evictions == 0  # two slots were enough: "c" took the one "a" left


def test_fork_copies_the_kept_columns(tiny: tuple[Any, Any]) -> None:
    def scenario(engine: MemberEngine) -> list[dict[str, StepOutput]]:
        (prompt,) = prompts(3, [14])
        engine.add("a", prompt)
        outputs = greedy(engine, ["a"], 3)
        engine.fork("a", "f", len(engine.token_ids("a")) - 2)
        engine.extend("f", [42, 43])
        return outputs + greedy(engine, ["a", "f"], 5)

    _, static = compare(tiny, scenario)
    assert static.stats.slot_moves >= 1


def test_subsets_move_between_slots_and_evict_past_capacity(tiny: tuple[Any, Any]) -> None:
    """Five sequences over three slots, stepped in changing subsets: placement moves K/V between slots
    and evicts the least recently stepped; an evicted sequence is recomputed, never wrong."""

    def scenario(engine: MemberEngine) -> list[dict[str, StepOutput]]:
        ids = ["a", "b", "c", "d", "e"]
        for seq_id, tokens in zip(ids, prompts(4, [6, 9, 4, 13, 8]), strict=True):
            engine.add(seq_id, tokens)
        outputs = []
        for subset in (["a", "b"], ["c", "a"], ["d", "e", "b"], ["a", "e"], ["b", "c", "d"], ["e", "a"]):
            outputs += greedy(engine, subset, 2)
        return outputs

    _, static = compare(tiny, scenario, StaticCacheOptions(max_slots=3, initial_len=16))
    assert static.stats.evictions > 0 and static.stats.slot_moves > 0


def test_a_live_sequence_in_a_padding_row_keeps_its_cache(tiny: tuple[Any, Any]) -> None:
    """Four slots, three sequences stepped: the batch bucket is 4 and its fourth row is the slot of the
    fourth, live sequence. As padding it writes to the scratch column only; its K/V must survive."""

    def scenario(engine: MemberEngine) -> list[dict[str, StepOutput]]:
        ids = ["a", "b", "c", "d"]
        for seq_id, tokens in zip(ids, prompts(10, [5, 9, 7, 11]), strict=True):
            engine.add(seq_id, tokens)
        outputs = greedy(engine, ids, 2)
        outputs += greedy(engine, ids[:3], 4)
        return outputs + greedy(engine, ids, 3)

    _, static = compare(tiny, scenario, StaticCacheOptions(max_slots=4, initial_len=16))
    assert static.stats.evictions == 0


def test_a_step_wider_than_the_cache_runs_in_chunks(tiny: tuple[Any, Any]) -> None:
    def scenario(engine: MemberEngine) -> list[dict[str, StepOutput]]:
        ids = [f"s{i}" for i in range(5)]
        for seq_id, tokens in zip(ids, prompts(5, [3, 8, 5, 10, 6]), strict=True):
            engine.add(seq_id, tokens)
        return greedy(engine, ids, 3)

    compare(tiny, scenario, StaticCacheOptions(max_slots=2, initial_len=16))


def test_echo_riders_and_shared_prompts(tiny: tuple[Any, Any]) -> None:
    """The eager forward over slots: echo (every fed position's log-probs, masses, full rows), a rider
    taking tokens in without an output, and identical new prompts prefilled once and copied."""

    def scenario(engine: MemberEngine) -> list[dict[str, StepOutput]]:
        question, text, other = prompts(6, [10, 12, 7])
        engine.add("q1", question)
        engine.add("q2", question)
        engine.add("q3", [*question, 77])
        engine.add("rider", other)
        outputs = [engine.step(["q1", "q2", "q3"], top_k=8, full=True, kv_only=["rider"])]
        engine.add("t", text)
        masses = {"t": [(0, torch.tensor([5, 6, 7])), (3, torch.tensor([11]))]}
        outputs.append(
            engine.step(["t", "q1"], echo=["t"], echo_top_k=3, echo_masses=masses, echo_full=["t"], top_k=8)
        )
        engine.extend("t", [100, 101, 102])
        engine.extend("rider", [55])
        outputs.append(engine.step(["t", "rider", "q2"], echo=["t"], top_k=8, full=["rider"]))
        return outputs + greedy(engine, ["q1", "q2", "q3", "t"], 3)

    dynamic, static = compare(tiny, scenario)
    assert static.stats.shared_prompts == dynamic.stats.shared_prompts > 0


def test_a_failed_forward_leaves_the_slots_recomputable(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    engine = MemberEngine(model, tokenizer, static_cache=SMALL)
    reference = MemberEngine(model, tokenizer)
    for e in (engine, reference):
        for seq_id, tokens in zip(["a", "b"], prompts(7, [6, 9]), strict=True):
            e.add(seq_id, tokens)
        greedy(e, ["a", "b"], 2)
    original = engine._run

    def broken(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("boom")

    engine._run = broken  # type: ignore[method-assign]
    engine.extend("a", [1, 2, 3])  # a catch-up: the eager forward over slots
    with pytest.raises(RuntimeError, match="boom"):
        engine.step(["a", "b"])
    engine._run = original  # type: ignore[method-assign]
    assert engine.num_cached("a") == engine.num_cached("b") == 0
    reference.extend("a", [1, 2, 3])
    assert_same_outputs(greedy(reference, ["a", "b"], 3), greedy(engine, ["a", "b"], 3))


def test_the_check_sees_a_static_path_without_the_window() -> None:
    """With the sliding window left out of the static masks, Gemma-3 (window 8, prompts past it) no longer
    matches the dynamic engine: the comparisons above test the window, not only causality."""
    model, tokenizer = _tiny("gemma3-270m")

    def scenario(engine: MemberEngine) -> list[dict[str, StepOutput]]:
        engine.add("a", prompts(8, [20])[0])
        return greedy(engine, ["a"], 4)

    def no_window(*args: Any, **kwargs: Any) -> Any:
        return slot_masks(*args, **{**kwargs, "window": None})

    dynamic = scenario(MemberEngine(model, tokenizer))
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(member_module, "slot_masks", no_window)
    try:
        static = scenario(MemberEngine(model, tokenizer, static_cache=SMALL))
    finally:
        monkeypatch.undo()
    gap = max(
        float((d["a"].logprobs - s["a"].logprobs).abs().max()) for d, s in zip(dynamic, static, strict=True)
    )
    assert gap > 1e-2


# ------------------------------------------------------------------- construction


def test_a_slot_caps_the_context_window(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    engine = MemberEngine(model, tokenizer, max_context=64, static_cache=StaticCacheOptions(max_len=32))
    assert engine.max_context == 32
    with pytest.raises(PromptTooLong):
        engine.add("a", list(range(10, 43)))
    assert MemberEngine(model, tokenizer, max_context=16, static_cache=StaticCacheOptions()).max_context == 16


def test_cuda_graphs_need_cuda(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="CUDA"):
        MemberEngine(model, tokenizer, static_cache=StaticCacheOptions(cuda_graphs=True))
    assert not MemberEngine(model, tokenizer, static_cache=StaticCacheOptions()).cuda_graphs
    with pytest.raises(ValueError, match="max_slots"):
        StaticCacheOptions(max_slots=0)


# ------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("alias", ALIASES)
def test_graph_replay_equals_the_eager_static_step_and_the_dynamic_path(alias: str) -> None:
    model, tokenizer = _tiny(alias, device="cuda")

    def scenario(engine: MemberEngine) -> list[dict[str, StepOutput]]:
        ids = ["a", "b", "c"]
        for seq_id, tokens in zip(ids, prompts(9, [5, 11, 17]), strict=True):
            engine.add(seq_id, tokens)
        outputs = greedy(engine, ids, 6)
        engine.crop("a", len(engine.token_ids("a")) - 3)
        outputs += greedy(engine, ids, 6)
        engine.remove("b")
        return outputs + greedy(engine, ["a", "c"], 4)

    def run(static_cache: StaticCacheOptions | None) -> tuple[MemberEngine, list[dict[str, StepOutput]]]:
        engine = MemberEngine(model, tokenizer, device="cuda", static_cache=static_cache)
        return engine, scenario(engine)

    _, dynamic = run(None)
    _, eager = run(StaticCacheOptions(max_slots=4, initial_len=16, cuda_graphs=False))
    graphed_engine, graphed = run(StaticCacheOptions(max_slots=4, initial_len=16))
    assert graphed_engine.cuda_graphs, (
        graphed_engine._decoder.capture_error if graphed_engine._decoder else None
    )
    assert graphed_engine.stats.graph_captures > 0 and graphed_engine.stats.graph_replays > 0
    assert_same_outputs(eager, graphed)
    assert_same_outputs(dynamic, graphed)


def test_the_member_setting_picks_the_cache(tiny: tuple[Any, Any]) -> None:
    from pydantic import ValidationError

    from consort.runtime.config import EnsembleConfig, MemberConfig
    from consort.runtime.loop import load_worker, static_cache_options

    assert static_cache_options("auto", "cpu", 16) is None
    assert static_cache_options("dynamic", "cuda", 16) is None
    assert static_cache_options("auto", "cuda", 16) is None  # until the graph replay is checked on a GPU
    assert static_cache_options("static", "cpu", 4) == StaticCacheOptions(max_slots=8)
    with pytest.raises(ValidationError):
        MemberConfig(name="m", model="tiny:x", kv_cache="paged")  # type: ignore[arg-type]
    config = EnsembleConfig(members=[MemberConfig(name="m", model="tiny:x", kv_cache="static")], max_batch=3)
    engine = load_worker(config, "m", "cpu", model_and_tokenizer=tiny).engine
    assert engine.kv_cache == "static" and not engine.cuda_graphs
    default = EnsembleConfig(members=[MemberConfig(name="m", model="tiny:x")])
    assert load_worker(default, "m", "cpu", model_and_tokenizer=tiny).engine.kv_cache == "dynamic"


@pytest.mark.parametrize("strategy", ["deepen", "mean", "vote"])
def test_an_ensemble_on_static_members_writes_what_it_writes_on_dynamic_ones(
    tiny_models: dict[str, tuple[Any, Any]], strategy: str
) -> None:
    """The whole loop (fusion, alignment crops, `me`-style catch-ups, vote samples) over two members:
    the same completions whether the members keep dynamic caches or static slots."""
    from consort.runtime.config import parse_config
    from consort.runtime.loop import EnsembleLoop, load_worker
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams
    from consort.runtime.types import RequestOptions

    members = [("a", "smollm2-135m-instruct"), ("b", "gemma3-270m")]

    def texts(kv_cache: str) -> list[str]:
        ensemble = parse_config(
            {
                "members": [
                    {"name": n, "model": f"tiny:{alias}", "kv_cache": kv_cache} for n, alias in members
                ],
                "deepen": {"min_anchors": 10, "max_anchors": 1024},
                "max_batch": 2,  # 4 slots per member: the samples of a vote reuse the slots of finished ones
                "strategy": strategy,
            }
        )
        workers = {n: load_worker(ensemble, n, "cpu", tiny_models[alias]) for n, alias in members}
        assert {w.engine.kv_cache for w in workers.values()} == {kv_cache}
        loop = EnsembleLoop(ensemble, workers)
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, seed=7)  # vote samples
        prompts_ = [
            Prompt(text="Question: what is 6 times 7? Answer:"),
            Prompt(text="The capital of France is"),
        ]
        return [c.text for c in loop.generate(prompts_, params, RequestOptions(strategy=strategy))]

    dynamic = texts("dynamic")
    assert dynamic == texts("dynamic")  # seeded: the comparison below is not at the mercy of sampling
    assert texts("static") == dynamic
