"""Eagle (training-free): a global ELO per member from all feedback, a local ELO from the feedback on
the k past queries most similar to this one, combined as P·global + (1−P)·local.

Ratings come from the comparisons in one of two ways (`EloConfig.fit`). Eagle's online ELO updates
each rating as feedback arrives; with K = 32 and feedback that is mostly ties (both members right or
both wrong), the ratings wander by more than the gaps between members of similar strength, and the
last few hundred comparisons decide them (measured on four members' multiple-choice records:
docs/results.md). The Bradley–Terry fit is the maximum-likelihood rating of all comparisons at once,
in the same ELO scale, independent of their order.
"""

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


def wins_matrix(comparisons: Iterable[Comparison], members: Sequence[str]) -> np.ndarray:
    """wins[i, j]: the score member i took from its comparisons with member j (a tie is half each)."""
    index = {m: i for i, m in enumerate(members)}
    wins = np.zeros((len(members), len(members)))
    for a, b, outcome in comparisons:
        wins[index[a], index[b]] += outcome
        wins[index[b], index[a]] += 1.0 - outcome
    return wins


def fit_wins(wins: np.ndarray, members: Sequence[str], initial: float, prior_ties: float = 1.0) -> dict[str, float]:
    """Bradley–Terry maximum-likelihood ratings (ELO scale, mean `initial`) of a `wins_matrix`.

    `prior_ties` virtual ties between every pair keep the fit finite when a member never lost (or
    has no comparison). Hunter's MM iteration, which increases the likelihood at every step.
    """
    wins = wins + prior_ties / 2.0
    np.fill_diagonal(wins, 0.0)
    games = wins + wins.T
    total_wins = wins.sum(axis=1)
    strength = np.ones(len(members))
    for _ in range(1000):
        pair = games / (strength[:, None] + strength[None, :])
        np.fill_diagonal(pair, 0.0)
        denominator = pair.sum(axis=1)
        updated = np.where(denominator > 0, total_wins / np.where(denominator > 0, denominator, 1.0), strength)
        updated = np.maximum(updated, 1e-12)
        updated /= np.exp(np.mean(np.log(updated)))
        converged = np.max(np.abs(np.log(updated) - np.log(strength))) < 1e-10
        strength = updated
        if converged:
            break
    return {m: initial + 400.0 * float(np.log10(strength[i])) for i, m in enumerate(members)}


def fit_ratings(
    comparisons: Iterable[Comparison], members: Sequence[str], initial: float, prior_ties: float = 1.0
) -> dict[str, float]:
    """Bradley–Terry ratings of `comparisons`, in any order (see `fit_wins`)."""
    return fit_wins(wins_matrix(comparisons, members), members, initial, prior_ties)


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
        self._online = dict.fromkeys(self.members, config.initial)
        self._wins = np.zeros((len(self.members), len(self.members)))
        self._fitted: dict[str, float] | None = None
        self._events: list[FeedbackEvent] = []
        self._embeddings: list[np.ndarray] = []

    @property
    def global_ratings(self) -> dict[str, float]:
        """Every member's rating from all feedback so far."""
        if self.config.fit == "online":
            return dict(self._online)
        if self._fitted is None:
            self._fitted = fit_wins(self._wins, self.members, self.config.initial, self.config.prior_ties)
        return dict(self._fitted)

    def _ratings(self, events: Iterable[FeedbackEvent]) -> dict[str, float]:
        if self.config.fit == "online":
            return replay(events, self.members, self.config.initial, self.config.k_factor)
        found = [c for event in events for c in comparisons(event, self.members)]
        return fit_ratings(found, self.members, self.config.initial, self.config.prior_ties)

    def observe(self, events: Sequence[FeedbackEvent]) -> None:
        for event in events:
            found = comparisons(event, self.members)
            # Only the state the configured fit reads: online ratings, or the wins the fit is made from.
            if self.config.fit == "online":
                for a, b, outcome in found:
                    self._online[a], self._online[b] = update(
                        self._online[a], self._online[b], outcome, self.config.k_factor
                    )
            elif found:
                self._wins += wins_matrix(found, self.members)
                self._fitted = None
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
        return self._ratings(self.neighbours(embedding))

    def combined_ratings(self, embedding: np.ndarray | None) -> dict[str, float]:
        share = self.config.global_share
        global_ratings = self.global_ratings
        if embedding is None:
            return global_ratings
        local = self.local_ratings(embedding)
        return {m: share * global_ratings[m] + (1 - share) * local[m] for m in self.members}

    def scores(self, embedding: np.ndarray | None) -> dict[str, float]:
        return win_scores(self.combined_ratings(embedding))
