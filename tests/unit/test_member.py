"""Contract tests of the member engine on tiny random models with the real tokenizers.

The reference for every distribution is a plain forward of the whole sequence with no
cache: whatever the engine does with its caches (solo, packed, holes, crops), the
next-token log-probs must be those.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from consort.runtime.errors import InvalidRequest, PromptTooLong
from consort.runtime.member import MemberEngine, StepOutput, top_k_exact
from consort.runtime.testing.tiny import build_tiny

ALIASES = ["smollm2-135m-instruct", "gemma3-270m"]
ATOL = 1e-4
# Small enough that the test sequences run well past it, so windowing is exercised.
GEMMA_WINDOW = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(alias: str) -> tuple[Any, Any]:
    model, tokenizer = build_tiny(alias)
    if alias.startswith("gemma"):
        config = copy.deepcopy(model.config)
        config.sliding_window = GEMMA_WINDOW
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module", params=ALIASES)
def tiny(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return _tiny(request.param)


@pytest.fixture
def engine(tiny: tuple[Any, Any]) -> Iterator[MemberEngine]:
    model, tokenizer = tiny
    yield MemberEngine(model, tokenizer, name="tiny")


def reference(model: Any, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V] log-probs of a cache-free forward: row i is the distribution after token i."""
    with torch.inference_mode():
        logits = model(torch.tensor([tokens]), use_cache=False).logits[0]
    return logits.float().log_softmax(dim=-1)


def random_ids(rng: random.Random, n: int) -> list[int]:
    # Ids below 5000 are ordinary tokens in both vocabularies.
    return [rng.randrange(10, 5000) for _ in range(n)]


def assert_matches_reference(engine: MemberEngine, seq_id: str, out: StepOutput) -> None:
    expected = reference(engine.model, engine.token_ids(seq_id))[-1]
    assert out.logprobs is not None
    torch.testing.assert_close(out.logprobs, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.top_logprobs, expected[out.top_ids], atol=ATOL, rtol=0)


# --------------------------------------------------------------- distributions


def test_ragged_batches_match_single_sequence(engine: MemberEngine) -> None:
    """Prefill, catch-up and decode mixed in one call; membership changes; crops; windows."""
    rng = random.Random(0)
    prompts = {"a": 1, "b": 5, "c": 13, "d": 30}
    for seq_id, n in prompts.items():
        engine.add(seq_id, random_ids(rng, n))
    plan = [
        ["a", "b", "c", "d"],
        ["a", "b", "c", "d"],  # same set: the pack is reused
        ["b", "d"],  # membership change
        ["a", "b", "c", "d"],
        ["c"],  # solo while the others stay packed
        ["a", "b", "c", "d"],
    ]
    for round_index, seq_ids in enumerate(plan):
        out = engine.step(seq_ids, full=True, top_k=8)
        assert set(out) == set(seq_ids)
        for seq_id in seq_ids:
            assert_matches_reference(engine, seq_id, out[seq_id])
            assert engine.num_cached(seq_id) == len(engine.token_ids(seq_id))
        for seq_id in seq_ids:
            extra = (round_index + ord(seq_id)) % 4  # 0..3 new tokens: ragged next round
            engine.extend(seq_id, random_ids(rng, extra))
        if round_index == 2:
            engine.crop("d", 20)  # inside the pack, behind the window
            engine.crop("b", len(engine.token_ids("b")) - 1)


def test_pack_is_reused_in_steady_state(engine: MemberEngine) -> None:
    """Left padding of very different prompt lengths is no reason to repack: a new pack has it too."""
    rng = random.Random(1)
    for seq_id, n in {"x": 4, "y": 300, "z": 2}.items():
        engine.add(seq_id, random_ids(rng, n))
    for _ in range(4):
        out = engine.step(["x", "y", "z"])
        for seq_id, result in out.items():
            engine.extend(seq_id, [int(result.top_ids[0])])
    assert engine.stats.repacks == 1
    engine.step(["z", "x"])
    assert engine.stats.repacks == 2


