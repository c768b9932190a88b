"""Eagle (training-free): a global ELO per member from all feedback, a local ELO from the feedback on
the k past queries most similar to this one, combined as P·global + (1−P)·local."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from consort.runtime.routing.base import Router
from consort.runtime.routing.config import EloConfig
from consort.runtime.routing.store import FeedbackEvent

Comparison = tuple[str, str, float]  # (a, b, a's outcome: 1 win, 0.5 tie, 0 loss)


def expected(rating_a: float, rating_b: float) -> float:
    """ELO's expected score of a against b."""
    return 1.0 / (1.0 + 10.0 ** ((rating_b - rating_a) / 400.0))


def update(rating_a: float, rating_b: float, outcome: float, k_factor: float) -> tuple[float, float]:
    """Both ratings after one comparison in which a scored `outcome` (1 win, 0.5 tie, 0 loss)."""
    change = k_factor * (outcome - expected(rating_a, rating_b))
    return rating_a + change, rating_b - change


def comparisons(event: FeedbackEvent, members: Sequence[str]) -> list[Comparison]:
    """A preference is one comparison; a score s for member m is a comparison of m against each other
    member in which m scored s (its answer was as good as s against the alternatives it displaced)."""
    if event.winner is not None and event.loser is not None:
        if event.winner not in members or event.loser not in members:
            return []  # a member that left the ensemble: its old feedback no longer compares anyone here
        return [(event.winner, event.loser, 0.5 if event.tie else 1.0)]
    if event.member is None or event.score is None or event.member not in members:
        return []
    return [(event.member, other, event.score) for other in members if other != event.member]


def replay(
    events: Iterable[FeedbackEvent], members: Sequence[str], initial: float, k_factor: float
) -> dict[str, float]:
    """Ratings after every comparison of `events`, in order, from `initial`."""
    ratings = dict.fromkeys(members, initial)
    for event in events:
        for a, b, outcome in comparisons(event, members):
            ratings[a], ratings[b] = update(ratings[a], ratings[b], outcome, k_factor)
    return ratings


def win_scores(ratings: dict[str, float]) -> dict[str, float]:
    """Each member's expected score against the mean rating of the others (0..1)."""
    out = {}
    for member, rating in ratings.items():
        others = [r for m, r in ratings.items() if m != member]
        out[member] = expected(rating, float(np.mean(others))) if others else 0.5
    return out


class EloRouter(Router):
    """Eagle's router. Feedback arrives through the store; `observe` folds each event in once."""

    name = "elo"
    learns_online = True

    def __init__(self, members: Sequence[str], config: EloConfig) -> None:
        super().__init__(members)
        self.config = config
        self.global_ratings = dict.fromkeys(self.members, config.initial)
        self._events: list[FeedbackEvent] = []
        self._embeddings: list[np.ndarray] = []

    def observe(self, events: Sequence[FeedbackEvent]) -> None:
        for event in events:
            for a, b, outcome in comparisons(event, self.members):
                self.global_ratings[a], self.global_ratings[b] = update(
                    self.global_ratings[a], self.global_ratings[b], outcome, self.config.k_factor
                )
            if event.embedding is None:
                continue
            if self._embeddings and len(event.embedding) != len(self._embeddings[0]):
                continue  # a query embedded by another embedder is nobody's neighbour here
            self._events.append(event)
            self._embeddings.append(event.embedding)

    def neighbours(self, embedding: np.ndarray) -> list[FeedbackEvent]:
        """The feedback on the k past queries most similar to `embedding`, in the order it arrived."""
        if not self._events:
            return []
        similarity = np.stack(self._embeddings) @ np.asarray(embedding, dtype=np.float32)
        k = min(self.config.neighbours, len(self._events))
        nearest = np.argpartition(-similarity, k - 1)[:k]
        return [self._events[i] for i in sorted(nearest.tolist())]

    def local_ratings(self, embedding: np.ndarray) -> dict[str, float]:
        return replay(self.neighbours(embedding), self.members, self.config.initial, self.config.k_factor)

    def combined_ratings(self, embedding: np.ndarray | None) -> dict[str, float]:
        share = self.config.global_share
        if embedding is None:
            return dict(self.global_ratings)
        local = self.local_ratings(embedding)
        return {m: share * self.global_ratings[m] + (1 - share) * local[m] for m in self.members}

    def scores(self, embedding: np.ndarray | None) -> dict[str, float]:
        return win_scores(self.combined_ratings(embedding))
