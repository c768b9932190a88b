"""Members alone on the same questions, and what a pair of them could reach together.

    python -m bench.member_pairs results/part3 [--markdown]

Reads every `predictions.jsonl` under the folder (one evaluation per member, `consort eval
--strategies members`, as `results/part3/run.sh` writes them), keeps each question that every
member answered, and prints per task: each member's accuracy, and per pair the oracle (either
member right: the most an ensemble of the two can score by choosing well) and how their errors
overlap (both wrong, as a share of the questions either gets wrong: 1 = the same mistakes, 0 =
never the same).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from itertools import combinations
from pathlib import Path


def load(folder: Path) -> dict[str, dict[str, dict[str, bool]]]:
    """task -> question id -> member -> correct, over every predictions file under `folder`."""
    table: dict[str, dict[str, dict[str, bool]]] = defaultdict(lambda: defaultdict(dict))
    for path in sorted(folder.rglob("predictions.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            for member, entry in record["members"].items():
                table[record["task"]][record["id"]][member] = bool(entry["correct"])
    return table


def report(table: dict[str, dict[str, dict[str, bool]]], markdown: bool) -> None:
    for task, questions in sorted(table.items()):
        members = sorted({m for answers in questions.values() for m in answers})
        shared = {q: a for q, a in questions.items() if set(a) == set(members)}
        n = len(shared)
        if not n:
            continue
        print(f"\n{task}: {n} questions answered by all of {', '.join(members)}")
        accuracy = {m: sum(a[m] for a in shared.values()) / n for m in members}
        print("  " + "  ".join(f"{m} {100 * accuracy[m]:.1f}" for m in members))
        if markdown:
            print("  | pair | A | B | oracle | both wrong / either wrong |\n  |---|---:|---:|---:|---:|")
        for a, b in combinations(members, 2):
            oracle = sum(x[a] or x[b] for x in shared.values()) / n
            either_wrong = sum(not x[a] or not x[b] for x in shared.values())
            both_wrong = sum(not x[a] and not x[b] for x in shared.values())
            overlap = both_wrong / either_wrong if either_wrong else 0.0
            cells = (f"{100 * accuracy[a]:.1f}", f"{100 * accuracy[b]:.1f}", f"{100 * oracle:.1f}", f"{overlap:.2f}")
            if markdown:
                print(f"  | {a} + {b} | " + " | ".join(cells) + " |")
            else:
                print(f"  {a} + {b}: oracle {cells[2]}, error overlap {cells[3]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    report(load(args.folder), args.markdown)


if __name__ == "__main__":
    main()
