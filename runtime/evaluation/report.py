"""Results of an evaluation: the predictions file, summary.json, a markdown table and a bar chart."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from consort.runtime.evaluation.errors import ResultsError

PREDICTIONS = "predictions.jsonl"
SUMMARY = "summary.json"
TABLE = "results.md"
CHART = "results.png"


def read_predictions(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The complete lines of a predictions file by (task, id); a later answer to a question wins,
    and a last line cut short by a kill is left out."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ResultsError(f"{path}:{number} is not valid JSON ({error}); move the file away") from error
        records[(record["task"], record["id"])] = record
    return records


class PredictionStore:
    """The append-only predictions file: one JSON line per answered question, flushed as it is written.

    Read back at start so that a restarted job skips what is already answered. A
    line cut short by a kill is dropped (and cut off the file) rather than trusted.
    """

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / PREDICTIONS
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        if self.path.exists():
            self._load()
        self._file = self.path.open("a", encoding="utf-8")

    def _load(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # The last write was interrupted: keep only complete lines.
            with self.path.open("r+b") as handle:
                handle.truncate(end)
        self.records = read_predictions(self.path)

    def answered(self, task: str, strategies: Sequence[str], members: Sequence[str]) -> set[str]:
        """Ids of `task` whose record already holds every requested strategy and member."""
        return {
            qid
            for (t, qid), r in self.records.items()
            if t == task and set(strategies) <= set(r["strategies"]) and set(members) <= set(r["members"])
        }

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.records[(record["task"], record["id"])] = record

    def close(self) -> None:
        self._file.close()


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test of paired wins against losses (ties dropped): how often a fair coin
    splits at least this unevenly. One question in a hundred either way is noise; this says how much."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(rows: list[dict[str, Any]], strategy: str, member: str) -> dict[str, Any]:
    """Questions the strategy got right and the member wrong (wins), and the reverse (losses)."""
    both = [r for r in rows if strategy in r["strategies"] and member in r["members"]]
    wins = sum(bool(r["strategies"][strategy]["correct"]) and not r["members"][member]["correct"] for r in both)
    losses = sum(bool(r["members"][member]["correct"]) and not r["strategies"][strategy]["correct"] for r in both)
    return {"against": member, "wins": wins, "losses": losses, "p_value": sign_test(wins, losses)}


def summarize(
    records: Iterable[dict[str, Any]],
    tasks: Sequence[str],
    members: Sequence[str],
    strategies: Sequence[str],
    ids: dict[str, list[str]],
) -> dict[str, Any]:
    """Accuracy per task of each member alone and each strategy, over the questions of this run."""
    by_key = {(r["task"], r["id"]): r for r in records}
    out: dict[str, Any] = {"members": list(members), "strategies": list(strategies), "tasks": {}}
    deltas = []
    for task in tasks:
        rows = [by_key[(task, i)] for i in ids.get(task, []) if (task, i) in by_key]
        if not rows:
            continue
        accuracy: dict[str, float] = {}
        for group, names in (("members", members), ("strategies", strategies)):
            for name in names:
                hits = [bool(r[group][name]["correct"]) for r in rows if name in r[group]]
                accuracy[name] = sum(hits) / len(hits) if hits else float("nan")
        best_member = max(members, key=lambda n: accuracy[n])
        ensemble = [s for s in strategies if s in accuracy]
        entry: dict[str, Any] = {
            "n": len(rows),
            "kind": rows[0]["kind"],
            "accuracy": accuracy,
            "best_member": best_member,
            "weights": rows[-1].get("weights"),
        }
        timed = [r for r in rows if r.get("seconds")]
        if timed:
            entry["seconds_per_question"] = sum(r["seconds"] for r in timed) / len(timed)
            phases: dict[str, list[float]] = {}
            for r in timed:
                for phase, seconds in (r.get("phase_seconds") or {}).items():
                    phases.setdefault(phase, []).append(seconds)
            # Questions per minute of each phase alone (phases run one after the other).
            entry["questions_per_minute"] = {
                phase: 60 * len(values) / sum(values) for phase, values in phases.items() if sum(values) > 0
            }
        if ensemble:
            best = max(ensemble, key=lambda s: accuracy[s])
            entry["best_strategy"] = best
            entry["delta_points"] = 100 * (accuracy[best] - accuracy[best_member])
            entry["paired"] = {s: paired(rows, s, best_member) for s in ensemble}
            deltas.append(entry["delta_points"])
        out["tasks"][task] = entry
    if deltas:
        out["mean_delta_points"] = sum(deltas) / len(deltas)
        out["ensemble_at_least_best_member_everywhere"] = all(d >= 0 for d in deltas)
    return out


def markdown_table(summary: dict[str, Any]) -> str:
    members, strategies = summary["members"], summary["strategies"]
    systems = [*members, *strategies]
    head = [
        "task",
        "N",
        *[f"{m} (alone)" for m in members],
        *strategies,
        "best member",
        "best ensemble",
        "Δ pts",
        "won/lost (p)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, entry in summary["tasks"].items():
        acc = entry["accuracy"]
        cells = [task, str(entry["n"])]
        for name in systems:
            value = acc.get(name)
            cells.append("–" if value is None or value != value else f"{100 * value:.1f}")
        cells.append(f"{entry['best_member']} {100 * acc[entry['best_member']]:.1f}")
        if "best_strategy" in entry:
            cells += [
                f"{entry['best_strategy']} {100 * acc[entry['best_strategy']]:.1f}",
                f"{entry['delta_points']:+.1f}",
            ]
            pair = entry.get("paired", {}).get(entry["best_strategy"])
            cells.append(f"{pair['wins']}/{pair['losses']} ({pair['p_value']:.2f})" if pair else "–")
        else:
            cells += ["–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    if "mean_delta_points" in summary:
        lines.append("")
        lines.append(
            f"Mean Δ (best ensemble − best member) over tasks: {summary['mean_delta_points']:+.2f} points; "
            f"ensemble ≥ best member on every task: {'yes' if summary['ensemble_at_least_best_member_everywhere'] else 'no'}."
        )
        lines.append(
            "won/lost: questions the best ensemble answered right and the best member wrong, and the reverse; "
            "p: two-sided exact sign test of that split."
        )
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict[str, Any], path: Path, title: str = "Accuracy per task") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary["tasks"])
    systems = [*summary["members"], *summary["strategies"]]
    labels = [f"{m} alone" for m in summary["members"]] + list(summary["strategies"])
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(tasks) + 2), 4.2))
    colors = plt.get_cmap("tab10")
    for j, (name, label) in enumerate(zip(systems, labels, strict=True)):
        values = [100 * summary["tasks"][t]["accuracy"].get(name, float("nan")) for t in tasks]
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(tasks))]
        hatch = "//" if name in summary["members"] else None
        ax.bar(
            xs,
            values,
            width,
            label=label,
            color=colors(j % 10),
            hatch=hatch,
            edgecolor="white",
            linewidth=0.5,
        )
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels([f"{t}\n(N={summary['tasks'][t]['n']})" for t in tasks])
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(
        fontsize=8, ncol=min(len(systems), 6), loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(folder: Path, summary: dict[str, Any]) -> None:
    (folder / SUMMARY).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (folder / TABLE).write_text(markdown_table(summary))
    if summary["tasks"]:
        bar_chart(summary, folder / CHART)
