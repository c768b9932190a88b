"""The OpenAI wire format: request and response bodies of /v1/models, /v1/completions, /v1/chat/completions.

Only the schema lives here (pydantic, one description per field); turning a
request into sampling parameters and deltas into responses is `deploy/convert.py`.
Fields OpenAI defines but Consort cannot honour are accepted at their neutral
value and refused otherwise (`UNSUPPORTED`), so a client never gets a silently
different answer. Ensemble options ride in the same body, as vLLM's extra fields
do (`extra_body=` in the official client).

The schema is the contract: every value these models refuse is outside their
JSON Schema and every value they admit the server accepts, cross-field rules
included (`json_schema_extra`); what depends on the ensemble (its model ids,
strategies, weights, limits) is added per replica by `served_document`.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic.json_schema import JsonDict, models_json_schema

from consort.runtime.types import VoteKind
from consort.runtime.vote_groups import CHECKED_OPTIONS, answer_strategies, strategies_reading

REF = "#/components/schemas/"
MAX_N = 16
MAX_LOGPROBS = 20
MAX_VOTE_SAMPLES = 64
MAX_TOOLS = 128
MAX_COT_BRANCHES = 20
MAX_DEBATE_ROUNDS = 8
CHOICE_LETTERS = 26  # vote kind=choice reads answers as the letters A-Z
# Seeds are 64-bit signed (as OpenAI's); choice i and the runtime's derived streams add small offsets.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

# OpenAI fields Consort recognises but cannot honour, and the one value of each it accepts: the schema
# admits only that value, and a request with another gets 400 unsupported_parameter naming the field.
UNSUPPORTED = {
    "presence_penalty": "only 0",
    "frequency_penalty": "only 0",
    "logit_bias": "only empty",
    "suffix": "only empty",
    "best_of": "only equal to n",
}

NonNegative = Annotated[float, Field(ge=0.0)]
Accuracy = Annotated[float, Field(ge=0.0, le=1.0)]
StopString = Annotated[str, Field(min_length=1)]
PromptText = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]
# A prompt as token ids (vLLM's and OpenAI's shape), in the vocabulary of the model the request names.
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = Field(description="The schema's name (accepted, not used).")
    description: str | None = Field(default=None, description="What the schema is for (accepted, not used).")
    schema_: dict[str, Any] | None = Field(
        default=None,
        alias="schema",
        description="The JSON schema the answer validates against (absent: any object).",
    )
    strict: bool | None = Field(default=None, description="Accepted; the schema is always enforced.")


def _schema_with_its_type(schema: JsonDict) -> None:
    schema.setdefault("allOf", []).append(  # type: ignore[union-attr]
        {
            "if": {"required": ["type"], "properties": {"type": {"const": "json_schema"}}},
            "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}},
            "else": {"properties": {"json_schema": {"type": "null"}}},
        }
    )


class ResponseFormat(BaseModel):
    """The format of the answer: plain text, any JSON object, or JSON valid for a schema."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_schema_with_its_type)

    type: Literal["text", "json_object", "json_schema"] = Field(
        default="text", description="text, json_object or json_schema."
    )
    json_schema: JsonSchemaFormat | None = Field(
        default=None, description="With type json_schema: the schema."
    )

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is given exactly when type is json_schema")
        return self


