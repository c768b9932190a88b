"""Members with random weights write random tokens — rare scripts, compatibility characters, bytes
that split a character — and the other members must follow that text whatever it is. An ensemble
of random tiny members of the packaged architectures and real tokenizers generates under every
token-level strategy: no sequence may fail, and each one writes all of its tokens.
(bench.gpu_ensemble's full-size random members found such a case: SmolLM2 writing
U+F9D1, which Qwen2's NFC rewrote, failed a sequence under `me`; test_vocab.py covers that one
directly, this test the general case.)"""

from __future__ import annotations

from typing import Any

import pytest

from consort.runtime import models
from consort.runtime.config import parse_config
from consort.runtime.loop import EnsembleLoop, load_worker
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.testing.tiny import build_tiny

QWEN, SMOLLM2, GEMMA = "qwen2.5-coder-0.5b-instruct", "smollm2-135m-instruct", "gemma3-270m"
PAIRS = {"default": (QWEN, SMOLLM2), "knowledge": (SMOLLM2, GEMMA)}
PROMPTS = ["Write a line about the sea.", "日本語で答えて: 六つ", "x = [1, 2, 3]\nprint("]


def prepared(alias: str) -> bool:
    return (models.resolve(alias) / "tokenizer_config.json").exists()


@pytest.fixture(scope="module")
def random_members() -> dict[tuple[str, int], tuple[Any, Any]]:
    return {}


def loop_of(
    pair: tuple[str, str], strategy: str, seed: int, cache: dict[tuple[str, int], tuple[Any, Any]]
) -> EnsembleLoop:
    names = ["a", "b"]
    config = parse_config(
        {
            "members": [{"name": n, "model": f"tiny:{alias}"} for n, alias in zip(names, pair, strict=True)],
            "strategy": strategy,
            "main": "a",
            "deepen": {"min_anchors": 10, "max_anchors": 1024},
        }
    )
    workers = {}
    for name, alias in zip(names, pair, strict=True):
        key = (alias, seed)
        if key not in cache:
            cache[key] = build_tiny(alias, seed=seed)
        workers[name] = load_worker(config, name, "cpu", cache[key])
    return EnsembleLoop(config, workers)


@pytest.mark.parametrize("pair_name", PAIRS)
@pytest.mark.parametrize("strategy", ["mean", "me", "deepen"])
@pytest.mark.parametrize("seed", [1, 2])
def test_random_members_never_fail_a_sequence(
    pair_name: str, strategy: str, seed: int, random_members: dict[tuple[str, int], tuple[Any, Any]]
) -> None:
    pair = PAIRS[pair_name]
    if not all(prepared(alias) for alias in pair):
        pytest.skip(f"the tokenizers of {pair} are not in this machine's cache")
    loop = loop_of(pair, strategy, seed, random_members)
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
    completions = loop.generate([Prompt(text=p) for p in PROMPTS], params)  # a failed sequence raises
    for completion in completions:
        assert completion.finish_reason == "length"
        assert completion.completion_tokens == 24
