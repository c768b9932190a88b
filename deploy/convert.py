"""From OpenAI request bodies to the runtime's types, and from its log-probs back to OpenAI's shapes."""

from __future__ import annotations

from dataclasses import replace

from consort.deploy.errors import Unsupported
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
from consort.runtime.errors import InvalidRequest, ModelNotFound
from consort.runtime.prompts import ChatMessage, Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions, TokenLogprob

EOS_TOKEN = ""  # how the core shows an end-of-sequence token: it is not text, so it is not reported


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
    )


def check_supported(request: EnsembleFields) -> None:
    """Refuse OpenAI fields Consort cannot honour, rather than answering as if they were applied."""
    if request.presence_penalty:
        raise Unsupported("presence_penalty is not supported (only 0)", param="presence_penalty")
    if request.frequency_penalty:
        raise Unsupported("frequency_penalty is not supported (only 0)", param="frequency_penalty")
    if request.logit_bias:
        raise Unsupported("logit_bias is not supported", param="logit_bias")
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise Unsupported("suffix is not supported", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise Unsupported("best_of is not supported (only equal to n)", param="best_of")
    if isinstance(request, ChatCompletionRequest):
        if request.tools:
            raise Unsupported("tools are not supported", param="tools")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise Unsupported("only response_format {'type': 'text'} is supported", param="response_format")


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def sampling_params(
    request: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, choice: int
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
    )


def _message_text(message: ChatMessageIn) -> str:
    if isinstance(message.content, str):
        return message.content
    parts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise Unsupported(
                f"message content part of type {part.type!r} is not supported (text only)", "messages"
            )
        parts.append(part.text)
    return "".join(parts)


def chat_prompt(messages: list[ChatMessageIn]) -> Prompt:
    if not messages:
        raise InvalidRequest("messages must not be empty")
    converted = [
        ChatMessage(role="system" if m.role == "developer" else m.role, content=_message_text(m))
        for m in messages
    ]
    return Prompt(messages=converted)


def completion_prompts(prompt: str | list[str]) -> list[Prompt]:
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not texts:
        raise InvalidRequest("prompt must not be an empty list")
    return [Prompt(text=t) for t in texts]


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


def _shown(entry: TokenLogprob) -> bool:
    # An end-of-sequence token ends the text; it is not part of it, so it is not reported (as in vLLM).
    return entry.token != EOS_TOKEN


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """Legacy parallel lists; `offset` is the character offset of the first entry in the choice's text."""
    out = CompletionLogprobs()
    for entry in entries:
        if not _shown(entry):
            continue
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        # The first prompt token of an echo has no log-prob and no alternatives: OpenAI reports null.
        out.top_logprobs.append(None if entry.logprob is None else dict(entry.top))
        out.text_offset.append(offset)
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
            if _shown(e)
        ]
    )