def _exactly_one_output(schema: JsonDict) -> None:
    given = [
        {"required": [name], "properties": {name: {"type": kind}}}
        for name, kind in (
            ("json", "object"),
            ("regex", "string"),
            ("choice", "array"),
            ("grammar", "string"),
        )
    ]
    given.append({"required": ["json_object"], "properties": {"json_object": {"const": True}}})
    schema["oneOf"] = given  # type: ignore[assignment]


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs request field: exactly one of its members."""

    model_config = ConfigDict(
        extra="forbid", strict=True, populate_by_name=True, json_schema_extra=_exactly_one_output
    )

    json_: dict[str, Any] | None = Field(default=None, alias="json", description="A JSON schema.")
    regex: str | None = Field(default=None, description="A regular expression the whole answer matches.")
    choice: list[str] | None = Field(default=None, min_length=1, description="The answer is one of these.")
    grammar: str | None = Field(default=None, description="A Lark grammar (llguidance's dialect).")
    json_object: bool | None = Field(default=None, description="true: any JSON object.")

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [
            v
            for v in (self.json_, self.regex, self.choice, self.grammar, self.json_object or None)
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs takes exactly one of json, regex, choice, grammar, json_object"
            )
        return self


class EnsembleFields(BaseModel):
    """Consort's per-request ensemble options and vLLM-style sampling extras, shared by both endpoints."""

    # OpenAI clients send fields Consort does not know (user, metadata, ...): ignore rather than fail.
    # Strict: a value must have its JSON type (no "5" or true for a number, no 1 for a boolean), as the
    # schema says. JSON has no NaN or infinity; Python's parser admits them, so refuse them here.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)

    strategy: str | None = Field(
        default=None,
        description="Ensemble strategy for this request (one of the registered strategies: mean, deepen, me, "
        "vote, mux, debate, route); not with a single member's model id.",
    )
    vote_samples: int | None = Field(
        default=None,
        ge=1,
        le=MAX_VOTE_SAMPLES,
        description="vote: how many complete answers to sample across the members; mux: how many per member.",
    )
    vote_kind: VoteKind | None = Field(
        default=None,
        description="vote, mux, debate: compare answers as number, choice, span or free text (embeddings).",
    )
    vote_choices: int | None = Field(
        default=None,
        ge=2,
        le=CHOICE_LETTERS,
        description="vote, mux, debate with kind=choice: how many options (lettered A, B, ...) the question has.",
    )
    member_accuracy: list[Accuracy] | None = Field(
        default=None,
        description="mux: each member's dev accuracy, in config order, one per member; breaks ties in agreement "
        "(higher wins). Overrides the configured mux.accuracy.",
    )
    cot_branches: int | None = Field(
        default=None,
        ge=1,
        le=MAX_COT_BRANCHES,
        description="vote, mux: answer by CoT-decoding instead of sampling: each member continues each of its "
        "cot_branches most likely first tokens greedily; vote takes each member's most confident path, mux "
        "treats the paths as the member's samples. Not with vote_samples.",
    )
    debate_rounds: int | None = Field(
        default=None,
        ge=0,
        le=MAX_DEBATE_ROUNDS,
        description="debate: rounds in which every member reads the others' answers and revises.",
    )
    weights: list[NonNegative] | None = Field(
        default=None,
        description="One non-negative weight per member, in config order, at least one positive; overrides "
        "the configured weights. Not with a single member's model id.",
        json_schema_extra={"contains": {"type": "number", "exclusiveMinimum": 0}},
    )
    gate: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="Fuse only where the main member's top probability is below this (strategies that gate: "
        "mean, deepen). Not with a single member's model id.",
    )
    top_k: int | None = Field(
        default=None, ge=0, description="Sample among the k most likely candidates (0 = all)."
    )
    ignore_eos: bool = Field(default=False, description="Keep generating past end-of-sequence (benchmarks).")
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="Not supported; only 0 is accepted.")
    frequency_penalty: float = Field(
        default=0.0, ge=0.0, le=0.0, description="Not supported; only 0 is accepted."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, max_length=0, description="Not supported; only empty is accepted."
    )
    user: str | None = Field(default=None, description="End-user id (accepted, not used).")
    response_format: ResponseFormat | None = Field(
        default=None,
        description="text, json_object, or json_schema (OpenAI's shapes): the answer is enforced to parse and "
        "validate, on whatever the ensemble samples from. An unusable schema is a 400.",
    )
    structured_outputs: StructuredOutputs | None = Field(
        default=None,
        description="vLLM's structured outputs: one of json, regex, choice, grammar, json_object.",
    )
    guided_json: dict[str, Any] | None = Field(
        default=None, description="vLLM's older name of structured_outputs.json (a JSON schema)."
    )
    guided_regex: str | None = Field(
        default=None, description="vLLM's older name of structured_outputs.regex."
    )
    guided_choice: list[str] | None = Field(
        default=None, min_length=1, description="vLLM's older name of structured_outputs.choice."
    )

    @field_validator("weights")
    @classmethod
    def _one_weight_positive(cls, weights: list[float] | None) -> list[float] | None:
        if weights is not None and not any(w > 0 for w in weights):
            raise ValueError("at least one weight must be positive")
        return weights

    @model_validator(mode="before")
    @classmethod
    def _whole_numbers(cls, data: Any) -> Any:
        """JSON Schema's integer is any number without a fraction (2.0 is one); strict pydantic wants an int."""
        if not isinstance(data, dict):
            return data
        integers = {
            name
            for name, field in cls.model_fields.items()
            if field.annotation is int or int in get_args(field.annotation)
        }
        return {
            key: int(value) if key in integers and isinstance(value, float) and value.is_integer() else value
            for key, value in data.items()
        }


