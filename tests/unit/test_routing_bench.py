"""bench/routing.py on synthetic evaluation records: curves, APGR, CPT and the picture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.routing import Curve, apgr, cpt, disagreement_auc, run, threshold_curve
from consort.runtime.routing.records import Split

TOPICS = {
    # topic: (who is right) — the strong member is right on both, the cheap one only on animals.
    "animals": {"tiny": True, "small": True, "big": True},
    "physics": {"tiny": False, "small": False, "big": True},
    "history": {"tiny": False, "small": True, "big": False},
}
WORDS = {
    "animals": "cats dogs horses eat grass meat animals fur",
    "physics": "quantum energy electron photon field mass physics",
    "history": "empire king war treaty century history dynasty",
}


def _write_records(root: Path, n: int = 120) -> None:
    rng = np.random.default_rng(0)
    rows: dict[str, list[str]] = {m: [] for m in ("tiny", "small", "big")}
    topics = list(TOPICS)
    for i in range(n):
        topic = topics[i % 3]
        words = WORDS[topic].split()
        question = " ".join(rng.choice(words, size=5)) + f" question {i}?"
        for member in rows:
            right = TOPICS[topic][member]
            record = {
                "task": "synth",
                "id": f"validation/{i}",
                "question": question,
                "members": {member: {"correct": right}},
            }
            rows[member].append(json.dumps(record))
    for member, lines in rows.items():
        folder = root / member / "mc"
        folder.mkdir(parents=True)
        (folder / "predictions.jsonl").write_text("\n".join(lines) + "\n")


def test_metrics_on_a_hand_made_curve() -> None:
    # cheap 0.5, strong 1.0: a perfect router recovers the whole gap once it sends half the questions.
    curve = threshold_curve(
        np.array([1.0, 0.9, 0.1, 0.0]), np.array([0, 0, 1, 1.0]), np.array([1, 1, 1, 1.0])
    )
    assert curve.share == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.accuracy == [0.5, 0.75, 1.0, 1.0, 1.0]
    assert cpt(curve, 0.5, 1.0, 0.5) == 0.25 and cpt(curve, 0.5, 1.0, 0.8) == 0.5
    # PGR = [0, .5, 1, 1, 1]: trapezoids over quarters → (0.25 + 0.75 + 1 + 1) / 4 = 0.75.
    assert apgr(curve, 0.5, 1.0) == pytest.approx(0.75)
    diagonal = Curve([0.0, 1.0], [0.5, 1.0])
    assert apgr(diagonal, 0.5, 1.0) == pytest.approx(0.5) and cpt(diagonal, 0.5, 1.0, 0.5) == 1.0
    assert apgr(curve, 1.0, 0.5) is None  # no gap to recover


def test_disagreement_auc_sees_only_the_questions_one_member_gets_right() -> None:
    cheap_right = np.array([1, 0, 0, 1, 1, 0.0])
    strong_right = np.array([0, 1, 1, 1, 0, 0.0])
    # strong-only: questions 1, 2; cheap-only: 0, 4; questions 3 and 5 (agreement) must not count.
    perfect = np.array([0.0, 1.0, 0.9, -5.0, 0.1, 9.0])
    assert disagreement_auc(perfect, cheap_right, strong_right) == 1.0
    assert disagreement_auc(-perfect, cheap_right, strong_right) == 0.0
    # 1.0 beats 0.1 and ties 1.0; 0.1 ties 0.1 and loses to 1.0: (1 + 0.5 + 0.5 + 0) / 4.
    mixed = np.array([1.0, 1.0, 0.1, 0.0, 0.1, 0.0])
    assert disagreement_auc(mixed, cheap_right, strong_right) == pytest.approx(0.5)
    assert disagreement_auc(perfect, strong_right, strong_right) is None


def test_bench_on_synthetic_records_beats_random_and_draws_the_curve(tmp_path: Path) -> None:
    _write_records(tmp_path / "records")
    out = tmp_path / "out"
    report = run(tmp_path / "records", out, group="mc", cheap="tiny", strong="big", embedder_name="hashing")
    pair = report["pair"]
    split = Split()
    assert pair["dev_questions"] == len(split.dev([_Key(f"synth/validation/{i}") for i in range(120)]))
    learned, random = pair["routers"]["learned (RouteLLM SW ranking)"], pair["routers"]["random"]
    assert random["apgr"] == pytest.approx(0.5)
    assert learned["apgr"] > 0.8 and learned["cpt80"] <= 0.5
    assert pair["routers"]["elo (Eagle, Bradley-Terry fit)"]["apgr"] > 0.6
    assert pair["routers"]["elo (Eagle, online K=32)"]["apgr"] > 0.6
    members = report["members"]
    fitted = members["elo (Eagle, Bradley-Terry fit) after dev feedback"]["accuracy"]
    assert fitted >= members["member big"]["accuracy"]
    assert fitted > members["elo before feedback"]["accuracy"]
    assert members["bandit after dev feedback"]["accuracy"] > members["random"]["accuracy"]
    assert members["oracle (some member right)"]["accuracy"] == 1.0
    assert (out / "routing.png").stat().st_size > 10_000
    assert json.loads((out / "routing.json").read_text())["members_with_records"] == ["big", "small", "tiny"]


def test_bench_works_on_whatever_records_exist(tmp_path: Path) -> None:
    _write_records(tmp_path / "records")
    for member in ("small", "big"):
        for f in (tmp_path / "records" / member / "mc").iterdir():
            f.unlink()
    report = run(
        tmp_path / "records",
        tmp_path / "out",
        cheap="tiny",
        strong="big",
        members=["tiny", "big"],
        embedder_name="hashing",
    )
    assert report["pair"] is None and report["members"] is None and report["members_missing"] == ["big"]
    assert (tmp_path / "out" / "routing.png").is_file()


class _Key:
    def __init__(self, key: str) -> None:
        self.key = key
