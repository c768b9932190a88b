"""Recompute an eval folder's summary for the first N questions of each task (a run stopped part-way
through a larger --limit, or a table at a smaller N than the run reached).

    python -m bench.resummarize results/real/mc-gemma-500 arc_easy:500,mmlu:250 --out /tmp/summary
"""

from __future__ import annotations

import argparse
from pathlib import Path

from consort.runtime.evaluation import load_task
from consort.runtime.evaluation.report import (
    PREDICTIONS,
    markdown_table,
    read_predictions,
    summarize,
    write_outputs,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an eval output folder (its predictions.jsonl is read)")
    parser.add_argument("limits", help="task:N pairs, comma-separated")
    parser.add_argument("--out", type=Path, required=True, help="where summary.json, results.md and the chart go")
    args = parser.parse_args()
    limits = {task: int(n) for task, n in (pair.split(":") for pair in args.limits.split(","))}
    records = read_predictions(args.folder / PREDICTIONS)
    members = list(dict.fromkeys(m for record in records.values() for m in record["members"]))
    strategies = list(dict.fromkeys(s for record in records.values() for s in record["strategies"]))
    ids = {task: [q.id for q in load_task(task, limit=n)] for task, n in limits.items()}
    missing = {t: sum((t, i) not in records for i in qids) for t, qids in ids.items()}
    if any(missing.values()):
        raise SystemExit(f"questions not answered in {args.folder}: {missing}")
    summary = summarize(records.values(), list(limits), members, strategies, ids)
    args.out.mkdir(parents=True, exist_ok=True)
    write_outputs(args.out, summary)
    print(markdown_table(summary), end="")


if __name__ == "__main__":
    main()
