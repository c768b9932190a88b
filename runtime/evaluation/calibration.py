"""Member-weight calibration: a grid over the weight simplex, scored on a task's dev split.

Weights only change the token-level strategies (`mean`, `deepen`, and `me`'s
draws); `vote` samples its answers from the members in turn and ignores them.
The search is plain and exhaustive: every point of the grid is scored by an
objective the caller supplies (e.g. accuracy of `mean` on dev questions, ties
broken by the mean log-probability of the gold choice), and the best point wins.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from consort.runtime.config import EnsembleConfig, parse_config
from consort.runtime.errors import ConfigError
from consort.runtime.evaluation.metrics import normalised_scores, pick_choice
from consort.runtime.evaluation.specs import Normalization

Weights = tuple[float, ...]
CalibrationMetric = Literal["accuracy", "loglik"]


class GridScore(BaseModel):
    """How one weight vector did on the dev questions."""

    model_config = ConfigDict(frozen=True)

    weights: list[float] = Field(description="Member weights, in the config's member order, summing to 1.")
    accuracy: float = Field(description="Fraction of dev questions answered correctly.")
    gold_logprob: float = Field(
        description="Mean log-probability of the gold answer: for multiple choice, the log-softmax of the "
        "(normalised) choice scores at the gold choice; for generation, the gold continuation's per-token log-prob."
    )
    questions: int = Field(description="Dev questions scored.")


class CalibrationResult(BaseModel):
    """The chosen weights and every grid point's score."""

    model_config = ConfigDict(frozen=True)

    task: str = Field(description="Task (or comma-joined tasks) whose dev split was used.")
    members: list[str] = Field(description="Member names, in the order of `weights`.")
    weights: list[float] = Field(description="The best grid point.")
    metric: CalibrationMetric = Field(
        description="What was maximised: accuracy (ties: gold log-prob) or gold log-prob."
    )
    best: GridScore = Field(description="The best point's scores.")
    grid: list[GridScore] = Field(description="Every point tried, in grid order.")


def simplex_grid(members: int, step: float = 0.1) -> list[Weights]:
    """Every weight vector whose entries are multiples of `step` and sum to 1 (one-hot vectors included)."""
    if members < 1:
        raise ConfigError("the weight grid needs at least one member")
    divisions = round(1 / step)
    if divisions < 1 or not math.isclose(divisions * step, 1.0, abs_tol=1e-9):
        raise ConfigError(f"the grid step must divide 1 evenly (0.5, 0.25, 0.1, ...), not {step}")
    points = []
    for parts in itertools.product(range(divisions + 1), repeat=members - 1):
        rest = divisions - sum(parts)
        if rest >= 0:
            points.append(tuple(round(p / divisions, 10) for p in (*parts, rest)))
    return points


def is_one_hot(weights: Sequence[float]) -> bool:
    return sum(1 for w in weights if w > 0) == 1


def _rank(score: GridScore, metric: CalibrationMetric) -> tuple[float, ...]:
    # Ties go to the more even weights: a small prior towards actually ensembling.
    spread = -max(score.weights) if score.weights else 0.0
    if metric == "accuracy":
        return (score.accuracy, score.gold_logprob, spread)
    return (score.gold_logprob, score.accuracy, spread)


def grid_search(
    grid: Sequence[Weights],
    evaluate: Callable[[Weights], GridScore],
    *,
    metric: CalibrationMetric = "accuracy",
    task: str = "",
    members: Sequence[str] = (),
) -> CalibrationResult:
    """Score every grid point with `evaluate` and return the best."""
    if not grid:
        raise ConfigError("the weight grid is empty")
    scores = [evaluate(point) for point in grid]
    return choose(scores, metric=metric, task=task, members=members)


def choose(
    scores: Sequence[GridScore],
    *,
    metric: CalibrationMetric = "accuracy",
    task: str = "",
    members: Sequence[str] = (),
) -> CalibrationResult:
    """The best of already scored grid points."""
    if not scores:
        raise ConfigError("no grid point was scored")
    best = max(scores, key=lambda s: _rank(s, metric))
    return CalibrationResult(
        task=task,
        members=list(members) or [f"member{i}" for i in range(len(best.weights))],
        weights=list(best.weights),
        metric=metric,
        best=best,
        grid=list(scores),
    )


def joint_weights(results: Sequence[CalibrationResult], metric: CalibrationMetric) -> CalibrationResult:
    """One weight vector for several tasks: the grid point with the best mean score over them."""
    grid = []
    for points in zip(*(r.grid for r in results), strict=True):
        grid.append(
            GridScore(
                weights=points[0].weights,
                accuracy=sum(p.accuracy for p in points) / len(points),
                gold_logprob=sum(p.gold_logprob for p in points) / len(points),
                questions=sum(p.questions for p in points),
            )
        )
    return choose(grid, metric=metric, task=",".join(r.task for r in results), members=results[0].members)


def multiple_choice_score(
    weights: Sequence[float],
    choice_logprobs: Sequence[Sequence[float]],
    choices: Sequence[Sequence[str]],
    golds: Sequence[int],
    *,
    normalization: Normalization = "per_char",
    token_counts: Sequence[Sequence[int]] | None = None,
) -> GridScore:
    """Accuracy and mean gold log-softmax of one weight vector's choice log-likelihoods, question by question."""
    if not (len(choice_logprobs) == len(choices) == len(golds)):
        raise ConfigError("one list of choice log-likelihoods, choices and gold per question is needed")
    correct, gold_total = 0, 0.0
    for q, (logprobs, texts, gold) in enumerate(zip(choice_logprobs, choices, golds, strict=True)):
        counts = token_counts[q] if token_counts is not None else None
        correct += pick_choice(logprobs, texts, normalization=normalization, token_counts=counts) == gold
        scores = normalised_scores(logprobs, texts, normalization, counts)
        top = max(scores)
        log_total = top + math.log(sum(math.exp(s - top) for s in scores))
        gold_total += scores[gold] - log_total
    n = max(len(golds), 1)
    return GridScore(
        weights=list(weights), accuracy=correct / n, gold_logprob=gold_total / n, questions=len(golds)
    )


def with_weights(config: EnsembleConfig, weights: Sequence[float]) -> EnsembleConfig:
    """`config` with its members' weights replaced (validated again)."""
    if len(weights) != len(config.members):
        raise ConfigError(f"{len(weights)} weights for {len(config.members)} members")
    data = config.model_dump(mode="json")
    for member, weight in zip(data["members"], weights, strict=True):
        member["weight"] = float(weight)
    return parse_config(data)


def write_config(config: EnsembleConfig, result: CalibrationResult, path: str | Path) -> Path:
    """Write `config` with the calibrated weights as YAML, with a header saying where they come from."""
    calibrated = with_weights(config, result.weights)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Member weights calibrated by `consort eval --calibrate` on the dev split of {result.task}:\n"
        f"# {result.best.questions} questions, metric {result.metric}, accuracy {result.best.accuracy:.3f}, "
        f"gold log-prob {result.best.gold_logprob:.4f}.\n"
        "# Weights change mean, deepen and me; vote ignores them.\n"
    )
    body = yaml.safe_dump(calibrated.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    path.write_text(header + body)
    return path
