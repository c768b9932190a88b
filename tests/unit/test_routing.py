"""Routers, their store and the `route` strategy, without Ray."""

from __future__ import annotations

import json
import math
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from consort.deploy.feedback import FeedbackRequest, FeedbackService
from consort.runtime.config import parse_config
from consort.runtime.errors import ConfigError, InvalidRequest, RoutingDecisionNotFound
from consort.runtime.prompts import Prompt
from consort.runtime.routing import elo
from consort.runtime.routing.bandit import BanditRouter
from consort.runtime.routing.baseline import RandomRouter
from consort.runtime.routing.config import BanditConfig, EloConfig
from consort.runtime.routing.cost import CostModel
from consort.runtime.routing.embed import HashingEmbedder
from consort.runtime.routing.learned import LearnedModel, LearnedRouter, TrainingLeak, choose_strong, train
from consort.runtime.routing.records import QuestionRecord, Split, read_predictions, read_records
from consort.runtime.routing.store import FeedbackEvent, RoutingStore
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions
from tests.unit.conftest import make_loop

MEMBERS = ["a", "b", "c"]


def _unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def _pref(
    i: int, winner: str, loser: str, embedding: np.ndarray | None = None, tie: bool = False
) -> FeedbackEvent:
    return FeedbackEvent(id=i, request_id=f"r{i}", embedding=embedding, winner=winner, loser=loser, tie=tie)


# -- ELO ------------------------------------------------------------------------------------------
def test_elo_updates_match_hand_computed_values() -> None:
    # Equal ratings: expected 0.5, so a win moves each by K/2.
    a, b = elo.update(1000.0, 1000.0, 1.0, 32.0)
    assert (a, b) == (1016.0, 984.0)
    # Then b beats a: E_b = 1 / (1 + 10^(32/400)) = 0.4540781; change = 32 * (1 − 0.4540781) = 17.469502.
    b2, a2 = elo.update(b, a, 1.0, 32.0)
    assert b2 == pytest.approx(1001.469502, abs=1e-5)
    assert a2 == pytest.approx(998.530498, abs=1e-5)
    # A tie between unequal ratings pulls them together: 400 apart, E = 1/(1+10) = 0.0909091.
    low, high = elo.update(800.0, 1200.0, 0.5, 10.0)
    assert low == pytest.approx(800 + 10 * (0.5 - 1 / 11), abs=1e-9)
    assert high == pytest.approx(1200 - 10 * (0.5 - 1 / 11), abs=1e-9)


def test_global_elo_replays_preferences_and_scores_in_order() -> None:
    router = elo.EloRouter(MEMBERS, EloConfig(k_factor=32.0, global_share=1.0, fit="online"))
    router.observe([_pref(1, "a", "b")])
    assert router.global_ratings == {"a": 1016.0, "b": 984.0, "c": 1000.0}
    # A score of 1 for c is c beating a (E = 1/(1+10^(16/400))), then c beating b.
    router.observe([FeedbackEvent(id=2, request_id="r2", embedding=None, member="c", score=1.0)])
    e_ca = 1 / (1 + 10 ** (16 / 400))
    c1 = 1000 + 32 * (1 - e_ca)
    e_cb = 1 / (1 + 10 ** ((984 - c1) / 400))
    assert router.global_ratings["a"] == pytest.approx(1016 - 32 * (1 - e_ca))
    assert router.global_ratings["c"] == pytest.approx(c1 + 32 * (1 - e_cb))
    assert router.global_ratings["b"] == pytest.approx(984 - 32 * (1 - e_cb))
    scores = router.scores(None)
    assert max(scores, key=scores.__getitem__) == "c"


