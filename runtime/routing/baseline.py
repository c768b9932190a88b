"""Blending's baseline: a uniformly random member. Every router must beat it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from consort.runtime.routing.base import Router


class RandomRouter(Router):
    """Scores are fresh uniform draws: the choice is a uniformly random member."""

    name = "random"
    needs_embedding = False

    def __init__(self, members: Sequence[str], seed: int | None = None) -> None:
        super().__init__(members)
        self._rng = np.random.default_rng(seed)

    def scores(self, embedding: np.ndarray | None) -> dict[str, float]:
        return {m: float(x) for m, x in zip(self.members, self._rng.random(len(self.members)), strict=True)}