class StreamOptions(BaseModel):
    """Options of a streamed response."""

    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = Field(
        default=False, description="Send a last chunk with token usage and no choices."
    )


def _best_of_documented(schema: JsonDict) -> None:
    """best_of in the schema: null, or 1 with n = 1 (the default some clients always send).

    The server also takes best_of equal to a larger n (a no-op), but JSON Schema cannot compare two
    fields, and enumerating every n multiplies the branches of the other cross-field rules past
    what schema-driven generators accept; the schema therefore admits the common subset only.
    """
    properties: Any = schema["properties"]
    properties["best_of"] = {
        "anyOf": [{"type": "integer", "const": 1}, {"type": "null"}],
        "description": properties["best_of"]["description"],
    }
    schema.setdefault("allOf", []).append(  # type: ignore[union-attr]
        {
            "if": {"required": ["best_of"], "properties": {"best_of": {"type": "integer"}}},
            "then": {"properties": {"n": {"const": 1}}},
        }
    )


class CompletionRequest(EnsembleFields):
    """POST /v1/completions."""

    model_config = ConfigDict(json_schema_extra=_best_of_documented)

    model: str = Field(description="The ensemble's name, or one member's name to use that member alone.")
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(
        description="Text to continue (not empty), a list of texts (several prompts), token ids (one prompt), "
        "or a list of token-id lists (several prompts). Token ids are in the vocabulary of the model named "
        "(a member's own; the ensemble's: its main member's, as /tokenize gives them) and are fed as they "
        "are, no special token added; members with another vocabulary read their text. Its tokens plus "
        "max_tokens must fit every member's context (400 context_length_exceeded otherwise)."
    )
    max_tokens: int | None = Field(
        default=16, ge=1, description="Most tokens to generate per choice (at most the ensemble's limit)."
    )
    temperature: float | None = Field(
        default=None, ge=0.0, description="Sampling temperature; 0 is greedy (default 1)."
    )
    top_p: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Nucleus sampling mass in (0, 1] (default 1)."
    )
    n: int = Field(default=1, ge=1, le=MAX_N, description="Choices per prompt.")
    stream: bool = Field(default=False, description="Stream chunks as server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Options of the stream.")
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Report each token's log-prob and this many alternatives.",
    )
    echo: bool = Field(default=False, description="Prepend the prompt to the completion.")
    stop: StopString | list[StopString] | None = Field(
        default=None, description="Stop strings (non-empty); the text ends before the first."
    )
    seed: int | None = Field(
        default=None, ge=SEED_MIN, le=SEED_MAX, description="Seed (64-bit); choice i uses seed + i."
    )
    suffix: str | None = Field(default=None, max_length=0, description="Not supported; only empty is accepted.")
    best_of: int | None = Field(
        default=None, description="Not supported beyond n: only null or a value equal to n is accepted."
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _whole_token_ids(cls, prompt: Any) -> Any:
        """JSON Schema's integer is any number without a fraction (2.0 is one); a token id must be an int."""

        def whole(value: Any) -> Any:
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return [whole(v) for v in value] if isinstance(value, list) else value

        return whole(prompt)

    @field_validator("best_of")
    @classmethod
    def _best_of_equals_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError(UNSUPPORTED["best_of"])
        return best_of


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"] = Field(description="Part type; only 'text' is supported.")
    text: str = Field(description="The text of the part.")


class FunctionCallIn(BaseModel):
    """A function call an assistant turn made."""

    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(description="The function called.")
    arguments: str = Field(description="Its arguments, a JSON object as text.")


class ToolCallIn(BaseModel):
    """One tool call of an earlier assistant turn."""

    model_config = ConfigDict(extra="ignore", strict=True)

    id: str = Field(description="The call's id; a tool turn answering it names it in tool_call_id.")
    type: Literal["function"] = Field(default="function", description="Always 'function'.")
    function: FunctionCallIn = Field(description="The function and its arguments.")


def _message_rules(schema: JsonDict) -> None:
    """content is required (not null) except in an assistant turn with tool calls; a tool turn names its call."""
    schema.setdefault("allOf", []).extend(  # type: ignore[union-attr]
        [
            {
                "anyOf": [
                    {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
                    {
                        "required": ["role", "tool_calls"],
                        "properties": {
                            "role": {"const": "assistant"},
                            "tool_calls": {"type": "array", "minItems": 1},
                        },
                    },
                ]
            },
            {
                "if": {"required": ["role"], "properties": {"role": {"const": "tool"}}},
                "then": {
                    "required": ["tool_call_id"],
                    "properties": {"tool_call_id": {"type": "string", "minLength": 1}},
                },
            },
        ]
    )


class ChatMessageIn(BaseModel):
    """One turn of the conversation sent by the client."""

    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_message_rules)

    role: Literal["system", "developer", "user", "assistant", "tool"] = Field(description="Who speaks.")
    content: str | list[ContentPart] | None = Field(
        default=None,
        description="The turn's text, or a list of text parts (null only for an assistant's tool calls).",
    )
    name: str | None = Field(default=None, description="Speaker name (accepted, not used).")
    tool_calls: list[ToolCallIn] | None = Field(
        default=None, description="assistant: the tool calls it made."
    )
    tool_call_id: str | None = Field(default=None, description="tool: the id of the call this turn answers.")

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessageIn:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required, except in an assistant turn with tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool turn needs the tool_call_id it answers")
        return self


class FunctionDefinition(BaseModel):
    """A function the model may call."""

    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="The function's name.")
    description: str | None = Field(default=None, description="What it does (shown to the members).")
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="JSON schema of its arguments (an object); forced calls validate against it.",
    )
    strict: bool | None = Field(default=None, description="Accepted; forced calls are always enforced.")


