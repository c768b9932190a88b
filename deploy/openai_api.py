"""The OpenAI wire format: request and response bodies of /v1/models, /v1/completions, /v1/chat/completions.

Only the schema lives here (pydantic, one description per field); turning a
request into sampling parameters and deltas into responses is `deploy/convert.py`.
Fields OpenAI defines but Consort cannot honour are accepted at their neutral
value and refused otherwise (`convert.unsupported`), so a client never gets a
silently different answer. Ensemble options ride in the same body, as vLLM's
extra fields do (`extra_body=` in the official client).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16
MAX_LOGPROBS = 20


class EnsembleFields(BaseModel):
    """Consort's per-request ensemble options and vLLM-style sampling extras, shared by both endpoints."""

    # OpenAI clients send fields Consort does not know (user, metadata, ...): ignore rather than fail.
    model_config = ConfigDict(extra="ignore")

    strategy: str | None = Field(
        default=None, description="Ensemble strategy for this request: mean, deepen, me or vote."
    )
    vote_samples: int | None = Field(
        default=None, ge=1, le=64, description="vote: how many complete answers to sample across the members."
    )
    vote_kind: str | None = Field(
        default=None, description="vote: compare answers as number, choice, span or free text (embeddings)."
    )
    vote_choices: int | None = Field(
        default=None, ge=2, description="vote with kind=choice: how many options the question has."
    )
    weights: list[float] | None = Field(
        default=None, description="One weight per member, in config order; overrides the configured weights."
    )
    gate: float | None = Field(
        default=None,
        description="Fuse only where the main member's top probability is below this (mean, deepen).",
    )
    top_k: int | None = Field(
        default=None, ge=0, description="Sample among the k most likely candidates (0 = all)."
    )
    ignore_eos: bool = Field(default=False, description="Keep generating past end-of-sequence (benchmarks).")
    presence_penalty: float = Field(default=0.0, description="Not supported; only 0 is accepted.")
    frequency_penalty: float = Field(default=0.0, description="Not supported; only 0 is accepted.")
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Not supported; only empty is accepted."
    )
    user: str | None = Field(default=None, description="End-user id (accepted, not used).")


class StreamOptions(BaseModel):
    """Options of a streamed response."""

    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(
        default=False, description="Send a last chunk with token usage and no choices."
    )


class CompletionRequest(EnsembleFields):
    """POST /v1/completions."""

    model: str = Field(description="The ensemble's name, or one member's name to use that member alone.")
    prompt: str | list[str] = Field(description="Text to continue; a list runs several prompts.")
    max_tokens: int | None = Field(default=16, description="Most tokens to generate per choice.")
    temperature: float | None = Field(
        default=None, description="Sampling temperature; 0 is greedy (default 1)."
    )
    top_p: float | None = Field(default=None, description="Nucleus sampling mass in (0, 1] (default 1).")
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
    stop: str | list[str] | None = Field(
        default=None, description="Stop strings; the text ends before the first."
    )
    seed: int | None = Field(default=None, description="Seed; choice i uses seed + i.")
    suffix: str | None = Field(default=None, description="Not supported; only empty is accepted.")
    best_of: int | None = Field(default=None, description="Not supported beyond n.")


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(description="Part type; only 'text'.")
    text: str | None = Field(default=None, description="The text of a text part.")


class ChatMessageIn(BaseModel):
    """One turn of the conversation sent by the client."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"] = Field(description="Who speaks.")
    content: str | list[ContentPart] = Field(description="The turn's text, or a list of text parts.")
    name: str | None = Field(default=None, description="Speaker name (accepted, not used).")


class ChatCompletionRequest(EnsembleFields):
    """POST /v1/chat/completions."""

    model: str = Field(description="The ensemble's name, or one member's name to use that member alone.")
    messages: list[ChatMessageIn] = Field(
        description="The conversation; each member renders it with its own template."
    )
    max_tokens: int | None = Field(
        default=None, description="Most tokens per choice (default: what the context allows)."
    )
    max_completion_tokens: int | None = Field(
        default=None, description="Newer name of max_tokens; wins when both are set."
    )
    temperature: float | None = Field(
        default=None, description="Sampling temperature; 0 is greedy (default 1)."
    )
    top_p: float | None = Field(default=None, description="Nucleus sampling mass in (0, 1] (default 1).")
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
    stop: str | list[str] | None = Field(
        default=None, description="Stop strings; the text ends before the first."
    )
    seed: int | None = Field(default=None, description="Seed; choice i uses seed + i.")
    tools: list[dict[str, Any]] | None = Field(
        default=None, description="Not supported; only empty is accepted."
    )
    response_format: dict[str, Any] | None = Field(
        default=None, description="Only {'type': 'text'} is accepted."
    )


# -- responses -------------------------------------------------------------------------------------


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


class ChatMessageOut(BaseModel):
    """The assistant's answer (or, in a chunk, a piece of it)."""

    role: Literal["assistant"] | None = Field(
        default=None, description="'assistant' (first chunk only when streaming)."
    )
    content: str | None = Field(default=None, description="The text.")


class ChatChoice(BaseModel):
    """One chat answer."""

    index: int = Field(description="Choice index.")
    message: ChatMessageOut = Field(description="The answer.")
    logprobs: ChatLogprobs | None = Field(default=None, description="Token log-probs when asked for.")
    finish_reason: Literal["stop", "length"] | None = Field(default=None, description="Why it ended.")


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


class ChatChunkChoice(BaseModel):
    """One choice's news in a stream chunk."""

    index: int = Field(description="Choice index.")
    delta: ChatMessageOut = Field(description="New text (and the role, in a choice's first chunk).")
    logprobs: ChatLogprobs | None = Field(
        default=None, description="Log-probs of the new tokens when asked for."
    )
    finish_reason: Literal["stop", "length"] | None = Field(
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


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str = Field(description="What went wrong and what to do.")
    type: str = Field(description="invalid_request_error, not_found_error, rate_limit_error, ...")
    param: str | None = Field(default=None, description="The request field at fault, when one is.")
    code: str | int | None = Field(default=None, description="A machine-readable code, when one applies.")


class ErrorResponse(BaseModel):
    """The body of every error response and of an error event in a stream."""

    error: ErrorDetail = Field(description="The error.")
