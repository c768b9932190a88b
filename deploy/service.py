"""The OpenAI endpoints' behaviour over one ensemble engine, independent of FastAPI and Serve.

Each method validates a request into runtime types (deploy/convert.py), starts
its sequences (deploy/streams.py) and answers with a response model, or with an
async iterator of server-sent-event lines when `stream` is set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from consort.deploy import convert
from consort.deploy.errors import sse_error
from consort.deploy.feedback import routed, routing_info
from consort.deploy.openai_api import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from consort.deploy.streams import Engine, Job, Primed, collect, merge, prime_all
from consort.deploy.tool_calls import ToolDeltas, answer_message
from consort.runtime.config import EnsembleConfig
from consort.runtime.errors import ConflictingOptions, ConsortError, InvalidRequest
from consort.runtime.prompts import Prompt
from consort.runtime.types import Completion, RequestOptions, TokenLogprob

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


async def guarded(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An event stream that always ends with [DONE]; a failure after the response began is sent in-band."""
    try:
        # aclosing: a client that hangs up closes the inner stream now, which frees its sequences.
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
    except ConsortError as error:
        log.warning("stream failed: %s", error)
        yield sse_error(error)
    except Exception:  # the response has begun: report in-band rather than cut the stream
        # The exception's text stays in the log: it is the server's business, not the client's.
        log.exception("stream failed unexpectedly")
        yield sse_error(ConsortError("internal error; the stream ended early"))
    yield DONE


def sse(payload: Any) -> str:
    body = (
        payload.model_dump_json(exclude_none=False)
        if hasattr(payload, "model_dump_json")
        else json.dumps(payload)
    )
    return f"data: {body}\n\n"


