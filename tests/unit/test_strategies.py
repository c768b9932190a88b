"""Contract tests every registered strategy must pass, on tiny models of both tokenizer kinds."""

from __future__ import annotations

import pytest
import torch

from consort.runtime import fusion
from consort.runtime.errors import ConfigError, InvalidRequest
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions
from tests.unit.conftest import ALIASES, make_loop

STRATEGIES = fusion.names("token")
PROMPTS = [Prompt(text="The capital of France is"), Prompt(messages=[{"role": "user", "content": "Count: 1, 2,"}])]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def texts(loop, strategy: str | None, params=GREEDY, **options) -> list[str]:
    return [c.text for c in loop.generate(PROMPTS, params, RequestOptions(strategy=strategy, **options))]


@pytest.fixture(scope="module")
def pair(tiny_models):
    return make_loop(tiny_models, [("smol", ALIASES[0]), ("gemma", ALIASES[1])], strategy="mean")


@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ensemble_of_a_model_with_itself_is_the_model(tiny_models, alias: str, strategy: str) -> None:
    alone = make_loop(tiny_models, [("solo", alias)], strategy="mean")
    twins = make_loop(tiny_models, [("one", alias), ("two", alias)], strategy=strategy)
    assert texts(twins, strategy) == texts(alone, "mean")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fused_distributions_are_normalised(pair, strategy: str, monkeypatch) -> None:
    core = pair.core
    strat = core.strategy(strategy)
    decide = strat.decide
    decisions = []

    def spy(seq, results, inverted):
        decision = decide(seq, results, inverted)
        decisions.append(decision)
        return decision

    monkeypatch.setattr(strat, "decide", spy)
    completion = pair.generate(PROMPTS[:1], GREEDY, RequestOptions(strategy=strategy, diagnostics=True))[0]
    steps = completion.diagnostics
    assert len(steps) == GREEDY.max_tokens
    # Every step but a mid-character one (the owner of a partial byte goes on alone) is the strategy's.
    assert len(steps) - 2 <= len(decisions) <= len(steps)
    if strategy in ("mean", "deepen"):
        assert any(d.fused for d in decisions)  # two different members: the average really combined them
    for decision in decisions:
        assert torch.isfinite(decision.logprobs).all()
        assert decision.logprobs.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
        assert len(decision.candidates) == decision.logprobs.numel()
        assert len({c.key for c in decision.candidates}) == len(decision.candidates)  # one entry a piece


@pytest.mark.parametrize("weights", [[1.0, 0.0], [0.0, 1.0]])
def test_me_with_one_hot_weights_is_that_member(tiny_models, pair, weights: list[float]) -> None:
    index = weights.index(1.0)
    alone = make_loop(tiny_models, [("solo", ALIASES[index])], strategy="mean")
    assert texts(pair, "me", weights=weights) == texts(alone, "mean")


def test_deepen_with_identical_members_keeps_the_members_top_token(tiny_models) -> None:
    twins = make_loop(tiny_models, [("one", ALIASES[1]), ("two", ALIASES[1])], strategy="deepen")
    completion = twins.generate(PROMPTS[:1], GREEDY, RequestOptions(diagnostics=True, logprobs=3))[0]
    assert all(step["fused"] for step in completion.diagnostics)
    alone = make_loop(tiny_models, [("solo", ALIASES[1])], strategy="mean")
    reference = alone.generate(PROMPTS[:1], GREEDY, RequestOptions(logprobs=3))[0]
    assert [t.token for t in completion.logprobs] == [t.token for t in reference.logprobs]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seeded_sampling_is_reproducible(pair, strategy: str) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=1234, ignore_eos=True)
    assert texts(pair, strategy, params) == texts(pair, strategy, params)
    other = SamplingParams(temperature=1.0, max_tokens=10, seed=99, ignore_eos=True)
    assert texts(pair, strategy, params) != texts(pair, strategy, other)


def test_gate_skips_the_others_when_main_is_sure(pair) -> None:
    never = pair.generate(PROMPTS[:1], GREEDY, RequestOptions(strategy="mean", gate=1e-9, diagnostics=True))[0]
    assert not any(step["fused"] for step in never.diagnostics)
    always = pair.generate(PROMPTS[:1], GREEDY, RequestOptions(strategy="mean", gate=1.0, diagnostics=True))[0]
    fused = [step["fused"] for step in always.diagnostics]
    # Fusion is skipped only mid-character, where the owner of a partial byte token must go on alone.
    assert sum(fused) >= len(fused) - 2


def test_me_draws_follow_the_weights(pair) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=40, seed=5, ignore_eos=True)
    completion = pair.generate(PROMPTS[:1], params, RequestOptions(strategy="me", weights=[3.0, 1.0], diagnostics=True))[0]
    drawn = [step["drawn"] for step in completion.diagnostics]
    assert drawn.count("smol") > drawn.count("gemma") > 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (RequestOptions(strategy="median"), "unknown strategy"),
        (RequestOptions(weights=[1.0]), "1 weights given for 2 members"),
        (RequestOptions(weights=[0.0, 0.0]), "not all zero"),
        (RequestOptions(strategy="me", gate=0.5), "gate applies"),
    ],
)
def test_bad_request_options(pair, options: RequestOptions, message: str) -> None:
    # The request's mistake (a 400 over HTTP), not the ensemble's configuration.
    with pytest.raises(InvalidRequest, match=message):
        pair.core.add(PROMPTS[0], GREEDY, options)


def test_deepen_refuses_too_few_anchors(tiny_models) -> None:
    with pytest.raises(ConfigError, match="anchor tokens"):
        make_loop(
            tiny_models,
            [("smol", ALIASES[0]), ("gemma", ALIASES[1])],
            strategy="deepen",
            deepen={"min_anchors": 10_000_000},
        )


def test_vote_spreads_answers_over_members_and_returns_one_of_them(pair) -> None:
    params = SamplingParams(temperature=0.8, max_tokens=6, seed=3, ignore_eos=True)
    options = RequestOptions(strategy="vote", vote_samples=4, vote_kind="span", diagnostics=True)
    completion = pair.generate(PROMPTS[:1], params, options)[0]
    (report,) = completion.diagnostics
    assert completion.text in report["answers"]
    assert len(report["answers"]) == 4
    again = pair.generate(PROMPTS[:1], params, options)[0]
    assert again.text == completion.text



def test_me_in_a_batch_equals_me_alone_and_keeps_the_packs(pair) -> None:
    """Under `me` a member computes only the sequences that drew it; the others ride along
    (KV only) in the same forward, so each member's batch, and its packed cache, stays put."""
    prompts = [Prompt(text=t) for t in ("The capital of France is", "1, 2, 3,", "Once upon a time", "def f(x):")]
    params = [SamplingParams(temperature=0.0, max_tokens=16, seed=i, ignore_eos=True) for i in range(len(prompts))]
    options = RequestOptions(strategy="me", diagnostics=True)
    alone = [pair.generate([p], [sp], options)[0] for p, sp in zip(prompts, params, strict=True)]
    repacks = {name: worker.engine.stats.repacks for name, worker in pair.workers.items()}
    together = pair.generate(prompts, params, options)
    assert [c.text for c in together] == [c.text for c in alone]
    assert [[s["drawn"] for s in c.diagnostics] for c in together] == [[s["drawn"] for s in c.diagnostics] for c in alone]
    for name, worker in pair.workers.items():
        # A new pack only when a sequence meets this member for the first time (lazily, without
        # riders, the batch changed nearly every one of the 16 steps).
        assert worker.engine.stats.repacks - repacks[name] <= len(prompts), name
