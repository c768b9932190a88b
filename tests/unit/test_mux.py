"""SLM-MUX: the member whose own samples agree most, its majority answer; ties by dev accuracy, then order."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch

from consort.runtime.errors import InvalidRequest
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions
from consort.runtime.vote import select_member
from tests.unit.conftest import make_loop


class FakeEmbedder:
    """Fixed vectors per text, to test the similarity rule without a model."""

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.tensor([self.vectors[t] for t in texts]), dim=-1)


class NoEmbedder:
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        raise AssertionError("the embedder must not be called")


def test_the_most_self_consistent_member_wins_even_against_a_larger_crowd() -> None:
    samples = {
        # a's answers disagree; b agrees with itself on 12 (3 of 3), though a says 7 twice overall.
        "a": ["The answer is 7.", "The answer is 9.", "The answer is 7 or so", "It is 5."],
        "b": ["#### 12", "So the answer is 12.", "12"],
    }
    result = select_member(samples, kind="number", embedder=NoEmbedder())
    assert (result.member, result.answer, result.index, result.method) == ("b", "12", 0, "majority")
    assert result.tie_break == "none"
    agreement = {m.member: m.agreement for m in result.members}
    assert agreement == {"a": pytest.approx(2 / 4), "b": pytest.approx(1.0)}


def test_unextractable_samples_count_against_their_member() -> None:
    samples = {"a": ["7", "no idea", "no idea"], "b": ["8", "8", "9"]}
    result = select_member(samples, kind="number")
    assert result.member == "b" and result.answer == "8"
    assert [m.agreement for m in result.members] == [pytest.approx(1 / 3), pytest.approx(2 / 3)]


def test_a_tie_in_agreement_goes_to_the_higher_dev_accuracy() -> None:
    samples = {"a": ["3", "3", "4"], "b": ["5", "5", "6"]}
    result = select_member(samples, kind="number", accuracy={"a": 0.31, "b": 0.42})
    assert (result.member, result.answer, result.tie_break) == ("b", "5", "accuracy")
    result = select_member(samples, kind="number", accuracy={"a": 0.5, "b": 0.42})
    assert (result.member, result.answer, result.tie_break) == ("a", "3", "accuracy")


def test_a_tie_in_agreement_and_accuracy_goes_to_the_first_member() -> None:
    samples = {"a": ["3", "4"], "b": ["5", "6"]}
    assert select_member(samples, kind="number").member == "a"
    result = select_member(samples, kind="number", accuracy={"a": 0.4, "b": 0.4})
    assert (result.member, result.answer, result.tie_break) == ("a", "3", "order")
    # A member without a known accuracy ranks below one with it.
    assert select_member(samples, kind="number", accuracy={"b": 0.1}).member == "b"


def test_a_tie_inside_a_member_goes_to_its_earliest_answer() -> None:
    result = select_member({"a": ["no", "4", "3", "3", "4"]}, kind="number")
    assert (result.answer, result.index) == ("4", 1)


def test_choice_letters_and_spans() -> None:
    result = select_member({"a": ["B", "(C)", "c."], "b": ["A", "D", "B"]}, kind="choice", n_choices=4)
    assert (result.member, result.answer, result.index) == ("a", "C", 1)
    result = select_member({"a": ["Paris", " paris."], "b": ["Lyon", "Nice"]}, kind="span")
    assert (result.member, result.answer) == ("a", "paris")


def test_free_text_agreement_is_mean_pairwise_similarity() -> None:
    vectors = {"x1": [1.0, 0.0], "x2": [0.9, 0.1], "y1": [1.0, 0.0], "y2": [0.0, 1.0], "y3": [0.7, 0.7]}
    result = select_member(
        {"y": ["y1", "y2", "y3"], "x": ["x1", "x2"]}, kind="free", embedder=FakeEmbedder(vectors)
    )
    assert result.method == "similarity" and result.member == "x"
    assert result.members[1].agreement == pytest.approx(
        float(
            torch.nn.functional.cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.1]), dim=0)
        ),
        abs=1e-6,
    )
    assert result.members[0].index == 2  # y's most central sample


def test_nothing_extractable_anywhere_falls_to_similarity_and_says_so() -> None:
    vectors = {"p": [1.0, 0.0], "q": [1.0, 0.0], "r": [1.0, 0.0], "s": [0.0, 1.0]}
    result = select_member({"a": ["r", "s"], "b": ["p", "q"]}, kind="number", embedder=FakeEmbedder(vectors))
    assert (result.method, result.member, result.answer) == ("similarity", "b", "p")


def test_bad_calls_are_loud() -> None:
    with pytest.raises(InvalidRequest):
        select_member({}, kind="number")
    with pytest.raises(InvalidRequest):
        select_member({"a": []}, kind="number")
    with pytest.raises(InvalidRequest, match="n_choices"):
        select_member({"a": ["B"]}, kind="choice")
    with pytest.raises(InvalidRequest, match="dev accuracy"):
        select_member({"a": ["1"]}, kind="number", accuracy={"zz": 0.3})


# --- the strategy, in process on tiny members ---------------------------------------------------


@pytest.fixture(scope="module")
def pair(tiny_models: dict[str, tuple[Any, Any]]) -> Any:
    return make_loop(tiny_models, [("a", "smollm2-135m-instruct"), ("b", "gemma3-270m")], strategy="mean")


PARAMS = SamplingParams(temperature=0.9, max_tokens=3, seed=5, ignore_eos=True)


def test_mux_samples_k_per_member_and_reports_every_token(pair: Any) -> None:
    options = RequestOptions(strategy="mux", vote_samples=2, vote_kind="span", member_accuracy=[0.2, 0.6])
    (answer,) = pair.generate([Prompt(text="The answer is")], PARAMS, options)
    (diagnostic,) = answer.diagnostics
    mux = diagnostic["mux"]
    assert [m["member"] for m in mux["members"]] == ["a", "b"]
    assert all(m["samples"] == 2 for m in mux["members"])
    assert answer.completion_tokens == 2 * 2 * PARAMS.max_tokens  # n-style: every sampled token
    assert answer.text in diagnostic["answers"]
    chosen = next(m for m in mux["members"] if m["member"] == mux["member"])
    assert chosen["agreement"] == max(m["agreement"] for m in mux["members"])
    assert not pair.core.has_work and not pair.core.votes


def test_mux_refuses_what_it_cannot_honour(pair: Any) -> None:
    prompt = Prompt(text="Hi")
    with pytest.raises(InvalidRequest, match="member_accuracy"):
        pair.core.add(prompt, PARAMS, RequestOptions(strategy="mux", vote_kind="span", member_accuracy=[0.5]))
    with pytest.raises(InvalidRequest, match=r"\[0, 1\]"):
        pair.core.add(
            prompt, PARAMS, RequestOptions(strategy="mux", vote_kind="span", member_accuracy=[0.5, 2.0])
        )
    with pytest.raises(InvalidRequest, match="member_accuracy applies to the strategies mux"):
        pair.core.add(
            prompt, PARAMS, RequestOptions(strategy="vote", vote_kind="span", member_accuracy=[0.5, 0.5])
        )
    with pytest.raises(InvalidRequest, match="gate"):
        pair.core.add(prompt, PARAMS, RequestOptions(strategy="mux", vote_kind="span", gate=0.5))
    with pytest.raises(InvalidRequest, match="number of choices"):
        pair.core.add(prompt, PARAMS, RequestOptions(strategy="mux", vote_kind="choice"))
    assert not pair.core.has_work


def test_mux_occupies_k_sequences_per_member(pair: Any) -> None:
    core = pair.core
    assert core.sequences_needed(RequestOptions(strategy="mux", vote_samples=4)) == 8
    assert core.sequences_needed(RequestOptions(strategy="mux", vote_samples=4, weights=[1.0, 0.0])) == 4
    assert core.sequences_needed(RequestOptions(strategy="mux", cot_branches=3)) == 6
    assert core.sequences_needed(RequestOptions(strategy="mux")) == 2 * core.config.mux.samples


@pytest.mark.parametrize("strategy", ["mux", "debate", "route"])
def test_answer_level_strategies_that_do_not_gate_their_answers_refuse_a_gate(pair, strategy: str) -> None:
    """One check (vote_groups.check_options) for every answer-level strategy; vote passes a gate on."""
    with pytest.raises(InvalidRequest, match=f"gate applies to .*vote.*, not '{strategy}'"):
        pair.core.add(Prompt(text="Q: 2+2?\nA:"), PARAMS, RequestOptions(strategy=strategy, vote_kind="span", gate=0.5))
