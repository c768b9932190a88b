"""The eval job takes its strategies from the registry: one registered from a test module is accepted
by the job's arguments and evaluated like the built-in ones (scored on multiple choice, generated on
generation tasks), and an answer-level one answers multiple choice by letters, as `vote` can."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from consort.runtime import fusion
from consort.runtime.errors import ConfigError
from consort.runtime.evaluation import GenerationQuestion, MultipleChoiceQuestion, get_task, job, questions
from consort.runtime.evaluation.backend import LocalBackend
from consort.runtime.evaluation.mc_tasks import letter_prompt
from consort.runtime.fusion.base import Decision, Strategy, WorkFlags, single_member
from consort.runtime.types import SeqResult
from consort.runtime.vote_groups import VoteStrategy
from tests.unit.conftest import ALIASES, TINY_PAIR_CONFIG, make_loop

SMOL, GEMMA = ALIASES


class FirstMemberStrategy(Strategy):
    """The first member alone: a throwaway token-level strategy, defined here and nowhere else."""

    name = "first-member-test"

    def first(self, seq) -> dict[str, WorkFlags]:
        return {self.ctx.names[0]: WorkFlags()}

    def decide(self, seq, results: dict[str, SeqResult], inverted) -> Decision:
        first = self.ctx.names[0]
        return single_member(self.ctx, first, results[first], seq.forced[0] if seq.forced else None)


class VoteCopyStrategy(VoteStrategy):
    """`vote` under another name: a throwaway answer-level strategy."""

    name = "vote-copy-test"


@pytest.fixture
def first_member():
    with fusion.registered(FirstMemberStrategy) as name:
        yield name


@pytest.fixture
def vote_copy():
    with fusion.registered(VoteCopyStrategy) as name:
        yield name


@pytest.fixture(scope="module")
def backend(tiny_models) -> LocalBackend:
    loop = make_loop(
        tiny_models, [("smollm2", SMOL), ("gemma3", GEMMA)], strategy="mean", main="smollm2", max_batch=8
    )
    return LocalBackend(loop)


def _mc(qid: str, stem: str, choices: list[str], gold: int) -> MultipleChoiceQuestion:
    return MultipleChoiceQuestion(
        task="arc_easy",
        id=qid,
        prompt=f"{stem}\nAnswer:",
        choices=[f" {c}" for c in choices],
        gold=gold,
        letter_prompt=letter_prompt(stem, choices),
    )


MC_QUESTIONS = [
    _mc("q1", "Question: What is the capital of France?", ["Paris", "Lyon", "Marseille"], 0),
    _mc("q2", "Question: Which one is a colour?", ["table", "green"], 1),
]
GEN_QUESTIONS = [
    GenerationQuestion(
        task="triviaqa",
        id="g1",
        prompt="Question: Who wrote Hamlet?\nAnswer:",
        answers=["William Shakespeare", "Shakespeare"],
        stop=["\n", "Question:"],
        max_tokens=6,
        answer_kind="span",
    )
]


def test_the_job_accepts_a_registered_strategy_in_registry_order(first_member: str) -> None:
    args = job.parse_args(["--task", "arc_easy", "--strategies", f"{first_member},vote,members,mean"])
    assert args.strategy_names == ["mean", "vote", first_member]
    # The default is every registered strategy, the new one included.
    assert job.parse_args(["--task", "arc_easy"]).strategy_names == [*fusion.names()]
    assert job.build_parser().get_default("strategies").split(",") == fusion.names()


def test_an_unregistered_name_is_refused_with_the_registry_names() -> None:
    message = f"unknown strategy 'first-member-test'; choose from members, {', '.join(fusion.names())}"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        job.parse_args(["--task", "arc_easy", "--strategies", "mean,first-member-test"])


def test_a_registered_token_level_strategy_is_scored_on_multiple_choice(backend, first_member: str) -> None:
    timing: dict[str, float] = {}
    records = asyncio.run(
        questions.multiple_choice(
            backend,
            get_task("arc_easy"),
            MC_QUESTIONS,
            ["mean", "me", first_member],
            [0.5, 0.5],
            seed=0,
            timing=timing,
        )
    )
    # mean and me (scored as mean) come from the members' own passes, mixed offline at the text
    # level; the new strategy gets the one stepped scoring pass.
    assert set(timing) == {"smollm2 alone", "gemma3 alone", first_member}
    for record, question in zip(records, MC_QUESTIONS, strict=True):
        assert list(record["strategies"]) == ["mean", "me", first_member]
        entry = record["strategies"][first_member]
        assert set(entry) == set(record["strategies"]["mean"]) == {"answer", "pick", "correct", "scores"}
        assert record["strategies"]["me"]["note"] == "scored as its mixture, i.e. as mean"
        # The first member (the main one) alone: its scores are that member's by the echo path.
        alone = record["members"]["smollm2"]
        assert entry["scores"] == pytest.approx(alone["scores"], abs=1e-3)
        assert entry["pick"] == alone["pick"]
        assert entry["correct"] == (entry["pick"] == question.gold)


def test_a_registered_token_level_strategy_generates_on_generation_tasks(backend, first_member: str) -> None:
    (record,) = asyncio.run(
        questions.generation(backend, GEN_QUESTIONS, ["mean", first_member], [0.5, 0.5], seed=0)
    )
    entry = record["strategies"][first_member]
    assert (
        set(entry) == set(record["strategies"]["mean"]) == {"answer", "extracted", "correct", "finish_reason"}
    )
    # Greedy, the first member alone: the same answer as that member alone.
    assert entry["answer"] == record["members"]["smollm2"]["answer"]


def test_a_registered_answer_level_strategy_answers_multiple_choice_by_letters(
    backend, vote_copy: str
) -> None:
    timing: dict[str, float] = {}
    records = asyncio.run(
        questions.multiple_choice(
            backend,
            get_task("arc_easy"),
            MC_QUESTIONS,
            ["vote", vote_copy],
            [0.5, 0.5],
            seed=0,
            timing=timing,
        )
    )
    assert f"{vote_copy} (letters)" in timing  # vote itself keeps --mc-vote loglik: no generation for it
    for record in records:
        assert set(record["strategies"]["vote"]) == {"answer", "pick", "correct", "votes", "method"}
        entry = record["strategies"][vote_copy]
        assert set(entry) == {"answer", "pick", "correct", "text", "votes"}
        assert len(entry["votes"]) == backend.config.vote.samples


@pytest.fixture
def local_job_argv(tiny_local_backend: None, tmp_path: Path) -> list[str]:
    """`consort eval --local` arguments over the tiny pair (the tiny models built once, not per run)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_PAIR_CONFIG)
    return ["--local", "--config", str(config), "--task", "arc_easy", "--limit", "2", "--no-progress"]


