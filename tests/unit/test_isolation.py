"""One bad request never harms another: a safe sampler, per-sequence failure, exact usage, EOS in log-probs."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from consort.deploy.convert import completion_logprobs
from consort.runtime.errors import SequenceFailed
from consort.runtime.fusion.base import EOS_KEY, Candidate, Decision
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingFailed, SamplingParams, make_generator, sample
from consort.runtime.types import RequestOptions, TokenLogprob
from tests.unit.conftest import ALIASES, make_loop

TINY = [5e-324, 1e-320, 1e-300, 1e-100, 1e-45, 1e-40, 1e-12]


@pytest.mark.parametrize("tiny", TINY)
def test_a_tiny_top_p_or_temperature_samples_the_most_likely_candidate(tiny: float) -> None:
    logprobs = torch.log_softmax(torch.randn(300, generator=torch.Generator().manual_seed(1)), -1)
    best = int(logprobs.argmax())
    for params in (SamplingParams(top_p=tiny), SamplingParams(temperature=tiny), SamplingParams(temperature=tiny, top_p=tiny)):
        assert [sample(logprobs, params, make_generator(seed)) for seed in range(5)] == [best] * 5


@given(
    temperature=st.floats(min_value=0.0, max_value=1e300, allow_subnormal=True),
    top_p=st.floats(min_value=5e-324, max_value=1.0, allow_subnormal=True),
    top_k=st.integers(min_value=0, max_value=70),
    seed=st.integers(min_value=0, max_value=2**31),
)
def test_every_value_the_api_admits_gives_a_possible_candidate(temperature: float, top_p: float, top_k: int, seed: int) -> None:
    logprobs = torch.log_softmax(torch.randn(64, generator=torch.Generator().manual_seed(seed)), -1)
    logprobs[::7] = float("-inf")  # some candidates are impossible (masked EOS, say)
    index = sample(logprobs, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k), make_generator(seed))
    assert 0 <= index < 64 and math.isfinite(float(logprobs[index]))


def test_a_distribution_with_nothing_possible_is_the_strategys_fault_not_a_silent_pick() -> None:
    with pytest.raises(SamplingFailed):
        sample(torch.full((8,), float("-inf")), SamplingParams(), make_generator(0))


def _run(core, ids: list[str]) -> dict[str, list]:
    """Step `core` until idle; every delta per sequence id."""
    seen: dict[str, list] = {i: [] for i in ids}
    while core.has_work:
        for delta in asyncio.run(core.step()):
            seen.setdefault(delta.seq_id, []).append(delta)
    return seen


@pytest.fixture
def pair(tiny_models):
    return make_loop(tiny_models, [("smol", ALIASES[0]), ("gemma", ALIASES[1])], strategy="mean")


def test_a_sequence_that_fails_fails_alone(pair, monkeypatch) -> None:
    prompts = [Prompt(text=t) for t in ("The capital of France is", "1, 2, 3,", "Once upon a time", "def f(x):")]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    options = RequestOptions(strategy="mean")
    alone = [pair.generate([p], params, options)[0].text for p in prompts]
    core = pair.core
    strategy = core.strategy("mean")
    decide = strategy.decide
    ids = [core.add(p, params, options) for p in prompts]
    poisoned = ids[2]

    def poison(seq, results, inverted):
        if seq.seq_id == poisoned and seq.tokens == 2:
            raise RuntimeError("invalid multinomial distribution (internal detail a client must not see)")
        return decide(seq, results, inverted)

    monkeypatch.setattr(strategy, "decide", poison)
    seen = _run(core, ids)
    for i, seq_id in enumerate(ids):
        deltas = seen[seq_id]
        if seq_id == poisoned:
            assert isinstance(deltas[-1].error, SequenceFailed)
            assert "multinomial" not in str(deltas[-1].error)
            assert len(deltas) == 3  # two pieces, then the failure; nothing after it
        else:
            assert all(d.error is None for d in deltas)
            assert "".join(d.text for d in deltas) == alone[i]
    assert all(worker.held_sequences == 0 for worker in pair.workers.values())


def test_a_failed_answer_fails_its_vote_and_stops_the_other_answers(pair, monkeypatch) -> None:
    core = pair.core
    member = core.strategy("me")
    decide = member.decide

    def poison(seq, results, inverted):
        if seq.seq_id.endswith("/1"):
            raise ValueError("boom")
        return decide(seq, results, inverted)

    monkeypatch.setattr(member, "decide", poison)
    params = SamplingParams(temperature=0.8, max_tokens=6, seed=1, ignore_eos=True)
    vote = core.add(Prompt(text="Hello"), params, RequestOptions(strategy="vote", vote_samples=3, vote_kind="span"))
    seen = _run(core, [vote])
    (failure,) = seen[vote]
    assert isinstance(failure.error, SequenceFailed)
    assert not core.has_work and not core.votes
    assert all(not key.startswith(f"{vote}/") or all(d.error is None for d in v) for key, v in seen.items())


def test_completion_tokens_count_the_tokens_emitted_not_a_retokenisation(pair) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    completion = pair.generate([Prompt(text="Request 30: list some animals.")], params, RequestOptions(strategy="mean"))[0]
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 16


def test_an_end_of_sequence_token_is_reported_with_the_main_members_text(pair) -> None:
    core = pair.core
    eos = Candidate(EOS_KEY, "smol", min(core.ctx.table("smol").eos_ids))
    other = Candidate(b" Paris", "smol", 7)
    decision = Decision([eos, other], torch.log_softmax(torch.tensor([2.0, 1.0]), -1), fused=False)
    entry = core._token_logprob(decision, eos, 0, 2)
    expected = pair.workers["smol"].tokenizer.convert_ids_to_tokens(eos.token_id)
    assert entry.token == expected and entry.token  # "<|im_end|>", not the empty string
    assert entry.data == b""
    assert entry.top[0][0] == expected
    # Reported in the legacy completion log-probs too, without moving the text offset.
    shown = completion_logprobs([TokenLogprob(" oxygen", b" oxygen", -1.0, []), entry], 10)
    assert shown.tokens == [" oxygen", expected]
    assert shown.text_offset == [10, 17]


def _echo_both_ways(loop, text: str, options: RequestOptions) -> tuple[list, list]:
    """The prompt's log-probs in one forward per member, and piece by piece (teacher forcing)."""
    from consort.runtime.scoring import add_scoring

    core = loop.core
    tokenizer = core.members[core.ctx.main].tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    head = tokenizer.decode(ids[:1])
    fast_id = core.add_echo(head, text[len(head):], options)
    assert fast_id is not None
    fast = [lp for d in _run(core, [fast_id])[fast_id] for lp in d.logprobs]
    slow_id = add_scoring(core, Prompt(text=head), text[len(head):], options)
    slow = [lp for d in _run(core, [slow_id])[slow_id] for lp in d.logprobs]
    return fast, slow


