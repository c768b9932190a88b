"""Two evaluation runs on the same questions, side by side: accuracy of a strategy in each, and the
paired split (questions one run answered right and the other wrong) with its exact sign test.

    python -m bench.paired results/deepen/old results/deepen/new --strategy deepen [--label-a before --label-b after]

Each folder is a `consort eval --out`; questions are matched by (task, id). `--strategy members:NAME`
reads a member alone; `members:best` the member with the most right answers on each task (the
issue's "best member", chosen on the same questions, which favours it). "same answer": the same
pick (multiple choice) or the same text.

    python -m bench.paired RUN RUN --strategy members:best --strategy-b mean --label-a "best member" --label-b mean
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from consort.runtime.evaluation.report import sign_test


def entry(record: dict, strategy: str) -> dict:
    if strategy.startswith("members:"):
        return record["members"][strategy.split(":", 1)[1]]
    return record["strategies"][strategy]


def load(folder: Path, strategy: str) -> dict[tuple[str, str], tuple[bool, object]]:
    """(task, id) -> (correct, the answer given: the pick on multiple choice, else the text)."""
    records = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines() if line]
    if strategy == "members:best":
        return _best_member(records)
    out = {}
    for record in records:
        answer = entry(record, strategy)
        out[(record["task"], record["id"])] = _outcome(answer)
    return out


def _outcome(answer: dict) -> tuple[bool, object]:
    return bool(answer["correct"]), answer.get("pick", answer.get("answer"))


def _best_member(records: list[dict]) -> dict[tuple[str, str], tuple[bool, object]]:
    right: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record in records:
        for name, answer in record["members"].items():
            right[record["task"]][name] += bool(answer["correct"])
    best = {task: max(counts, key=lambda name: counts[name]) for task, counts in right.items()}
    out = {}
    for record in records:
        answer = record["members"][best[record["task"]]]
        out[(record["task"], record["id"])] = _outcome(answer)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--strategy", required=True, help="strategy in both runs (or members:NAME)")
    parser.add_argument("--strategy-b", help="the strategy read from run b, if another")
    parser.add_argument("--label-a", default="a")
    parser.add_argument("--label-b", default="b")
    args = parser.parse_args()
    a = load(args.a, args.strategy)
    b = load(args.b, args.strategy_b or args.strategy)
    shared = sorted(set(a) & set(b))
    by_task: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    same: dict[str, int] = defaultdict(int)
    for key in shared:
        by_task[key[0]].append((a[key][0], b[key][0]))
        same[key[0]] += a[key][1] == b[key][1]
    same["pooled"] = sum(same.values())
    by_task["pooled"] = [pair for task in list(by_task) for pair in by_task[task]]
    print(
        f"| task | N | {args.label_a} | {args.label_b} | {args.label_b} vs {args.label_a}: won/lost (p) "
        "| same answer |"
    )
    print("|---|---|---|---|---|---|")
    for task, pairs in by_task.items():
        n = len(pairs)
        won = sum(1 for x, y in pairs if y and not x)
        lost = sum(1 for x, y in pairs if x and not y)
        acc_a = 100 * sum(x for x, _ in pairs) / n
        acc_b = 100 * sum(y for _, y in pairs) / n
        print(
            f"| {task} | {n} | {acc_a:.1f} | {acc_b:.1f} | {won}/{lost} ({sign_test(won, lost):.3g}) "
            f"| {same[task]} of {n} |"
        )


if __name__ == "__main__":
    main()
