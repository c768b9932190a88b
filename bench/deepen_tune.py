"""DeePEn's inverse search tuned on dev questions, then measured once on the test slices (issue 15, item 1).

    python -m bench.deepen_tune --config bench/runs/pair_configs/knowledge-gemma-main.yaml \
        --tasks arc_easy,piqa --dev-limit 100 --test-limit 100 --out results/deepen-tune

Stage 1 sweeps the search's steps × learning rate at the config's anchors; stage 2 sweeps the number
of anchors at the best of stage 1. Every point is one `consort eval --split dev --strategies deepen`
run into <out>/dev/<point> (resumable: a finished run is read back, a broken one goes on where it
stopped). The best point by pooled dev accuracy (ties: the fewer steps, then the config's own values)
is written to <out>/chosen.yaml and run once on the test slices (<out>/test); <out>/tune.json holds
every point's dev accuracy. The test questions are never seen before the choice is made.

`--consort` is the command that runs `consort` (default: this venv's; a long run should use
bench/runs/frozen_consort.sh so edits to the tree do not reach it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from consort.runtime.config import load_config
from consort.runtime.evaluation.registry import load_task

Runner = Callable[[list[str]], None]


def point_name(steps: int, rate: float, anchors: int | None) -> str:
    return f"steps{steps}-lr{rate:g}-anchors{'all' if anchors is None else anchors}"


def point_config(out: Path, steps: int, rate: float, anchors: int | None) -> Path:
    return out / "configs" / f"{point_name(steps, rate, anchors)}.yaml"


def write_point_config(base: Path, out: Path, steps: int, rate: float, anchors: int | None) -> Path:
    """The base config with DeePEn's search set to this point (validated by loading it back)."""
    data = yaml.safe_load(base.read_text())
    data["strategy"] = "deepen"
    data["deepen"] = {
        **(data.get("deepen") or {}),
        "steps": steps,
        "learning_rate": rate,
        "max_anchors": anchors,
    }
    path = point_config(out, steps, rate, anchors)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# {base} with DeePEn's search at one tuning point (bench/deepen_tune.py)\n" + yaml.safe_dump(data)
    )
    load_config(str(path))
    return path


def eval_argv(config: Path, tasks: Sequence[str], limit: int, split: str, out: Path) -> list[str]:
    return [
        "eval", "--local", "--config", str(config), "--tasks", ",".join(tasks), "--limit", str(limit),
        "--split", split, "--strategies", "deepen", "--out", str(out), "--no-progress",
    ]  # fmt: skip


def subprocess_runner(consort: str) -> Runner:
    def run(argv: list[str]) -> None:
        subprocess.run([*shlex.split(consort), *argv], check=True)

    return run


def deepen_accuracy(run: Path, tasks: Sequence[str]) -> dict[str, Any]:
    """Per task and pooled: deepen's right answers over the questions of the run's summary."""
    summary = json.loads((run / "summary.json").read_text())
    per_task = {}
    right = total = 0
    for task in tasks:
        row = summary["tasks"][task]
        n = int(row["n"])
        task_right = round(row["accuracy"]["deepen"] * n)
        per_task[task] = {"n": n, "accuracy": task_right / n}
        right, total = right + task_right, total + n
    return {"tasks": per_task, "right": right, "questions": total, "accuracy": right / total}


def finished(run: Path, tasks: Sequence[str], expected: dict[str, int]) -> bool:
    """Whether a dev run has answered every question it was asked (a stopped one resumes)."""
    path = run / "summary.json"
    if not path.exists():
        return False
    summary = json.loads(path.read_text())["tasks"]
    return all(t in summary and summary[t]["n"] == expected[t] for t in tasks)