def test_local_elo_sees_only_the_neighbours() -> None:
    near_x, near_y = _unit(1, 0, 0), _unit(0, 1, 0)
    events = [_pref(i, "a", "b", _unit(1, 0.05 * i, 0)) for i in range(1, 4)]  # near x: a beats b
    events += [
        _pref(i, "b", "a", _unit(0.05 * i, 1, 0)) for i in range(4, 9)
    ]  # near y: b beats a (more often)
    router = elo.EloRouter(["a", "b"], EloConfig(neighbours=3, global_share=0.0, fit="online"))
    router.observe(events)
    assert [e.id for e in router.neighbours(near_x)] == [1, 2, 3]
    assert {e.id for e in router.neighbours(near_y)} <= {4, 5, 6, 7, 8}
    # Globally b won more, but near x only a's wins count.
    assert router.global_ratings["b"] > router.global_ratings["a"]
    local = router.local_ratings(near_x)
    assert local == elo.replay(events[:3], ["a", "b"], 1000.0, 32.0)
    assert local["a"] > local["b"]
    assert router.choose(router.scores(near_x)) == ["a"]
    assert router.choose(router.scores(near_y)) == ["b"]
    # P = 1: the global ratings alone decide, everywhere.
    globally = elo.EloRouter(["a", "b"], EloConfig(neighbours=3, global_share=1.0, fit="online"))
    globally.observe(events)
    assert globally.choose(globally.scores(near_x)) == ["b"]


def test_elo_mixes_global_and_local_with_p() -> None:
    router = elo.EloRouter(["a", "b"], EloConfig(neighbours=1, global_share=0.25, fit="online"))
    events = [
        _pref(1, "a", "b", _unit(1, 0)),
        _pref(2, "b", "a", _unit(0, 1)),
        _pref(3, "b", "a", _unit(0, 1)),
    ]
    router.observe(events)
    query = _unit(1, 0.01)
    local = elo.replay(events[:1], ["a", "b"], 1000.0, 32.0)
    combined = router.combined_ratings(query)
    for m in ("a", "b"):
        assert combined[m] == pytest.approx(0.25 * router.global_ratings[m] + 0.75 * local[m])


def test_bradley_terry_fit_matches_hand_computed_ratings_in_any_order() -> None:
    # a beats b 3 times of 4, no prior: strengths in ratio 3, i.e. 400·log10(3) ELO points apart,
    # centred on the initial rating.
    found = [("a", "b", 1.0)] * 3 + [("b", "a", 1.0)]
    ratings = elo.fit_ratings(found, ["a", "b"], 1000.0, prior_ties=0.0)
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert ratings["a"] + ratings["b"] == pytest.approx(2000.0, abs=1e-6)
    # One virtual tie per pair: a has 3.5 of 5 games, ratio 7/3; a tie is half a win each way.
    ratings = elo.fit_ratings([*found, ("a", "b", 0.5)], ["a", "b"], 1000.0, prior_ties=1.0)
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(4 / 2), abs=1e-6)
    # Three members, shuffled: the same ratings; a member with no comparison stays at the initial rating.
    three = [("a", "b", 1.0), ("b", "c", 1.0), ("a", "c", 0.5), ("c", "a", 0.0), ("b", "a", 1.0)] * 3
    reordered = elo.fit_ratings(three[::-1], ["a", "b", "c", "d"], 1000.0)
    for member, rating in elo.fit_ratings(three, ["a", "b", "c", "d"], 1000.0).items():
        assert reordered[member] == pytest.approx(rating, abs=1e-6)
    # d has only the virtual ties: finite, and between the best and the worst member.
    assert min(reordered["a"], reordered["c"]) < reordered["d"] < reordered["b"]


