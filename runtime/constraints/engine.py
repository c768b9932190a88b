"""The grammar engine (llguidance) over the ensemble's emitted bytes.

One matcher per sequence reads the text as BYTES (a 257-entry vocabulary: the 256 byte
values and an end marker), so any member's piece, whatever its tokenizer, is checked by
what it spells. When a step's candidates all break the grammar, the sequence widens to a
mask over one member's whole vocabulary: a matcher over that member's tokens, created the
first time it is needed and caught up on the text it has not read yet.

llguidance over xgrammar and outlines-core: measured in bench/grammar.py (docs/benchmarks.md);
it checks a piece without moving the matcher (`validate_tokens`), needs no per-vocabulary
compilation, and has no dependencies.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

from consort.runtime.constraints.spec import Constraint
from consort.runtime.errors import ConsortError, UnparsableContent
from consort.runtime.vocab import TokenTable

log = logging.getLogger(__name__)

BYTE_END = 256  # the byte vocabulary's end marker


class GrammarViolated(ConsortError):
    """The ensemble emitted text its grammar refuses: a bug in the constraint layer, never the request's."""

    error_type = "internal_error"


class GrammarAbandoned(UnparsableContent):
    """The grammar engine stopped following the request's constraint (a piece it allowed, it then
    refused: its limits on lexer and parser work, reached by an unusual schema, regex or grammar).
    The request fails with a message the client can act on; the engine's report goes to the log."""


class GrammarDeadEnd(ConsortError):
    """The grammar admits nothing a member can write next; that sequence fails alone."""

    error_type = "internal_error"


class _ByteVocabulary:
    """A vocabulary of single bytes, in the shape llguidance's TokenizerWrapper reads."""

    eos_token_id = BYTE_END
    bos_token_id = None
    tokens: ClassVar[list[bytes]] = [bytes([i]) for i in range(256)] + [b"<end>"]
    special_token_ids: ClassVar[list[int]] = [BYTE_END]

    def __call__(self, data: bytes | str) -> list[int]:
        return list(data.encode() if isinstance(data, str) else data)


class _TableVocabulary:
    """A member's vocabulary as bytes (its TokenTable), for llguidance."""

    def __init__(self, table: TokenTable) -> None:
        self._table = table
        self.eos_token_id = min(table.eos_ids)
        self.bos_token_id = None
        self.special_token_ids = [i for i in range(table.vocab_size) if table.is_special(i)]
        self.tokens = [table.token_bytes(i) for i in range(table.vocab_size)]

    def __call__(self, data: bytes | str) -> list[int]:
        return self._table.encode(data.encode() if isinstance(data, str) else data)


@functools.cache
def byte_tokenizer() -> LLTokenizer:
    return LLTokenizer(TokenizerWrapper(_ByteVocabulary()))


def member_tokenizer(table: TokenTable) -> LLTokenizer:
    """llguidance's view of a member's vocabulary (~1 s for 262k tokens: cache it per member)."""
    return LLTokenizer(TokenizerWrapper(_TableVocabulary(table)), slices=[])


@functools.lru_cache(maxsize=256)
def _compile(key: str, grammar: str) -> str:
    problem = LLMatcher.validate_grammar(grammar, byte_tokenizer())
    if problem:
        # The engine's message is about the request's own schema or regex, never about the server.
        first = problem.strip().splitlines()[0][:300]
        raise UnparsableContent(f"invalid structured output constraint: {first}")
    return grammar


def compile_grammar(constraint: Constraint) -> str:
    """The constraint's grammar, validated (InvalidRequest if the schema or regex is unusable)."""
    grammar = constraint.grammar()
    return _compile(hashlib.sha256(grammar.encode()).hexdigest(), grammar)


@dataclass
class _MemberMatcher:
    matcher: LLMatcher
    read: int = 0  # bytes of the text it has consumed


@dataclass
class ByteGrammar:
    """One sequence's grammar state over the text emitted so far."""

    grammar: str
    matcher: LLMatcher = field(init=False)
    text: bytearray = field(default_factory=bytearray)
    _members: dict[str, _MemberMatcher] = field(default_factory=dict)

    @classmethod
    def of(cls, constraint: Constraint) -> ByteGrammar:
        return cls(compile_grammar(constraint))

    def __post_init__(self) -> None:
        self.matcher = LLMatcher(byte_tokenizer(), self.grammar, log_level=0)
        self._check(self.matcher)

    @staticmethod
    def _check(matcher: LLMatcher) -> None:
        if matcher.is_error():
            raise GrammarViolated(f"grammar matcher failed: {matcher.get_error()}")

    def allows(self, piece: bytes) -> bool:
        """Whether the text may go on with `piece` (the matcher does not move)."""
        return bool(piece) and self.matcher.validate_tokens(list(piece)) == len(piece)

    def can_end(self) -> bool:
        return self.matcher.is_accepting()

    @property
    def complete(self) -> bool:
        """Nothing but the end may follow."""
        return self.matcher.is_stopped()

    def advance(self, piece: bytes) -> None:
        if not piece:
            return
        if not self.matcher.consume_tokens(list(piece)):
            log.warning("grammar engine refused %r after allowing it: %s", piece, self.matcher.get_error())
            raise GrammarAbandoned(
                f"the structured output constraint could not be followed after {len(self.text)} bytes of "
                "output (the grammar engine gave up on it); simplify the schema, regex or grammar"
            )
        self.text.extend(piece)

    def member_matcher(self, tokenizer: LLTokenizer) -> LLMatcher:
        """A fresh matcher of this grammar over a member's vocabulary."""
        matcher = LLMatcher(tokenizer, self.grammar, log_level=0)
        self._check(matcher)
        return matcher

    def vocab_mask(self, matcher: LLMatcher) -> np.ndarray:
        """Which of the matcher's tokens may come next, as a bool array over its vocabulary."""
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        self._check(matcher)
        return np.unpackbits(bits, bitorder="little").astype(bool)

    def allowed_ids(self, member: str, table: TokenTable, tokenizer: Any) -> np.ndarray:
        """The member's token ids that may come next (its end-of-sequence id when the text may end)."""
        state = self._members.get(member)
        if state is None:
            state = self._members[member] = _MemberMatcher(self.member_matcher(tokenizer))
        if state.read < len(self.text):
            unread = bytes(self.text[state.read :])
            ids = table.encode(unread)
            if table.decode_bytes(ids) != unread or not state.matcher.consume_tokens(ids):
                raise GrammarViolated(f"member {member!r} could not follow the emitted text {unread!r}")
            state.read = len(self.text)
        mask = self.vocab_mask(state.matcher)[: table.vocab_size]
        return np.flatnonzero(mask)
