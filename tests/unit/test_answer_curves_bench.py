"""bench/answer_curves.py's curves from hand-made sample records: which answer each strategy picks."""

from __future__ import annotations

import json

import pytest

import bench.answer_curves as answer_curves
from bench.answer_curves import (
    against_best_greedy,
    curves,
    member_rates,
    outcomes,
    read_log,
    run_rolling,
    tie_breaker,
)
from consort.runtime.config import parse_config
from consort.runtime.evaluation.specs import GenerationQuestion
from consort.runtime.loop import EnsembleLoop
from tests.unit.conftest import TINY_PAIR_CONFIG, make_loop


def _question(qid: str) -> GenerationQuestion:
    return GenerationQuestion(
        task="gsm8k_chat", id=qid, prompt="?", chat=True, answers=["7"], stop=[], max_tokens=8, answer_kind="number"
    )


def test_vote_mux_and_each_member_alone_pick_by_agreement() -> None:
    # Member a: greedy wrong, samples 7, 7, 3 (its own majority is right).
    # Member b: greedy right, samples 5, 5, 5 (agrees most with itself, and is wrong).
    samples = {"a": ["= 7", "= 7", "= 3"], "b": ["= 5", "= 5", "= 5"]}
    record = {
        "members": {
            "a": {"greedy": "= 3", "samples": samples["a"]},
            "b": {"greedy": "= 7!", "samples": samples["b"]},
        },
        "correct": {"= 3": False, "= 7!": True, "= 7": True, "= 5": False},
    }
    question = _question("q1")
    lines = curves(outcomes([question], {("q1", "samples"): record}, ["a", "b"], [1, 2, 3, 6], {}))
    assert lines["a greedy"] == {1: 0.0}
    assert lines["b greedy"] == {1: 1.0}
    # vote over n answers drawn in turn a, b, a, b, ...: n=1 takes a's first (7); n=2 ties 7 vs 5 and the
    # first drawn wins; n=6 has 5 three times against 7 twice.
    assert lines["vote"] == {1: 1.0, 2: 1.0, 3: 1.0, 6: 0.0}
    # Each member alone votes over its own first n samples; n beyond its samples is not drawn.
    assert lines["vote a alone"] == {1: 1.0, 2: 1.0, 3: 1.0}
    assert lines["vote b alone"] == {1: 0.0, 2: 0.0, 3: 0.0}
    # mux with k samples per member takes the member whose samples agree most: b (5, 5, 5) at k=3.
    assert lines["mux"][6] == 0.0


def test_rolling_window_returns_every_item_with_its_own_completions(tiny_models) -> None:
    """Items finish out of order and are refilled; each item's completions are its own requests'."""
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams
    from consort.runtime.types import RequestOptions

    loop = make_loop(tiny_models, [("smollm2", "smollm2-135m-instruct")], strategy="mean", main="smollm2")
    items = [
        [(Prompt(text=f"Item {i}:"), SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), RequestOptions())]
        for i, n in enumerate([6, 1, 3, 2, 5])
    ]
    finished = list(run_rolling(loop, items, window=2))
    assert sorted(i for i, _ in finished) == list(range(5))
    # The short item 1 overtakes item 0, which started first.
    assert [i for i, _ in finished].index(1) < [i for i, _ in finished].index(0)
    for index, completions in finished:
        (alone,) = list(run_rolling(loop, [items[index]], window=1))
        assert [o.text for o in completions] == [o.text for o in alone[1]]
        assert completions[0].completion_tokens == items[index][0][1].max_tokens