def test_the_local_job_evaluates_a_registered_strategy(
    local_job_argv: list[str], first_member: str, tmp_path: Path, capsys
) -> None:
    """`consort eval --local` end to end."""
    argv, out = local_job_argv, tmp_path / "out"
    assert job.main([*argv, "--strategies", f"mean,{first_member}", "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        assert set(record["strategies"]) == {"mean", first_member}
        assert set(record["strategies"][first_member]) == {"answer", "pick", "correct", "scores"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategies"] == ["mean", first_member]
    assert first_member in summary["tasks"]["arc_easy"]["accuracy"]
    assert first_member in capsys.readouterr().out  # the results table


def test_the_local_job_answers_the_dev_split_when_asked(local_job_argv: list[str], tmp_path: Path) -> None:
    """`--split dev` answers the dev questions (tuning runs) and never the test slice's."""
    from consort.runtime.evaluation.registry import load_task

    argv, out = local_job_argv, tmp_path / "dev"
    assert job.main([*argv, "--strategies", "mean", "--split", "dev", "--out", str(out)]) == 0
    ids = {json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()}
    assert ids == {q.id for q in load_task("arc_easy", split="dev", limit=2)}
    assert not ids & {q.id for q in load_task("arc_easy")}
    # The same folder refuses to go on with the eval split: one folder, one split.
    assert job.main([*argv, "--strategies", "mean", "--out", str(out)]) != 0
    with pytest.raises(ConfigError, match="--calibrate"):
        job.parse_args(["--task", "arc_easy", "--split", "dev", "--calibrate"])
