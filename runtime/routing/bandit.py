"""PickLLM / MetaLLM-style bandit: a reward estimate per member, linear in the query embedding (LinUCB),
updated from feedback, with an upper-confidence bonus that makes it try members it knows little about."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from consort.runtime.routing.base import Router
from consort.runtime.routing.config import BanditConfig
from consort.runtime.routing.store import FeedbackEvent


def rewards(event: FeedbackEvent, members: Sequence[str]) -> list[tuple[str, float]]:
    """A score is the scored member's reward; a preference gives the winner 1 and the loser 0 (½ each on a tie)."""
    if event.winner is not None and event.loser is not None:
        won = 0.5 if event.tie else 1.0
        return [(m, r) for m, r in ((event.winner, won), (event.loser, 1.0 - won)) if m in members]
    if event.member is not None and event.score is not None and event.member in members:
        return [(event.member, event.score)]
    return []


class BanditRouter(Router):
    """Disjoint LinUCB over [embedding, 1]: per member, ridge regression of reward on the query."""

    name = "bandit"
    learns_online = True

    def __init__(self, members: Sequence[str], config: BanditConfig) -> None:
        super().__init__(members)
        self.config = config
        self._inverse: dict[str, np.ndarray] = {}  # (ridge·I + Σ x xᵀ)⁻¹, kept by Sherman–Morrison
        self._b: dict[str, np.ndarray] = {}
        self.pulls: dict[str, int] = dict.fromkeys(self.members, 0)

    def _ensure(self, dim: int) -> None:
        if not self._inverse:
            for m in self.members:
                self._inverse[m] = np.eye(dim) / self.config.ridge
                self._b[m] = np.zeros(dim)

    @staticmethod
    def _features(embedding: np.ndarray | None) -> np.ndarray:
        base = np.zeros(0) if embedding is None else np.asarray(embedding, dtype=np.float64)
        return np.concatenate([base, [1.0]])

    def observe(self, events: Sequence[FeedbackEvent]) -> None:
        for event in events:
            x = self._features(event.embedding)
            self._ensure(len(x))
            if len(x) != len(self._b[self.members[0]]):
                continue  # feedback from another embedder's era: not comparable with these features
            for member, reward in rewards(event, self.members):
                inverse = self._inverse[member]
                ax = inverse @ x
                self._inverse[member] = inverse - np.outer(ax, ax) / (1.0 + x @ ax)
                self._b[member] = self._b[member] + reward * x
                self.pulls[member] += 1

    def estimate(self, embedding: np.ndarray | None) -> dict[str, tuple[float, float]]:
        """Per member: (the reward estimate, the confidence width) for this query."""
        x = self._features(embedding)
        self._ensure(len(x))
        out = {}
        for m in self.members:
            inverse = self._inverse[m]
            theta = inverse @ self._b[m]
            out[m] = (float(theta @ x), float(np.sqrt(max(x @ inverse @ x, 0.0))))
        return out

    def scores(self, embedding: np.ndarray | None) -> dict[str, float]:
        return {
            m: mean + self.config.exploration * width for m, (mean, width) in self.estimate(embedding).items()
        }
