"""`me`: Mixture-model-like Ensemble (arXiv 2605.00419).

Each step one member is drawn with probability proportional to its weight, and
only it computes; the text emitted meanwhile reaches the others lazily, in one
multi-token forward the next time each is drawn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from consort.runtime.fusion import register
from consort.runtime.fusion.base import Decision, Strategy, WorkFlags, single_member
from consort.runtime.types import SeqResult

if TYPE_CHECKING:
    from consort.runtime.core import SequenceState


@register
class MixtureStrategy(Strategy):
    """Mixture-model-like Ensemble: one member drawn per step by weight; the others catch up lazily."""

    name = "me"
    scored_as = "mean"  # the weighted mixture `me` samples from is `mean`'s distribution

    def first(self, seq: SequenceState) -> dict[str, WorkFlags]:
        weights = torch.tensor([seq.weight(n) for n in self.ctx.names], dtype=torch.float64)
        index = int(torch.multinomial(weights / weights.sum(), 1, generator=seq.draw_generator).item())
        return {self.ctx.names[index]: WorkFlags()}

    def decide(self, seq: SequenceState, results: dict[str, SeqResult], inverted: torch.Tensor | None) -> Decision:
        (member,) = results
        return single_member(self.ctx, member, results[member], seq.forced[0] if seq.forced else None)