def test_riders_take_their_tokens_in_without_an_output(engine: MemberEngine) -> None:
    """`me` at concurrency: sequences a member does not compute ride along, KV only, in the same pack."""
    rng = random.Random(2)
    for seq_id, n in {"a": 3, "b": 9, "c": 17, "d": 5}.items():
        engine.add(seq_id, random_ids(rng, n))
    engine.step(["a", "b", "c", "d"])
    repacks = engine.stats.repacks
    for round_index in range(4):
        for seq_id in "abcd":
            engine.extend(seq_id, random_ids(rng, 1))
        wanted = ["a", "c"] if round_index % 2 else ["b", "d"]
        riders = [s for s in "abcd" if s not in wanted]
        out = engine.step(wanted, full=True, kv_only=riders)
        assert set(out) == set(wanted)
        for seq_id in wanted:
            assert_matches_reference(engine, seq_id, out[seq_id])
        for seq_id in riders:  # taken in: nothing is left to catch up
            assert engine.num_cached(seq_id) == len(engine.token_ids(seq_id))
    assert engine.stats.repacks == repacks  # the same four rows every step: the pack stays
    out = engine.step(["a", "b", "c", "d"], full=True)  # the riders' caches are right
    for seq_id in "abcd":
        assert_matches_reference(engine, seq_id, out[seq_id])


def test_a_rider_with_nothing_new_is_left_out(engine: MemberEngine) -> None:
    rng = random.Random(3)
    engine.add("a", random_ids(rng, 4))
    engine.add("b", random_ids(rng, 4))
    engine.step(["a", "b"])
    engine.extend("a", random_ids(rng, 1))
    fed = engine.stats.tokens_fed
    out = engine.step(["a"], full=True, kv_only=["b"])
    assert engine.stats.tokens_fed == fed + 1
    assert_matches_reference(engine, "a", out["a"])


def test_output_layer_on_some_rows_equals_the_whole_model(tiny: tuple[Any, Any]) -> None:
    """The rows-only output layer must do what the model's own forward does after the decoder
    (Gemma soft-caps its logits when configured to)."""
    model, tokenizer = tiny
    if hasattr(model.config.get_text_config(decoder=True), "final_logit_softcapping"):
        model = copy.deepcopy(model)
        model.config.get_text_config(decoder=True).final_logit_softcapping = 3.0
        model.config.final_logit_softcapping = 3.0
    engine = MemberEngine(model, tokenizer, name="tiny")
    rng = random.Random(4)
    for seq_id, n in {"a": 6, "b": 11, "c": 2}.items():
        engine.add(seq_id, random_ids(rng, n))
    engine.step(["a", "b", "c"])
    for seq_id in "abc":
        engine.extend(seq_id, random_ids(rng, 2))
    out = engine.step(["b"], full=True, kv_only=["a", "c"])
    assert_matches_reference(engine, "b", out["b"])


def test_identical_new_prompts_are_prefilled_once(engine: MemberEngine) -> None:
    """A question's answer choices (and the strategies scoring them) share one prompt prefill."""
    rng = random.Random(5)
    question, other = random_ids(rng, 20), random_ids(rng, 9)
    for seq_id in ("c1", "c2", "c3"):
        engine.add(seq_id, question)
    engine.add("d1", other)
    engine.add("d2", other)
    engine.add("solo", random_ids(rng, 7))
    fed = engine.stats.tokens_fed
    out = engine.step(["c1", "c2", "c3", "d1", "d2", "solo"], full=True)
    assert engine.stats.tokens_fed - fed == 20 + 2 + 9 + 1 + 7
    assert engine.stats.shared_prompts == 3
    for seq_id in out:
        assert_matches_reference(engine, seq_id, out[seq_id])
    for i, seq_id in enumerate(("c1", "c2", "c3", "d1")):  # the copies are caches of their own
        engine.extend(seq_id, random_ids(rng, i + 1))
    out = engine.step(["c1", "c2", "c3", "d1", "d2"], full=True)
    for seq_id in out:
        assert_matches_reference(engine, seq_id, out[seq_id])


