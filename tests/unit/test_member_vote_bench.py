"""bench.member_vote: the eval job's multiple-choice `vote`, recomputed from members' records, must equal it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bench.member_vote import read_entries, report, vote_outcomes
from consort.runtime.errors import InvalidRequest
from consort.runtime.evaluation.logliks import Loglik
from consort.runtime.evaluation.questions import member_vote_entry, scored_entry
from consort.runtime.evaluation.registry import get_task, load_task
from consort.runtime.evaluation.specs import MultipleChoiceQuestion


def test_vote_from_records_equals_the_eval_jobs_vote(tmp_path: Path) -> None:
    """Three members' entries made by the job's own scorer on real CSQA questions (per-character
    normalisation, five choices), ties included; the job's vote on them is the reference."""
    task = "csqa"
    normalization = get_task(task).normalization or "none"
    questions = [q for q in load_task(task, limit=40) if isinstance(q, MultipleChoiceQuestion)]
    rng = random.Random(0)
    members = ["a", "b", "c"]
    rows: dict[str, list[dict[str, object]]] = {m: [] for m in members}
    expected: dict[str, bool] = {}
    for q in questions:
        logliks = {m: [Loglik(rng.uniform(-12, -2), 3) for _ in q.choices] for m in members}
        entries = {m: scored_entry(q, logliks[m], normalization) for m in members}
        expected[q.id] = member_vote_entry(q, list(logliks.values()), list(entries.values()), normalization)["correct"]
        for m in members:
            rows[m].append({"task": task, "id": q.id, "members": {m: entries[m], "other": {"pick": 0}}})
    for m in members:
        (tmp_path / m / "mc").mkdir(parents=True)
        (tmp_path / m / "mc" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[m]))

    outcomes = vote_outcomes(read_entries(tmp_path), members)[task]
    assert {qid: o["vote"] for qid, o in outcomes.items()} == expected
    result = report({task: outcomes}, members)["tasks"][task]
    assert result["questions"] == len(questions)
    assert abs(result["accuracy"]["vote"] - 100 * sum(expected.values()) / len(questions)) < 1e-9


def test_a_misnamed_member_folder_is_an_error_not_a_missing_member(tmp_path: Path) -> None:
    """The vote reads the records layout with the routers' reader: a folder whose rows hold no answer
    of the member it names raises, rather than quietly leaving that member out of the vote."""
    folder = tmp_path / "a" / "mc"
    folder.mkdir(parents=True)
    row = {"task": "csqa", "id": "0", "members": {"b": {"pick": 0, "scores": [0.0], "correct": True}}}
    (folder / "predictions.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(InvalidRequest, match="'a'"):
        read_entries(tmp_path)
