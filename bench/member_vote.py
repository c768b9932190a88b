"""Majority vote over members' multiple-choice picks, read from their records (issue 15: more than two members).

    python -m bench.member_vote results/members --members gemma3,qwen05,qwen15 [--json out.json]

The eval job's `vote` on multiple choice (`--mc-vote loglik`) is each member's log-likelihood pick,
the majority, a tie to the tied choice the members find most probable on average: it generates
nothing and needs no pass beyond the members' own. So it is computed here, with the job's own
function (`vote_on_picks`) on the task's normalised scores, for any set of members from
<root>/<member>/mc/predictions.jsonl (each file gives only the member its folder names; see
bench/runs/members_records.sh), on the questions all of them answered. Each task: the members,
the vote, and the vote against the best member with the exact sign test; pooled over the tasks.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consort.runtime.evaluation.metrics import normalised_scores
from consort.runtime.evaluation.questions import vote_on_picks
from consort.runtime.evaluation.registry import get_task, load_task
from consort.runtime.evaluation.report import sign_test
from consort.runtime.evaluation.specs import MultipleChoiceQuestion
from consort.runtime.routing.records import find_predictions, iter_answers, member_folder

Entries = dict[str, dict[str, dict[str, dict[str, Any]]]]  # task -> id -> member -> entry


def read_entries(root: Path, group: str = "mc") -> Entries:
    """Each member's own entries (pick, raw choice scores, correct) from the records layout."""
    out: Entries = defaultdict(lambda: defaultdict(dict))
    for found in iter_answers(find_predictions(root, group), owner_of=member_folder):
        out[found.task][found.id][found.member] = dict(found.answer)
    return out


class Questions:
    """A task's eval questions by id, loaded once per task."""

    def __init__(self) -> None:
        self._by_task: dict[str, dict[str, MultipleChoiceQuestion]] = {}

    def __call__(self, task: str, qid: str) -> MultipleChoiceQuestion:
        if task not in self._by_task:
            self._by_task[task] = {q.id: q for q in load_task(task) if isinstance(q, MultipleChoiceQuestion)}
        return self._by_task[task][qid]


def vote_outcomes(entries: Entries, members: Sequence[str]) -> dict[str, dict[str, dict[str, bool]]]:
    """task -> id -> {each member, "vote"}: right or not, on the questions all `members` answered."""
    question_of = Questions()
    out: dict[str, dict[str, dict[str, bool]]] = {}
    for task, questions in sorted(entries.items()):
        normalization = get_task(task).normalization or "none"
        for qid, answers in questions.items():
            if not all(m in answers for m in members):
                continue
            question = question_of(task, qid)
            chosen = [answers[m] for m in members]
            scores = [normalised_scores(e["scores"], question.continuations, normalization) for e in chosen]
            choice, _ = vote_on_picks([e["pick"] for e in chosen], scores)
            right = {m: bool(answers[m]["correct"]) for m in members}
            right["vote"] = choice == question.gold
            out.setdefault(task, {})[qid] = right
    return out


def report(outcomes: dict[str, dict[str, dict[str, bool]]], members: Sequence[str]) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    pooled_won = pooled_lost = pooled_n = 0
    pooled_right = dict.fromkeys([*members, "vote", "best"], 0)
    for task, questions in outcomes.items():
        n = len(questions)
        right = {k: sum(q[k] for q in questions.values()) for k in [*members, "vote"]}
        best = max(members, key=lambda m: right[m])
        won = sum(q["vote"] and not q[best] for q in questions.values())
        lost = sum(q[best] and not q["vote"] for q in questions.values())
        tasks[task] = {
            "questions": n,
            "accuracy": {k: 100 * v / n for k, v in right.items()},
            "best": best,
            "vote_minus_best": 100 * (right["vote"] - right[best]) / n,
            "won": won,
            "lost": lost,
            "p": sign_test(won, lost),
        }
        pooled_won, pooled_lost, pooled_n = pooled_won + won, pooled_lost + lost, pooled_n + n
        for k in [*members, "vote"]:
            pooled_right[k] += right[k]
        pooled_right["best"] += right[best]
    pooled = {
        "questions": pooled_n,
        "accuracy": {k: 100 * v / pooled_n for k, v in pooled_right.items()} if pooled_n else {},
        "won": pooled_won,
        "lost": pooled_lost,
        "p": sign_test(pooled_won, pooled_lost),
    }
    return {"members": list(members), "tasks": tasks, "pooled": pooled}


def markdown(result: dict[str, Any]) -> str:
    members = result["members"]
    head = ["task", "N", *members, "vote", "vote − best", "vote vs best: won/lost (p)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for task, t in result["tasks"].items():
        cells = [f"{t['accuracy'][m]:.1f}" + ("*" if m == t["best"] else "") for m in members]
        lines.append(
            f"| {task} | {t['questions']} | " + " | ".join(cells) + f" | {t['accuracy']['vote']:.1f} | "
            f"{t['vote_minus_best']:+.1f} | {t['won']}/{t['lost']} ({t['p']:.2g}) |"
        )
    p = result["pooled"]
    if p["questions"]:
        cells = [f"{p['accuracy'][m]:.1f}" for m in members]
        lines.append(
            f"| pooled | {p['questions']} | " + " | ".join(cells) + f" | {p['accuracy']['vote']:.1f} | "
            f"{p['accuracy']['vote'] - p['accuracy']['best']:+.1f} | {p['won']}/{p['lost']} ({p['p']:.2g}) |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="<root>/<member>/mc/predictions.jsonl")
    parser.add_argument("--members", required=True, help="comma-separated members that vote")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    members = [m for m in args.members.split(",") if m]
    result = report(vote_outcomes(read_entries(args.root), members), members)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print("(* the best member of the task on these questions)")


if __name__ == "__main__":
    main()