def test_points_are_tested_against_the_best_greedy_member_on_the_same_questions() -> None:
    points = {
        "a greedy": {1: {"q1": True, "q2": False, "q3": False}},
        "b greedy": {1: {"q1": True, "q2": True, "q3": False}},  # the best member: 2 of 3
        "vote": {3: {"q1": False, "q2": True, "q3": True}, 5: {"q1": True, "q3": True}},
    }
    tests = against_best_greedy(points)
    assert tests["vote"][3] == {"against": "b greedy", "questions": 3, "won": 1, "lost": 1, "p": 1.0}
    assert tests["vote"][5]["questions"] == 2 and (tests["vote"][5]["won"], tests["vote"][5]["lost"]) == (1, 0)
    assert "a greedy" not in tests


def test_outcomes_keep_which_question_each_point_comes_from() -> None:
    record = {
        "members": {"a": {"greedy": "= 7", "samples": ["= 7"]}, "b": {"greedy": "= 5", "samples": ["= 5"]}},
        "correct": {"= 7": True, "= 5": False},
    }
    points = outcomes([_question("q9")], {("q9", "samples"): record}, ["a", "b"], [1], {})
    assert points["a greedy"] == {1: {"q9": True}}
    assert points["b greedy"] == {1: {"q9": False}}


def test_mux_ties_go_to_the_member_with_the_higher_dev_accuracy_from_config_or_flag() -> None:
    config = parse_config(
        {
            "members": [{"name": "a", "model": "tiny:smollm2-135m-instruct"}, {"name": "b", "model": "tiny:gemma3-270m"}],
            "strategy": "mux",
            "mux": {"accuracy": {"a": 0.2, "b": 0.6}},
        }
    )
    assert tie_breaker(config, None) == {"a": 0.2, "b": 0.6}
    assert tie_breaker(config, "0.9,0.1") == {"a": 0.9, "b": 0.1}
    with pytest.raises(SystemExit, match="1 values for the 2 members"):
        tie_breaker(config, "0.9")
    # One sample each agrees fully with itself: a tie on every question, so the accuracy decides.
    record = {
        "members": {"a": {"greedy": "= 7", "samples": ["= 7"]}, "b": {"greedy": "= 5", "samples": ["= 5"]}},
        "correct": {"= 7": True, "= 5": False},
    }
    records = {("q1", "samples"): record}
    assert outcomes([_question("q1")], records, ["a", "b"], [2], tie_breaker(config, None))["mux"] == {2: {"q1": False}}
    assert outcomes([_question("q1")], records, ["a", "b"], [2], tie_breaker(config, "0.9,0.1"))["mux"] == {2: {"q1": True}}


@pytest.fixture
def curves_loops(tiny_models, monkeypatch: pytest.MonkeyPatch) -> list[EnsembleLoop]:
    """The command's ensemble built over the session's tiny pair; the list holds every loop it built."""
    members = [("smollm2", "smollm2-135m-instruct"), ("gemma3", "gemma3-270m")]
    built: list[EnsembleLoop] = []

    def from_config(config, device: str) -> EnsembleLoop:
        built.append(make_loop(tiny_models, members, strategy="mean", main="smollm2"))
        return built[-1]

    monkeypatch.setattr(answer_curves.EnsembleLoop, "from_config", staticmethod(from_config))
    return built