def test_bradley_terry_ratings_do_not_forget_what_online_elo_does() -> None:
    """b is better over all the feedback, but a won the last few comparisons: online ELO follows the
    recent ones, the fit of all of them does not."""
    here = _unit(1, 0)
    events = [_pref(i, "b", "a", here) for i in range(1, 31)] + [_pref(i, "a", "b", here) for i in range(31, 41)]
    online = elo.EloRouter(["a", "b"], EloConfig(global_share=1.0, fit="online"))
    fitted = elo.EloRouter(["a", "b"], EloConfig(global_share=1.0))
    for router in (online, fitted):
        router.observe(events)
    assert online.choose(online.scores(None)) == ["a"]
    assert fitted.choose(fitted.scores(None)) == ["b"]
    # Feedback folded in across several calls is the fit of all of it at once.
    batched = elo.EloRouter(["a", "b"], EloConfig(global_share=1.0))
    for start in range(0, len(events), 7):
        batched.observe(events[start : start + 7])
    everything = [c for e in events for c in elo.comparisons(e, ["a", "b"])]
    expected = elo.fit_ratings(everything, ["a", "b"], 1000.0)
    for member in ("a", "b"):
        assert batched.global_ratings[member] == pytest.approx(expected[member], abs=1e-9)
    # Local ratings are fitted the same way, from the neighbours' comparisons only.
    nearest = fitted.neighbours(here)
    assert len(nearest) == EloConfig().neighbours
    assert fitted.local_ratings(here) == elo.fit_ratings(
        [c for e in nearest for c in elo.comparisons(e, ["a", "b"])], ["a", "b"], 1000.0
    )


# -- learned (RouteLLM) ----------------------------------------------------------------------------
def _records(n: int = 80) -> list[QuestionRecord]:
    """Questions about cats the cheap member gets right, about physics only the strong one does."""
    out = []
    for i in range(n):
        if i % 2:
            out.append(
                QuestionRecord("t", f"q{i}", f"what do cats eat number {i}", {"cheap": True, "strong": True})
            )
        else:
            out.append(
                QuestionRecord(
                    "t", f"q{i}", f"quantum physics energy level {i}", {"cheap": False, "strong": True}
                )
            )
    return out


def test_training_data_never_includes_test_ids() -> None:
    split = Split(test_share=0.5)
    records = _records()
    test_keys = {r.key for r in split.test(records)}
    assert test_keys and len(test_keys) < len(records)
    model = train(split.dev(records), "cheap", "strong", HashingEmbedder(), "hashing", split)
    assert model.keys and not set(model.keys) & test_keys
    with pytest.raises(TrainingLeak):
        train(records, "cheap", "strong", HashingEmbedder(), "hashing", split)


def test_alpha_zero_and_one_send_everything_to_cheap_and_strong(tmp_path: Path) -> None:
    split = Split(test_share=0.5)
    model = train(split.dev(_records()), "cheap", "strong", HashingEmbedder(), "hashing", split)
    model = LearnedModel.load(model.save(tmp_path / "router.npz"))
    queries = HashingEmbedder().embed([r.question for r in split.test(_records())])
    for alpha, expected in ((0.0, "cheap"), (1.0, "strong")):
        router = LearnedRouter(["cheap", "strong"], model, alpha)
        assert {router.choose(router.scores(q))[0] for q in queries} == {expected}
    # Between, the physics questions (only the strong member right) go to the strong member first.
    router = LearnedRouter(["cheap", "strong"], model, 0.4)
    chosen = {
        r.question: router.choose(router.scores(q))[0]
        for r, q in zip(split.test(_records()), queries, strict=True)
    }
    assert all(m == "strong" for q, m in chosen.items() if "physics" in q)
    assert all(m == "cheap" for q, m in chosen.items() if "cats" in q)
    assert choose_strong(0.7, 0.3) and not choose_strong(0.69, 0.3)


def test_learned_router_refuses_members_outside_the_ensemble(tmp_path: Path) -> None:
    split = Split()
    model = train(split.dev(_records()), "cheap", "strong", HashingEmbedder(), "hashing", split)
    with pytest.raises(ConfigError, match="strong"):
        LearnedRouter(["cheap", "other"], model, 0.5)
    with pytest.raises(ConfigError, match="does not exist"):
        LearnedModel.load(tmp_path / "missing.npz")


