"""Members alone on the same questions, and what a pair of them could reach together.

    python -m bench.member_pairs results/members [--group mc] [--markdown]

Reads <folder>/<member>/<group>/predictions.jsonl (`consort eval --strategies members`, or a link to
a pair's run: each file gives only the answers of the member its folder names), keeps per task the
questions every member answered, and prints each member's accuracy, and per pair the oracle (either
member right: the most an ensemble of the two can score by choosing well) and how their errors
overlap (both wrong, as a share of the questions either gets wrong: 1 = the same mistakes, 0 =
never the same).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from consort.runtime.routing.records import read_records

Table = dict[str, dict[str, dict[str, bool]]]


def load(folder: Path, group: str | None = None) -> Table:
    """task -> question id -> member -> correct."""
    table: Table = defaultdict(dict)
    for record in read_records(folder, group).values():
        table[record.task][record.id] = dict(record.correct)
    return table


def shared_questions(questions: dict[str, dict[str, bool]]) -> tuple[list[str], dict[str, dict[str, bool]]]:
    members = sorted({m for answers in questions.values() for m in answers})
    return members, {q: a for q, a in questions.items() if set(a) == set(members)}


def members_table(table: Table) -> str:
    """One markdown row per task: N and each member's accuracy on the questions all of them answered."""
    members = sorted({m for questions in table.values() for answers in questions.values() for m in answers})
    lines = ["| task | N | " + " | ".join(members) + " |", "|---|---:|" + "---:|" * len(members)]
    for task, questions in sorted(table.items()):
        present, shared = shared_questions(questions)
        if not shared:
            continue
        cells = [
            f"{100 * sum(a[m] for a in shared.values()) / len(shared):.1f}" if m in present else "–"
            for m in members
        ]
        lines.append(f"| {task} | {len(shared)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(table: Table, markdown: bool) -> None:
    if markdown:
        print(members_table(table))
    for task, questions in sorted(table.items()):
        members, shared = shared_questions(questions)
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
    parser.add_argument("folder", type=Path, help="<folder>/<member>/<group>/predictions.jsonl")
    parser.add_argument("--group", help="only this group of records (mc, code, gsm8k_chat)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    report(load(args.folder, args.group), args.markdown)


if __name__ == "__main__":
    main()
