"""Tokenizer routes (vLLM's /tokenize and /detokenize): a member's own token ids for a prompt, and text
for token ids. The ensemble's model id speaks for its main member (whose tokens usage counts)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from consort.runtime.errors import InvalidRequest
from consort.runtime.prompts import Prompt, prompt_ids


@dataclass(frozen=True)
class Tokenized:
    """A prompt in one member's tokens."""

    tokens: list[int]
    token_strs: list[str] | None
    max_model_len: int


def tokenize(
    tokenizer: Any, max_context: int, prompt: Prompt, *, add_special_tokens: bool, token_strs: bool
) -> Tokenized:
    """Raw text as the tokenizer splits it (with its special tokens if asked); a conversation exactly as
    the ensemble renders it for this member (its chat template, the generation prompt, tools)."""
    if prompt.text is not None:
        ids = list(tokenizer(prompt.text, add_special_tokens=add_special_tokens)["input_ids"])
    else:
        ids = prompt_ids(tokenizer, prompt)
    strs = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)] if token_strs else None
    return Tokenized(ids, strs, max_context)


def detokenize(tokenizer: Any, tokens: list[int]) -> str:
    size = len(tokenizer)
    bad = [t for t in tokens if not 0 <= t < size]
    if bad:
        raise InvalidRequest(f"token ids {bad[:5]} are outside this model's vocabulary of {size}")
    return str(tokenizer.decode(tokens))
