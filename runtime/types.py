"""The types every layer shares: what crosses between the core and its members, and what a
request gets back. Plain data, no models and no transformers: fusion strategies, the
HTTP layer and the actors import these without pulling in the member engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from consort.runtime.errors import ConsortError
    from consort.runtime.vocab import TokenTable

VoteKind = Literal["number", "choice", "span", "free"]

@dataclass(frozen=True)
class Piece:
    """Bytes the ensemble emitted, and which member's token they were (for exact own-token feeding)."""

    data: bytes
    owner: str | None = None
    token_id: int | None = None


@dataclass
class SeqWork:
    """What one member must do for one sequence in this step."""

    seq_id: str
    prompt_ids: list[int] | None = None  # this member's prompt tokens, sent once when the sequence is admitted
    pieces: list[Piece] = field(default_factory=list)  # emitted since this member last saw the sequence
    compute: bool = True  # return a distribution; False: take the text in, in this step's forward if there is one
    full: bool = False  # return the full-vocabulary distribution
    relative: bool = False  # return the DeePEn relative-space vector
    echo: bool = False  # return log-probs of the prompt tokens (log-likelihood scoring)
    echo_top_k: int = 0
    # Text-level scoring: (j, text) pairs; the reply's echo_masses gives, for each, the log of the
    # total probability at the j-th echoed position of this member's tokens that start with `text`.
    echo_prefixes: list[tuple[int, bytes]] = field(default_factory=list)
    # Echo under DeePEn: `prompt_ids` is the context and these are the scored text's pieces (the main
    # member's tokens). The reply's `positions` holds this member's result before each piece, on
    # its own tokens of the text so far: what stepping through the pieces would have given it.
    echo_pieces: list[Piece] | None = None
    # DeePEn, on the main member only: run the inverse search within this step, from this member's
    # result and what the other members returned in the same round (the executor passes them on).
    invert: InvertSpec | None = None


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Ray hands large arrays back read-only (zero-copy from its object store); a tensor must own writable memory.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _as_array(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_as_array(v) for v in value)
    return value.numpy() if isinstance(value, torch.Tensor) else value


def _as_tensor(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_as_tensor(v) for v in value)
    return _tensor(value) if isinstance(value, np.ndarray) else value


class _ShipsArrays:
    """Pickles tensor fields as numpy arrays, back into tensors on arrival.

    A member's reply crosses a process boundary every step: two 64-entry tensors
    cost ~0.8 ms more to ship than the same numpy arrays (of a ~4 ms round trip here).
    """

    def __getstate__(self) -> dict[str, Any]:
        return {key: _as_array(value) for key, value in self.__dict__.items()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({key: _as_tensor(value) for key, value in state.items()})


@dataclass
class SeqResult(_ShipsArrays):
    """A member's compact answer for one sequence: its top-k always (empty only for a sequence
    that rode along without computing, which no strategy sees), the rest when asked for."""

    seq_id: str
    top_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    top_logprobs: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    logprobs: torch.Tensor | None = None  # the full distribution (SeqWork.full)
    relative: torch.Tensor | None = None  # DeePEn's relative-space vector (SeqWork.relative)
    prompt_tokens: int | None = None
    echo_ids: list[int] | None = None
    echo_logprobs: list[float] | None = None
    echo_top: tuple[torch.Tensor, torch.Tensor] | None = None
    echo_masses: list[float] | None = None
    # DeePEn: the candidate keys of this member's top `relative_top_k` tokens (their bytes, EOS_KEY,
    # None for other special tokens), so that the main member can map them into its vocabulary.
    top_keys: list[bytes | None] | None = None
    # DeePEn, from the main member when its work carried `invert`: the candidates in its vocabulary
    # and the inverse search's log-probs over them.
    candidate_ids: torch.Tensor | None = None
    inverted: torch.Tensor | None = None
    # Echo under DeePEn (SeqWork.echo_pieces): one result per piece, before it; None where this member
    # does not compute there (inside a character the main member's token split, only the main one does).
    positions: list[SeqResult | None] | None = None
    # The main member's, per position: the log-probability of the piece that follows.
    forced_logprob: float | None = None


@dataclass
class InvertSpec:
    """DeePEn's inverse search for one sequence, asked of the main member within the step: which
    members' relative vectors to average (in the ensemble's order, the main member among them) with
    which normalised weights; the search's settings; and the main member's own result when it
    computed in an earlier round of the step (the gate), else None (this round's result)."""

    members: list[str]
    weights: list[float]
    top_k: int
    steps: int
    learning_rate: float
    main_result: SeqResult | None = None


@dataclass
class InvertWork(_ShipsArrays):
    """DeePEn's inverse step for one sequence, done by the main member next to its embeddings."""

    seq_id: str
    target: torch.Tensor
    candidate_ids: torch.Tensor
    initial_logprobs: torch.Tensor


@dataclass
class MemberReply:
    """One member's results in a round, and its round trip as the executor saw it."""

    results: list[SeqResult]
    seconds: float


@dataclass(frozen=True)
class MemberInfo:
    """What the core needs to know of a member without holding its weights."""

    name: str
    tokenizer: Any
    table: TokenTable
    max_context: int


@dataclass
class RequestOptions:
    """Per-request ensemble overrides (the HTTP body's extra fields)."""

    strategy: str | None = None
    weights: list[float] | None = None
    gate: float | None = None
    logprobs: int | None = None  # alternatives to report per token (None = no log-probs)
    diagnostics: bool = False
    vote_samples: int | None = None  # vote: answers to sample (default: the config's)
    vote_kind: VoteKind | None = None  # vote: number | choice | span | free (default: the config's)
    vote_choices: int | None = None  # vote with kind=choice: how many options the question has
    member_accuracy: list[float] | None = None  # mux: the members' dev accuracy (tie-breaker), config order
    cot_branches: int | None = None  # vote/mux: answer by CoT-decoding over this many first tokens per member
    debate_rounds: int | None = None  # debate: revision rounds after the first answers
    request_id: str | None = None  # the response's id, where a decision is kept under it (route, feedback)


@dataclass
class TokenLogprob:
    """One emitted piece with its ensemble log-probability and the best alternatives."""

    token: str
    data: bytes
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    """New text for one sequence (streaming), and its end."""

    seq_id: str
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    error: ConsortError | None = None  # this sequence failed (alone): the caller gets this error instead


@dataclass
class Completion:
    """A sequence's deltas added up: the one accumulator of streamed output (CLI, HTTP, jobs, loop)."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)

    def add(self, delta: Delta) -> None:
        if delta.error is not None:
            raise delta.error
        self.text += delta.text
        self.logprobs.extend(delta.logprobs)
        self.diagnostics.extend(delta.diagnostics)
        self.prompt_tokens = delta.prompt_tokens or self.prompt_tokens
        self.completion_tokens = delta.completion_tokens
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def logprob(self) -> float:
        """Summed log-probability of the pieces (teacher-forced scoring)."""
        return sum(lp.logprob for lp in self.logprobs)

    @property
    def piece_logprobs(self) -> list[float]:
        return [lp.logprob for lp in self.logprobs]
