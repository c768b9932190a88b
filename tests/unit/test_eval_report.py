"""The evaluation summary: accuracy, the best member and strategy, and the paired comparison."""

from __future__ import annotations

from typing import Any

import pytest

from consort.runtime.evaluation.report import markdown_table, sign_test, summarize


def record(qid: str, members: dict[str, bool], strategies: dict[str, bool]) -> dict[str, Any]:
    return {
        "task": "arc_easy",
        "id": qid,
        "kind": "multiple_choice",
        "members": {name: {"correct": ok} for name, ok in members.items()},
        "strategies": {name: {"correct": ok} for name, ok in strategies.items()},
    }


@pytest.mark.parametrize(
    ("wins", "losses", "expected"),
    [
        (0, 0, 1.0),
        (1, 1, 1.0),
        (5, 0, 0.0625),  # 2 × (1/2)^5
        (0, 5, 0.0625),
        (6, 5, 1.0),  # session 1's ARC-Easy split: noise
        (20, 8, 0.0357),  # 2 × P(X ≤ 8), X ~ Bin(28, 1/2)
    ],
)
def test_sign_test(wins: int, losses: int, expected: float) -> None:
    assert sign_test(wins, losses) == pytest.approx(expected, abs=1e-4)


def test_paired_wins_and_losses_against_the_best_member() -> None:
    rows = [
        record("q1", {"a": True, "b": False}, {"mean": True}),  # both right: a tie
        record("q2", {"a": False, "b": True}, {"mean": True}),  # win
        record("q3", {"a": False, "b": False}, {"mean": True}),  # win
        record("q4", {"a": True, "b": True}, {"mean": False}),  # loss
        record("q5", {"a": True, "b": False}, {"mean": True}),
    ]
    summary = summarize(rows, ["arc_easy"], ["a", "b"], ["mean"], {"arc_easy": [r["id"] for r in rows]})
    entry = summary["tasks"]["arc_easy"]
    assert entry["best_member"] == "a" and entry["best_strategy"] == "mean"
    assert entry["delta_points"] == pytest.approx(20.0)
    assert entry["paired"]["mean"] == {"against": "a", "wins": 2, "losses": 1, "p_value": 1.0}
    table = markdown_table(summary)
    assert "| 2/1 (1.00) |" in table
