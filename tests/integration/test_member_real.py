"""The member engine on the real packaged models: greedy decoding through a ragged batch
of three reproduces `model.generate(do_sample=False)` of each prompt alone, token for token."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from consort.runtime import models
from consort.runtime.member import MemberEngine

NEW_TOKENS = 24
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The waves",
    "Q: What is 12 times 7?\nA:",
]


@pytest.fixture(scope="module", params=models.DEFAULT_MEMBERS)
def real(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    return models.load(request.param)


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for prompt, tokens in zip(prompts, produced, strict=True):
        generated = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            pad_token_id=pad,
        )[0, len(prompt) :].tolist()
        assert tokens == generated, (tokenizer.decode(tokens), tokenizer.decode(generated))
