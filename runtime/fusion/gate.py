"""The `gate` option (GaC thresholded mode, SAFE): fuse only where the main member is unsure.

Shared by the aggregate strategies: the main member computes first; if its top
probability reaches the threshold its own distribution is used and the other
members skip the step (they catch up on the emitted text when next consulted).
"""

from __future__ import annotations

import math

from runtime.fusion.base import WorkFlags
from runtime.worker import SeqResult


def main_is_sure(result: SeqResult, threshold: float) -> bool:
    assert result.top_logprobs is not None
    return math.exp(float(result.top_logprobs[0])) >= threshold


def others(names: list[str], main: str, flags: WorkFlags) -> dict[str, WorkFlags]:
    return {n: flags for n in names if n != main}
