"""vLLM's tokenizer routes: POST /tokenize and /detokenize, per model id (the ensemble's: its main
member's tokens; a member's: that member's). The bodies follow vLLM's shapes."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from consort.deploy import convert
from consort.deploy.openai_api import ChatMessageIn, ToolDefinition
from consort.deploy.streams import Engine
from consort.runtime.config import EnsembleConfig
from consort.runtime.errors import InvalidRequest
from consort.runtime.tokens import detokenize, tokenize

TokenId = Annotated[int, Field(ge=0)]


class TokenizeRequest(BaseModel):
    """POST /tokenize: a text prompt, or a conversation rendered as the ensemble renders it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="The ensemble's id (its main member's tokens) or a member's id.")
    prompt: str | None = Field(default=None, description="Text to tokenize as is.")
    messages: list[ChatMessageIn] | None = Field(
        default=None, min_length=1, description="A conversation, rendered by the member's chat template."
    )
    tools: list[ToolDefinition] | None = Field(
        default=None, description="Tools the conversation is rendered with."
    )
    add_special_tokens: bool = Field(
        default=True,
        description="prompt: add the tokenizer's special tokens (BOS) as a completion prompt does.",
    )
    return_token_strs: bool = Field(default=False, description="Also return each token's string.")

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.tools and self.messages is None:
            raise ValueError("tools apply to messages")
        return self


class TokenizeResponse(BaseModel):
    """The prompt's tokens in the model's tokenizer."""

    count: int = Field(description="How many tokens.")
    max_model_len: int = Field(description="The model's context length, in its tokens.")
    tokens: list[int] = Field(description="The token ids.")
    token_strs: list[str] | None = Field(default=None, description="Each token's string, when asked for.")


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="The ensemble's id (its main member's tokens) or a member's id.")
    tokens: list[TokenId] = Field(description="Token ids of that model's tokenizer.")


class DetokenizeResponse(BaseModel):
    """The text of the tokens."""

    prompt: str = Field(description="The decoded text.")


class TokenizerService:
    """The tokenizer routes over an engine's members."""

    def __init__(self, engine: Engine, config: EnsembleConfig) -> None:
        self.engine = engine
        self.config = config

    def _member(self, model: str) -> str:
        convert.model_options(model, self.config)  # an unknown id is a 404 naming the known ones
        return self.config.main_member if model == self.config.name else model

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        tokenizer, max_context = self.engine.tokenizer(self._member(request.model))
        if request.messages is not None:
            tools = [t.model_dump(exclude_none=True) for t in request.tools] if request.tools else None
            prompt = convert.chat_prompt(request.messages, tools)
        else:
            if not request.prompt:
                raise InvalidRequest("prompt must not be empty")
            prompt = convert.completion_prompts(request.prompt)[0]
        out = tokenize(
            tokenizer,
            max_context,
            prompt,
            add_special_tokens=request.add_special_tokens,
            token_strs=request.return_token_strs,
        )
        return TokenizeResponse(
            count=len(out.tokens),
            max_model_len=out.max_model_len,
            tokens=out.tokens,
            token_strs=out.token_strs,
        )

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        tokenizer, _ = self.engine.tokenizer(self._member(request.model))
        return DetokenizeResponse(prompt=detokenize(tokenizer, request.tokens))
