"""bench.deepen_tune: DeePEn's search points are scored on dev questions only, the best is chosen by
dev accuracy, and only the chosen point ever sees the test slice."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from bench.deepen_tune import tune
from consort.runtime.evaluation import job
from consort.runtime.evaluation.registry import load_task
from tests.unit.conftest import TINY_PAIR_CONFIG


def _right(run: Path) -> int:
    rows = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines() if line]
    return sum(r["strategies"]["deepen"]["correct"] for r in rows)


def _ids(run: Path) -> set[str]:
    return {json.loads(line)["id"] for line in (run / "predictions.jsonl").read_text().splitlines() if line}


def test_tuning_scores_dev_only_picks_the_best_and_resumes(tiny_local_backend: None, tmp_path: Path) -> None:
    base = tmp_path / "tiny.yaml"
    base.write_text(TINY_PAIR_CONFIG)
    calls: list[list[str]] = []

    def runner(argv: list[str]) -> None:
        calls.append(argv)
        assert argv[0] == "eval" and job.main(argv[1:]) == 0

    out = tmp_path / "tune"
    grid = {"dev_limit": 3, "test_limit": 2, "steps": [0, 2], "rates": [0.15], "anchors": [256, 1024]}
    result = tune(base, ["arc_easy"], out, runner, **grid)

    dev_ids = {q.id for q in load_task("arc_easy", split="dev", limit=3)}
    test_ids = {q.id for q in load_task("arc_easy", limit=2)}
    # Stage 1: two step counts at the config's 1024 anchors; stage 2 adds 256 anchors at the best.
    assert len(result["points"]) == 3
    for name, point in result["points"].items():
        run = out / "dev" / name
        assert _ids(run) == dev_ids
        assert point["right"] == _right(run)
        config = yaml.safe_load((out / "configs" / f"{name}.yaml").read_text())
        assert (config["deepen"]["steps"], config["deepen"]["max_anchors"]) == (
            point["steps"],
            point["max_anchors"],
        )
    assert result["chosen"]["right"] == max(p["right"] for p in result["points"].values())
    chosen = yaml.safe_load((out / "chosen.yaml").read_text())["deepen"]
    assert (
        chosen["steps"] == result["chosen"]["steps"]
        and chosen["max_anchors"] == result["chosen"]["max_anchors"]
    )
    assert _ids(out / "test") == test_ids
    assert [a[a.index("--split") + 1] for a in calls] == ["dev", "dev", "dev", "eval"]

    calls.clear()
    again = tune(base, ["arc_easy"], out, runner, **grid)
    assert [a[a.index("--split") + 1] for a in calls] == ["eval"]  # finished dev points are read back
    assert again["chosen"] == result["chosen"] and again["test"] == result["test"]
