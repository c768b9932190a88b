"""vLLM's tokenizer routes over the real tokenizers: per model id, round trips, conversations rendered as
the ensemble renders them, and the request's errors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from consort.deploy.tokenize_api import DetokenizeRequest, TokenizeRequest, TokenizerService
from consort.runtime.config import parse_config
from consort.runtime.errors import InvalidRequest, ModelNotFound
from consort.runtime.prompts import ChatMessage, Prompt, prompt_ids
from tests.unit.conftest import ALIASES

CONFIG = parse_config(
    {
        "name": "consort",
        "members": [
            {"name": "smollm2", "model": f"tiny:{ALIASES[0]}"},
            {"name": "gemma3", "model": f"tiny:{ALIASES[1]}"},
        ],
        "main": "smollm2",
    }
)
TEXTS = ["The capital of France is", "  spaces\tand\nlines ", "unicode: é 漢字 🙂", '{"json": [1, 2]}']


class Members:
    """The engine's side of the routes: each member's tokenizer and context length."""

    def __init__(self, tokenizers: dict[str, Any]) -> None:
        self.by_name = {"smollm2": tokenizers[ALIASES[0]], "gemma3": tokenizers[ALIASES[1]]}

    def tokenizer(self, member: str) -> tuple[Any, int]:
        return self.by_name[member], 2048


@pytest.fixture(scope="module")
def service(tokenizers) -> TokenizerService:
    return TokenizerService(Members(tokenizers), CONFIG)  # type: ignore[arg-type]


@pytest.mark.parametrize("model", ["consort", "smollm2", "gemma3"])
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(service: TokenizerService, tokenizers, model: str, text: str) -> None:
    out = service.tokenize(
        TokenizeRequest(model=model, prompt=text, add_special_tokens=False, return_token_strs=True)
    )
    member = {"consort": ALIASES[0], "smollm2": ALIASES[0], "gemma3": ALIASES[1]}[model]
    assert out.tokens == tokenizers[member](text, add_special_tokens=False)["input_ids"]
    assert out.count == len(out.tokens) == len(out.token_strs or []) and out.max_model_len == 2048
    assert service.detokenize(DetokenizeRequest(model=model, tokens=out.tokens)).prompt == text


def test_special_tokens_as_a_completion_prompt_gets_them(service: TokenizerService, tokenizers) -> None:
    gemma = tokenizers[ALIASES[1]]
    with_bos = service.tokenize(TokenizeRequest(model="gemma3", prompt="Hi")).tokens
    assert with_bos == prompt_ids(gemma, Prompt(text="Hi")) and with_bos[0] == gemma.bos_token_id


def test_a_conversation_is_rendered_as_the_ensemble_renders_it(service: TokenizerService, tokenizers) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    out = service.tokenize(TokenizeRequest(model="consort", messages=messages, tools=[tool]))
    expected = Prompt(messages=[ChatMessage(**messages[0])], tools=[tool])
    assert out.tokens == prompt_ids(tokenizers[ALIASES[0]], expected)
    assert "get_weather" in tokenizers[ALIASES[0]].decode(out.tokens)


def test_errors(service: TokenizerService) -> None:
    with pytest.raises(ModelNotFound):
        service.tokenize(TokenizeRequest(model="gpt-4", prompt="x"))
    with pytest.raises(InvalidRequest, match="outside this model's vocabulary"):
        service.detokenize(DetokenizeRequest(model="smollm2", tokens=[1, 10**9]))
    with pytest.raises(ValidationError):
        TokenizeRequest(model="consort", prompt="x", messages=[{"role": "user", "content": "y"}])
    with pytest.raises(ValidationError):
        DetokenizeRequest(model="consort", tokens=[-1])
