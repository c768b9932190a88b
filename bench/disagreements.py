"""Where two members pick different choices, who is right: the cause a score fusion can or cannot gain.

    python -m bench.disagreements results/pairs/gemma-qwen05-bf16/mc gemma3 qwen05

Reads a multiple-choice `consort eval --out` run that scored both members (and the ensemble's
strategies) on the same questions. On the questions where the two members' picks differ it counts
each member right, the *surer* member right (the one whose own pick has the higher probability: a
softmax over the task's normalised choice scores, the ones its pick compared) and each strategy
right. A fusion of the members' scores can only beat the better member if confidence tells who is
right where they disagree: if the surer member is right no more often than the better member,
mixing takes as many of those questions as it gives away.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.member_vote import Questions
from consort.runtime.evaluation.metrics import normalised_scores
from consort.runtime.evaluation.registry import get_task
from consort.runtime.evaluation.report import sign_test


def own_pick_probability(scores: Sequence[float]) -> float:
    """The probability of the highest-scoring choice, with the choice scores normalised by softmax
    (`scores`: the task's normalised scores, whose argmax is the member's pick)."""
    top = max(scores)
    return 1.0 / sum(math.exp(s - top) for s in scores)


Outcome = dict[str, bool]  # who got one disagreement right: a, b, "surer", "strategy:NAME"


def disagreements(rows: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, list[Outcome]]:
    """task -> one outcome per question where `a` and `b` pick differently."""
    out: dict[str, list[Outcome]] = defaultdict(list)
    question_of = Questions()
    for row in rows:
        first, second = row["members"][a], row["members"][b]
        if first["pick"] == second["pick"]:
            continue
        continuations = question_of(row["task"], str(row["id"])).continuations
        normalization = get_task(row["task"]).normalization or "none"
        first_p, second_p = (
            own_pick_probability(normalised_scores(m["scores"], continuations, normalization)) for m in (first, second)
        )
        first_surer = first_p >= second_p
        outcome = {a: bool(first["correct"]), b: bool(second["correct"])}
        outcome["surer"] = outcome[a] if first_surer else outcome[b]
        for name, answer in row.get("strategies", {}).items():
            outcome[f"strategy:{name}"] = bool(answer["correct"])
        out[row["task"]].append(outcome)
    return out


def table(outcomes: dict[str, list[Outcome]], a: str, b: str) -> str:
    """Counts per task and pooled; the surer member against the task's better member, paired."""
    strategies = sorted({k for rows in outcomes.values() for o in rows for k in o if k.startswith("strategy:")})
    head = ["task", "disagree", a, b, "surer member", *(s.split(":", 1)[1] for s in strategies)]
    head.append("surer vs better member: won/lost (p)")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    totals: Counter[str] = Counter()
    for task, rows in sorted(outcomes.items()):
        counts = Counter(k for o in rows for k, ok in o.items() if ok)
        better = a if counts[a] >= counts[b] else b
        won = sum(o["surer"] and not o[better] for o in rows)
        lost = sum(o[better] and not o["surer"] for o in rows)
        totals.update(counts)
        totals.update({"questions": len(rows), "won": won, "lost": lost})
        cells = [task, str(len(rows)), str(counts[a]), str(counts[b]), str(counts["surer"])]
        cells += [str(counts[s]) for s in strategies]
        lines.append("| " + " | ".join(cells) + f" | {won}/{lost} ({sign_test(won, lost):.2g}) |")
    cells = ["pooled", str(totals["questions"]), str(totals[a]), str(totals[b]), str(totals["surer"])]
    cells += [str(totals[s]) for s in strategies]
    won, lost = totals["won"], totals["lost"]
    lines.append("| " + " | ".join(cells) + f" | {won}/{lost} ({sign_test(won, lost):.2g}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a `consort eval --out` folder (its predictions.jsonl)")
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in (args.run / "predictions.jsonl").read_text().splitlines() if line.strip()]
    print(table(disagreements(rows, args.a, args.b), args.a, args.b))


if __name__ == "__main__":
    main()
