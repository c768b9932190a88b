"""From OpenAI request bodies to the runtime's types, and from its log-probs back to OpenAI's shapes."""

from __future__ import annotations

from dataclasses import replace

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
from consort.runtime.errors import InvalidRequest, ModelNotFound
from consort.runtime.prompts import ChatMessage, Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions, TokenLogprob
from consort.runtime.vote_groups import VoteStrategy


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


def check_capacity(jobs: int, options: RequestOptions, config: EnsembleConfig) -> None:
    """Refuse a request that needs more sequences than the admission queue holds: it can never be admitted
    whole, so a 429 would have its client retry forever; 400 says to split it."""
    voting = (options.strategy or config.strategy) == VoteStrategy.name
    per_job = (options.vote_samples or config.vote.samples) if voting else 1
    needed = jobs * per_job
    if needed > config.max_queue:
        what = "prompts × n × vote_samples" if voting else "prompts × n"
        raise QueueCapacityExceeded(
            f"this request needs {needed} sequences at once ({what}); this ensemble queues at most "
            f"{config.max_queue}: split it into smaller requests"
        )


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
    # Only text parts pass validation (ContentPart), each with its text.
    return "".join(part.text for part in message.content)


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
