"""The gate (GaC thresholded mode, SAFE): fuse only where the main member is unsure.

The base of the aggregate strategies (`mean`, `deepen`): every member with weight
computes each step; with a gate the main member computes first, and if its top
probability reaches the threshold its own distribution is used and the others
skip the step (they catch up on the emitted text when next consulted).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from consort.runtime.fusion.base import Strategy, WorkFlags
from consort.runtime.types import SeqResult

if TYPE_CHECKING:
    from consort.runtime.core import SequenceState


def main_is_sure(result: SeqResult, threshold: float) -> bool:
    return math.exp(float(result.top_logprobs[0])) >= threshold


class GatedStrategy(Strategy):
    """A strategy that averages every weighted member's output, optionally behind the gate."""

    supports_gate: ClassVar[bool] = True

    def member_flags(self) -> WorkFlags:
        """What each member returns for this strategy."""
        return WorkFlags()

    def _weighted(self, seq: SequenceState, names: list[str]) -> dict[str, WorkFlags]:
        # A member with weight zero adds nothing to the average: it does not compute at all.
        flags = self.member_flags()
        return {name: flags for name in names if seq.weight(name) > 0}

    def first(self, seq: SequenceState) -> dict[str, WorkFlags]:
        if seq.gate is not None:
            return {self.ctx.main: self.member_flags()}
        return self._weighted(seq, self.ctx.names)

    def more(self, seq: SequenceState, results: dict[str, SeqResult]) -> dict[str, WorkFlags]:
        if seq.gate is None or main_is_sure(results[self.ctx.main], seq.gate):
            return {}
        return self._weighted(seq, [n for n in self.ctx.names if n != self.ctx.main])
