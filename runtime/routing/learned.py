"""RouteLLM's similarity-weighted (SW) ranking between a cheap and a strong member, trained offline.

Training keeps, for each dev question, its embedding and the outcome of strong against cheap (1: only
the strong member was right, 0: only the cheap one, ½: a tie). For a new query each training question
is weighted by exp(sharpness · (similarity − the highest similarity)), and the strong member's win
probability is the Bradley–Terry estimate from those weighted comparisons, which for two players is
the weighted share of its wins (ties count half). The threshold alpha turns it into a choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from consort.runtime.errors import ConfigError
from consort.runtime.routing.base import Router
from consort.runtime.routing.cost import CostModel
from consort.runtime.routing.embed import QueryEmbedder
from consort.runtime.routing.records import QuestionRecord, Split

DEFAULT_SHARPNESS = 10.0


class TrainingLeak(ValueError):
    """Training data holds a question of the test split."""


@dataclass
class LearnedModel:
    """What `consort route train` saves: the dev questions' embeddings and outcomes."""

    cheap: str
    strong: str
    embedder: str
    keys: list[str]
    embeddings: np.ndarray  # [n, d], unit rows
    outcomes: np.ndarray  # [n]: 1 strong wins, 0 cheap wins, 0.5 tie
    sharpness: float = DEFAULT_SHARPNESS

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            np.savez(
                handle,
                cheap=self.cheap,
                strong=self.strong,
                embedder=self.embedder,
                keys=np.array(self.keys, dtype=str),
                embeddings=self.embeddings.astype(np.float32),
                outcomes=self.outcomes.astype(np.float32),
                sharpness=self.sharpness,
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> LearnedModel:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"route.learned.path: {path} does not exist; write it with `consort route train`"
            )
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(
                    cheap=str(data["cheap"]),
                    strong=str(data["strong"]),
                    embedder=str(data["embedder"]),
                    keys=[str(k) for k in data["keys"]],
                    embeddings=data["embeddings"],
                    outcomes=data["outcomes"],
                    sharpness=float(data["sharpness"]),
                )
        except (OSError, KeyError, ValueError) as error:
            raise ConfigError(f"route.learned.path: {path} is not a trained router file ({error})") from error

    def win_probability(self, embedding: np.ndarray) -> float:
        """P(the strong member's answer beats the cheap one's) for this query."""
        if len(self.outcomes) == 0:
            return 0.5
        similarity = self.embeddings @ np.asarray(embedding, dtype=np.float32)
        weights = np.exp(self.sharpness * (similarity - similarity.max()))
        return float((weights * self.outcomes).sum() / weights.sum())


def outcome(record: QuestionRecord, cheap: str, strong: str) -> float:
    strong_right, cheap_right = record.correct[strong], record.correct[cheap]
    if strong_right == cheap_right:
        return 0.5
    return 1.0 if strong_right else 0.0


def train(
    records: Sequence[QuestionRecord],
    cheap: str,
    strong: str,
    embedder: QueryEmbedder,
    embedder_name: str,
    split: Split,
    sharpness: float = DEFAULT_SHARPNESS,
) -> LearnedModel:
    """Fit on `records`, every one of which must be a dev question of `split` (TrainingLeak otherwise)."""
    if cheap == strong:
        raise ConfigError(f"the cheap and the strong member must differ, both are {cheap!r}")
    leaked = [r.key for r in records if split.is_test(r.key)]
    if leaked:
        raise TrainingLeak(f"{len(leaked)} training questions are test questions (e.g. {leaked[0]})")
    usable = [r for r in records if cheap in r.correct and strong in r.correct]
    if not usable:
        raise ConfigError(f"no dev question has answers from both {cheap!r} and {strong!r}")
    embeddings = embedder.embed([r.question for r in usable]) if usable else np.zeros((0, 1), np.float32)
    return LearnedModel(
        cheap=cheap,
        strong=strong,
        embedder=embedder_name,
        keys=[r.key for r in usable],
        embeddings=np.asarray(embeddings, dtype=np.float32),
        outcomes=np.array([outcome(r, cheap, strong) for r in usable], dtype=np.float32),
        sharpness=sharpness,
    )


def choose_strong(win_probability: float, alpha: float) -> bool:
    """alpha 0: never the strong member; 1: always; between, when its win probability is ≥ 1 − alpha."""
    if alpha <= 0.0:
        return False
    if alpha >= 1.0:
        return True
    return win_probability >= 1.0 - alpha


class LearnedRouter(Router):
    """Routes between the model's cheap and strong members with threshold alpha."""

    name = "learned"

    def __init__(self, members: Sequence[str], model: LearnedModel, alpha: float) -> None:
        super().__init__(members)
        for role, member in (("cheap", model.cheap), ("strong", model.strong)):
            if member not in self.members:
                raise ConfigError(
                    f"the trained router's {role} member {member!r} is not in this ensemble ({', '.join(self.members)})"
                )
        self.model = model
        self.alpha = alpha

    def scores(self, embedding: np.ndarray | None) -> dict[str, float]:
        assert embedding is not None
        p = self.model.win_probability(embedding)
        return {
            m: (p if m == self.model.strong else 1.0 - p if m == self.model.cheap else 0.0)
            for m in self.members
        }

    def choose(
        self,
        scores: dict[str, float],
        top: int = 1,
        costs: CostModel | None = None,
        cost_weight: float = 0.0,
        min_score: float | None = None,
        allowed: Sequence[str] | None = None,
    ) -> list[str]:
        strong = choose_strong(scores[self.model.strong], self.alpha)
        return [self.model.strong if strong else self.model.cheap]