def test_the_command_resumes_and_reports_only_the_parts_it_is_given(
    curves_loops: list[EnsembleLoop], tmp_path
) -> None:
    config = tmp_path / "pair.yaml"
    config.write_text(TINY_PAIR_CONFIG + "mux: {accuracy: {smollm2: 0.1, gemma3: 0.2}}\n")
    out = tmp_path / "curves"
    common = ["--config", str(config), "--task", "gsm8k_chat", "--samples", "1,2", "--max-tokens", "2", "--out", str(out)]

    answer_curves.main([*common, "--limit", "2", "--parts", "samples,debate", "--debate-rounds", "1"])
    log = [json.loads(line) for line in (out / "gsm8k_chat.jsonl").read_text().splitlines()]
    ids = sorted({r["id"] for r in log})
    assert len(ids) == 2
    assert sorted((r["id"], r["part"]) for r in log) == [(i, p) for i in ids for p in ("debate", "samples")]
    summary = json.loads((out / "gsm8k_chat.json").read_text())
    assert summary["mux_tie_breaker"] == {"smollm2": 0.1, "gemma3": 0.2}
    assert summary["questions_per_strategy"]["debate"] == 2 and "vote" in summary["curves"]

    # A third question, samples only: one part runs, the debate records stay in the log but not in the report.
    answer_curves.main([*common, "--limit", "3", "--parts", "samples"])
    assert len(curves_loops) == 2
    assert len((out / "gsm8k_chat.jsonl").read_text().splitlines()) == 5
    summary = json.loads((out / "gsm8k_chat.json").read_text())
    assert "debate" not in summary["curves"]
    assert summary["questions_per_strategy"]["vote"] == 3
    assert (out / "gsm8k_chat.png").stat().st_size > 0

    # Everything asked for is in the log: nothing is generated.
    answer_curves.main([*common, "--limit", "3", "--parts", "samples"])
    assert len(curves_loops) == 2


def test_more_samples_extend_the_recorded_ones_and_equal_drawing_them_at_once(
    curves_loops: list[EnsembleLoop], tmp_path
) -> None:
    config = tmp_path / "pair.yaml"
    config.write_text(TINY_PAIR_CONFIG)
    common = ["--config", str(config), "--task", "gsm8k_chat", "--limit", "2", "--max-tokens", "3", "--parts", "samples"]

    def last_records(out) -> dict[str, dict]:
        return {qid: record for (qid, _), record in read_log(out / "gsm8k_chat.jsonl").items()}

    extended, at_once = tmp_path / "extended", tmp_path / "at_once"
    answer_curves.main([*common, "--samples", "1,2", "--out", str(extended)])  # 1 sample per member
    first = last_records(extended)
    answer_curves.main([*common, "--samples", "1,2,6", "--out", str(extended)])  # 3 per member
    answer_curves.main([*common, "--samples", "1,2,6", "--out", str(at_once)])
    assert len((extended / "gsm8k_chat.jsonl").read_text().splitlines()) == 4  # two records, each extended once
    grown, fresh = last_records(extended), last_records(at_once)
    for qid, record in grown.items():
        for name in ("smollm2", "gemma3"):
            assert len(record["members"][name]["samples"]) == 3
            assert record["members"][name]["samples"][0] == first[qid]["members"][name]["samples"][0]
            assert record["members"][name]["greedy"] == first[qid]["members"][name]["greedy"]
        assert record["members"] == fresh[qid]["members"]
        assert set(record["correct"]) == {t for e in record["members"].values() for t in [e["greedy"], *e["samples"]]}
    assert json.loads((extended / "gsm8k_chat.json").read_text())["curves"]["vote"].keys() == {"1", "2", "6"}


def test_a_torn_last_line_is_cut_off_and_the_next_record_starts_on_its_own_line(tmp_path) -> None:
    """A log committed or killed mid-write ends in half a record: reading drops it from the file, so the
    part is redone and appending does not glue the next record onto the torn one."""
    log = tmp_path / "gsm8k_chat.jsonl"
    first = {"id": "q1", "part": "samples", "tokens": 1}
    later = {"id": "q1", "part": "samples", "tokens": 2}
    log.write_text(json.dumps(first) + "\n" + json.dumps(later) + "\n" + '{"id": "q2", "part": "sam')
    records = read_log(log)
    assert records == {("q1", "samples"): later}
    with log.open("a") as append:
        append.write(json.dumps({"id": "q2", "part": "samples", "tokens": 3}) + "\n")
    assert set(read_log(log)) == {("q1", "samples"), ("q2", "samples")}

    only_torn = tmp_path / "humaneval.jsonl"
    only_torn.write_text('{"id": "q1"')
    assert read_log(only_torn) == {}
    assert only_torn.read_text() == ""
    assert read_log(tmp_path / "missing.jsonl") == {}