def tune(
    base: Path,
    tasks: Sequence[str],
    out: Path,
    runner: Runner,
    *,
    dev_limit: int,
    test_limit: int,
    steps: Sequence[int],
    rates: Sequence[float],
    anchors: Sequence[int | None],
) -> dict[str, Any]:
    defaults = load_config(str(base)).deepen
    expected = {t: len(load_task(t, split="dev", limit=dev_limit)) for t in tasks}
    points: dict[str, dict[str, Any]] = {}

    def measure(s: int, r: float, a: int | None) -> None:
        name = point_name(s, r, a)
        if name in points:
            return
        config = write_point_config(base, out, s, r, a)
        run = out / "dev" / name
        if not finished(run, tasks, expected):
            runner(eval_argv(config, tasks, dev_limit, "dev", run))
        points[name] = {"steps": s, "learning_rate": r, "max_anchors": a, **deepen_accuracy(run, tasks)}

    def best() -> dict[str, Any]:
        def key(p: dict[str, Any]) -> tuple[int, int, bool, bool]:
            return (
                p["right"],
                -p["steps"],
                p["learning_rate"] == defaults.learning_rate,
                p["max_anchors"] == defaults.max_anchors,
            )

        return max(points.values(), key=key)

    for s, r in itertools.product(steps, rates):
        measure(s, r, defaults.max_anchors)
    stage1 = best()
    for a in anchors:
        measure(stage1["steps"], stage1["learning_rate"], a)
    chosen = best()
    chosen_config = point_config(out, chosen["steps"], chosen["learning_rate"], chosen["max_anchors"])
    (out / "chosen.yaml").write_text(chosen_config.read_text())  # written and validated when it was measured
    result: dict[str, Any] = {
        "base": str(base),
        "tasks": list(tasks),
        "dev_limit": dev_limit,
        "defaults": defaults.model_dump(),
        "points": points,
        "chosen": chosen,
    }
    (out / "tune.json").write_text(json.dumps(result, indent=2) + "\n")
    runner(eval_argv(out / "chosen.yaml", tasks, test_limit, "eval", out / "test"))
    result["test"] = deepen_accuracy(out / "test", tasks)
    (out / "tune.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def markdown(result: dict[str, Any]) -> str:
    tasks = result["tasks"]
    lines = [
        "| steps | learning rate | anchors | " + " | ".join(f"{t} (dev)" for t in tasks) + " | pooled dev |",
        "|---:|---:|---:|" + "---:|" * (len(tasks) + 1),
    ]
    chosen = result["chosen"]
    for p in result["points"].values():
        mark = " ←" if p == chosen else ""
        cells = " | ".join(f"{100 * p['tasks'][t]['accuracy']:.1f}" for t in tasks)
        anchors = "all" if p["max_anchors"] is None else p["max_anchors"]
        lines.append(
            f"| {p['steps']} | {p['learning_rate']:g} | {anchors} | {cells} | {100 * p['accuracy']:.1f}{mark} |"
        )
    return "\n".join(lines)


def _anchors(text: str) -> list[int | None]:
    return [None if a == "all" else int(a) for a in text.split(",") if a]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="the ensemble whose DeePEn search is tuned"
    )
    parser.add_argument("--tasks", required=True, help="comma-separated tasks with a dev split")
    parser.add_argument("--dev-limit", type=int, default=100, help="dev questions per task for each point")
    parser.add_argument(
        "--test-limit", type=int, default=100, help="test questions per task for the chosen point"
    )
    parser.add_argument("--steps", default="1,5,10", help="stage 1: inverse-search steps")
    parser.add_argument("--rates", default="0.05,0.15,0.5", help="stage 1: learning rates")
    parser.add_argument(
        "--anchors", default="1024,4096,all", help="stage 2: anchor counts (all = every shared token)"
    )
    parser.add_argument("--out", type=Path, default=Path("results/deepen-tune"))
    parser.add_argument(
        "--consort", default=f"{sys.executable} -m consort", help="the command that runs consort"
    )
    args = parser.parse_args(argv)
    result = tune(
        args.config,
        [t for t in args.tasks.split(",") if t],
        args.out,
        subprocess_runner(args.consort),
        dev_limit=args.dev_limit,
        test_limit=args.test_limit,
        steps=[int(s) for s in args.steps.split(",") if s],
        rates=[float(r) for r in args.rates.split(",") if r],
        anchors=_anchors(args.anchors),
    )
    print(markdown(result))
    test = result["test"]
    print(
        f"chosen on dev: {result['chosen']['steps']} steps, rate {result['chosen']['learning_rate']:g}, "
        f"anchors {result['chosen']['max_anchors']}; test {100 * test['accuracy']:.1f} on {test['questions']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
