"""From OpenAI request bodies to the runtime's types, and from its log-probs back to OpenAI's shapes."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any

from consort.deploy.errors import QueueCapacityExceeded
from consort.deploy.openai_api import (
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessageIn,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionRequest,
    EnsembleFields,
    TopLogprob,
)
from consort.runtime.config import EnsembleConfig
from consort.runtime.constraints import Constraint
from consort.runtime.constraints.engine import compile_grammar
from consort.runtime.constraints.tools import call_constraint
from consort.runtime.errors import ConflictingOptions, InvalidRequest, ModelNotFound
from consort.runtime.prompts import ChatMessage, Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions, TokenLogprob
from consort.runtime.vote_groups import sequences_needed


def model_options(model: str, config: EnsembleConfig) -> RequestOptions:
    """The ensemble's name: the configured ensemble. A member's name: that member alone (vLLM-like)."""
    if model == config.name:
        return RequestOptions()
    names = [m.name for m in config.members]
    if model in names:
        return RequestOptions(strategy="me", weights=[1.0 if n == model else 0.0 for n in names])
    known = ", ".join([config.name, *names])
    raise ModelNotFound(f"the model {model!r} does not exist here; known models: {known}")


def request_options(
    request: EnsembleFields, model: str, config: EnsembleConfig, logprobs: int | None
) -> RequestOptions:
    base = model_options(model, config)
    if base.strategy is not None and (request.strategy or request.weights or request.gate is not None):
        raise InvalidRequest(
            f"model {model!r} is a single member; strategy, weights and gate apply to the ensemble {config.name!r}"
        )
    return replace(
        base,
        strategy=base.strategy or request.strategy,
        weights=base.weights or request.weights,
        gate=request.gate,
        logprobs=logprobs,
        vote_samples=request.vote_samples,
        vote_kind=request.vote_kind,
        vote_choices=request.vote_choices,
        member_accuracy=request.member_accuracy,
        cot_branches=request.cot_branches,
        debate_rounds=request.debate_rounds,
    )


def check_capacity(jobs: int, options: RequestOptions, config: EnsembleConfig) -> None:
    """Refuse a request that needs more sequences than the admission queue holds: it can never be admitted
    whole, so a 429 would have its client retry forever; 400 says to split it."""
    per_job = sequences_needed(config, options)
    needed = jobs * per_job
    if needed > config.max_queue:
        strategy = options.strategy or config.strategy
        what = "prompts × n" if per_job == 1 else f"prompts × n × vote_samples ({per_job} for {strategy})"
        raise QueueCapacityExceeded(
            f"this request needs {needed} sequences at once ({what}); this ensemble queues at most "
            f"{config.max_queue}: split it into smaller requests"
        )


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def sampling_params(
    request: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    choice: int,
    constraint: Constraint | None = None,
) -> SamplingParams:
    """Validated sampling parameters of one choice (choice i of a seeded request is seeded seed + i)."""
    if max_tokens is not None and max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be at least 1, got {max_tokens}")
    return SamplingParams.create(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        seed=None if request.seed is None else request.seed + choice,
        max_tokens=max_tokens,
        stop=stop_list(request.stop),
        ignore_eos=request.ignore_eos,
        constraint=constraint,
    )


def _checked(constraint: Constraint, param: str) -> Constraint:
    """The constraint, its grammar validated now: an unusable schema or regex is this request's 400."""
    try:
        compile_grammar(constraint)
    except InvalidRequest as error:
        error.param = param  # type: ignore[attr-defined]
        raise
    return constraint


