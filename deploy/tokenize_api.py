"""vLLM's tokenizer routes: POST /tokenize and /detokenize, GET /tokenizer_info, per model id (the ensemble's:
its main member's tokens; a member's: that member's; none given: the ensemble's, as lm-eval's remote
tokenizer sends none). The bodies follow vLLM's shapes."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, model_validator

from consort.deploy import convert
from consort.deploy.openai_api import ChatMessageIn, ToolDefinition
from consort.deploy.streams import Engine
from consort.runtime.config import EnsembleConfig
from consort.runtime.errors import ConflictingOptions, InvalidRequest
from consort.runtime.tokens import detokenize, tokenize

TokenId = Annotated[int, Field(ge=0)]


class TokenizeRequest(BaseModel):
    """POST /tokenize: a text prompt, or a conversation rendered as the ensemble renders it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(
        default=None,
        description="The ensemble's id (its main member's tokens) or a member's id; absent: the ensemble's "
        "(under /models/{model}/: that model's).",
    )
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

    model: str | None = Field(
        default=None,
        description="The ensemble's id (its main member's tokens) or a member's id; absent: the ensemble's "
        "(under /models/{model}/: that model's).",
    )
    tokens: list[TokenId] = Field(description="Token ids of that model's tokenizer.")


class DetokenizeResponse(BaseModel):
    """The text of the tokens."""

    prompt: str = Field(description="The decoded text.")


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info: what a remote tokenizer client needs (lm-eval's `tokenizer_backend=remote`)."""

    model: str = Field(description="The model id these tokens are for.")
    member: str = Field(description="The member whose tokenizer it is (the ensemble's: its main member).")
    tokenizer_class: str = Field(description="The tokenizer's class name.")
    vocab_size: int = Field(description="How many token ids the tokenizer has (ids are 0 to vocab_size - 1).")
    model_max_length: int = Field(description="The model's context length, in its tokens.")
    bos_token: str | None = Field(default=None, description="The beginning-of-sequence token, if any.")
    eos_token: str | None = Field(default=None, description="The end-of-sequence token, if any.")
    pad_token: str | None = Field(default=None, description="The padding token, if any.")
    unk_token: str | None = Field(default=None, description="The unknown token, if any.")
    chat_template: str | None = Field(default=None, description="The chat template (Jinja), if any.")


class TokenizerService:
    """The tokenizer routes over an engine's members."""

    def __init__(self, engine: Engine, config: EnsembleConfig) -> None:
        self.engine = engine
        self.config = config

    def model_id(self, model: str | None, scope: str | None = None) -> str:
        """The model a request names: its body's, else the route's (/models/{model}/...), else the ensemble.
        A body that names another model than its route is refused rather than silently answered for one."""
        if scope is not None and model is not None and model != scope:
            raise ConflictingOptions(f"the body names model {model!r} under the route of model {scope!r}")
        chosen = model or scope or self.config.name
        convert.model_options(chosen, self.config)  # an unknown id is a 404 naming the known ones
        return chosen

    def _member(self, model: str | None, scope: str | None = None) -> str:
        return convert.vocabulary_of(self.model_id(model, scope), self.config)

    def info(self, model: str | None = None, scope: str | None = None) -> TokenizerInfo:
        chosen = self.model_id(model, scope)
        member = convert.vocabulary_of(chosen, self.config)
        tokenizer, max_context = self.engine.tokenizer(member)

        def token(name: str) -> str | None:
            value = getattr(tokenizer, name, None)
            return value if isinstance(value, str) else None

        template = getattr(tokenizer, "chat_template", None)
        return TokenizerInfo(
            model=chosen,
            member=member,
            tokenizer_class=type(tokenizer).__name__,
            vocab_size=len(tokenizer),
            model_max_length=max_context,
            bos_token=token("bos_token"),
            eos_token=token("eos_token"),
            pad_token=token("pad_token"),
            unk_token=token("unk_token"),
            chat_template=template if isinstance(template, str) else None,
        )

    def tokenize(self, request: TokenizeRequest, scope: str | None = None) -> TokenizeResponse:
        tokenizer, max_context = self.engine.tokenizer(self._member(request.model, scope))
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

    def detokenize(self, request: DetokenizeRequest, scope: str | None = None) -> DetokenizeResponse:
        tokenizer, _ = self.engine.tokenizer(self._member(request.model, scope))
        return DetokenizeResponse(prompt=detokenize(tokenizer, request.tokens))
