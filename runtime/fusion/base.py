"""What every strategy shares: the per-step context, the decision type, and candidate helpers."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from runtime.vocab import TokenTable

if TYPE_CHECKING:
    from runtime.config import EnsembleConfig
    from runtime.core import SequenceState
    from runtime.worker import InvertWork, SeqResult

EOS_KEY = b"\x00<eos>"  # shared key of every member's end-of-sequence tokens


@dataclass(frozen=True)
class WorkFlags:
    """What a strategy asks one member to return for one sequence this step."""

    full: bool = False
    relative: bool = False


@dataclass
class Candidate:
    """One possible next piece of text, with the member token that produces it."""

    key: bytes  # the piece's bytes, or EOS_KEY
    owner: str  # member whose token this is (it is fed to that member exactly)
    token_id: int


@dataclass
class Decision:
    """A distribution over candidates, ready for the sampler."""

    candidates: list[Candidate]
    logprobs: torch.Tensor  # [len(candidates)], normalised
    fused: bool  # whether several members' distributions were combined
    drawn: str | None = None  # the member drawn (me) or the only member consulted
    forced_logprob: float | None = None  # scoring: log-probability of the sequence's forced next piece


@dataclass
class EnsembleContext:
    """Static facts about the ensemble a strategy needs (no models: those live in the workers)."""

    config: EnsembleConfig
    names: list[str]
    main: str
    tables: dict[str, TokenTable]
    identical_vocab: bool
    max_context: dict[str, int]
    anchors: dict[str, list[int]] | None = None

    def table(self, member: str) -> TokenTable:
        return self.tables[member]


class Strategy:
    """A way of turning members' next-token outputs into one decision per step."""

    name: ClassVar[str]
    token_level: ClassVar[bool] = True

    def __init__(self, ctx: EnsembleContext) -> None:
        self.ctx = ctx

    def validate(self) -> None:
        """Raise ConfigError if this strategy cannot serve this ensemble."""

    def first(self, seq: SequenceState) -> dict[str, WorkFlags]:
        """Members that must compute first for this sequence."""
        raise NotImplementedError

    def more(self, seq: SequenceState, results: dict[str, SeqResult]) -> dict[str, WorkFlags]:
        """Members that must also compute, after seeing the first results (gate)."""
        return {}

    def invert_work(self, seq: SequenceState, results: dict[str, SeqResult]) -> InvertWork | None:
        """DeePEn's inverse search to run on the main member, if this step needs one."""
        return None

    def decide(
        self, seq: SequenceState, results: dict[str, SeqResult], inverted: torch.Tensor | None
    ) -> Decision:
        raise NotImplementedError


def member_key(table: TokenTable, token_id: int) -> bytes | None:
    """The candidate key of a member token: its bytes, EOS_KEY, or None for other special tokens."""
    if token_id in table.eos_ids:
        return EOS_KEY
    if table.is_special(token_id):
        return None
    return table.token_bytes(token_id)


def member_logprob(ctx: EnsembleContext, member: str, result: SeqResult, key: bytes) -> float:
    """A member's log-probability of a candidate piece (exact when the full distribution came back)."""
    table = ctx.table(member)
    if key == EOS_KEY:
        token_id = min(table.eos_ids)
    else:
        found = table.id_of(key)
        token_id = found if found is not None else table.first_token(key)
    if token_id is None:
        return tail_logprob(result, table.vocab_size)
    if result.logprobs is not None:
        return float(result.logprobs[token_id])
    assert result.top_ids is not None and result.top_logprobs is not None
    hits = (result.top_ids == token_id).nonzero()
    if hits.numel():
        return float(result.top_logprobs[hits[0, 0]])
    return tail_logprob(result, table.vocab_size)


def single_member(
    ctx: EnsembleContext, member: str, result: SeqResult, forced: Candidate | None = None
) -> Decision:
    """A decision that is one member's own top-k distribution, renormalised."""
    assert result.top_ids is not None and result.top_logprobs is not None
    table = ctx.table(member)
    candidates, logprobs = [], []
    for token_id, logprob in zip(result.top_ids.tolist(), result.top_logprobs.tolist(), strict=True):
        key = member_key(table, token_id)
        if key is None:
            continue
        candidates.append(Candidate(key, member, token_id))
        logprobs.append(logprob)
    values = torch.tensor(logprobs, dtype=torch.float32)
    decision = Decision(candidates, torch.log_softmax(values, dim=-1), fused=False, drawn=member)
    if forced is not None:
        decision.forced_logprob = member_logprob(ctx, member, result, forced.key)
    return decision


def tail_logprob(result: SeqResult, vocab_size: int) -> float:
    """Log-probability of one token outside the top-k: the leftover mass spread evenly."""
    assert result.top_logprobs is not None
    k = result.top_logprobs.numel()
    covered = float(torch.logsumexp(result.top_logprobs, dim=0).exp())
    rest = max(1.0 - covered, 1e-12)
    return math.log(rest / max(vocab_size - k, 1))


def normalised_weights(names: Sequence[str], weights: Sequence[float]) -> dict[str, float]:
    total = float(sum(weights))
    return {n: w / total for n, w in zip(names, weights, strict=True)}