class ToolDefinition(BaseModel):
    """One tool: a function."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"] = Field(description="Always 'function'.")
    function: FunctionDefinition = Field(description="The function.")


class NamedFunction(BaseModel):
    """The function tool_choice names."""

    model_config = ConfigDict(extra="ignore", strict=True)

    name: str = Field(description="Its name, one of the tools'.")


class NamedToolChoice(BaseModel):
    """tool_choice naming one function: the answer is a call of it."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"] = Field(description="Always 'function'.")
    function: NamedFunction = Field(description="The function to call.")


def _top_logprobs_needs_logprobs(schema: JsonDict) -> None:
    """top_logprobs (a number, not null) needs logprobs: true."""
    schema.setdefault("allOf", []).append(  # type: ignore[union-attr]
        {
            "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
        }
    )


class ChatCompletionRequest(EnsembleFields):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(json_schema_extra=_top_logprobs_needs_logprobs)

    model: str = Field(description="The ensemble's name, or one member's name to use that member alone.")
    messages: list[ChatMessageIn] = Field(
        min_length=1,
        description="The conversation; each member renders it with its own template, and it must leave "
        "room in every member's context (400 context_length_exceeded otherwise).",
    )
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        description="Most tokens per choice (default: what the context allows, at most the ensemble's limit).",
    )
    max_completion_tokens: int | None = Field(
        default=None, ge=1, description="Newer name of max_tokens; wins when both are set."
    )
    temperature: float | None = Field(
        default=None, ge=0.0, description="Sampling temperature; 0 is greedy (default 1)."
    )
    top_p: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Nucleus sampling mass in (0, 1] (default 1)."
    )
    n: int = Field(default=1, ge=1, le=MAX_N, description="Choices.")
    stream: bool = Field(default=False, description="Stream chunks as server-sent events.")
    stream_options: StreamOptions | None = Field(default=None, description="Options of the stream.")
    logprobs: bool = Field(default=False, description="Report each token's log-prob.")
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_LOGPROBS,
        description="Alternatives reported per token (needs logprobs=true).",
    )
    stop: StopString | list[StopString] | None = Field(
        default=None, description="Stop strings (non-empty); the text ends before the first."
    )
    seed: int | None = Field(
        default=None, ge=SEED_MIN, le=SEED_MAX, description="Seed (64-bit); choice i uses seed + i."
    )
    tools: list[ToolDefinition] | None = Field(
        default=None,
        max_length=MAX_TOOLS,
        description="Functions the answer may call; rendered by the main member's chat template (or the "
        "documented fallback) and answered as tool_calls.",
    )
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description="none: no calls; auto (default with tools): the ensemble decides; required: at least one "
        "call; a named function: a call of it. required and named calls are constrained to the parameters' schema.",
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="Whether one answer may hold several calls (default true)."
    )

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_with_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return top


