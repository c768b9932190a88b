"""What every strategy shares: the per-step context, the decision type, and candidate helpers."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from consort.runtime.vocab import TokenTable

if TYPE_CHECKING:
    from consort.runtime.config import EnsembleConfig
    from consort.runtime.core import EnsembleCore, SequenceState
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams
    from consort.runtime.types import InvertSpec, InvertWork, RequestOptions, SeqResult

StrategyLevel = Literal["token", "answer"]

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
    # Candidates from several vocabularies: greedy picks the most probable text (textprob.text_greedy).
    text_level: bool = False


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
    """A way of turning members' next-token outputs into one decision per step (`level` token),
    or of answering a request with several whole answers (`level` answer: `admit`)."""

    name: ClassVar[str]
    level: ClassVar[StrategyLevel] = "token"
    supports_gate: ClassVar[bool] = False
    # The token-level strategy whose distribution scores given text for this one (log-likelihood,
    # echo log-probs): itself by default; None when it has no distribution over text (answer level).
    scored_as: ClassVar[str | None] = None
    # Whether text is scored at the text level (runtime/textprob.py: every member's tokens that are
    # consistent with the text count) rather than by the forced piece's entry in `decide`'s output.
    scores_text: ClassVar[bool] = False
    # Whether echo scores text from every member's result before every piece, in one round
    # (`echo_spec`, `position_decision`: DeePEn), rather than piece by piece.
    echoes_positions: ClassVar[bool] = False

    def __init__(self, ctx: EnsembleContext) -> None:
        self.ctx = ctx

    @classmethod
    def scoring_strategy(cls) -> str | None:
        if cls.level == "answer":
            return cls.scored_as
        return cls.scored_as or cls.name

    def admit(
        self, core: EnsembleCore, prompt: Prompt, params: SamplingParams, options: RequestOptions, seq_id: str | None
    ) -> str:
        """Answer level: queue the sequences this request needs in `core`; returns the id its caller follows."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ConfigError if this strategy cannot serve this ensemble."""

    def first(self, seq: SequenceState) -> dict[str, WorkFlags]:
        """Members that must compute first for this sequence."""
        raise NotImplementedError

    def more(self, seq: SequenceState, results: dict[str, SeqResult]) -> dict[str, WorkFlags]:
        """Members that must also compute, after seeing the first results (gate)."""
        return {}

    def invert_spec(self, seq: SequenceState, members: Collection[str]) -> InvertSpec | None:
        """DeePEn's inverse search for the main member to run within the step, if this step needs
        one once `members` (those that computed earlier in the step and those computing now) have
        computed; the executor passes the main member the others' results of the same round."""
        return None

    def invert_work(self, seq: SequenceState, results: dict[str, SeqResult]) -> InvertWork | None:
        """DeePEn's inverse search to run on the main member, if this step needs one (the
        two-round path: a round of its own after the step)."""
        return None

    def decide(
        self, seq: SequenceState, results: dict[str, SeqResult], inverted: torch.Tensor | None
    ) -> Decision:
        raise NotImplementedError

    def echo_spec(self, weights: Mapping[str, float]) -> InvertSpec:
        """`echoes_positions`: what the main member computes from the members' results before each piece."""
        raise NotImplementedError

    def position_decision(self, main_position: SeqResult) -> Decision:
        """`echoes_positions`: the decision before one piece, from the main member's result there."""
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
    return table_logprob(ctx.table(member), result, key)


def table_logprob(table: TokenTable, result: SeqResult, key: bytes) -> float:
    """`member_logprob` for the member whose vocabulary `table` is."""
    if key == EOS_KEY:
        token_id = min(table.eos_ids)
    else:
        found = table.id_of(key)
        token_id = found if found is not None else table.first_token(key)
    if token_id is None:
        return tail_logprob(result, table.vocab_size)
    if result.logprobs is not None:
        return float(result.logprobs[token_id])
    hits = (result.top_ids == token_id).nonzero()
    if hits.numel():
        return float(result.top_logprobs[hits[0, 0]])
    return tail_logprob(result, table.vocab_size)


def single_member(
    ctx: EnsembleContext, member: str, result: SeqResult, forced: Candidate | None = None
) -> Decision:
    """A decision that is one member's own top-k distribution, renormalised."""
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
    k = result.top_logprobs.numel()
    covered = float(torch.logsumexp(result.top_logprobs, dim=0).exp())
    rest = max(1.0 - covered, 1e-12)
    return math.log(rest / max(vocab_size - k, 1))


def normalised_weights(names: Sequence[str], weights: Sequence[float]) -> dict[str, float]:
    total = float(sum(weights))
    return {n: w / total for n, w in zip(names, weights, strict=True)}
