"""The strategy contracts on the two real packaged models (slow: real weights, CPU)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from consort.runtime import models
from consort.runtime.config import parse_config
from consort.runtime.loop import EnsembleLoop, load_worker
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions

pytestmark = pytest.mark.slow

ALIASES = ("smollm2-135m-instruct", "gemma3-270m")
PROMPTS = [Prompt(text="The capital of France is"), Prompt(messages=[{"role": "user", "content": "Name a colour."}])]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def real_models() -> dict[str, tuple[Any, Any]]:
    return {alias: models.load(alias) for alias in ALIASES}


def loop_of(real_models: dict, members: list[tuple[str, str]], strategy: str) -> EnsembleLoop:
    config = parse_config(
        {"members": [{"name": n, "model": a} for n, a in members], "strategy": strategy, "main": members[0][0]}
    )
    return EnsembleLoop(config, {n: load_worker(config, n, "cpu", real_models[a]) for n, a in members})


def texts(loop: EnsembleLoop, options: RequestOptions, params: SamplingParams = GREEDY) -> list[str]:
    return [c.text for c in loop.generate(PROMPTS, params, options)]


@pytest.mark.parametrize("strategy", ["mean", "deepen", "me"])
def test_real_model_with_itself_is_the_model(real_models, strategy: str) -> None:
    alone = loop_of(real_models, [("solo", ALIASES[0])], "mean")
    twins = loop_of(real_models, [("one", ALIASES[0]), ("two", ALIASES[0])], strategy)
    assert texts(twins, RequestOptions()) == texts(alone, RequestOptions())


def test_real_pair_me_one_hot_is_each_member_and_fusion_is_normalised(real_models) -> None:
    pair = loop_of(real_models, [("smol", ALIASES[0]), ("gemma", ALIASES[1])], "deepen")
    for index, alias in enumerate(ALIASES):
        alone = loop_of(real_models, [("solo", alias)], "mean")
        weights = [float(i == index) for i in range(2)]
        assert texts(pair, RequestOptions(strategy="me", weights=weights)) == texts(alone, RequestOptions())
    completion = pair.generate(PROMPTS[:1], GREEDY, RequestOptions(strategy="deepen", logprobs=5))[0]
    assert "Paris" in completion.text
    for token in completion.logprobs:
        assert token.logprob <= 0.0
        assert sum(math.exp(lp) for _, lp in token.top) <= 1.0 + 1e-4


@pytest.mark.parametrize("strategy", ["mean", "deepen", "me"])
def test_real_pair_seeded_sampling_is_reproducible(real_models, strategy: str) -> None:
    pair = loop_of(real_models, [("smol", ALIASES[0]), ("gemma", ALIASES[1])], strategy)
    params = SamplingParams(temperature=0.8, max_tokens=8, seed=21)
    assert texts(pair, RequestOptions(), params) == texts(pair, RequestOptions(), params)