def test_prediction_records_merge_members(tmp_path: Path) -> None:
    for member, right in (("x", True), ("y", False)):
        folder = tmp_path / member / "mc"
        folder.mkdir(parents=True)
        rows = [
            {"task": "sciq", "id": "validation/0", "question": "Q?", "members": {member: {"correct": right}}}
        ]
        (folder / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records = read_predictions(sorted(tmp_path.glob("*/mc/predictions.jsonl")))
    assert records["sciq/validation/0"].correct == {"x": True, "y": False}


# -- bandit, random, cost ------------------------------------------------------------------------
def test_bandit_learns_the_rewarded_member_per_region_and_explores() -> None:
    router = BanditRouter(["a", "b"], BanditConfig(exploration=0.1))
    x, y = _unit(1, 0), _unit(0, 1)
    events = []
    for i in range(20):
        events.append(FeedbackEvent(id=2 * i, request_id="r", embedding=x, member="a", score=1.0))
        events.append(FeedbackEvent(id=2 * i + 1, request_id="r", embedding=x, member="b", score=0.0))
        events.append(FeedbackEvent(id=100 + i, request_id="r", embedding=y, winner="b", loser="a"))
    router.observe(events)
    assert router.choose(router.scores(x)) == ["a"]
    assert router.choose(router.scores(y)) == ["b"]
    # Exploration: a member never tried has the widest confidence bound.
    fresh = BanditRouter(["a", "b"], BanditConfig(exploration=1.0))
    fresh.observe(
        [FeedbackEvent(id=i, request_id="r", embedding=x, member="a", score=0.6) for i in range(10)]
    )
    estimate = fresh.estimate(x)
    assert estimate["b"][1] > estimate["a"][1]
    assert fresh.choose(fresh.scores(x)) == ["b"]


def test_random_router_is_uniform() -> None:
    router = RandomRouter(MEMBERS, seed=0)
    counts = dict.fromkeys(MEMBERS, 0)
    for _ in range(3000):
        counts[router.choose(router.scores(None))[0]] += 1
    assert all(abs(c - 1000) < 100 for c in counts.values())


def test_cost_model_picks_the_cheapest_member_expected_to_be_right() -> None:
    router = RandomRouter(MEMBERS)
    costs = CostModel({"a": 1.5, "b": 0.5, "c": 0.1})
    scores = {"a": 0.9, "b": 0.8, "c": 0.3}
    assert router.choose(scores, costs=costs, min_score=0.7) == ["b"]
    assert router.choose(scores, costs=costs, min_score=0.95) == ["a"]  # none reaches it: the best
    assert router.choose(scores, costs=costs, cost_weight=0.5) == ["b"]  # 0.9−0.5 < 0.8−0.17
    assert router.choose(scores, top=2) == ["a", "b"]
    assert costs.request("a", 10) == 15.0


# -- the store ---------------------------------------------------------------------------------------
def test_store_is_shared_by_two_connections_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "routing.sqlite"
    first, second = RoutingStore(path), RoutingStore(path)
    assert first.journal_mode() == "wal"
    first.record_decision("req-1", "elo", ["a"], _unit(1, 0))
    second.add_preference("req-1", "b", "a")  # the decision written by the other connection is seen
    events = first.feedback_since(0)
    assert [(e.winner, e.loser) for e in events] == [("b", "a")]
    np.testing.assert_allclose(events[0].embedding, _unit(1, 0))
    first.close()
    second.close()
    reopened = RoutingStore(path)
    assert reopened.feedback_count() == 1 and reopened.decision("req-1").members == ["a"]
    with pytest.raises(RoutingDecisionNotFound):
        reopened.add_score("nope", "a", 1.0)
    with pytest.raises(InvalidRequest):
        reopened.add_score("req-1", "a", 1.5)
    assert reopened.feedback_count() == 1


def _writer(path: str, worker: int, count: int) -> None:
    store = RoutingStore(path)
    for i in range(count):
        store.record_decision(f"w{worker}-{i}", "elo", ["a"], None)
        store.add_score(f"w{worker}-{i}", "a", 1.0)


def test_store_takes_concurrent_writers_in_several_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "routing.sqlite")
    RoutingStore(path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_writer, args=(path, w, 60)) for w in range(3)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    store = RoutingStore(path)
    assert store.decision_count() == 180 and store.feedback_count() == 180
    ids = [e.id for e in store.feedback_since(0)]
    assert ids == sorted(ids) and len(set(ids)) == 180


