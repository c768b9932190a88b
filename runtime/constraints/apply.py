"""The grammar applied to a step's decision, whatever strategy made it.

A decision is a distribution over candidate pieces of text (bytes, from any member). The
constrained decision keeps the candidates whose bytes the grammar allows, renormalised. When
none fits (the members' top-k all break the grammar, common right after `{` with a schema),
the step widens: the grammar masks the whole vocabulary of the member the decision speaks
for (the drawn one for `me` or a single-member step, the main one for a fused step), and the
allowed tokens, best first, become the candidates, each scored as the strategy's members score
it (their weighted mixture for a fused step). The member the step speaks for returned its full
distribution (the core asks for it on constrained sequences), so its scores are exact; the others'
are their top-k, and the strategy's tail estimate elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from consort.runtime.constraints.engine import ByteGrammar, GrammarDeadEnd, member_tokenizer
from consort.runtime.fusion.base import (
    EOS_KEY,
    Candidate,
    Decision,
    EnsembleContext,
    member_key,
    member_logprob,
)
from consort.runtime.types import SeqResult


class Constrainer:
    """The ensemble's constraint helpers: llguidance's view of each member's vocabulary, built once."""

    def __init__(self, ctx: EnsembleContext) -> None:
        self.ctx = ctx
        self._tokenizers: dict[str, Any] = {}

    def tokenizer(self, member: str) -> Any:
        if member not in self._tokenizers:
            self._tokenizers[member] = member_tokenizer(self.ctx.table(member))
        return self._tokenizers[member]

    def constrain(
        self,
        grammar: ByteGrammar,
        decision: Decision,
        results: Mapping[str, SeqResult],
        weights: Mapping[str, float],
    ) -> Decision:
        """The decision restricted to what the grammar allows next (see the module's docstring)."""
        keep = [i for i, c in enumerate(decision.candidates) if self._allowed(grammar, c.key)]
        if keep:
            if len(keep) == len(decision.candidates):
                return decision
            index = torch.tensor(keep)
            return Decision(
                [decision.candidates[i] for i in keep],
                torch.log_softmax(decision.logprobs[index], dim=-1),
                fused=decision.fused,
                drawn=decision.drawn,
            )
        return self._widen(grammar, decision, results, weights)

    @staticmethod
    def _allowed(grammar: ByteGrammar, key: bytes) -> bool:
        return grammar.can_end() if key == EOS_KEY else grammar.allows(key)

    def _widen(
        self,
        grammar: ByteGrammar,
        decision: Decision,
        results: Mapping[str, SeqResult],
        weights: Mapping[str, float],
    ) -> Decision:
        member = decision.drawn if decision.drawn in results else self.ctx.main
        if member not in results:
            member = next(iter(results))
        voices = [member] if decision.drawn is not None else [m for m in results if weights.get(m, 0.0) > 0]
        total = sum(weights.get(m, 0.0) for m in voices) or 1.0
        table = self.ctx.table(member)
        allowed = torch.from_numpy(grammar.allowed_ids(member, table, self.tokenizer(member)))
        result = results[member]
        if result.logprobs is not None:
            own = result.logprobs[allowed[allowed < result.logprobs.numel()]]
            allowed = allowed[: own.numel()]
        else:  # not asked for the full distribution: top-k where known, the tail elsewhere
            known = dict(zip(result.top_ids.tolist(), result.top_logprobs.tolist(), strict=True))
            own = torch.tensor([known.get(int(i), -1e9) for i in allowed])
        order = torch.argsort(own, descending=True)
        candidates: list[Candidate] = []
        values: list[float] = []
        for token_id in allowed[order].tolist():
            key = member_key(table, token_id)
            if key is None or any(c.key == key for c in candidates):
                continue
            mix = sum(
                weights.get(m, 0.0) / total * math.exp(member_logprob(self.ctx, m, results[m], key))
                for m in voices
            )
            candidates.append(Candidate(key, member, token_id))
            values.append(math.log(max(mix, 1e-300)))
            if len(candidates) >= self.ctx.config.top_k:
                break
        if not candidates:
            raise GrammarDeadEnd(f"no token of member {member!r} continues the text within its grammar")
        return Decision(
            candidates,
            torch.log_softmax(torch.tensor(values, dtype=torch.float32), dim=-1),
            fused=decision.fused,
            drawn=decision.drawn,
        )