def test_a_draining_run_finishes_the_items_in_flight_and_starts_no_more(tiny_models) -> None:
    from consort.runtime.prompts import Prompt
    from consort.runtime.sampling import SamplingParams
    from consort.runtime.types import RequestOptions

    loop = make_loop(tiny_models, [("smollm2", "smollm2-135m-instruct")], strategy="mean", main="smollm2")
    items = [
        [(Prompt(text=f"Item {i}:"), SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), RequestOptions())]
        for i, n in enumerate([4, 1, 3, 2, 5])
    ]
    finished: list[int] = []
    rolling = run_rolling(loop, items, window=2, admitting=lambda: not finished)
    for index, completions in rolling:
        finished.append(index)
        assert completions[0].completion_tokens == items[index][0][1].max_tokens
    # Items 0 and 1 were in flight when item 1 ended and the drain began: 0 still finishes, 2-4 never start.
    assert finished == [1, 0]
    assert not loop.core.has_work


def test_member_rates_count_greedy_and_sampled_answers_apart() -> None:
    record = {
        "members": {
            "a": {"greedy": "= 7", "samples": ["= 7", "= 3", "= 3"]},
            "b": {"greedy": "= 3", "samples": ["= 7", "= 7", "= 7"]},
        },
        "correct": {"= 3": False, "= 7": True},
    }
    questions = [_question("q1"), _question("q2")]  # q2 has no record: counted nowhere
    rates = member_rates(questions, {("q1", "samples"): record}, ["a", "b"])
    assert rates == {"a": {"greedy": [1, 1], "sample": [1, 3]}, "b": {"greedy": [0, 1], "sample": [3, 3]}}


def test_behaviour_lines_vote_on_the_keys_and_the_plain_lines_stay_as_they_were() -> None:
    # Texts a0..b2 (all giving different numbers); the behaviour keys group a0, b1 and b0, a1 apart.
    record = {
        "members": {
            "a": {"greedy": "= 1", "samples": ["= 10", "= 11", "= 12"]},
            "b": {"greedy": "= 2", "samples": ["= 20", "= 21", "= 22"]},
        },
        "correct": {"= 1": False, "= 2": False, "= 10": False, "= 11": False, "= 12": True,
                    "= 20": False, "= 21": True, "= 22": True},
    }
    keys: dict[str, str | None] = {"= 1": None, "= 2": None, "= 10": "=x", "= 11": None, "= 12": "=y",
                                   "= 20": None, "= 21": "=y", "= 22": "=y"}
    records = {("q1", "samples"): record}
    plain = curves(outcomes([_question("q1")], records, ["a", "b"], [1, 3, 4, 6], {}))
    both = curves(outcomes([_question("q1")], records, ["a", "b"], [1, 3, 4, 6], {}, {"q1": keys}))
    assert {k: v for k, v in both.items() if "by behaviour" not in k} == plain
    # Drawn in turn a0, b0, a1, b1, a2, b2: n=1 and n=3 =x alone (wrong); n=4 =x against =y: a tie, the
    # earliest (a0) wins; n=6 =y three times.
    assert both["vote by behaviour"] == {1: 0.0, 3: 0.0, 4: 0.0, 6: 1.0}
    # b alone: n=1 b0 has no key, so the number rule picks it (wrong); n=3 =y twice (b1, right).
    assert both["vote b alone by behaviour"] == {1: 0.0, 3: 1.0}
    assert both["vote a alone by behaviour"] == {1: 0.0, 3: 0.0}  # =x and =y tie: the earliest
    # mux: k=1 a (=x, agreement 1) against b (no key); k=2 a tie at 1/2, member order; k=3 b's =y, =y
    # (2/3) beats a's 1/3: its first =y answer, b1, is right.
    assert both["mux by behaviour"] == {2: 0.0, 4: 0.0, 6: 1.0}
