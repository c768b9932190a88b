"""bench.disagreements: on questions two members answer differently, who is right, and the surer member."""

from __future__ import annotations

import math

from bench.disagreements import disagreements, own_pick_probability, table
from consort.runtime.evaluation.registry import load_task


def _row(qid: str, a: tuple[int, list[float], bool], b: tuple[int, list[float], bool]) -> dict[str, object]:
    def member(pick: int, scores: list[float], correct: bool) -> dict[str, object]:
        return {"pick": pick, "scores": scores, "correct": correct}

    return {"task": "boolq", "id": qid, "members": {"a": member(*a), "b": member(*b)}, "strategies": {"mean": {"correct": a[2]}}}


def test_own_pick_probability_is_a_softmax_over_the_choices() -> None:
    assert own_pick_probability([0.0, 0.0]) == 0.5
    assert math.isclose(own_pick_probability([-1.0, -3.0, -3.0]), 1 / (1 + 2 * math.exp(-2)))


def test_only_disagreements_count_and_the_surer_member_is_paired_against_the_better() -> None:
    # BoolQ scores raw log-likelihoods (no normalisation), two choices.
    ids = [q.id for q in load_task("boolq", limit=4)]
    rows = [
        _row(ids[0], (0, [-0.1, -5.0], True), (0, [-0.2, -4.0], True)),  # agree: not counted
        _row(ids[1], (0, [-0.1, -5.0], True), (1, [-3.0, -0.5], False)),  # a surer and right
        _row(ids[2], (0, [-1.0, -1.2], True), (1, [-5.0, -0.1], False)),  # b surer and wrong
        _row(ids[3], (0, [-1.0, -1.2], False), (1, [-5.0, -0.1], True)),  # b surer and right
    ]
    outcomes = disagreements(rows, "a", "b")["boolq"]
    assert [o["surer"] for o in outcomes] == [True, False, True]
    assert sum(o["a"] for o in outcomes) == 2 and sum(o["b"] for o in outcomes) == 1
    # Better member a (2 right): the surer member wins the third question and loses the second.
    assert table({"boolq": outcomes}, "a", "b").splitlines()[2] == "| boolq | 3 | 2 | 1 | 2 | 2 | 1/1 (1) |"
