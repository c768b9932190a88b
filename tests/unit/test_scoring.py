"""Log-likelihood scoring: members alone by the echo fast path, the ensemble through the core."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from consort.runtime.errors import InvalidRequest
from consort.runtime.evaluation.batches import GenerationRequest, generate, member_alone
from consort.runtime.evaluation.logliks import (
    LoglikRequest,
    _batches,
    ensemble_logliks,
    member_logliks,
    scoring_order,
)
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions
from tests.unit.conftest import make_loop

SMOL, GEMMA = "smollm2-135m-instruct", "gemma3-270m"

REQUESTS = [
    LoglikRequest("Question: What is the capital of France?\nAnswer:", " Paris"),
    LoglikRequest("Question: What is the capital of France?\nAnswer:", " The city of Lyon, on the Rhone"),
    LoglikRequest("Goal: boil an egg\nAnswer:", " Put it in boiling water for eight minutes."),
    LoglikRequest("The quick brown fox", " jumps over the lazy dog"),
    LoglikRequest("Numbers:", " 1, 2, 3, 1000, 2024"),
]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def self_pair(tiny_models):
    """SmolLM2 twice: identical vocabularies, so mean averages full distributions exactly."""
    return make_loop(tiny_models, [("a", SMOL), ("b", SMOL)], strategy="mean", main="a", max_batch=4)


@pytest.mark.parametrize("weights", [None, [0.3, 0.7]])
def test_mean_of_a_model_with_itself_is_the_model(self_pair, weights) -> None:
    core = self_pair.core
    fast = run(member_logliks(core.executor, core.members["a"], REQUESTS))
    (fused,) = run(ensemble_logliks(core, REQUESTS, [RequestOptions(strategy="mean", weights=weights)]))
    for alone, ensemble in zip(fast, fused, strict=True):
        assert ensemble.tokens == alone.tokens
        assert ensemble.logprob == pytest.approx(alone.logprob, abs=1e-4)
        assert ensemble.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)


@pytest.mark.parametrize("main", ["smollm2", "gemma3"])
def test_fast_member_path_equals_the_stepwise_core_path(tiny_models, main: str) -> None:
    """A member alone, token by token through the core (strategy me, one-hot weights), and by echo agree."""
    loop = make_loop(
        tiny_models, [("smollm2", SMOL), ("gemma3", GEMMA)], strategy="mean", main=main, max_batch=3
    )
    core = loop.core
    fast = run(member_logliks(core.executor, core.members[main], REQUESTS, max_batch=2))
    (stepwise,) = run(ensemble_logliks(core, REQUESTS, [member_alone(core.ctx.names, main)]))
    for a, b in zip(fast, stepwise, strict=True):
        assert a.tokens == b.tokens
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)
    # Nothing is left behind in the members.
    assert all(not w.engine.seq_ids for w in loop.workers.values())


def test_several_strategies_share_one_pass_and_keep_their_order(tiny_models) -> None:
    loop = make_loop(
        tiny_models, [("smollm2", SMOL), ("gemma3", GEMMA)], strategy="mean", main="smollm2", max_batch=8
    )
    requests = REQUESTS[:3]
    options = [RequestOptions(strategy="deepen"), member_alone(["smollm2", "gemma3"], "gemma3")]
    together = run(ensemble_logliks(loop.core, requests, options))
    alone = [run(ensemble_logliks(loop.core, requests, [o]))[0] for o in options]
    flat = [x.logprob for r in together for x in r]
    assert flat == pytest.approx([x.logprob for r in alone for x in r], abs=1e-4)
    assert all(v < 0 for v in flat)


def test_batches_respect_the_logit_budget_and_the_batch_size() -> None:
    lengths = [(10, n) for n in (1, 2, 3, 4, 9, 9)]
    order = list(range(6))
    groups = _batches(order, lengths, max_batch=3, budget=10 * 100, vocab_size=100)
    assert sorted(i for g in groups for i in g) == order
    for group in groups:
        assert len(group) <= 3
        assert len(group) == 1 or len(group) * (max(lengths[i][1] for i in group) + 1) * 100 <= 1000


def test_scoring_order_keeps_the_choices_of_a_question_together() -> None:
    contexts = [[1, 2], [3], [1, 2], [4, 5, 6], [3]]
    lengths = [(len(c), n) for c, n in zip(contexts, (1, 9, 8, 2, 1), strict=True)]
    order = scoring_order(contexts, lengths)
    assert sorted(order) == list(range(5))
    # Each context's requests are adjacent; contexts go by their widest continuation.
    assert order == [3, 0, 2, 1, 4]


def test_choices_of_a_question_share_one_prefill_and_score_as_alone(self_pair) -> None:
    core = self_pair.core
    engine = self_pair.workers["a"].engine
    before = engine.stats.shared_prompts
    together = run(member_logliks(core.executor, core.members["a"], REQUESTS, max_batch=2))
    # The two French-capital choices differ most in length, yet land in one step and one prefill.
    assert engine.stats.shared_prompts == before + 1
    one_by_one = [run(member_logliks(core.executor, core.members["a"], [r]))[0] for r in REQUESTS]
    for a, b in zip(together, one_by_one, strict=True):
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=1e-4)


def test_generation_batches_many_requests_and_matches_one_at_a_time(tiny_models) -> None:
    loop = make_loop(
        tiny_models, [("smollm2", SMOL), ("gemma3", GEMMA)], strategy="mean", main="smollm2", max_batch=4
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, seed=5
    )  # seeded: me draws members
    prompts = ["Question: 2+2?\nAnswer:", "Hello", "The capital of Peru is"]
    requests = [
        GenerationRequest(p, params, RequestOptions(strategy=s)) for p in prompts for s in ("mean", "me")
    ]
    batched = run(generate(loop.core, requests))
    single = [run(generate(loop.core, [r]))[0] for r in requests]
    assert [o.text for o in batched] == [o.text for o in single]
    assert all(o.finish_reason == "length" for o in batched)


def test_member_alone_needs_a_known_member() -> None:
    assert member_alone(["a", "b"], "b").weights == [0.0, 1.0]
    with pytest.raises(InvalidRequest, match="unknown member"):
        member_alone(["a", "b"], "c")
