"""`deepen`: DeePEn (arXiv 2404.12715), fusion in a relative representation space.

Each member projects its most likely tokens' distribution into the space of
similarities to the anchor tokens all vocabularies share (on its own device,
next to its embeddings); the projections are averaged with the weights; the
main member then searches, over a small candidate set, for the distribution of
its own vocabulary whose projection matches the average.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from consort.runtime.errors import ConfigError
from consort.runtime.fusion import register
from consort.runtime.fusion.base import (
    Candidate,
    Decision,
    WorkFlags,
    member_key,
    normalised_weights,
    single_member,
    tail_logprob,
)
from consort.runtime.fusion.gate import GatedStrategy
from consort.runtime.types import InvertSpec, InvertWork, SeqResult
from consort.runtime.vocab import TokenTable

if TYPE_CHECKING:
    from consort.runtime.core import SequenceState

RELATIVE = WorkFlags(relative=True)


@register
class DeepenStrategy(GatedStrategy):
    """DeePEn: average in the relative space of shared anchor tokens, then map back to the main member's vocabulary."""

    name = "deepen"

    def validate(self) -> None:
        minimum = self.ctx.config.deepen.min_anchors
        count = len(next(iter(self.ctx.anchors.values()))) if self.ctx.anchors else 0
        if count < minimum:
            raise ConfigError(
                f"deepen needs at least {minimum} anchor tokens shared by all members, these share {count}; "
                "use mean or me for such different vocabularies, or lower deepen.min_anchors"
            )

    def member_flags(self) -> WorkFlags:
        return RELATIVE

    def _active(self, seq: SequenceState, results: dict[str, SeqResult]) -> list[str]:
        return [n for n in self.ctx.names if n in results and seq.weight(n) > 0]

    echoes_positions = True

    def invert_spec(self, seq: SequenceState, members: Collection[str]) -> InvertSpec | None:
        """The inverse search the main member runs within the step, when `members` compute."""
        active = [n for n in self.ctx.names if n in members and seq.weight(n) > 0]
        if len(active) < 2:
            return None
        return self.echo_spec({n: seq.weight(n) for n in active})

    def echo_spec(self, weights: Mapping[str, float]) -> InvertSpec:
        """The inverse search over the members with these (positive) weights, in the ensemble's order."""
        active = [n for n in self.ctx.names if weights.get(n, 0) > 0]
        normalised = normalised_weights(active, [weights[n] for n in active])
        deepen = self.ctx.config.deepen
        return InvertSpec(
            members=active,
            weights=[normalised[n] for n in active],
            top_k=deepen.relative_top_k,
            steps=deepen.steps,
            learning_rate=deepen.learning_rate,
        )

    def position_decision(self, main_position: SeqResult) -> Decision:
        """Before one piece of an echo: the inverse search's distribution, or inside a character the
        main member's own; the piece's log-probability as the main member computed it."""
        main = self.ctx.main
        if main_position.inverted is None or main_position.candidate_ids is None:
            decision = single_member(self.ctx, main, main_position)
        else:
            decision = fused_decision(self.ctx.table(main), main, main_position.candidate_ids, main_position.inverted)
        decision.forced_logprob = main_position.forced_logprob
        return decision

    def invert_work(self, seq: SequenceState, results: dict[str, SeqResult]) -> InvertWork | None:
        """The inverse search as a round of its own, after the step (the two-round path)."""
        active = self._active(seq, results)
        if len(active) < 2:
            return None
        weights = normalised_weights(active, [seq.weight(n) for n in active])
        main, k = self.ctx.main, self.ctx.config.deepen.relative_top_k
        keys = {
            name: [member_key(self.ctx.table(name), t) for t in results[name].top_ids[:k].tolist()]
            for name in active
            if name != main
        }
        return build_invert_work(seq.seq_id, main, self.ctx.table(main), weights, results, keys, k)

    def decide(self, seq: SequenceState, results: dict[str, SeqResult], inverted: torch.Tensor | None) -> Decision:
        main = self.ctx.main
        forced = seq.forced[0] if seq.forced else None
        if inverted is None:
            active = self._active(seq, results) or [main]
            return single_member(self.ctx, active[0], results[active[0]], forced)
        work = seq.pending_invert
        assert work is not None
        decision = fused_decision(self.ctx.table(main), main, work.candidate_ids, inverted)
        if forced is not None:
            decision.forced_logprob = forced_logprob(
                work.candidate_ids, inverted, results[main], forced.token_id, self.ctx.table(main).vocab_size
            )
        return decision


