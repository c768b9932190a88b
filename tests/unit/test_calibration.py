"""Weight calibration: the simplex grid, the search, the mixture objective, the written config."""

from __future__ import annotations

import math
import random

import pytest

from consort.runtime.config import default_config, load_config
from consort.runtime.errors import ConfigError
from consort.runtime.evaluation.calibration import (
    GridScore,
    grid_search,
    multiple_choice_score,
    simplex_grid,
    with_weights,
    write_config,
)
from consort.runtime.evaluation.questions import vote_on_picks
from consort.runtime.textprob import mix


def test_simplex_grid_covers_the_simplex() -> None:
    two = simplex_grid(2, 0.1)
    assert len(two) == 11
    assert (1.0, 0.0) in two and (0.0, 1.0) in two and (0.5, 0.5) in two
    three = simplex_grid(3, 0.5)
    assert sorted(three) == sorted(
        [(0, 0, 1), (0, 0.5, 0.5), (0, 1, 0), (0.5, 0, 0.5), (0.5, 0.5, 0), (1, 0, 0)]
    )
    assert all(math.isclose(sum(p), 1.0) for p in simplex_grid(3, 0.1))
    with pytest.raises(ConfigError, match="divide 1"):
        simplex_grid(2, 0.3)


def _synthetic(seed: int = 0, questions: int = 60) -> tuple[list, list, list]:
    """Member 0 knows the answers (gold pieces likelier), member 1 guesses at random."""
    rng = random.Random(seed)
    pieces, choices, golds = [], [], []
    for _ in range(questions):
        gold = rng.randrange(4)
        texts = [f" choice {i} text" for i in range(4)]
        per_choice = []
        for i in range(4):
            n = rng.randint(2, 5)
            good = [-(0.4 if i == gold else 1.6) + rng.uniform(-0.3, 0.3) for _ in range(n)]
            noise = [-rng.uniform(0.1, 3.0) for _ in range(n)]
            per_choice.append((good, noise))
        pieces.append(per_choice)
        choices.append(texts)
        golds.append(gold)
    return pieces, choices, golds


@pytest.mark.parametrize("metric", ["accuracy", "loglik"])
@pytest.mark.parametrize("strong", [0, 1])
def test_grid_search_favours_the_member_that_knows(metric, strong: int) -> None:
    pieces, choices, golds = _synthetic()

    def evaluate(weights: tuple[float, ...]) -> GridScore:
        logliks = []
        for per_choice in pieces:
            row = []
            for good, noise in per_choice:
                members = [good, noise] if strong == 0 else [noise, good]
                row.append(sum(mix({"x": members[0], "y": members[1]}, dict(zip("xy", weights, strict=True)))))
            logliks.append(row)
        return multiple_choice_score(weights, logliks, choices, golds, normalization="none")

    result = grid_search(simplex_grid(2, 0.1), evaluate, metric=metric, task="synthetic", members=["x", "y"])
    assert result.weights[strong] >= 0.9
    assert result.best.accuracy >= max(p.accuracy for p in result.grid) - 1e-9 or metric == "loglik"
    assert len(result.grid) == 11
    uniform = next(p for p in result.grid if p.weights == [0.5, 0.5])
    assert result.best.gold_logprob >= uniform.gold_logprob


def test_ties_go_to_the_more_even_weights() -> None:
    flat = lambda w: GridScore(weights=list(w), accuracy=0.5, gold_logprob=-1.0, questions=1)  # noqa: E731
    assert grid_search(simplex_grid(2, 0.25), flat).weights == [0.5, 0.5]


def test_multiple_choice_score_normalises_per_char() -> None:
    score = multiple_choice_score(
        [1.0], [[-4.0, -3.0]], [[" long answer", " a"]], [0], normalization="per_char"
    )
    assert score.accuracy == 1.0  # -4/12 beats -3/2
    assert score.gold_logprob < 0


def test_calibrated_weights_are_written_to_a_loadable_config(tmp_path) -> None:
    config = default_config("mean")
    assert with_weights(config, [0.2, 0.8]).weights == [0.2, 0.8]
    result = grid_search(
        [(0.3, 0.7)],
        lambda w: GridScore(weights=list(w), accuracy=0.6, gold_logprob=-1.0, questions=10),
        task="arc_easy",
    )
    path = write_config(config, result, tmp_path / "calibrated.yaml")
    assert load_config(path).weights == [0.3, 0.7]
    assert "arc_easy" in path.read_text().splitlines()[0]
    with pytest.raises(ConfigError):
        with_weights(config, [1.0])


def test_vote_on_picks_majority_then_mean_probability() -> None:
    assert vote_on_picks([1, 1, 0], [[0, 0], [0, 0], [0, 0]]) == (1, "majority")
    # Two members disagree: the choice they find more probable on average wins.
    choice, method = vote_on_picks([0, 1], [[-1.0, -1.2, -5.0], [-3.0, -0.1, -5.0]])
    assert (choice, method) == (1, "tie: mean probability")
