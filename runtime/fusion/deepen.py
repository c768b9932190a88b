"""`deepen`: DeePEn (arXiv 2404.12715), fusion in a relative representation space.

Each member projects its most likely tokens' distribution into the space of
similarities to the anchor tokens all vocabularies share (on its own device,
next to its embeddings); the projections are averaged with the weights; the
main member then searches, over a small candidate set, for the distribution of
its own vocabulary whose projection matches the average.
"""

from __future__ import annotations

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
from consort.runtime.types import InvertWork, SeqResult

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

    def invert_work(self, seq: SequenceState, results: dict[str, SeqResult]) -> InvertWork | None:
        active = self._active(seq, results)
        if len(active) < 2:
            return None
        weights = normalised_weights(active, [seq.weight(n) for n in active])
        target = torch.stack([weights[n] * _relative(results[n]) for n in active]).sum(0)
        main, k = self.ctx.main, self.ctx.config.deepen.relative_top_k
        main_result = results[main]
        main_table = self.ctx.table(main)
        candidate_ids: list[int] = main_result.top_ids[:k].tolist()
        for name in active:
            if name == main:
                continue
            table = self.ctx.table(name)
            for token_id in results[name].top_ids[:k].tolist():
                key = member_key(table, token_id)
                if key is None:
                    continue
                mapped = main_table.id_of(key)
                if mapped is None:
                    mapped = main_table.first_token(key)
                if mapped is not None:  # None: the main vocabulary cannot spell this piece at all
                    candidate_ids.append(mapped)
        if seq.forced:
            candidate_ids.append(seq.forced[0].token_id)
        candidate_ids = list(dict.fromkeys(candidate_ids))
        known = dict(zip(main_result.top_ids.tolist(), main_result.top_logprobs.tolist(), strict=True))
        tail = tail_logprob(main_result, main_table.vocab_size)
        initial = torch.tensor([known.get(c, tail) for c in candidate_ids], dtype=torch.float32)
        return InvertWork(seq.seq_id, target, torch.tensor(candidate_ids), torch.log_softmax(initial, -1))

    def decide(self, seq: SequenceState, results: dict[str, SeqResult], inverted: torch.Tensor | None) -> Decision:
        main = self.ctx.main
        forced = seq.forced[0] if seq.forced else None
        if inverted is None:
            active = self._active(seq, results) or [main]
            return single_member(self.ctx, active[0], results[active[0]], forced)
        work = seq.pending_invert
        assert work is not None
        table = self.ctx.table(main)
        candidates, values = [], []
        for token_id, logprob in zip(work.candidate_ids.tolist(), inverted.tolist(), strict=True):
            key = member_key(table, token_id)
            if key is not None:
                candidates.append(Candidate(key, main, token_id))
                values.append(logprob)
        decision = Decision(candidates, torch.log_softmax(torch.tensor(values), -1), fused=True)
        if forced is not None:
            index = work.candidate_ids.tolist().index(forced.token_id)
            decision.forced_logprob = float(inverted[index])
        return decision


def _relative(result: SeqResult) -> torch.Tensor:
    if result.relative is None:
        raise RuntimeError(f"sequence {result.seq_id}: the member returned no relative vector for deepen")
    return result.relative