class OpenAIService:
    """/v1/models, /v1/completions and /v1/chat/completions over a coordinator."""

    def __init__(self, engine: Engine, config: EnsembleConfig) -> None:
        self.engine = engine
        self.config = config
        self.created = int(time.time())

    # -- models --------------------------------------------------------------------------------
    def models(self) -> ModelList:
        cards = [ModelCard(id=self.config.name, created=self.created, root="ensemble")]
        cards += [ModelCard(id=m.name, created=self.created, root=m.model) for m in self.config.members]
        return ModelList(data=cards)

    # -- completions ---------------------------------------------------------------------------
    async def completions(self, request: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        options = convert.request_options(request, request.model, self.config, request.logprobs)
        options = dataclasses.replace(options, request_id=rid)  # a routed request's decision is kept under it
        prompts = self._prompts(request)
        convert.check_capacity(len(prompts) * request.n, options, self.config)
        constraint = convert.output_constraint(request)
        jobs = [
            Job(
                p * request.n + i,
                prompt,
                convert.sampling_params(request, request.max_tokens, i, constraint),
                options,
            )
            for p, prompt in enumerate(prompts)
            for i in range(request.n)
        ]
        # After validating every field: scoring the prompt is work a bad request should not cost.
        echoed = await self._echo(prompts, options) if request.echo else None
        streams = await prime_all(self.engine, jobs)
        if request.stream:
            return guarded(self._stream_completion(request, streams, rid, created, prompts, echoed))
        finished = await collect(streams)
        choices = []
        for index, item in finished.items():
            prompt_text = prompts[index // request.n].text or ""
            text = (prompt_text if request.echo else "") + item.text
            logprobs = None
            if request.logprobs is not None:
                entries = (echoed[index // request.n] if echoed else []) + item.logprobs
                logprobs = convert.completion_logprobs(entries, 0)
            choices.append(
                CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=item.finish_reason)
            )
        return CompletionResponse(
            id=rid,
            created=created,
            model=request.model,
            choices=choices,
            usage=_usage(finished, request.n),
            routing=routing_info(finished),
        )

    def _prompts(self, request: CompletionRequest) -> list[Prompt]:
        """The request's prompts; token ids are checked against, and decoded by, the named model's tokenizer."""
        texts, id_lists = convert.prompt_shapes(request.prompt)
        if not id_lists:
            return [Prompt(text=t) for t in texts]
        vocab = convert.vocabulary_of(request.model, self.config)
        tokenizer, _ = self.engine.tokenizer(vocab)
        return convert.token_prompts(id_lists, vocab, tokenizer)

    async def _echo(self, prompts: list[Prompt], options: RequestOptions) -> list[list[TokenLogprob]] | None:
        """Prompt tokens with their log-probs, when log-probs are asked for with echo (None: text only).

        A prompt given as token ids is reported over exactly those ids (lm-eval slices the entries by its
        own token counts); a text prompt over the main member's tokens of it.
        """
        if options.logprobs is None:
            return None
        echoed = []
        for p in prompts:
            if p.token_ids is not None and p.token_vocab is not None:
                entries = await self.engine.prompt_token_logprobs(p.token_vocab, p.token_ids, options)
                tokenizer, _ = self.engine.tokenizer(p.token_vocab)
                echoed.append(convert.token_echo_entries(tokenizer, p.token_ids, entries))
            else:
                text = p.text or ""
                echoed.append(convert.echo_entries(text, await self.engine.prompt_logprobs(text, options)))
        return echoed

    async def _stream_completion(
        self,
        request: CompletionRequest,
        streams: list[Primed],
        rid: str,
        created: int,
        prompts: list[Prompt],
        echoed: list[list[TokenLogprob]] | None,
    ) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None, routing: Any = None) -> str:
            return sse(
                CompletionResponse(
                    id=rid, created=created, model=request.model, choices=choices, usage=usage, routing=routing
                )
            )

        offsets = {p.index: 0 for p in streams}
        finished = {p.index: Completion() for p in streams}
        if request.echo:
            for p in streams:
                prompt_text = prompts[p.index // request.n].text or ""
                entries = echoed[p.index // request.n] if echoed else []
                logprobs = convert.completion_logprobs(entries, 0) if request.logprobs is not None else None
                offsets[p.index] = len(prompt_text)
                yield chunk([CompletionChoice(index=p.index, text=prompt_text, logprobs=logprobs)])
        async for index, delta in merge(streams):
            finished[index].add(delta)
            info = routed(index, delta.diagnostics)
            if not delta.text and not delta.logprobs and delta.finish_reason is None and info is None:
                continue  # text held back (a possible stop string, a split character): nothing to say yet
            logprobs: CompletionLogprobs | None = None
            if request.logprobs is not None:
                logprobs = convert.completion_logprobs(delta.logprobs, offsets[index])
            offsets[index] += len(delta.text)
            yield chunk(
                [
                    CompletionChoice(
                        index=index, text=delta.text, logprobs=logprobs, finish_reason=delta.finish_reason
                    )
                ],
                routing=[info] if info is not None else None,
            )
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], _usage(finished, request.n))

    # -- chat ----------------------------------------------------------------------------------
    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        # top_logprobs without logprobs is refused by the request's validation.
        top = (request.top_logprobs or 0) if request.logprobs else None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        options = convert.request_options(request, request.model, self.config, top)
        options = dataclasses.replace(options, request_id=rid)  # a routed request's decision is kept under it
        plan = convert.tool_plan(request)
        constraint = convert.output_constraint(request)
        if plan is not None and plan.constraint is not None:
            if constraint is not None:
                raise ConflictingOptions(
                    "a forced tool call (tool_choice required or named) takes no response_format"
                )
            constraint = plan.constraint
        prompt = convert.chat_prompt(request.messages, plan.tools if plan is not None else None)
        convert.check_capacity(request.n, options, self.config)
        for name in ("max_tokens", "max_completion_tokens"):
            # The one that wins is checked again at admission; the other must not be out of range either.
            value = getattr(request, name)
            if value is not None and value > self.config.max_tokens_limit:
                raise InvalidRequest(
                    f"{name}={value} is above this ensemble's limit of {self.config.max_tokens_limit}"
                )
        max_tokens = (
            request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
        )
        if max_tokens is None:
            max_tokens = self.engine.room(prompt)
        jobs = [
            Job(i, prompt, convert.sampling_params(request, max_tokens, i, constraint), options)
            for i in range(request.n)
        ]
        streams = await prime_all(self.engine, jobs)
        if request.stream:
            return guarded(self._stream_chat(request, streams, rid, created, tools=plan is not None))
        finished = await collect(streams)
        choices = []
        for index, item in finished.items():
            message, reason = ChatMessageOut(role="assistant", content=item.text), item.finish_reason
            if plan is not None:
                message, reason = answer_message(item.text, item.finish_reason)
            choices.append(
                ChatChoice(
                    index=index,
                    message=message,
                    logprobs=convert.chat_logprobs(item.logprobs) if request.logprobs else None,
                    finish_reason=reason,
                )
            )
        return ChatCompletionResponse(
            id=rid,
            created=created,
            model=request.model,
            choices=choices,
            usage=_usage(finished, request.n),
            routing=routing_info(finished),
        )

    async def _stream_chat(
        self,
        request: ChatCompletionRequest,
        streams: list[Primed],
        rid: str,
        created: int,
        tools: bool = False,
    ) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None, routing: Any = None) -> str:
            return sse(
                ChatCompletionChunk(
                    id=rid,
                    created=created,
                    model=request.model,
                    choices=choices,
                    usage=usage,
                    routing=routing,
                )
            )

        finished = {p.index: Completion() for p in streams}
        calls = {p.index: ToolDeltas() for p in streams} if tools else {}
        for p in streams:
            # OpenAI's first chunk of each choice carries the role and empty content.
            yield chunk([ChatChunkChoice(index=p.index, delta=ChatDelta(role="assistant", content=""))])
        async for index, delta in merge(streams):
            finished[index].add(delta)
            info = routed(index, delta.diagnostics)
            if not delta.text and not delta.logprobs and delta.finish_reason is None and info is None:
                continue
            logprobs = convert.chat_logprobs(delta.logprobs) if request.logprobs else None
            if tools:
                # Calls stream as tool_calls pieces; text that may still become a call is held back.
                reader = calls[index]
                pieces = reader.feed(delta.text, final=delta.finish_reason is not None)
                if delta.finish_reason is not None or (not pieces and (logprobs or info)):
                    pieces.append(ChatDelta())
                for n, piece in enumerate(pieces):
                    last = n == len(pieces) - 1
                    reason = reader.finish_reason(delta.finish_reason) if last else None
                    first = n == 0
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=index,
                                delta=piece,
                                logprobs=logprobs if first else None,
                                finish_reason=reason,  # type: ignore[arg-type]
                            )
                        ],
                        routing=[info] if info is not None and first else None,
                    )
                continue
            yield chunk(
                [
                    ChatChunkChoice(
                        index=index,
                        delta=ChatDelta(content=delta.text),
                        logprobs=logprobs,
                        finish_reason=delta.finish_reason,
                    )
                ],
                routing=[info] if info is not None else None,
            )
        if request.stream_options and request.stream_options.include_usage:
            yield chunk([], _usage(finished, request.n))


def _usage(finished: dict[int, Completion], n: int) -> Usage:
    """Prompt tokens count once per prompt (choices of one prompt share it), completion tokens per choice."""
    prompt = sum(item.prompt_tokens for index, item in finished.items() if index % n == 0)
    completion = sum(item.completion_tokens for item in finished.values())
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