# -- feedback bodies --------------------------------------------------------------------------------
def _feedback_config(tmp_path: Path) -> Any:
    return parse_config(
        {
            "members": [{"name": "a", "model": "x"}, {"name": "b", "model": "y"}],
            "route": {"store": str(tmp_path / "s.sqlite")},
        }
    )


def test_feedback_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    service = FeedbackService(_feedback_config(tmp_path))
    assert service.store is not None
    service.store.record_decision("chatcmpl-1", "elo", ["a"], None)
    with pytest.raises(ValueError):
        FeedbackRequest.model_validate({"request_id": "chatcmpl-1"})  # neither score nor preference
    with pytest.raises(ValueError):
        FeedbackRequest.model_validate({"request_id": "chatcmpl-1", "score": "1"})
    with pytest.raises(InvalidRequest, match="not a member"):
        service.submit(
            FeedbackRequest.model_validate(
                {"request_id": "chatcmpl-1", "preference": {"winner": "z", "loser": "a"}}
            )
        )
    with pytest.raises(RoutingDecisionNotFound):
        service.submit(FeedbackRequest.model_validate({"request_id": "other", "score": 1.0}))
    assert service.store.feedback_count() == 0
    taken = service.submit(FeedbackRequest.model_validate({"request_id": "chatcmpl-1", "score": 0.0}))
    assert taken.id == 1
    assert service.store.feedback_since(0)[0].member == "a"


# -- the strategy, in process -------------------------------------------------------------------------
PAIR = [("small", "smollm2-135m-instruct"), ("gem", "gemma3-270m")]


def test_route_strategy_answers_with_the_chosen_member_and_learns_from_feedback(
    tiny_models: dict[str, Any], tmp_path: Path
) -> None:
    store = tmp_path / "route.sqlite"
    loop = make_loop(
        tiny_models,
        PAIR,
        strategy="route",
        route={"router": "elo", "store": str(store), "embedder": "hashing", "elo": {"global_share": 1.0}},
    )
    params = SamplingParams(max_tokens=3, temperature=0.0)
    prompt = Prompt(text="The capital of France is")
    first = loop.generate([prompt], params, RequestOptions(request_id="req-1"))[0]
    route = next(d["route"] for d in first.diagnostics if "route" in d)
    assert route["members"] == ["small"]  # a tie goes to the member listed first
    assert route["id"] == "req-1" and route["router"] == "elo"
    assert first.completion_tokens == 3
    RoutingStore(store).add_preference("req-1", "gem", "small")  # as /v1/feedback would, from any process
    second = loop.generate([prompt], params, RequestOptions(request_id="req-2"))[0]
    assert next(d["route"] for d in second.diagnostics if "route" in d)["members"] == ["gem"]
    # A fresh process (a restarted replica) reads the same state.
    again = make_loop(
        tiny_models,
        PAIR,
        strategy="route",
        route={"router": "elo", "store": str(store), "embedder": "hashing", "elo": {"global_share": 1.0}},
    )
    third = again.generate([prompt], params, RequestOptions(request_id="req-3"))[0]
    assert next(d["route"] for d in third.diagnostics if "route" in d)["members"] == ["gem"]


def test_route_strategy_config_errors_are_loud(tiny_models: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"route\.store"):
        make_loop(tiny_models, PAIR, strategy="route", route={"router": "elo", "embedder": "hashing"})
    with pytest.raises(ConfigError, match=r"learned\.path"):
        make_loop(tiny_models, PAIR, strategy="route", route={"router": "learned", "embedder": "hashing"})
    with pytest.raises(ConfigError, match="costs"):
        make_loop(tiny_models, PAIR, strategy="route", route={"router": "random", "costs": {"zz": 1.0}})


