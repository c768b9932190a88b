"""Merge the summary.json of several `consort eval` runs into one table and one chart (docs/results.md).

    python -m bench.results_chart results/real/mc-gemma/summary.json results/real/gen/summary.json \
        --png docs/results.png --json docs/results.json --title "SmolLM2-135M-Instruct + Gemma-3-270M"
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from consort.runtime.evaluation.report import bar_chart, markdown_table


def merge(paths: list[Path]) -> dict[str, Any]:
    merged: dict[str, Any] = {"tasks": {}}
    deltas = []
    for path in paths:
        summary = json.loads(path.read_text())
        for key in ("members", "strategies"):
            if key in merged and merged[key] != summary[key]:
                raise SystemExit(f"{path}: {key} differ from the first summary's; cannot merge")
            merged[key] = summary[key]
        for task, entry in summary["tasks"].items():
            merged["tasks"][task] = entry
    for entry in merged["tasks"].values():
        if "delta_points" in entry:
            deltas.append(entry["delta_points"])
    if deltas:
        merged["mean_delta_points"] = sum(deltas) / len(deltas)
        merged["ensemble_at_least_best_member_everywhere"] = all(d >= 0 for d in deltas)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--title", default="Accuracy per task: each member alone and each strategy")
    parser.add_argument("--json", type=Path, help="also write the merged summary here")
    args = parser.parse_args()
    merged = merge(args.summaries)
    if args.json:
        args.json.write_text(json.dumps(merged, indent=2) + "\n")
    bar_chart(merged, args.png, title=args.title)
    print(markdown_table(merged), end="")


if __name__ == "__main__":
    main()