def fused_decision(table: TokenTable, main: str, candidate_ids: torch.Tensor, inverted: torch.Tensor) -> Decision:
    """The inverse search's distribution over its candidates, as the main member's pieces."""
    candidates, values = [], []
    for token_id, logprob in zip(candidate_ids.tolist(), inverted.tolist(), strict=True):
        key = member_key(table, token_id)
        if key is not None:
            candidates.append(Candidate(key, main, token_id))
            values.append(logprob)
    return Decision(candidates, torch.log_softmax(torch.tensor(values), -1), fused=True)


def forced_logprob(
    candidate_ids: torch.Tensor, inverted: torch.Tensor, main: SeqResult, token_id: int, vocab_size: int
) -> float:
    """The fused distribution over the main member's whole vocabulary, at one token.

    The inverse search redistributes the main member's mass on the candidate set; every other
    token keeps the main member's own probability. (Adding the scored token to the candidates
    instead, as DeePEn's code does, gives it the search's starting value almost unchanged: every
    unlikely answer then scores the same constant, and ranking them is a tie.)
    """
    own = main.logprobs
    if own is None:
        own_at = tail_logprob(main, vocab_size)
        candidate_mass = float(torch.logsumexp(main.top_logprobs, 0))
    else:
        own_at = float(own[token_id])
        candidate_mass = float(torch.logsumexp(own[candidate_ids], 0))
    hits = (candidate_ids == token_id).nonzero()
    if hits.numel():
        return min(candidate_mass, 0.0) + float(inverted[hits[0, 0]])
    return own_at


def build_invert_work(
    seq_id: str,
    main: str,
    main_table: TokenTable,
    weights: Mapping[str, float],
    results: Mapping[str, SeqResult],
    keys: Mapping[str, Sequence[bytes | None]],
    k: int,
) -> InvertWork:
    """DeePEn's inverse search for one sequence: the weighted average of the members' relative
    vectors (`weights`, in the ensemble's order), and the candidates in the main member's vocabulary
    (its own top `k`, then the other members' top `k` by their keys) starting from its own log-probs
    (exact where its whole distribution is at hand, else its top-k and an even tail).

    The coordinator builds it for a round of its own; the main member builds the same within the
    step, from the other members' results passed to it.
    """
    target = torch.stack([weight * _relative(results[n]) for n, weight in weights.items()]).sum(0)
    main_result = results[main]
    candidate_ids: list[int] = main_result.top_ids[:k].tolist()
    for name in weights:
        if name == main:
            continue
        for key in keys[name]:
            if key is None:
                continue
            mapped = main_table.id_of(key)
            if mapped is None:
                mapped = main_table.first_token(key)
            if mapped is not None:  # None: the main vocabulary cannot spell this piece at all
                candidate_ids.append(mapped)
    candidate_ids = list(dict.fromkeys(candidate_ids))
    if main_result.logprobs is not None:
        # The main member's own log-probs of every candidate. A candidate that only another member
        # ranks high is usually outside the main member's top-k, and the even spread of its leftover
        # mass (below) puts it near log(1/V): " refrigerator", -6.37 for SmolLM2 and -3.54 for
        # Gemma-3, started at -12 and stayed there (bench/text_scoring.py).
        initial = main_result.logprobs[torch.tensor(candidate_ids)].float()
    else:
        known = dict(zip(main_result.top_ids.tolist(), main_result.top_logprobs.tolist(), strict=True))
        tail = tail_logprob(main_result, main_table.vocab_size)
        initial = torch.tensor([known.get(c, tail) for c in candidate_ids], dtype=torch.float32)
    return InvertWork(seq_id, target, torch.tensor(candidate_ids), torch.log_softmax(initial, -1))


def _relative(result: SeqResult) -> torch.Tensor:
    if result.relative is None:
        raise RuntimeError(f"sequence {result.seq_id}: the member returned no relative vector for deepen")
    return result.relative