def test_route_top_two_runs_the_base_strategy(tiny_models: dict[str, Any]) -> None:
    loop = make_loop(
        tiny_models, PAIR, strategy="route", route={"router": "random", "top": 2, "base": "mean", "seed": 1}
    )
    out = loop.generate([Prompt(text="Hello")], SamplingParams(max_tokens=2, temperature=0.0))[0]
    route = next(d["route"] for d in out.diagnostics if "route" in d)
    assert sorted(route["members"]) == ["gem", "small"]
    assert not math.isnan(out.completion_tokens)


def test_route_works_with_the_default_config(tiny_models: dict[str, Any]) -> None:
    # The default router is the random baseline: no store, no embedding model, no training.
    loop = make_loop(tiny_models, PAIR, strategy="route")
    outs = loop.generate([Prompt(text="Hi")] * 6, SamplingParams(max_tokens=1, temperature=0.0))
    chosen = {tuple(next(d["route"] for d in o.diagnostics if "route" in d)["members"]) for o in outs}
    assert chosen <= {("small",), ("gem",)}
    assert loop.core.strategy("route").routing.store is None  # type: ignore[attr-defined]


def test_route_train_cli_writes_a_router_from_dev_questions_only(tmp_path: Path, capsys: Any) -> None:
    from consort.cli import main

    for member in ("cheap", "strong"):
        folder = tmp_path / "records" / member / "mc"
        folder.mkdir(parents=True)
        rows = [
            {
                "task": r.task,
                "id": r.id,
                "question": r.question,
                "members": {member: {"correct": r.correct[member]}},
            }
            for r in _records()
        ]
        (folder / "predictions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "router.npz"
    code = main(
        [
            "route",
            "train",
            "--records",
            str(tmp_path / "records"),
            "--group",
            "mc",
            "--cheap",
            "cheap",
            "--strong",
            "strong",
            "--out",
            str(out),
            "--embedder",
            "hashing",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    model = LearnedModel.load(out)
    split = Split()
    assert summary["dev_questions"] == len(model.keys) == len(split.dev(_records()))
    assert summary["test_questions_held_out"] == len(split.test(_records()))
    assert not any(split.is_test(k) for k in model.keys)
    assert (model.cheap, model.strong, model.embedder) == ("cheap", "strong", "hashing")
    # The file is what a config names: the learned router serves from it.
    config = parse_config(
        {
            "members": [{"name": "cheap", "model": "x"}, {"name": "strong", "model": "y"}],
            "strategy": "route",
            "route": {
                "router": "learned",
                "embedder": "hashing",
                "learned": {"path": str(out), "alpha": 1.0},
            },
        }
    )
    from consort.runtime.routing.strategy import Routing

    routing = Routing(config.route, ["cheap", "strong"])
    assert routing.decide("quantum physics energy level")["members"] == ["strong"]


def test_a_member_folder_contributes_only_its_member(tmp_path: Path) -> None:
    """A folder linked to a pair's run (both members alone in one file) gives the named member only,
    so it never overwrites the other member's own records of the same questions."""
    rows = {
        "x": {"x": {"correct": True}},
        "pair": {"x": {"correct": False}, "y": {"correct": True}},
    }
    for folder_name, members in rows.items():
        folder = tmp_path / ("y" if folder_name == "pair" else folder_name) / "mc"
        folder.mkdir(parents=True)
        row = {"task": "sciq", "id": "0", "question": "Q?", "members": members}
        (folder / "predictions.jsonl").write_text(json.dumps(row) + "\n")
    assert read_records(tmp_path, "mc")["sciq/0"].correct == {"x": True, "y": True}
    (tmp_path / "z" / "mc").mkdir(parents=True)
    (tmp_path / "z" / "mc" / "predictions.jsonl").write_text("")  # a run that has not answered yet
    assert set(read_records(tmp_path, "mc")["sciq/0"].correct) == {"x", "y"}
    (tmp_path / "z" / "mc" / "predictions.jsonl").write_text(
        json.dumps({"task": "sciq", "id": "0", "question": "Q?", "members": {"x": {"correct": True}}}) + "\n"
    )
    with pytest.raises(InvalidRequest, match="'z'"):
        read_records(tmp_path, "mc")
