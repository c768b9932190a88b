"""A member's next-token distribution before every piece of a scored text, in two forwards.

Scoring text under DeePEn (echo, log-likelihoods) fuses, before each of the main member's
tokens, every member's distribution after *its own* tokenization of the text so far: what
stepping through the text token by token gives each member, one forward per token. Most of
those prefixes are prefixes of the member's tokenization of the whole text, so one forward
over the whole text (an echo) already holds their distributions. The others differ only at
the end, where a piece cut one of the member's tokens (" refriger" for a member that spells
" refrigerator" whole): each is a fork of the whole text's cache, cut back to where the two
tokenizations part, plus the one or two tokens that differ, all forked rows in one batched
forward. Two forwards per member instead of one per token, and the same distributions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from consort.runtime.alignment import Aligner, common_prefix, incomplete_tail
from consort.runtime.member import MemberEngine
from consort.runtime.types import Piece
from consort.runtime.vocab import TokenTable

# Forked rows per batched forward: each holds a copy of the whole text's cache.
_FORKS_PER_FORWARD = 32


@dataclass
class PositionOutput:
    """A member's distribution at one position: its top-k, and all of it when asked for."""

    top_ids: torch.Tensor
    top_logprobs: torch.Tensor
    logprobs: torch.Tensor | None = None


def prefix_states(tokenizer: Any, table: TokenTable, member: str, pieces: Sequence[Piece], window_tokens: int) -> list[list[int]]:
    """This member's ids of the text after each number of pieces (index i: after pieces[:i]),
    exactly as its aligner holds them when the pieces arrive one step at a time."""
    aligner = Aligner(tokenizer, table, window_tokens=window_tokens)
    states = [aligner.ids]
    for piece in pieces:
        if piece.owner == member and piece.token_id is not None:
            aligner.append_own(piece.token_id)
        else:
            aligner.append(piece.data)
        states.append(aligner.ids)
    return states


def mid_character(pieces: Sequence[Piece]) -> list[bool]:
    """Whether the text before each piece ends inside a character (only the member whose token
    split it goes on there; the others do not compute)."""
    text, inside = b"", []
    for piece in pieces:
        inside.append(incomplete_tail(text) > 0)
        text += piece.data
    return inside


def positions(
    engine: MemberEngine,
    seq_id: str,
    prompt: list[int],
    states: list[list[int]],
    wanted: Sequence[bool],
    *,
    top_k: int,
    full: bool,
) -> list[PositionOutput | None]:
    """The member's distribution after `prompt + states[i]` for each i in `wanted`.

    Registers `seq_id` in the engine with the whole text (the caller releases it like any
    sequence); the forks are gone when this returns.
    """
    whole = prompt + states[-1]
    engine.add(seq_id, whole)
    echo = engine.step(
        [seq_id], top_k=top_k, echo={seq_id}, echo_top_k=top_k, echo_full={seq_id} if full else ()
    )[seq_id]
    assert echo.echo_top is not None
    top_ids, top_logprobs = echo.echo_top
    out: list[PositionOutput | None] = [None] * (len(states) - 1)
    forks: list[tuple[int, int, list[int]]] = []  # (position, tokens kept, tokens fed)
    for i, state in enumerate(states[:-1]):
        if not wanted[i]:
            continue
        ids = prompt + state
        kept = common_prefix(ids, whole)
        if kept == len(ids) < len(whole):
            # Echo row j is the distribution after the first j + 1 tokens.
            j = len(ids) - 1
            out[i] = PositionOutput(
                top_ids[j].clone(), top_logprobs[j].clone(), echo.echo_full[j].clone() if echo.echo_full is not None else None
            )
        else:
            kept = min(kept, len(ids) - 1)  # a fork must feed at least one token to have an output
            forks.append((i, kept, ids[kept:]))
    for start in range(0, len(forks), _FORKS_PER_FORWARD):
        chunk = forks[start : start + _FORKS_PER_FORWARD]
        names = [f"{seq_id}/fork{i}" for i, _, _ in chunk]
        try:
            for name, (_, kept, fed) in zip(names, chunk, strict=True):
                engine.fork(seq_id, name, kept)
                engine.extend(name, fed)
            stepped = engine.step(names, top_k=top_k, full=full)
        finally:
            for name in names:
                engine.remove(name)
        for name, (i, _, _) in zip(names, chunk, strict=True):
            result = stepped[name]
            out[i] = PositionOutput(result.top_ids, result.top_logprobs, result.logprobs)
    return out

