"""What every router is: query embedding -> a score per member, a choice, and feedback folded in."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from consort.runtime.routing.cost import CostModel
from consort.runtime.routing.store import FeedbackEvent


class Router:
    """One interface for every router: `scores` per member in [0, 1] (higher: more likely the best
    answer), `choose` the members that answer, `observe` feedback as it arrives."""

    name: str = "router"
    needs_embedding: bool = True
    learns_online: bool = False  # whether feedback changes its decisions (it then needs the store)

    def __init__(self, members: Sequence[str]) -> None:
        self.members = list(members)

    def scores(self, embedding: np.ndarray | None) -> dict[str, float]:
        raise NotImplementedError

    def observe(self, events: Sequence[FeedbackEvent]) -> None:
        """Fold feedback in, oldest first (each event exactly once)."""

    def choose(
        self,
        scores: dict[str, float],
        top: int = 1,
        costs: CostModel | None = None,
        cost_weight: float = 0.0,
        min_score: float | None = None,
        allowed: Sequence[str] | None = None,
    ) -> list[str]:
        """The `top` members by score less cost; with `min_score`, the cheapest that reaches it (top = 1)."""
        candidates = [m for m in self.members if allowed is None or m in allowed]
        costs = costs or CostModel({})
        if min_score is not None and top == 1:
            good = [m for m in candidates if scores[m] >= min_score]
            if good:
                return [min(good, key=lambda m: (costs.per_token(m), -scores[m]))]
        normalised = costs.normalised(candidates)
        utility = {m: scores[m] - cost_weight * normalised[m] for m in candidates}
        # Stable: ties go to the member listed first in the config.
        ranked = sorted(candidates, key=lambda m: -utility[m])
        return ranked[:top]
