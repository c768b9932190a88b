"""The member engine on the real packaged models (every member `make test` prepares): greedy decoding
through a ragged batch of three reproduces `model.generate(do_sample=False)` of each prompt alone,
token for token; and through the whole local loop a member alone gives its known greedy answer."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from consort.runtime import models
from consort.runtime.config import members_config
from consort.runtime.loop import EnsembleLoop, load_worker
from consort.runtime.member import MemberEngine
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams

NEW_TOKENS = 24
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The waves",
    "Q: What is 12 times 7?\nA:",
]


# Greedy continuations of "The capital of France is" known for a member, from its cache loaded in fp32.
KNOWN_CAPITAL = {
    "qwen2.5-coder-0.5b-instruct": " Paris.",
    "qwen2.5-coder-1.5b-instruct": " Paris.",
}


@pytest.fixture(scope="module", params=models.STANDARD_MEMBERS)
def member(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    model, tokenizer = models.load(request.param)
    return request.param, model, tokenizer


@pytest.fixture
def real(member: tuple[str, Any, Any]) -> tuple[Any, Any]:
    return member[1], member[2]


def _engine_greedy(model: Any, tokenizer: Any, prompts: list[list[int]]) -> list[list[int]]:
    engine = MemberEngine(model, tokenizer)
    for i, prompt in enumerate(prompts):
        engine.add(str(i), prompt)
    live = [str(i) for i in range(len(prompts))]
    produced: dict[str, list[int]] = {s: [] for s in live}
    for _ in range(NEW_TOKENS):
        out = engine.step(live, top_k=1)
        for seq_id in list(live):
            token = int(out[seq_id].top_ids[0])
            produced[seq_id].append(token)
            engine.extend(seq_id, [token])
            if token in engine.eos_token_ids:
                live.remove(seq_id)
        if not live:
            break
    return [produced[str(i)] for i in range(len(prompts))]


@pytest.mark.slow
def test_batched_greedy_reproduces_generate(real: tuple[Any, Any]) -> None:
    model, tokenizer = real
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts), "prompts must be ragged"
    produced = _engine_greedy(model, tokenizer, prompts)
    for prompt, tokens in zip(prompts, produced, strict=True):
        generated = _generate(model, tokenizer, prompt, NEW_TOKENS)
        assert tokens == generated, (tokenizer.decode(tokens), tokenizer.decode(generated))


def _generate(model: Any, tokenizer: Any, prompt: list[int], new_tokens: int) -> list[int]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=new_tokens,
        pad_token_id=pad,
    )[0, len(prompt) :].tolist()


@pytest.mark.slow
def test_member_alone_through_the_loop_gives_its_known_greedy_answer(member: tuple[str, Any, Any]) -> None:
    # Only members whose answer is known. The loop shares text, not token ids: each step the member
    # re-tokenizes it, so where generate emits a non-canonical split ('\n', '\n' for SmolLM2, which
    # its tokenizer writes as one '\n\n') the two continue from different contexts by design.
    alias, model, tokenizer = member
    if alias not in KNOWN_CAPITAL:
        pytest.skip(f"no known greedy answer for {alias}")
    config = members_config([alias], "mean")
    name = config.members[0].name
    loop = EnsembleLoop(config, {name: load_worker(config, name, "cpu", (model, tokenizer))})
    text = "The capital of France is"
    completion = loop.generate([Prompt(text=text)], SamplingParams.create(temperature=0.0, max_tokens=8))[0]
    expected = _generate(model, tokenizer, tokenizer(text)["input_ids"], 8)
    assert completion.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert completion.text.startswith(KNOWN_CAPITAL[alias]), completion.text