ECHO_TEXT = "Question: Which gas do plants take in?\nAnswer: carbon dioxide, mostly through their leaves."


@pytest.mark.parametrize("weights", [[1.0, 0.0], [1.0, 3.0]])
def test_echo_in_one_forward_equals_scoring_piece_by_piece(tiny_models, weights: list[float]) -> None:
    # Twins share one vocabulary, so mean over them is exact position by position; [1, 0] is one member alone.
    twins = make_loop(tiny_models, [("one", ALIASES[1]), ("two", ALIASES[1])], strategy="mean")
    fast, slow = _echo_both_ways(twins, ECHO_TEXT, RequestOptions(strategy="mean", weights=weights, logprobs=3))
    assert [e.token for e in fast] == [e.token for e in slow]
    assert [e.logprob for e in fast] == pytest.approx([e.logprob for e in slow], abs=2e-4)
    assert [e.top[0][0] for e in fast] == [e.top[0][0] for e in slow]


def test_echo_of_a_member_alone_takes_one_round(pair) -> None:
    core = pair.core
    rounds = []
    original = core.executor.step

    async def counting(works, release=None):
        rounds.append(sorted(works))
        return await original(works, release)

    core.executor.step = counting  # type: ignore[method-assign]
    seq_id = core.add_echo("Question", ": " + "word " * 60, RequestOptions(strategy="me", weights=[1.0, 0.0], logprobs=1))
    assert seq_id is not None
    (delta,) = _run(core, [seq_id])[seq_id]
    assert len(delta.logprobs) > 60
    assert rounds[0] == ["smol"]  # one forward, of that member only
    # Different vocabularies: mean at the text level, one forward per member (tests/unit/test_textprob.py);
    # deepen from every member's result before every piece (tests/unit/test_echo_positions.py).
    assert core.add_echo("Question", ": why", RequestOptions(strategy="deepen")) is not None
    assert core.add_echo("Question", ": why", RequestOptions(strategy="mean")) is not None


def test_a_round_that_fails_under_an_echo_fails_that_echo_for_its_caller(pair) -> None:
    """The coordinator fails what `core.fail()` returns; an echo whose round broke must be among them,
    or its caller waits forever."""
    core = pair.core
    original = core.executor.step

    async def broken(works, release=None):
        raise RuntimeError("a member went away")

    core.executor.step = broken  # type: ignore[method-assign]
    try:
        in_round = [core.add_echo("Question", text, RequestOptions(strategy="mean", logprobs=1)) for text in (": why", ": how")]
        with pytest.raises(RuntimeError):
            asyncio.run(core.step())
        queued = core.add_echo("Question", ": when", RequestOptions(strategy="mean", logprobs=1))
    finally:
        core.executor.step = original  # type: ignore[method-assign]
    assert sorted(core.fail()) == sorted(in_round)  # the queued one has not run yet: it still may
    assert core.has_work
    assert core.fail(waiting_too=True) == [queued]
    assert not core.has_work
