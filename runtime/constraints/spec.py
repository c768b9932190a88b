"""What a request constrains its output to, and the grammar that says it (llguidance's format)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ConstraintKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]

# JSON's whitespace: at most one space where whitespace may go. A free run of whitespace lets a
# member that likes newlines (a small or random model) fill max_tokens with them; one space keeps
# both the compact and the usual `{"a": 1}` spellings. A schema's own "x-guidance" overrides it.
JSON_OPTIONS = {"whitespace_pattern": "[ ]?"}

# Characters with a meaning in a (Rust) regex: escaped when a choice list becomes one.
_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def regex_literal(text: str) -> str:
    """`text` as a regex that matches exactly it."""
    return "".join("\\" + ch if ch in _REGEX_META else ch for ch in text)


class Constraint(BaseModel):
    """The shape the generated text must have; checked on bytes, whatever tokenizer produced them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ConstraintKind = Field(description="json_object, json_schema, regex, choice or grammar.")
    json_schema: dict[str, Any] | None = Field(
        default=None, description="The JSON schema (kind json_schema)."
    )
    regex: str | None = Field(
        default=None, description="The regular expression the whole text matches (kind regex)."
    )
    choices: list[str] | None = Field(
        default=None, description="The text is exactly one of these (kind choice)."
    )
    grammar_text: str | None = Field(
        default=None, description="A Lark grammar, with llguidance's %json extension (kind grammar)."
    )

    @model_validator(mode="after")
    def _one_payload(self) -> Constraint:
        needs = {
            "json_schema": self.json_schema,
            "regex": self.regex,
            "choice": self.choices,
            "grammar": self.grammar_text,
        }
        for kind, value in needs.items():
            if (kind == self.kind) != (value is not None):
                raise ValueError(
                    f"a {self.kind} constraint {'needs' if kind == self.kind else 'takes no'} {kind}"
                )
        if self.kind == "choice" and not self.choices:
            raise ValueError("a choice constraint needs at least one choice")
        return self

    def grammar(self) -> str:
        """The llguidance grammar of this constraint (not yet validated: engine.compile does that)."""
        from llguidance import LLMatcher

        if self.kind in ("json_object", "json_schema"):
            schema = self.json_schema if self.json_schema is not None else {"type": "object"}
            if isinstance(schema, dict) and "x-guidance" not in schema:
                schema = {**schema, "x-guidance": JSON_OPTIONS}
            return LLMatcher.grammar_from_json_schema(json.dumps(schema))
        if self.kind == "regex":
            assert self.regex is not None
            return LLMatcher.grammar_from_regex(self.regex)
        if self.kind == "grammar":
            assert self.grammar_text is not None
            return LLMatcher.grammar_from_lark(self.grammar_text)
        assert self.choices is not None
        return LLMatcher.grammar_from_regex("(" + "|".join(regex_literal(c) for c in self.choices) + ")")