def output_constraint(request: EnsembleFields) -> Constraint | None:
    """The structured output a request asks for (response_format, or vLLM's fields), validated; None for text."""
    found: list[tuple[str, Constraint]] = []
    response_format = request.response_format
    if response_format is not None and response_format.type == "json_object":
        found.append(("response_format", Constraint(kind="json_object")))
    elif response_format is not None and response_format.json_schema is not None:
        schema = response_format.json_schema.schema_
        kind = "json_schema" if schema is not None else "json_object"
        found.append(("response_format", Constraint(kind=kind, json_schema=schema)))
    outputs = request.structured_outputs
    if outputs is not None:
        if outputs.json_ is not None:
            found.append(("structured_outputs", Constraint(kind="json_schema", json_schema=outputs.json_)))
        elif outputs.regex is not None:
            found.append(("structured_outputs", Constraint(kind="regex", regex=outputs.regex)))
        elif outputs.choice is not None:
            found.append(("structured_outputs", Constraint(kind="choice", choices=outputs.choice)))
        elif outputs.grammar is not None:
            found.append(("structured_outputs", Constraint(kind="grammar", grammar_text=outputs.grammar)))
        else:
            found.append(("structured_outputs", Constraint(kind="json_object")))
    if request.guided_json is not None:
        found.append(("guided_json", Constraint(kind="json_schema", json_schema=request.guided_json)))
    if request.guided_regex is not None:
        found.append(("guided_regex", Constraint(kind="regex", regex=request.guided_regex)))
    if request.guided_choice is not None:
        found.append(("guided_choice", Constraint(kind="choice", choices=request.guided_choice)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise ConflictingOptions(f"one structured output at a time: this request sets {names}")
    return _checked(found[0][1], found[0][0]) if found else None


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools ask of the answer."""

    tools: list[dict[str, Any]]  # OpenAI tool definitions, for the members' prompts
    constraint: Constraint | None  # required or a named function: the calls' grammar


def tool_plan(request: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tools; None when there are none or tool_choice is none (the tools are then not shown)."""
    choice = request.tool_choice
    if not request.tools:
        if choice == "auto":
            return None  # nothing to choose from: a plain answer, as with no tools at all
        if choice is not None and choice != "none":
            raise ConflictingOptions("tool_choice requires a tool call, but the request has no tools")
        return None
    if choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in request.tools]
    names = [t.function.name for t in request.tools]
    if len(set(names)) != len(names):
        raise ConflictingOptions("tool names must be unique")
    if choice is None or choice == "auto":
        return ToolPlan(tools, None)
    name = None if choice == "required" else choice.function.name
    parallel = request.parallel_tool_calls is not False and name is None
    return ToolPlan(tools, _checked(call_constraint(tools, name, parallel), "tools"))


def _message_text(message: ChatMessageIn) -> str:
    if isinstance(message.content, str):
        return message.content
    # Only text parts pass validation (ContentPart), each with its text.
    return "".join(part.text for part in message.content or [])


def _calls(message: ChatMessageIn) -> list[dict[str, Any]] | None:
    if not message.tool_calls:
        return None
    calls = []
    for call in message.tool_calls:
        # A past call's arguments are the client's history: JSON becomes an object for the chat
        # template; any other text is rendered as it was written (as chat templates do with a string).
        arguments: Any
        try:
            arguments = json.loads(call.function.arguments)
        except json.JSONDecodeError:
            arguments = call.function.arguments
        calls.append({"name": call.function.name, "arguments": arguments})
    return calls


def chat_prompt(messages: list[ChatMessageIn], tools: list[dict[str, Any]] | None = None) -> Prompt:
    if not messages:
        raise InvalidRequest("messages must not be empty")
    converted = [
        ChatMessage(
            role="system" if m.role == "developer" else m.role,
            content="" if m.content is None else _message_text(m),
            tool_calls=_calls(m),
            tool_call_id=m.tool_call_id,
        )
        for m in messages
    ]
    return Prompt(messages=converted, tools=tools)


def prompt_shapes(prompt: str | list[str] | list[int] | list[list[int]]) -> tuple[list[str], list[list[int]]]:
    """The request's prompts as texts, or as token-id lists (exactly one of the two is not empty)."""
    if isinstance(prompt, str):
        return [prompt], []
    if not prompt:
        raise InvalidRequest("prompt must not be an empty list")
    if all(isinstance(p, str) for p in prompt):
        return [p for p in prompt if isinstance(p, str)], []
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return [], [[p for p in prompt if isinstance(p, int)]]
    if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
        return [], [list(p) for p in prompt if isinstance(p, list)]
    raise InvalidRequest("prompt is a text, a list of texts, a list of token ids or a list of token-id lists")


def vocabulary_of(model: str, config: EnsembleConfig) -> str:
    """The member whose vocabulary a model id's token ids are in: its own, or the ensemble's main member's."""
    return config.main_member if model == config.name else model


def token_prompts(id_lists: list[list[int]], vocab: str, tokenizer: Any) -> list[Prompt]:
    """Prompts given as token ids of `vocab`'s tokenizer: checked against its vocabulary, with their text
    (what /detokenize gives: what members with another vocabulary read, and what echo shows)."""
    size = len(tokenizer)
    prompts = []
    for ids in id_lists:
        if not ids:
            raise _param(InvalidRequest("a token-id prompt must not be empty"), "prompt")
        bad = [t for t in ids if not 0 <= t < size]
        if bad:
            raise _param(
                InvalidRequest(
                    f"prompt token ids {bad[:5]} are outside the vocabulary of {size} tokens of the model's "
                    f"tokenizer ({vocab!r}); get ids from POST /tokenize with the same model"
                ),
                "prompt",
            )
        prompts.append(Prompt(text=str(tokenizer.decode(ids)), token_ids=ids, token_vocab=vocab))
    return prompts


def completion_prompts(prompt: str | list[str]) -> list[Prompt]:
    texts, id_lists = prompt_shapes(prompt)
    if id_lists:
        raise InvalidRequest("token-id prompts need the model's tokenizer (token_prompts)")
    return [Prompt(text=t) for t in texts]


def _param(error: InvalidRequest, param: str) -> InvalidRequest:
    error.param = param  # type: ignore[attr-defined]
    return error


def echo_entries(text: str, entries: list[TokenLogprob | None]) -> list[TokenLogprob]:
    """The prompt's entries from `Coordinator.prompt_logprobs`, whose first token has no log-prob (None).

    That first token is reported as OpenAI does, with its text and a null log-prob: its text is what
    the scored tokens leave of the prompt at its start.
    """
    scored = [e for e in entries if e is not None]
    rest = "".join(e.token for e in scored)
    head = text[: len(text) - len(rest)] if text.endswith(rest) else ""
    first = [TokenLogprob(head, head.encode(), None, [])] if len(scored) < len(entries) else []  # type: ignore[arg-type]
    return first + scored


def token_echo_entries(
    tokenizer: Any, ids: list[int], entries: list[TokenLogprob | None]
) -> list[TokenLogprob]:
    """A token-id prompt's echo entries, one per id: the first, unscored, with its text and a null log-prob."""
    head = str(tokenizer.decode(ids[:1]))
    first = TokenLogprob(head, head.encode(), None, [])  # type: ignore[arg-type]
    return [first, *[e for e in entries[1:] if e is not None]]


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """Legacy parallel lists; `offset` is the character offset of the first entry in the choice's text."""
    out = CompletionLogprobs()
    for entry in entries:
        # Every generated token is reported, end-of-sequence included, as vLLM does (lm-eval relies on it).
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        # The first prompt token of an echo has no log-prob and no alternatives: OpenAI reports null.
        out.top_logprobs.append(None if entry.logprob is None else dict(entry.top))
        out.text_offset.append(offset)
        if entry.data:  # an end-of-sequence token is reported but is not part of the text
            offset += len(entry.token)
    return out


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=list(e.data),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in e.top],
            )
            for e in entries
        ]
    )