def test_pack_with_many_holes_is_rebuilt(engine: MemberEngine) -> None:
    """Alternating long catch-ups leave columns where every row has a hole; they get squeezed out."""
    rng = random.Random(11)
    ids = ["a", "b", "c"]
    for seq_id in ids:
        engine.add(seq_id, random_ids(rng, 3))
    engine.step(ids)
    for round_index in range(9):
        for i, seq_id in enumerate(ids):
            engine.extend(seq_id, random_ids(rng, 40 if i == round_index % 3 else 1))
        engine.step(ids)
    assert engine.stats.repacks >= 2
    assert engine._packed is not None and engine._packed.positions.shape[1] < 9 * 40
    engine.extend("a", random_ids(rng, 2))
    out = engine.step(ids, full=True)
    for seq_id in ids:
        assert_matches_reference(engine, seq_id, out[seq_id])


def test_failed_forward_leaves_no_half_updated_cache(
    engine: MemberEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(12)
    engine.add("a", random_ids(rng, 5))
    engine.add("b", random_ids(rng, 9))
    engine.step(["a", "b"])
    engine.extend("a", random_ids(rng, 2))
    last_layer = engine.model.model.layers[-1]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("device lost")

    for seq_ids in (["a", "b"], ["b"]):
        monkeypatch.setattr(last_layer, "forward", broken)  # the first layers have already cached
        with pytest.raises(RuntimeError, match="device lost"):
            engine.step(seq_ids)
        monkeypatch.undo()
        assert all(engine.num_cached(s) == 0 for s in seq_ids)
        out = engine.step(["a", "b"], full=True)
        assert_matches_reference(engine, "a", out["a"])
        assert_matches_reference(engine, "b", out["b"])


def test_top_k_sorted_and_consistent_with_full(engine: MemberEngine) -> None:
    engine.add("s", random_ids(random.Random(2), 7))
    out = engine.step(["s"], top_k=20, full=True)["s"]
    assert out.top_ids.dtype == torch.int64 and out.top_logprobs.dtype == torch.float32
    assert out.logprobs is not None and out.logprobs.dtype == torch.float32
    assert out.top_ids.shape == (20,) and out.logprobs.shape == (engine.vocab_size,)
    assert torch.all(out.top_logprobs[:-1] >= out.top_logprobs[1:])
    assert len(set(out.top_ids.tolist())) == 20
    torch.testing.assert_close(out.top_logprobs, out.logprobs.topk(20).values)
    torch.testing.assert_close(out.top_logprobs, out.logprobs[out.top_ids])
    assert abs(torch.logsumexp(out.logprobs, 0).item()) < 1e-4


@pytest.mark.parametrize("rows", [0, 3])
@pytest.mark.parametrize("width", [100, 49_152, 262_144, 70_001])
@pytest.mark.parametrize("k", [0, 1, 64, 300])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k_exact_equals_torch_topk(rows: int, width: int, k: int, ties: bool) -> None:
    generator = torch.Generator().manual_seed(width + k)
    scores = torch.randn(rows, width, generator=generator) * 4
    if ties:
        scores = scores.round()  # many equal values, at the boundary too
    k = min(k, width)
    values, ids = top_k_exact(scores, k)
    expected = scores.topk(k, dim=-1).values
    assert torch.equal(values, expected)
    assert torch.equal(scores.gather(1, ids), values)
    assert all(len(set(row.tolist())) == k for row in ids)


def test_full_only_for_the_sequences_asked(engine: MemberEngine) -> None:
    engine.add("p", [11, 12, 13])
    engine.add("q", [21, 22])
    out = engine.step(["p", "q"], full={"q"}, top_k=3)
    assert out["p"].logprobs is None and out["q"].logprobs is not None
    assert out["p"].echo_logprobs is None and out["p"].echo_top is None


def test_stepping_without_new_tokens_refeeds_the_last(engine: MemberEngine) -> None:
    engine.add("s", random_ids(random.Random(3), 12))
    first = engine.step(["s"], full=True)["s"]
    again = engine.step(["s"], full=True)["s"]
    torch.testing.assert_close(first.logprobs, again.logprobs, atol=ATOL, rtol=0)
    engine.extend("s", [42, 43])
    engine.step(["s"])
    engine.crop("s", engine.num_cached("s"))  # cropped to exactly its cached length
    engine.add("t", [7, 8, 9])
    out = engine.step(["s", "t"], full=True)
    assert_matches_reference(engine, "s", out["s"])


def test_crop_and_re_extend_equals_never_diverging(engine: MemberEngine) -> None:
    """Roll back past the sliding window (Gemma window 8) and take another branch."""
    rng = random.Random(4)
    prompt = random_ids(rng, 6)
    branch_a, branch_b = random_ids(rng, 20), random_ids(rng, 5)
    engine.add("s", prompt)
    engine.add("other", random_ids(rng, 3))
    for token in branch_a:  # decoded one by one, packed with another sequence
        engine.step(["s", "other"])
        engine.extend("s", [token])
        engine.extend("other", [token])
    engine.step(["s", "other"])
    keep = len(prompt) + 15  # well past the window; 6 cached tokens are dropped
    engine.crop("s", keep)
    assert engine.num_cached("s") == keep
    engine.extend("s", branch_b)
    diverged = engine.step(["s"], full=True)["s"]

    fresh = MemberEngine(engine.model, engine.tokenizer)
    fresh.add("s", prompt + branch_a[:15] + branch_b)
    straight = fresh.step(["s"], full=True)["s"]
    torch.testing.assert_close(diverged.logprobs, straight.logprobs, atol=ATOL, rtol=0)
    assert_matches_reference(engine, "s", diverged)


def test_crop_solo_cache_behind_the_window(engine: MemberEngine) -> None:
    rng = random.Random(5)
    engine.add("s", random_ids(rng, 30))
    engine.step(["s"])
    engine.crop("s", 17)
    engine.extend("s", random_ids(rng, 4))
    assert_matches_reference(engine, "s", engine.step(["s"], full=True)["s"])
    engine.crop("s", 0)
    with pytest.raises(ValueError, match="no tokens"):
        engine.step(["s"])
    engine.extend("s", random_ids(rng, 3))
    assert_matches_reference(engine, "s", engine.step(["s"], full=True)["s"])


# ------------------------------------------------------------------- greedy


def test_greedy_matches_generate(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    rng = random.Random(6)
    prompts = [random_ids(rng, n) for n in (3, 11, 6)]
    new_tokens = 20
    engine = MemberEngine(model, tokenizer)
    for i, prompt in enumerate(prompts):
        engine.add(str(i), prompt)
    live = [str(i) for i in range(len(prompts))]
    produced: dict[str, list[int]] = {s: [] for s in live}
    for _ in range(new_tokens):
        out = engine.step(live, top_k=1)
        for seq_id in list(live):
            token = int(out[seq_id].top_ids[0])
            produced[seq_id].append(token)
            engine.extend(seq_id, [token])
            if token in engine.eos_token_ids:
                live.remove(seq_id)
        if not live:
            break

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i, prompt in enumerate(prompts):
        generated = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            pad_token_id=pad,
        )[0, len(prompt) :].tolist()
        assert produced[str(i)] == generated


# --------------------------------------------------------------------- echo


def _expected_echo(model: Any, tokens: list[int], first: int) -> tuple[list[float], torch.Tensor]:
    lp = reference(model, tokens)
    positions = list(range(max(first, 1), len(tokens)))
    values = [lp[p - 1, tokens[p]].item() for p in positions]
    return values, lp[[p - 1 for p in positions]]


def test_echo_matches_full_forward(engine: MemberEngine) -> None:
    rng = random.Random(7)
    engine.add("fresh", random_ids(rng, 12))
    engine.add("plain", random_ids(rng, 5))
    engine.add("cached", random_ids(rng, 4))
    engine.step(["cached"])
    engine.extend("cached", random_ids(rng, 14))  # 14 fed tokens, each with a predecessor

    out = engine.step(["fresh", "plain", "cached"], echo={"fresh", "cached"}, echo_top_k=5, full=True)
    assert out["plain"].echo_logprobs is None
    for seq_id, first, fed in (("fresh", 0, 11), ("cached", 4, 14)):
        result = out[seq_id]
        tokens = engine.token_ids(seq_id)
        values, rows = _expected_echo(engine.model, tokens, first)
        assert result.echo_logprobs is not None and len(result.echo_logprobs) == fed
        torch.testing.assert_close(
            torch.tensor(result.echo_logprobs), torch.tensor(values), atol=ATOL, rtol=0
        )
        assert result.echo_top is not None
        ids, logprobs = result.echo_top
        assert ids.shape == (fed, 5) and logprobs.dtype == torch.float32
        torch.testing.assert_close(logprobs, rows.topk(5, dim=-1).values, atol=ATOL, rtol=0)
        assert_matches_reference(engine, seq_id, result)
    assert_matches_reference(engine, "plain", out["plain"])


def test_echo_solo_and_without_pending(engine: MemberEngine) -> None:
    rng = random.Random(8)
    engine.add("s", random_ids(rng, 9))
    out = engine.step(["s"], echo={"s"})["s"]
    tokens = engine.token_ids("s")
    assert out.echo_top is None
    torch.testing.assert_close(
        torch.tensor(out.echo_logprobs),
        torch.tensor(_expected_echo(engine.model, tokens, 0)[0]),
        atol=ATOL,
        rtol=0,
    )
    # Nothing pending: the last token is re-fed, and its log-prob is what echo reports.
    again = engine.step(["s"], echo={"s"})["s"]
    assert again.echo_logprobs is not None and len(again.echo_logprobs) == 1
    assert again.echo_logprobs[0] == pytest.approx(out.echo_logprobs[-1], abs=ATOL)
    engine.add("one", [5])
    single = engine.step(["one"], echo={"one"}, echo_top_k=3)["one"]
    assert single.echo_logprobs == [] and single.echo_top is not None and single.echo_top[0].shape == (0, 3)


# -------------------------------------------------------------- bookkeeping


def test_remove_frees_state(engine: MemberEngine) -> None:
    rng = random.Random(9)
    for seq_id in "abc":
        engine.add(seq_id, random_ids(rng, 4 + ord(seq_id) % 5))
    engine.step(["a", "b", "c"])
    engine.remove("b")
    engine.remove("b")  # cancellation may race: no error
    engine.remove("never-added")
    assert engine.seq_ids == ["a", "c"]
    with pytest.raises(KeyError):
        engine.token_ids("b")
    engine.extend("a", [17])
    out = engine.step(["a", "c"], full=True)
    assert_matches_reference(engine, "a", out["a"])
    assert_matches_reference(engine, "c", out["c"])
    engine.remove("a")
    engine.remove("c")
    assert engine.seq_ids == [] and engine._packed is None and engine._seqs == {}
    engine.add("a", [1, 2, 3])  # the id is free again
    assert engine.token_ids("a") == [1, 2, 3] and engine.num_cached("a") == 0


def test_prompt_too_long(tiny: tuple[Any, Any]) -> None:
    engine = MemberEngine(*tiny, max_context=16)
    assert engine.max_context == 16
    with pytest.raises(PromptTooLong):
        engine.add("s", list(range(10, 27)))
    engine.add("s", list(range(10, 26)))
    with pytest.raises(PromptTooLong):
        engine.extend("s", [5])
    assert len(engine.token_ids("s")) == 16
    engine.step(["s"])


def test_invalid_calls(engine: MemberEngine) -> None:
    engine.add("s", [1, 2, 3])
    with pytest.raises(ValueError, match="already exists"):
        engine.add("s", [4])
    with pytest.raises(ValueError, match="empty"):
        engine.add("e", [])
    with pytest.raises(InvalidRequest):
        engine.add("big", [engine.vocab_size])
    with pytest.raises(InvalidRequest):
        engine.extend("s", [-1])
    with pytest.raises(ValueError):
        engine.crop("s", 4)
    with pytest.raises(KeyError):
        engine.step(["missing"])
    with pytest.raises(KeyError):
        engine.extend("missing", [1])
    with pytest.raises(ValueError):
        engine.step(["s", "s"])
    with pytest.raises(ValueError):
        engine.step([])
    assert engine.token_ids("s") == [1, 2, 3]


def test_attributes_and_stats(engine: MemberEngine) -> None:
    config = engine.model.config
    assert engine.vocab_size == config.vocab_size
    assert engine.max_context == config.max_position_embeddings
    assert config.eos_token_id in engine.eos_token_ids
    engine.add("a", [5, 6, 7])
    engine.add("b", [8])
    engine.step(["a", "b"])
    engine.extend("a", [9])
    engine.step(["a"])
    stats = engine.stats
    assert (stats.steps, stats.last_batch_size, stats.max_batch_size, stats.tokens_fed) == (2, 1, 2, 5)
    assert stats.forward_seconds > 0
    assert stats.as_dict()["steps"] == 2


def test_eager_attention(tiny: tuple[Any, Any]) -> None:
    """Eager attention adds the mask to the scores: the engine must hand it a float mask."""
    model, tokenizer = tiny
    model.set_attn_implementation("eager")
    try:
        engine = MemberEngine(model, tokenizer)
        rng = random.Random(10)
        engine.add("a", random_ids(rng, 12))
        engine.add("b", random_ids(rng, 3))
        engine.step(["a", "b"])
        engine.extend("b", random_ids(rng, 2))
        out = engine.step(["a", "b"], full=True)
        assert_matches_reference(engine, "a", out["a"])
        assert_matches_reference(engine, "b", out["b"])
    finally:
        model.set_attn_implementation("sdpa")


def test_bf16_model_gives_fp32_outputs() -> None:
    model, tokenizer = build_tiny("smollm2-135m-instruct")
    half = MemberEngine(model.to(torch.bfloat16), tokenizer)
    half.add("s", [4, 5, 6])
    result = half.step(["s"], full=True)["s"]
    assert result.top_logprobs.dtype == torch.float32 and result.logprobs is not None
    assert result.logprobs.dtype == torch.float32


def test_a_prefill_joining_decodes_runs_apart_and_matches(engine: MemberEngine) -> None:
    rng = random.Random(31)
    for name in "abc":
        engine.add(name, random_ids(rng, 4))
    engine.step(["a", "b", "c"])
    for name in "abc":
        engine.extend(name, random_ids(rng, 1))
    engine.add("long", random_ids(rng, 120))  # padding every decode row to 120 would triple the work
    fed_before = engine.stats.tokens_fed
    widths: list[int] = []
    forward = engine._forward

    def counting(feeds: Any, keep: int, head: Any = None) -> Any:
        widths.append(max(len(f.tokens) for f in feeds))
        return forward(feeds, keep, head)

    engine._forward = counting  # type: ignore[method-assign]
    out = engine.step(["a", "b", "c", "long"], full=True)
    assert widths == [119, 1]  # the prompt's prefix alone, then one token for every row
    assert engine.stats.tokens_fed - fed_before == 3 + 120
    assert engine.stats.steps == 2 and engine.stats.last_batch_size == 4
    for name in ("a", "b", "c", "long"):
        assert_matches_reference(engine, name, out[name])
