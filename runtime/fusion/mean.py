"""`mean`: weighted average of the members' next-token probabilities.

Identical vocabularies average the full distributions exactly. Different
vocabularies are aligned by the candidate's bytes over the union of every
member's top-k (UniTE/GaC): a candidate a member lacks as a single token gets
that member's probability of the first token of its own tokenization of the
candidate text; a token outside a member's top-k gets its share of the leftover
mass.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from consort.runtime.fusion import register
from consort.runtime.fusion.base import (
    EOS_KEY,
    Candidate,
    Decision,
    WorkFlags,
    member_key,
    normalised_weights,
    single_member,
    tail_logprob,
)
from consort.runtime.fusion.gate import GatedStrategy
from consort.runtime.types import SeqResult

if TYPE_CHECKING:
    from consort.runtime.core import SequenceState


@register
class MeanStrategy(GatedStrategy):
    """Weighted average of the members' next-token probabilities (UniTE/GaC union of top-k across vocabularies)."""

    name = "mean"

    def member_flags(self) -> WorkFlags:
        return WorkFlags(full=self.ctx.identical_vocab)

    def decide(self, seq: SequenceState, results: dict[str, SeqResult], inverted: torch.Tensor | None) -> Decision:
        active = [n for n in self.ctx.names if n in results and seq.weight(n) > 0]
        forced = seq.forced[0] if seq.forced else None
        if len(results) == 1 or len(active) == 1:
            member = active[0] if active else self.ctx.main
            return single_member(self.ctx, member, results[member], forced)
        weights = normalised_weights(active, [seq.weight(n) for n in active])
        if self.ctx.identical_vocab:
            return self._full_average(results, weights, forced)
        return self._union_average(results, weights, forced)

    def _full_average(
        self, results: dict[str, SeqResult], weights: dict[str, float], forced: Candidate | None
    ) -> Decision:
        probs = sum(weights[n] * _full(results[n]).exp() for n in weights)
        assert isinstance(probs, torch.Tensor)
        main = self.ctx.main
        top = torch.topk(probs, min(self.ctx.config.top_k, probs.numel()))
        table = self.ctx.table(main)
        candidates, values = [], []
        for token_id, p in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            key = member_key(table, token_id)
            if key is not None:
                candidates.append(Candidate(key, main, token_id))
                values.append(p)
        decision = Decision(candidates, torch.log(torch.tensor(values)).log_softmax(-1), fused=True)
        if forced is not None:
            # The full average is a distribution over the whole vocabulary: score it exactly.
            decision.forced_logprob = float(torch.log(probs[forced.token_id]))
        return decision

    def _union_average(
        self, results: dict[str, SeqResult], weights: dict[str, float], forced: Candidate | None
    ) -> Decision:
        tops: dict[str, dict[bytes, tuple[int, float]]] = {}
        for name in weights:
            table, result = self.ctx.table(name), results[name]
            entries: dict[bytes, tuple[int, float]] = {}
            for token_id, logprob in zip(result.top_ids.tolist(), result.top_logprobs.tolist(), strict=True):
                key = member_key(table, token_id)
                if key is not None and key not in entries:
                    entries[key] = (token_id, logprob)
            tops[name] = entries
        keys = list(dict.fromkeys(k for name in weights for k in tops[name]))
        if forced is not None and forced.key not in keys:
            keys.append(forced.key)
        fused = [0.0] * len(keys)  # plain floats: per-element tensor updates cost more than the arithmetic
        owners: list[tuple[str, int, float]] = [("", -1, -math.inf)] * len(keys)
        for name, weight in weights.items():
            table, result = self.ctx.table(name), results[name]
            tail = tail_logprob(result, table.vocab_size)
            by_id = {tid: lp for tid, lp in tops[name].values()}
            for i, key in enumerate(keys):
                own = tops[name].get(key)
                if own is not None:
                    token_id, logprob = own
                    single = True
                else:
                    token_id, single = self._lookup(name, key)
                    if token_id is None:
                        logprob = tail
                    elif result.logprobs is not None:
                        logprob = float(result.logprobs[token_id])
                    else:
                        logprob = by_id.get(token_id, tail)
                fused[i] += weight * math.exp(logprob)
                # The owner feeds its token exactly; prefer the main member, then the strongest voice.
                if single:
                    score = weight * math.exp(logprob) + (1.0 if name == self.ctx.main else 0.0)
                    if score > owners[i][2]:
                        owners[i] = (name, token_id, score)
        candidates = [Candidate(k, owner, tid) for k, (owner, tid, _) in zip(keys, owners, strict=True)]
        total = torch.tensor(fused)
        decision = Decision(candidates, torch.log(total / total.sum()), fused=True)
        if forced is not None:
            decision.forced_logprob = float(decision.logprobs[keys.index(forced.key)])
        return decision

    def _lookup(self, member: str, key: bytes) -> tuple[int | None, bool]:
        """(token id standing for `key` in this member's vocabulary, whether it is the whole key)."""
        table = self.ctx.table(member)
        if key == EOS_KEY:
            return min(table.eos_ids), True
        token_id = table.id_of(key)
        if token_id is not None:
            return token_id, True
        return table.first_token(key), False


def _full(result: SeqResult) -> torch.Tensor:
    if result.logprobs is None:
        raise RuntimeError(f"sequence {result.seq_id}: the member returned no full distribution for mean")
    return result.logprobs