# -- responses -------------------------------------------------------------------------------------


class RoutingInfo(BaseModel):
    """Which member(s) answered a choice of the `route` strategy, and why."""

    index: int = Field(description="Choice index.")
    members: list[str] = Field(description="The member(s) the router chose to answer.")
    router: str = Field(description="The router that chose them: elo, learned, bandit or random.")
    scores: dict[str, float] = Field(description="The router's score of each member for this request.")


ROUTING_DESCRIPTION = "With the route strategy: which member(s) answered each choice (null otherwise)."


class Usage(BaseModel):
    """Token counts, in the main member's tokens."""

    prompt_tokens: int = Field(description="Prompt tokens (each prompt counted once, whatever n).")
    completion_tokens: int = Field(description="Generated tokens over all choices.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class ModelCard(BaseModel):
    """One entry of /v1/models."""

    id: str = Field(description="Model id to put in requests.")
    object: Literal["model"] = Field(default="model", description="Always 'model'.")
    created: int = Field(description="Unix time the replica started.")
    owned_by: str = Field(default="consort", description="Always 'consort'.")
    root: str = Field(description="What it runs: 'ensemble' or the member's model reference.")


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = Field(default="list", description="Always 'list'.")
    data: list[ModelCard] = Field(description="The ensemble first, then each member alone.")


class CompletionLogprobs(BaseModel):
    """Legacy completions log-probs: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list, description="Token texts.")
    token_logprobs: list[float | None] = Field(default_factory=list, description="Each token's log-prob.")
    top_logprobs: list[dict[str, float] | None] = Field(
        default_factory=list, description="Best alternatives per token."
    )
    text_offset: list[int] = Field(
        default_factory=list, description="Character offset of each token in the text."
    )


class CompletionChoice(BaseModel):
    """One completion (or one chunk of it when streaming)."""

    index: int = Field(description="Choice index: prompt index × n + choice.")
    text: str = Field(description="Generated text (the whole of it, or this chunk's piece).")
    logprobs: CompletionLogprobs | None = Field(default=None, description="Token log-probs when asked for.")
    finish_reason: Literal["stop", "length"] | None = Field(
        default=None, description="Why it ended; null while streaming."
    )


class CompletionResponse(BaseModel):
    """A completions response or stream chunk (same object type, as in OpenAI)."""

    id: str = Field(description="Request id, shared by every chunk.")
    object: Literal["text_completion"] = Field(
        default="text_completion", description="Always 'text_completion'."
    )
    created: int = Field(description="Unix time of the request.")
    model: str = Field(description="Model id that answered.")
    choices: list[CompletionChoice] = Field(description="The choices (in a chunk: those with news).")
    usage: Usage | None = Field(default=None, description="Token counts (last chunk only when streaming).")
    routing: list[RoutingInfo] | None = Field(default=None, description=ROUTING_DESCRIPTION)


class TopLogprob(BaseModel):
    """One alternative token."""

    token: str = Field(description="Token text.")
    logprob: float = Field(description="Its ensemble log-prob.")
    bytes: list[int] | None = Field(default=None, description="Its UTF-8 bytes.")


class ChatTokenLogprob(BaseModel):
    """One generated token with its log-prob and alternatives."""

    token: str = Field(description="Token text.")
    logprob: float = Field(description="Its ensemble log-prob.")
    bytes: list[int] | None = Field(default=None, description="Its bytes (a piece may end mid-character).")
    top_logprobs: list[TopLogprob] = Field(default_factory=list, description="The most likely alternatives.")


class ChatLogprobs(BaseModel):
    """Log-probs of a chat choice."""

    content: list[ChatTokenLogprob] | None = Field(default=None, description="One entry per generated token.")


class FunctionCallOut(BaseModel):
    """A called function and its arguments."""

    name: str = Field(description="The function's name.")
    arguments: str = Field(description="Its arguments: a JSON object, as text.")


class ToolCallOut(BaseModel):
    """One tool call of the answer."""

    id: str = Field(description="The call's id (a tool turn answering it names it).")
    type: Literal["function"] = Field(default="function", description="Always 'function'.")
    function: FunctionCallOut = Field(description="The function and its arguments.")


class FunctionCallDelta(BaseModel):
    """A piece of a streamed function call."""

    name: str | None = Field(default=None, description="The function's name (in the call's first piece).")
    arguments: str | None = Field(default=None, description="The next piece of the arguments' JSON text.")


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call; pieces with the same index make one call."""

    index: int = Field(description="Which call of the answer this piece belongs to.")
    id: str | None = Field(default=None, description="The call's id (in its first piece).")
    type: Literal["function"] | None = Field(default=None, description="'function' (in its first piece).")
    function: FunctionCallDelta = Field(description="The name or a piece of the arguments.")


class ChatMessageOut(BaseModel):
    """The assistant's answer (or, in a chunk, a piece of it)."""

    role: Literal["assistant"] | None = Field(
        default=None, description="'assistant' (first chunk only when streaming)."
    )
    content: str | None = Field(
        default=None, description="The text (null for an answer that is only tool calls)."
    )
    tool_calls: list[ToolCallOut] | None = Field(default=None, description="The tool calls of the answer.")


class ChatDelta(BaseModel):
    """In a stream chunk: the news of one choice."""

    role: Literal["assistant"] | None = Field(
        default=None, description="'assistant' (a choice's first chunk)."
    )
    content: str | None = Field(default=None, description="New text.")
    tool_calls: list[ToolCallDelta] | None = Field(default=None, description="New pieces of tool calls.")


class ChatChoice(BaseModel):
    """One chat answer."""

    index: int = Field(description="Choice index.")
    message: ChatMessageOut = Field(description="The answer.")
    logprobs: ChatLogprobs | None = Field(default=None, description="Token log-probs when asked for.")
    finish_reason: Literal["stop", "length", "tool_calls"] | None = Field(
        default=None, description="Why it ended (tool_calls: the answer is tool calls)."
    )


class ChatCompletionResponse(BaseModel):
    """A chat completion."""

    id: str = Field(description="Request id.")
    object: Literal["chat.completion"] = Field(
        default="chat.completion", description="Always 'chat.completion'."
    )
    created: int = Field(description="Unix time of the request.")
    model: str = Field(description="Model id that answered.")
    choices: list[ChatChoice] = Field(description="The answers.")
    usage: Usage = Field(description="Token counts.")
    routing: list[RoutingInfo] | None = Field(default=None, description=ROUTING_DESCRIPTION)


class ChatChunkChoice(BaseModel):
    """One choice's news in a stream chunk."""

    index: int = Field(description="Choice index.")
    delta: ChatDelta = Field(
        description="New text or tool-call pieces (and the role, in a choice's first chunk)."
    )
    logprobs: ChatLogprobs | None = Field(
        default=None, description="Log-probs of the new tokens when asked for."
    )
    finish_reason: Literal["stop", "length", "tool_calls"] | None = Field(
        default=None, description="Set in the choice's last chunk."
    )


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str = Field(description="Request id, shared by every chunk.")
    object: Literal["chat.completion.chunk"] = Field(
        default="chat.completion.chunk", description="Always 'chat.completion.chunk'."
    )
    created: int = Field(description="Unix time of the request.")
    model: str = Field(description="Model id that answered.")
    choices: list[ChatChunkChoice] = Field(description="Choices with news (empty in the usage chunk).")
    usage: Usage | None = Field(default=None, description="Token counts, in the last chunk if asked for.")
    routing: list[RoutingInfo] | None = Field(default=None, description=ROUTING_DESCRIPTION)


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str = Field(description="What went wrong and what to do.")
    type: str = Field(description="invalid_request_error, not_found_error, rate_limit_error, ...")
    param: str | None = Field(default=None, description="The request field at fault, when one is.")
    code: str | int | None = Field(default=None, description="A machine-readable code, when one applies.")


class ErrorResponse(BaseModel):
    """The body of every error response and of an error event in a stream."""

    error: ErrorDetail = Field(description="The error.")


# -- the served OpenAPI document ---------------------------------------------------------------------


def _typed(prop: dict[str, Any], kind: str) -> dict[str, Any]:
    """The branch of a (possibly nullable) property's schema that has JSON type `kind`."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") == kind:
            return branch  # type: ignore[no-any-return]
    raise KeyError(f"no {kind} branch in {prop}")


def _absent_or_null(*fields: str) -> dict[str, Any]:
    return {"properties": {f: {"type": "null"} for f in fields}}


def event_stream(chunk: str) -> dict[str, Any]:
    """The schema of one server-sent event of a stream of `chunk` objects (OpenAPI 3.1: `schema` is per event).

    Its data is a JSON `chunk`, or an ErrorResponse if the stream fails after it began, and the last
    event's data is `[DONE]`.
    """
    payload = {"anyOf": [{"$ref": f"{REF}{chunk}"}, {"$ref": f"{REF}ErrorResponse"}]}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "if": {"const": "[DONE]"},
                "else": {"contentMediaType": "application/json", "contentSchema": payload},
            }
        },
    }


def with_components(document: dict[str, Any], *models: type[BaseModel]) -> dict[str, Any]:
    """The document with `models` (and what they refer to) among its component schemas."""
    doc = copy.deepcopy(document)
    _, definitions = models_json_schema([(m, "serialization") for m in models], ref_template=REF + "{model}")
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in definitions.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    return doc


def without_422(document: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents its 422 validation error; the server answers 400 with an ErrorResponse instead."""
    doc = copy.deepcopy(document)
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return doc


def served_document(
    document: dict[str, Any],
    *,
    ensemble: str,
    members: list[str],
    strategies: list[str],
    gated: list[str],
    default_strategy: str,
    vote_kind: str,
    max_tokens_limit: int,
    max_queue: int,
    vocab_sizes: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The OpenAPI document of one ensemble: the request schemas narrowed to what its replica accepts.

    The static schema cannot know the ensemble: which model ids exist, how many weights it takes,
    which strategies it runs (and which of them gate), its max_tokens limit, the vocabularies its token-id
    prompts are in (`vocab_sizes`: model id to size; the ensemble's is its main member's). Here they become
    JSON Schema, cross-field rules included, so that a request the document admits is one the
    server accepts (short of a prompt too long for a member's context, which only its tokenizer knows).
    """
    doc = copy.deepcopy(document)
    schemas = doc["components"]["schemas"]
    for name, limited in (
        ("CompletionRequest", ("max_tokens",)),
        ("ChatCompletionRequest", ("max_tokens", "max_completion_tokens")),
    ):
        schema = schemas[name]
        props = schema["properties"]
        props["model"]["enum"] = [ensemble, *members]
        _typed(props["strategy"], "string")["enum"] = list(strategies)
        weights = _typed(props["weights"], "array")
        weights["minItems"] = weights["maxItems"] = len(members)
        for field in limited:
            _typed(props[field], "integer")["maximum"] = max_tokens_limit
        # One request's sequences must fit the admission queue (prompts × n × vote_samples: a product,
        # which JSON Schema cannot bound; each factor alone is bounded here, the rest is a 400).
        props["n"]["maximum"] = min(props["n"]["maximum"], max_queue)
        samples = _typed(props["vote_samples"], "integer")
        samples["maximum"] = min(samples["maximum"], max_queue)
        rules: list[dict[str, Any]] = schema.setdefault("allOf", [])
        if name == "CompletionRequest":
            _prompt_limits(props["prompt"], max_queue, vocab_sizes or {})
        # A member's own id is that member alone: no strategy, weights or gate.
        rules.append(
            {
                "if": {"required": ["model"], "properties": {"model": {"enum": members}}},
                "then": _absent_or_null("strategy", "weights", "gate"),
            }
        )
        # A gate needs a strategy that gates.
        gate_given = {"required": ["gate"], "properties": {"gate": {"type": "number"}}}
        if default_strategy in gated:
            gate_then = {"properties": {"strategy": {"enum": [*gated, None]}}}
        else:
            gate_then = {"required": ["strategy"], "properties": {"strategy": {"enum": gated}}}
        rules.append({"if": gate_given, "then": gate_then})
        # Voting on choice letters needs the number of choices.
        comparing = [s for s in answer_strategies() if s in strategies]
        voting = _strategy_in(comparing, default_strategy)
        kind = {"properties": {"vote_kind": {"enum": ["choice", *([None] if vote_kind == "choice" else [])]}}}
        if vote_kind != "choice":
            kind["required"] = ["vote_kind"]
        rules.append(
            {
                "if": {"allOf": [voting, kind]},
                "then": {"required": ["vote_choices"], "properties": {"vote_choices": {"type": "integer"}}},
            }
        )
        _answer_option_rules(rules, props, strategies, default_strategy, len(members))
    return doc


def _prompt_limits(prompt: dict[str, Any], max_queue: int, vocab_sizes: dict[str, int]) -> None:
    """Several prompts (texts or token-id lists) fit the queue; token ids are below the vocabulary size.

    One bound for every model id, the smallest vocabulary's: a per-model bound (if model then prompt's
    ids below its size) is exact, but schema-driven generators cannot produce cases from an if/then on
    a field that is itself a choice of shapes (schemathesis refuses the operation). So the document
    admits no id a model refuses; ids of a larger vocabulary above the bound are served, undocumented.
    """
    for branch in prompt["anyOf"]:
        items = branch.get("items", {})
        if branch.get("type") == "array" and items.get("type") in ("string", "array"):
            branch["maxItems"] = max_queue
        ids = items.get("items", {}) if items.get("type") == "array" else items
        if vocab_sizes and ids.get("type") == "integer":
            ids["maximum"] = min(vocab_sizes.values()) - 1

def _given(field: str, kind: str) -> dict[str, Any]:
    return {"required": [field], "properties": {field: {"type": kind}}}


def _strategy_in(names: list[str], default_strategy: str) -> dict[str, Any]:
    """Requests whose strategy (named, or the default when none is) is one of `names`."""
    if default_strategy in names:
        return {"properties": {"strategy": {"enum": [*names, None]}}}
    return {"required": ["strategy"], "properties": {"strategy": {"enum": names}}}


def _answer_option_rules(
    rules: list[dict[str, Any]],
    props: dict[str, Any],
    strategies: list[str],
    default_strategy: str,
    members: int,
) -> None:
    """The options only some answer-level strategies read are refused elsewhere; some exclude each other."""
    accuracy = _typed(props["member_accuracy"], "array")
    accuracy["minItems"] = accuracy["maxItems"] = members
    kinds = {"member_accuracy": "array", "cot_branches": "integer", "debate_rounds": "integer"}
    for option in CHECKED_OPTIONS:
        readers = [s for s in strategies_reading(option) if s in strategies]
        rules.append({"if": _given(option, kinds[option]), "then": _strategy_in(readers, default_strategy)})
    # CoT-decoding's paths replace the sampled answers: not both.
    both = {"allOf": [_given("cot_branches", "integer"), _given("vote_samples", "integer")]}
    rules.append({"if": both, "then": {"not": {}}})
    # A debate's members answer once a round: no number of samples.
    if default_strategy == "debate":
        no_debate: dict[str, Any] = {
            "required": ["strategy"],
            "properties": {"strategy": {"not": {"enum": ["debate", None]}}},
        }
    else:
        no_debate = {"properties": {"strategy": {"not": {"const": "debate"}}}}
    rules.append({"if": _given("vote_samples", "integer"), "then": no_debate})


class HealthResponse(BaseModel):
    """GET /health when the ensemble answers; the coordinator's own status fields follow these."""

    model_config = ConfigDict(extra="allow")

    status: Literal["ok"] = Field(description="Always 'ok' (a replica that cannot serve answers 503).")
    ensemble: str = Field(description="The ensemble's name (its model id).")
    strategy: str = Field(description="The ensemble's default strategy.")
