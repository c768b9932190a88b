"""`mean`: weighted average of the members' next-token probabilities.

Identical vocabularies average the full distributions exactly. Different
vocabularies are averaged as distributions over pieces of text: every member
token of the union of the members' top-k (UniTE/GaC) is a candidate piece, and
each member gives probability to exactly the pieces it can emit as one token —
its own token's probability, never a share of another piece's. A piece one
member spells with several tokens (":[" where the other has ":" then "[") is not
a rival of the shorter one: sampling from this mixture continues the text with
":" exactly as often as the members together would, through whichever piece.
Scoring given text goes further and counts, for each member, every token
consistent with the text (`runtime/textprob.py`).
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
    scores_text = True

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
            for i, key in enumerate(keys):
                own = tops[name].get(key)
                if own is not None:
                    token_id, logprob = own
                else:
                    found = self._token_of(name, key)
                    if found is None:
                        continue  # this member cannot emit the piece as one token: its mass is on its own pieces
                    token_id = found
                    logprob = float(result.logprobs[token_id]) if result.logprobs is not None else tail
                fused[i] += weight * math.exp(logprob)
                # The owner feeds its token exactly; prefer the main member, then the strongest voice.
                score = weight * math.exp(logprob) + (1.0 if name == self.ctx.main else 0.0)
                if score > owners[i][2]:
                    owners[i] = (name, token_id, score)
        candidates = [Candidate(k, owner, tid) for k, (owner, tid, _) in zip(keys, owners, strict=True)]
        total = torch.tensor(fused, dtype=torch.float64)
        # A forced piece no member spells as one token has probability zero here; the text-level
        # scorer gives it its real probability.
        logprobs = torch.log(total / total.sum()).to(torch.float32)
        decision = Decision(candidates, logprobs, fused=True, text_level=True)
        if forced is not None:
            decision.forced_logprob = float(decision.logprobs[keys.index(forced.key)])
        return decision

    def _token_of(self, member: str, key: bytes) -> int | None:
        """The member's token that is exactly this piece, if it has one."""
        table = self.ctx.table(member)
        if key == EOS_KEY:
            return min(table.eos_ids)
        return table.id_of(key)


def _full(result: SeqResult) -> torch.Tensor:
    if result.logprobs is None:
        raise RuntimeError(f"sequence {result.seq_id}: the member returned no full distribution for mean")
    return result.logprobs
