"""The ensemble's step loop, shared by the in-process loop and the Ray coordinator.

Like vLLM's engine core: `step()` schedules the sequences that advance now,
executes the members that must work (through an `Executor`: direct calls in one
process, actor calls on Ray), lets each sequence's strategy fuse or select,
samples, and updates every sequence's text. Results do not depend on which
executor runs the members.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import logging
import math
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from consort.runtime import fusion
from consort.runtime.config import EnsembleConfig
from consort.runtime.constraints.apply import Constrainer
from consort.runtime.constraints.engine import ByteGrammar
from consort.runtime.errors import ConsortError, InvalidRequest, PromptTooLong, SequenceFailed
from consort.runtime.fusion.base import (
    EOS_KEY,
    Candidate,
    Decision,
    EnsembleContext,
    Strategy,
    WorkFlags,
    single_member,
)
from consort.runtime.prompts import Prompt, prompt_ids
from consort.runtime.sampling import SamplingParams, find_stop, make_generator, sample, stop_holdback
from consort.runtime.textprob import TextPlan, TextScorer, mix, text_greedy
from consort.runtime.types import (
    Delta,
    InvertWork,
    MemberInfo,
    MemberReply,
    Piece,
    RequestOptions,
    SeqResult,
    SeqWork,
    TokenLogprob,
)
from consort.runtime.vocab import anchors
from consort.runtime.vote_groups import VoteGroups, check_options, sequences_needed

log = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs member work in rounds, one concurrent round per phase of a step: in process, or on
    member actors (a round is then one compiled-graph execution or one call per member)."""

    async def step(
        self, works: Mapping[str, list[SeqWork]], release: Mapping[str, list[str]] | None = None
    ) -> dict[str, MemberReply]:
        """One round: each member in `works` first frees the sequences in `release` (finished
        ones ride in the next call, never a round of their own), then computes. A member whose
        works carry `invert` (the main member under `deepen`; at most one) also gets the other
        members' results of the same round and runs the inverse search after its forward
        (`MemberWorker.finish_inverts`): still one round."""
        ...

    async def invert(self, member: str, works: list[InvertWork], steps: int, learning_rate: float) -> list[torch.Tensor]: ...

    async def release(self, seq_ids: Mapping[str, list[str]]) -> None:
        """A round that only frees sequences: used when no further step would carry them."""
        ...


@dataclass
class SequenceState:
    """One sequence in the core: its request, its text so far, and what each member has yet to see."""

    seq_id: str
    params: SamplingParams
    strategy: Strategy
    weights: dict[str, float]
    gate: float | None
    prompt_ids: dict[str, list[int]]
    generator: torch.Generator
    draw_generator: torch.Generator
    options: RequestOptions
    admitted: set[str] = field(default_factory=set)
    unsent: dict[str, list[Piece]] = field(default_factory=lambda: defaultdict(list))
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    text: str = ""
    streamed: int = 0
    tokens: int = 0
    finish_reason: str | None = None
    mid_char_owner: str | None = None
    pending_invert: InvertWork | None = None
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    new_diagnostics: list[dict[str, Any]] = field(default_factory=list)
    forced: deque[Candidate] = field(default_factory=deque)  # scoring: the pieces to take instead of sampling
    grammar: ByteGrammar | None = None  # structured output: the grammar's state over the emitted text
    text_scorer: TextScorer | None = None  # scoring at the text level: each forced piece's probability
    fused_steps: int = 0
    draws: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def weight(self, member: str) -> float:
        return self.weights[member]


@dataclass
class EchoState:
    """`echo` of a prompt scored in one forward per member: each member runs its prefill over the
    context and the continuation's tokens and reports the log-prob at every position."""

    seq_id: str
    members: dict[str, float]  # the members that score, with their normalised weights
    context_ids: list[int]  # the first token of the text, as a prompt (BOS and all)
    continuation_ids: list[int]  # the scored tokens (one tokenizer: the ensemble's, or the member's alone)
    table: Any
    top_n: int
    # Different vocabularies under a text-level strategy: where the text is cut, and each member's
    # own (context, continuation) tokens; the tokens above are then the main member's.
    plan: TextPlan | None = None
    member_ids: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    lead: str = ""  # whose tokens the entries are (the main member's, when it scores)
    # Scored from every member's result before every piece (`Strategy.echoes_positions`): the main
    # member's tokens as pieces, and the strategy that turns its results there into decisions.
    pieces: list[Piece] = field(default_factory=list)
    strategy: Strategy | None = None


@dataclass
class StepStats:
    """What one step did, for metrics and benchmarks."""

    sequences: int = 0
    member_seconds: dict[str, float] = field(default_factory=dict)
    member_batch: dict[str, int] = field(default_factory=dict)
    fusion_seconds: float = 0.0
    fused: int = 0
    draws: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rounds: int = 0  # executor rounds this step took (each one a round trip to the members)


class EnsembleCore:
    """Admits sequences, steps them together, emits text deltas."""

    def __init__(self, config: EnsembleConfig, members: Sequence[MemberInfo], executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self.members = {m.name: m for m in members}
        names = [m.name for m in config.members]
        tables = {m.name: m.table for m in members}
        first = tables[names[0]]
        identical = all(t.fingerprint == first.fingerprint for t in tables.values())
        shared = anchors([tables[n] for n in names])
        # Lower BPE ids were merged earlier, i.e. are more frequent: keep those when capping.
        main_index = names.index(config.main_member)
        order = sorted(range(len(shared[main_index])), key=lambda i: shared[main_index][i]) if shared else []
        shared = [[ids[i] for i in order] for ids in shared]
        limit = config.deepen.max_anchors
        self.ctx = EnsembleContext(
            config=config,
            names=names,
            main=config.main_member,
            tables=tables,
            identical_vocab=identical,
            max_context={m.name: min(m.max_context, config.max_context or m.max_context) for m in members},
            anchors={n: ids[:limit] if limit else ids for n, ids in zip(names, shared, strict=True)},
        )
        self._strategies: dict[str, Strategy] = {}
        self.constrainer = Constrainer(self.ctx)
        self.default_strategy = config.strategy
        self.waiting: deque[SequenceState] = deque()
        self.running: dict[str, SequenceState] = {}
        self.votes = VoteGroups()
        self.echoes: list[EchoState] = []
        self._echoing: list[str] = []  # the echoes of the round in flight (a failed round fails them)
        self.last_stats = StepStats()
        # DeePEn's inverse search within the main member's step (one round); False: a round of its
        # own after the step, as before (kept to check that both give the same outputs).
        self.invert_in_step = True
        self._counter = itertools.count()
        # Sequences each member may free: sent with that member's next call, not in a round of their own.
        self._unreleased: dict[str, list[str]] = defaultdict(list)

    def strategy(self, name: str) -> Strategy:
        """The strategy called `name`, created (and checked against this ensemble) on first use."""
        if name not in self._strategies:
            self._strategies[name] = fusion.create(name, self.ctx)
        return self._strategies[name]

    # -- admission -----------------------------------------------------------------------------
    def new_id(self, prefix: str = "seq") -> str:
        return f"{prefix}-{next(self._counter)}-{uuid.uuid4().hex[:8]}"

    def resolve_weights(self, weights: list[float] | None) -> dict[str, float]:
        names = self.ctx.names
        if weights is None:
            return dict(zip(names, self.config.weights, strict=True))
        if len(weights) != len(names):
            raise InvalidRequest(f"{len(weights)} weights given for {len(names)} members ({', '.join(names)})")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise InvalidRequest("weights must be non-negative and not all zero")
        return dict(zip(names, weights, strict=True))

    def resolve_gate(self, strategy: Strategy, options: RequestOptions) -> float | None:
        """The request's gate threshold; the config's applies only to strategies that gate."""
        if options.gate is not None:
            if not strategy.supports_gate:
                gated = ", ".join(fusion.gated_names())
                raise InvalidRequest(f"gate applies to {gated}, not {strategy.name!r}")
            if not 0 < options.gate <= 1:
                raise InvalidRequest(f"gate threshold must be in (0, 1], got {options.gate}")
            return options.gate
        if self.config.gate is not None and strategy.supports_gate:
            return self.config.gate.threshold
        return None

    def add(
        self,
        prompt: Prompt,
        params: SamplingParams,
        options: RequestOptions | None = None,
        seq_id: str | None = None,
        forced: Iterable[Candidate] = (),
        text_scorer: TextScorer | None = None,
    ) -> str:
        """Validate and queue one request; errors here are the request's, raised before it runs.

        A token-level strategy queues one sequence; an answer-level one (vote) queues the
        sequences it needs and answers for them under the returned id. `forced`: the pieces
        to emit instead of sampling (teacher-forced scoring); `text_scorer`: what scores them
        at the text level (`runtime/textprob.py`) instead of the strategy's own decision.
        """
        options = options or RequestOptions()
        strategy = self.strategy(options.strategy or self.default_strategy)
        check_options(strategy, options)
        if strategy.level == "answer":
            return strategy.admit(self, prompt, params, options, seq_id)
        if params.max_tokens > self.config.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens={params.max_tokens} is above this ensemble's limit of {self.config.max_tokens_limit}"
            )
        gate = self.resolve_gate(strategy, options)
        weights = self.resolve_weights(options.weights)
        ids = {name: self.member_prompt_ids(name, prompt) for name in self.ctx.names}
        for name, member_ids in ids.items():
            limit = self.ctx.max_context[name]
            if len(member_ids) + params.max_tokens > limit:
                raise PromptTooLong(
                    f"prompt is {len(member_ids)} tokens for member {name!r} and max_tokens is {params.max_tokens}, "
                    f"over its context of {limit} tokens; shorten the prompt or lower max_tokens"
                )
        seed = params.seed
        seq = SequenceState(
            seq_id=seq_id or self.new_id(),
            params=params,
            strategy=strategy,
            weights=weights,
            gate=gate,
            prompt_ids=ids,
            generator=make_generator(seed),
            draw_generator=make_generator(None if seed is None else seed + 7919),
            options=options,
            forced=deque(forced),
            grammar=ByteGrammar.of(params.constraint) if params.constraint is not None else None,
            text_scorer=text_scorer,
        )
        self.waiting.append(seq)
        return seq.seq_id

    def note(self, seq_id: str, diagnostic: dict[str, Any]) -> None:
        """Attach a diagnostic to a queued sequence's first delta (route: which members answer)."""
        seq = next((s for s in reversed(self.waiting) if s.seq_id == seq_id), None)
        if seq is None:
            raise KeyError(seq_id)
        seq.new_diagnostics.append(diagnostic)

    def sequences_needed(self, options: RequestOptions | None) -> int:
        """How many sequences a request occupies: one, or one per answer for an answer-level strategy."""
        return sequences_needed(self.config, options or RequestOptions())

    def prompt_tokens(self, seq_id: str) -> int:
        """The request's prompt length in the main member's tokens (as usage reports it)."""
        if seq_id in self.votes:
            return self.votes.prompt_tokens(seq_id)
        seq = self.running.get(seq_id) or next((s for s in self.waiting if s.seq_id == seq_id), None)
        if seq is None:
            raise KeyError(seq_id)
        return len(seq.prompt_ids[self.ctx.main])

    def room(self, prompt: Prompt) -> int:
        """Tokens every member's context leaves after `prompt`, capped by the ensemble's max_tokens limit."""
        room = min(
            self.ctx.max_context[name] - len(self.member_prompt_ids(name, prompt))
            for name in self.ctx.names
        )
        if room < 1:
            raise PromptTooLong(f"the conversation fills the context ({room} tokens left); shorten it")
        return min(room, self.config.max_tokens_limit)

    def _same_vocab(self, a: str, b: str) -> bool:
        return self.ctx.table(a).fingerprint == self.ctx.table(b).fingerprint

    def member_prompt_ids(self, name: str, prompt: Prompt) -> list[int]:
        """This member's prompt tokens; a prompt given as token ids keeps them exactly (as vLLM feeds
        them) for every member with their vocabulary, the others tokenize the ids' text."""
        if prompt.token_ids is not None and prompt.token_vocab is not None:
            if prompt.token_vocab not in self.members:
                raise InvalidRequest(f"token ids of an unknown member {prompt.token_vocab!r}")
            if self._same_vocab(name, prompt.token_vocab):
                return list(prompt.token_ids)
        return prompt_ids(self.members[name].tokenizer, prompt)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.echoes)

    def add_echo(self, context: str, continuation: str, options: RequestOptions | None = None) -> str | None:
        """Queue the scoring of `continuation` after `context` in ONE round: one member scoring alone,
        or `mean` over members that share one vocabulary (the average of their log-probs of the same
        token), `mean` over different vocabularies at the text level (runtime/textprob.py), and
        `deepen` from every member's result before every piece (runtime/echo_positions.py). None:
        this request must be scored piece by piece (under the gate), as `scoring.add_scoring` does.
        """
        options = options or RequestOptions()
        strategy = self.strategy(options.strategy or self.default_strategy)
        scored_as = strategy.scoring_strategy()
        weights = self.resolve_weights(options.weights)
        active = {n: w for n, w in weights.items() if w > 0}
        text_level = (
            len(active) > 1
            and scored_as is not None
            and fusion.strategy_class(scored_as).scores_text
            and not self.ctx.identical_vocab
            and self.resolve_gate(self.strategy(scored_as), options) is None
        )
        if text_level:
            return self._add_text_echo(context, continuation, active, options)
        if (
            len(active) > 1
            and scored_as is not None
            and fusion.strategy_class(scored_as).echoes_positions
            and self.resolve_gate(self.strategy(scored_as), options) is None
        ):
            tokenizer = self.members[self.ctx.main].tokenizer
            continuation_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
            if not continuation_ids:
                raise InvalidRequest("the continuation to score is empty")
            table = self.ctx.table(self.ctx.main)
            pieces = [Piece(table.token_bytes(i), self.ctx.main, i) for i in continuation_ids]
            return self._add_position_echo(Prompt(text=context), pieces, active, self.strategy(scored_as), options)
        if len(active) > 1 and not (scored_as == "mean" and self.ctx.identical_vocab):
            return None
        total = sum(active.values())
        scorer = next(iter(active))  # the ensemble's tokens are the main member's; with one vocabulary they agree
        if len(active) > 1:
            scorer = self.ctx.main
        tokenizer = self.members[scorer].tokenizer
        continuation_ids = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if not continuation_ids:
            raise InvalidRequest("the continuation to score is empty")
        state = EchoState(
            seq_id=self.new_id("echo"),
            members={n: w / total for n, w in active.items()},
            context_ids=prompt_ids(tokenizer, Prompt(text=context)),
            continuation_ids=continuation_ids,
            table=self.ctx.table(scorer),
            top_n=max(options.logprobs or 0, 1),
        )
        for name in state.members:
            limit = self.ctx.max_context[name]
            if len(state.context_ids) + len(continuation_ids) > limit:
                raise PromptTooLong(f"the prompt is over member {name!r}'s context of {limit} tokens; shorten it")
        self.echoes.append(state)
        return state.seq_id

    def _add_text_echo(
        self, context: str, continuation: str, active: dict[str, float], options: RequestOptions
    ) -> str:
        """Echo at the text level (runtime/textprob.py): one forward per member over its own tokens."""
        if not continuation:
            raise InvalidRequest("the continuation to score is empty")
        plan = TextPlan.build(continuation.encode("utf-8"), {n: self.ctx.table(n) for n in active})
        member_ids = {}
        for name in active:
            tokenizer = self.members[name].tokenizer
            ids = (prompt_ids(tokenizer, Prompt(text=context)), self.ctx.table(name).encode(continuation.encode("utf-8")))
            if len(ids[0]) + len(ids[1]) > self.ctx.max_context[name]:
                raise PromptTooLong(
                    f"the prompt is over member {name!r}'s context of {self.ctx.max_context[name]} tokens; shorten it"
                )
            member_ids[name] = ids
        main = self.ctx.main if self.ctx.main in active else next(iter(active))
        total = sum(active.values())
        state = EchoState(
            seq_id=self.new_id("echo"),
            members={n: w / total for n, w in active.items()},
            context_ids=member_ids[main][0],
            continuation_ids=member_ids[main][1],
            table=self.ctx.table(main),
            top_n=max(options.logprobs or 0, 1),
            plan=plan,
            member_ids=member_ids,
            lead=main,
        )
        self.echoes.append(state)
        return state.seq_id

    def _add_position_echo(
        self,
        context: Prompt,
        pieces: list[Piece],
        active: dict[str, float],
        strategy: Strategy,
        options: RequestOptions,
    ) -> str:
        """Echo from every member's result before every piece of the main member's tokens (DeePEn):
        the same pieces and prompts as scoring them piece by piece, in one round."""
        main = self.ctx.main
        member_ids: dict[str, tuple[list[int], list[int]]] = {
            name: (self.member_prompt_ids(name, context), []) for name in active
        }
        for name, (ids, _) in member_ids.items():
            # A member's own tokens of the text are about as many as the main member's (not known before the round).
            if len(ids) + len(pieces) > self.ctx.max_context[name]:
                raise PromptTooLong(
                    f"the prompt is over member {name!r}'s context of {self.ctx.max_context[name]} tokens; shorten it"
                )
        total = sum(active.values())
        state = EchoState(
            seq_id=self.new_id("echo"),
            members={n: w / total for n, w in active.items()},
            context_ids=member_ids[main][0],
            continuation_ids=[p.token_id for p in pieces if p.token_id is not None],
            table=self.ctx.table(main),
            top_n=max(options.logprobs or 0, 1),
            member_ids=member_ids,
            lead=main,
            pieces=pieces,
            strategy=strategy,
        )
        self.echoes.append(state)
        return state.seq_id

    def add_echo_ids(self, vocab: str, ids: list[int], options: RequestOptions | None = None) -> str | None:
        """`add_echo` of a prompt given as token ids of member `vocab`'s vocabulary: the log-prob of each id
        after those before it, one entry per id the client sent (ids[1:]; ids[0] is the context).

        Every active member with that vocabulary scores the ids as they are (canonical or not, as vLLM
        feeds them); one with another vocabulary scores its own tokens of the same bytes, at the text
        level, the text cut at the client's token ends too, so each id's entry is exact. None: this
        strategy scores piece by piece (`scoring.add_scoring_ids`).
        """
        if len(ids) < 2:
            raise InvalidRequest("echo log-probs of a token-id prompt need at least two ids")
        options = options or RequestOptions()
        strategy = self.strategy(options.strategy or self.default_strategy)
        scored_as = strategy.scoring_strategy()
        weights = self.resolve_weights(options.weights)
        active = {n: w for n, w in weights.items() if w > 0}
        owners = [n for n in active if self._same_vocab(n, vocab)]
        if not owners:
            raise InvalidRequest(
                f"the prompt's token ids are in member {vocab!r}'s vocabulary, which no member with a positive "
                "weight has: give it a weight, or send the prompt as text"
            )
        total = sum(active.values())
        state = EchoState(
            seq_id=self.new_id("echo"),
            members={n: w / total for n, w in active.items()},
            context_ids=list(ids[:1]),
            continuation_ids=list(ids[1:]),
            table=self.ctx.table(vocab),
            top_n=max(options.logprobs or 0, 1),
        )
        exact = len(active) == 1 or (scored_as == "mean" and len(owners) == len(active))
        text_level = (
            not exact
            and scored_as is not None
            and fusion.strategy_class(scored_as).scores_text
            and self.resolve_gate(self.strategy(scored_as), options) is None
        )
        positions = (
            not exact
            and not text_level
            and scored_as is not None
            and fusion.strategy_class(scored_as).echoes_positions
            and self._same_vocab(vocab, self.ctx.main)
            and self.resolve_gate(self.strategy(scored_as), options) is None
        )
        if positions:
            assert scored_as is not None
            return self._position_echo_ids(vocab, ids, active, self.strategy(scored_as), options)
        if not exact and not text_level:
            return None
        if text_level:
            self._plan_token_echo(state, vocab, owners)
        for name in active:
            context_ids, continuation_ids = state.member_ids.get(
                name, (state.context_ids, state.continuation_ids)
            )
            if len(context_ids) + len(continuation_ids) > self.ctx.max_context[name]:
                raise PromptTooLong(
                    f"the prompt is over member {name!r}'s context of {self.ctx.max_context[name]} tokens; shorten it"
                )
        self.echoes.append(state)
        return state.seq_id

    def _position_echo_ids(
        self, vocab: str, ids: list[int], active: dict[str, float], strategy: Strategy, options: RequestOptions
    ) -> str:
        """`_add_position_echo` of the client's ids as they are (the same context and pieces as
        `scoring.add_scoring_ids`)."""
        context, pieces = self.token_id_pieces(vocab, ids)
        return self._add_position_echo(context, pieces, active, strategy, options)

    def token_id_pieces(self, vocab: str, ids: list[int]) -> tuple[Prompt, list[Piece]]:
        """A prompt of the main member's token ids, to be scored: ids[0] as the context (fed as it is),
        each later id a piece of the main member's."""
        table = self.ctx.table(self.ctx.main)
        pieces = [Piece(table.token_bytes(i), self.ctx.main, i) for i in ids[1:]]
        if not all(p.data for p in pieces):
            raise InvalidRequest("a special token after the first prompt id cannot be scored by this strategy")
        head = str(self.members[vocab].tokenizer.decode(ids[:1]))
        return Prompt(text=head, token_ids=ids[:1], token_vocab=vocab), pieces

    def _plan_token_echo(self, state: EchoState, vocab: str, owners: list[str]) -> None:
        """The text-level plan of a token-id echo: the owners' tokens end where the client's ids end."""
        table = self.ctx.table(vocab)
        pieces = [table.token_bytes(i) for i in state.continuation_ids]
        if not all(pieces):
            raise InvalidRequest(
                "a special token after the first prompt id has no text that members with another vocabulary "
                "could score: send it as the first id only, or score with one member"
            )
        continuation = b"".join(pieces)
        client_ends = tuple(itertools.accumulate(len(p) for p in pieces))
        head = Prompt(text=str(self.members[vocab].tokenizer.decode(state.context_ids)))
        ends: dict[str, tuple[int, ...]] = {}
        for name in state.members:
            if name in owners:
                ends[name] = client_ends
                state.member_ids[name] = (state.context_ids, state.continuation_ids)
                continue
            own, own_ends = self.ctx.table(name).encode_spans(continuation)
            if not own_ends or own_ends[-1] != len(continuation):
                raise InvalidRequest(
                    f"member {name!r} cannot spell the prompt's text; score it with one member"
                )
            ends[name] = tuple(own_ends)
            state.member_ids[name] = (prompt_ids(self.members[name].tokenizer, head), own)
        state.plan = TextPlan(continuation, tuple(sorted({e for e_s in ends.values() for e in e_s})), ends)
        state.lead = vocab if vocab in owners else owners[0]

    # -- leaving -------------------------------------------------------------------------------
    def _drop(self, seq_ids: set[str]) -> None:
        """Forget sequences (and the votes they answer for); their members free them on their next call."""
        for parent in [i for i in seq_ids if i in self.votes]:
            seq_ids.update(self.votes.close(parent))
        self.waiting = deque(s for s in self.waiting if s.seq_id not in seq_ids)
        for seq_id in [i for i in seq_ids if i in self.running]:
            self._forget(self.running.pop(seq_id))

    def _forget(self, seq: SequenceState) -> None:
        for member in seq.admitted:
            self._unreleased[member].append(seq.seq_id)

    async def abort(self, seq_ids: Sequence[str]) -> None:
        """Drop sequences (a caller went away) and free their state in every member."""
        self._drop(set(seq_ids))
        await self.release_if_idle()

    def fail(self, *, waiting_too: bool = False) -> list[str]:
        """Drop every running sequence (and the waiting ones): a step failed under them.

        Returns the ids their callers wait on, each once (a vote's, for its answers).
        The members free what they held with their next call (`release_if_idle`, if
        none comes).
        """
        failed = list(self.running)
        if waiting_too:
            failed += [s.seq_id for s in self.waiting]
        callers = list(dict.fromkeys(self.votes.caller_of(seq_id) for seq_id in failed))
        self._drop(set(failed) | set(callers))
        # The echoes the failed round carried, and with the waiting ones those still queued.
        echoes, self._echoing = self._echoing, []
        if waiting_too:
            echoes += [echo.seq_id for echo in self.echoes]
            self.echoes = []
        return callers + echoes

    async def release_if_idle(self) -> None:
        """With nothing left to step, free what finished now: no next step would carry it."""
        if self.has_work or not any(self._unreleased.values()):
            return
        pending, self._unreleased = self._unreleased, defaultdict(list)
        await self.executor.release({m: ids for m, ids in pending.items() if ids})

    # -- the step ------------------------------------------------------------------------------
    async def step(self) -> list[Delta]:
        echoed = await self._echo() if self.echoes else []
        return echoed + await self._step_sequences()

    async def _echo(self) -> list[Delta]:
        """Every queued echo in one round: one forward per member over the whole text."""
        echoes, self.echoes = self.echoes, []
        works: dict[str, list[SeqWork]] = defaultdict(list)
        for echo in echoes:
            if echo.strategy is not None:
                self._position_echo_works(echo, works)
                continue
            for name in echo.members:
                context_ids, continuation_ids = echo.member_ids.get(name, (echo.context_ids, echo.continuation_ids))
                prefixes = []
                if echo.plan is not None:
                    # Echo reports positions 1.. of the whole text: the continuation's token j is at len(context) + j.
                    prefixes = [(len(context_ids) - 1 + j, text) for j, text in echo.plan.queries(name)]
                works[name].append(
                    SeqWork(
                        seq_id=echo.seq_id,
                        prompt_ids=context_ids + continuation_ids,
                        echo=True,
                        echo_prefixes=prefixes,
                        # Alone, the alternatives asked for are exact; fused, a few more per member
                        # let a token that is second for both come out first. Every extra one costs
                        # a top-k over the vocabulary at each position (262k rows for Gemma).
                        echo_top_k=echo.top_n if len(echo.members) == 1 else echo.top_n + 4,
                    )
                )
        release = {m: self._unreleased.pop(m) for m in works if self._unreleased.get(m)}
        # Freed with the members' next call even if this round fails (a member drops what it never held).
        for name, member_works in works.items():
            self._unreleased[name].extend(w.seq_id for w in member_works)
        self._echoing = [echo.seq_id for echo in echoes]
        replies = await self.executor.step(works, release)
        self._echoing = []
        by_echo: dict[str, dict[str, SeqResult]] = defaultdict(dict)
        for name, reply in replies.items():
            for result in reply.results:
                by_echo[result.seq_id][name] = result
        deltas = []
        for echo in echoes:
            try:
                entries = self._echo_entries(echo, by_echo[echo.seq_id])
            except Exception:  # this echo's failure is this request's alone
                log.exception("echo %s failed", echo.seq_id)
                deltas.append(Delta(seq_id=echo.seq_id, text="", finish_reason="error", error=SequenceFailed(echo.seq_id)))
                continue
            deltas.append(Delta(seq_id=echo.seq_id, text="", finish_reason="length", logprobs=entries))
        return deltas

    def _position_echo_works(self, echo: EchoState, works: dict[str, list[SeqWork]]) -> None:
        """Each member: its context and the pieces; the main member also the inverse search over the others'."""
        assert echo.strategy is not None
        spec = echo.strategy.echo_spec(echo.members)
        for name in echo.members:
            main = name == echo.lead
            works[name].append(
                SeqWork(
                    seq_id=echo.seq_id,
                    prompt_ids=echo.member_ids[name][0],
                    echo_pieces=echo.pieces,
                    full=main,  # the scored piece's own probability, and the candidates' mass, need all of it
                    relative=True,
                    invert=spec if main else None,
                )
            )

    def _echo_entries(self, echo: EchoState, results: dict[str, SeqResult]) -> list[TokenLogprob]:
        if echo.plan is not None:
            return self._text_echo_entries(echo, echo.plan, results)
        if echo.strategy is not None:
            positions = results[echo.lead].positions
            assert positions is not None and len(positions) == len(echo.pieces)
            entries = []
            for piece, position in zip(echo.pieces, positions, strict=True):
                assert position is not None and piece.token_id is not None
                decision = echo.strategy.position_decision(position)
                chosen = Candidate(piece.data, echo.lead, piece.token_id)
                entries.append(self._token_logprob(decision, chosen, -1, echo.top_n))
            return entries
        n = len(echo.continuation_ids)
        fused_token = torch.zeros(n, dtype=torch.float64)
        alternatives: list[dict[int, float]] = [defaultdict(float) for _ in range(n)]
        for name, weight in echo.members.items():
            result = results[name]
            assert result.echo_logprobs is not None and result.echo_top is not None
            # Echo reports every position after the first; the continuation is the last n of them.
            token_logprobs = torch.tensor(result.echo_logprobs[-n:], dtype=torch.float64)
            fused_token += weight * token_logprobs.exp()
            top_ids, top_logprobs = (t[-n:] for t in result.echo_top)
            for i in range(n):
                for token_id, logprob in zip(top_ids[i].tolist(), top_logprobs[i].tolist(), strict=True):
                    alternatives[i][token_id] += weight * math.exp(logprob)

        def show(token_id: int) -> tuple[str, bytes]:
            return self._shown(EOS_KEY if token_id in echo.table.eos_ids else echo.table.token_bytes(token_id))

        entries = []
        for i, token_id in enumerate(echo.continuation_ids):
            best = sorted(alternatives[i].items(), key=lambda kv: -kv[1])[: echo.top_n]
            text, data = show(token_id)
            entries.append(
                TokenLogprob(
                    token=text,
                    data=data,
                    logprob=math.log(max(float(fused_token[i]), 1e-300)),
                    top=[(show(t)[0], math.log(p)) for t, p in best],
                )
            )
        return entries

    def _text_echo_entries(self, echo: EchoState, plan: TextPlan, results: dict[str, SeqResult]) -> list[TokenLogprob]:
        """One entry per main-member token: the sum of the mixed log-probs of the pieces it spans.

        Its alternatives are the main member's own candidates with the main member's log-probs:
        how likely the ensemble finds a text that was not written is not computed.
        """
        conditionals = {}
        for name in echo.members:
            result = results[name]
            assert result.echo_logprobs is not None
            n = len(echo.member_ids[name][1])
            conditionals[name] = plan.conditionals(name, result.echo_logprobs[-n:], result.echo_masses or [])
        pieces = mix(conditionals, echo.members)
        main_ends = plan.ends[echo.lead]
        totals = [0.0] * len(main_ends)
        token = 0
        for end, logprob in zip(plan.cuts, pieces, strict=True):
            totals[token] += logprob
            if end == main_ends[token]:
                token += 1
        top = results[echo.lead].echo_top
        entries = []
        for i, token_id in enumerate(echo.continuation_ids):
            text, data = self._shown(echo.table.token_bytes(token_id))
            alternatives = []
            if top is not None:
                ids, values = (t[-len(echo.continuation_ids) :] for t in top)
                alternatives = [
                    (self._shown(echo.table.token_bytes(int(t)) if int(t) not in echo.table.eos_ids else EOS_KEY)[0], float(v))
                    for t, v in zip(ids[i][: echo.top_n].tolist(), values[i][: echo.top_n].tolist(), strict=True)
                ]
            entries.append(TokenLogprob(token=text, data=data, logprob=totals[i], top=alternatives))
        return entries

    async def _step_sequences(self) -> list[Delta]:
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting.popleft()
            self.running[seq.seq_id] = seq
        seqs = list(self.running.values())
        if not seqs:
            return []
        stats = StepStats(sequences=len(seqs))
        results: dict[str, dict[str, SeqResult]] = {s.seq_id: {} for s in seqs}
        await self._execute({s.seq_id: self._first(s) for s in seqs}, results, stats)
        more = {s.seq_id: s.strategy.more(s, results[s.seq_id]) for s in seqs if s.mid_char_owner is None}
        await self._execute({k: v for k, v in more.items() if v}, results, stats)
        inverted = await self._invert(seqs, results, stats)
        started = time.perf_counter()
        deltas = []
        for seq in seqs:
            try:
                decision = self._constrain(seq, results[seq.seq_id], self._decide(seq, results, inverted))
                deltas.append(self._advance(seq, decision, stats))
            except InvalidRequest as error:  # the request's own fault, in words written for its client
                log.info("sequence %s failed: %s", seq.seq_id, error)
                deltas.append(self._failed(seq, error))
            except Exception:  # one sequence's failure (a strategy's, the sampler's) is that sequence's alone
                log.exception("sequence %s failed; the other %d go on", seq.seq_id, len(seqs) - 1)
                deltas.append(self._failed(seq))
        stats.fusion_seconds += time.perf_counter() - started
        for seq in seqs:
            if seq.finish_reason is not None:
                self._forget(self.running.pop(seq.seq_id))
        self.last_stats = stats
        deltas = self._fail_votes(deltas)
        deltas = self.votes.collect(deltas) if self.votes else deltas
        await self.release_if_idle()
        return deltas

    def _decide(
        self, seq: SequenceState, results: dict[str, dict[str, SeqResult]], inverted: dict[str, torch.Tensor]
    ) -> Decision:
        if seq.mid_char_owner is not None:
            owner = seq.mid_char_owner
            forced = seq.forced[0] if seq.forced else None
            decision = single_member(self.ctx, owner, results[seq.seq_id][owner], forced)
        else:
            decision = seq.strategy.decide(seq, results[seq.seq_id], inverted.get(seq.seq_id))
        if seq.forced and seq.text_scorer is not None:
            decision.forced_logprob = seq.text_scorer.advance(results[seq.seq_id], seq.weights)
        return decision

    def _constrain(self, seq: SequenceState, results: dict[str, SeqResult], decision: Decision) -> Decision:
        """Structured output: what the ensemble samples from, restricted to what the grammar allows."""
        if seq.grammar is None or seq.forced:
            return decision
        return self.constrainer.constrain(seq.grammar, decision, results, seq.weights)

    def _failed(self, seq: SequenceState, error: ConsortError | None = None) -> Delta:
        seq.finish_reason = "error"
        return Delta(seq_id=seq.seq_id, text="", finish_reason="error", error=error or SequenceFailed(seq.seq_id))

    def _fail_votes(self, deltas: list[Delta]) -> list[Delta]:
        """A failed answer fails its vote: the caller gets the error, the other answers stop."""
        out = []
        for delta in deltas:
            caller = self.votes.caller_of(delta.seq_id)
            if delta.error is not None and caller != delta.seq_id:
                self._drop({caller})
                error = delta.error if isinstance(delta.error, InvalidRequest) else SequenceFailed(caller)
                out.append(Delta(seq_id=caller, text="", finish_reason="error", error=error))
            else:
                out.append(delta)
        return out

    def _first(self, seq: SequenceState) -> dict[str, WorkFlags]:
        if seq.mid_char_owner is not None:
            # Mid-character, the others' text ends before the owner's partial token: only it can go on.
            return {seq.mid_char_owner: WorkFlags()}
        return seq.strategy.first(seq)

    async def _execute(
        self, plan: dict[str, dict[str, WorkFlags]], results: dict[str, dict[str, SeqResult]], stats: StepStats
    ) -> None:
        if not plan:
            return
        works: dict[str, list[SeqWork]] = defaultdict(list)
        for seq_id, members in plan.items():
            seq = self.running[seq_id]
            for member, flags in members.items():
                if seq.grammar is not None and (member == self.ctx.main or len(members) == 1):
                    # A constrained step that widens scores the allowed tokens of the member it speaks for
                    # (the main one, or the one computing alone) exactly: that member's full distribution.
                    flags = replace(flags, full=True)
                works[member].append(self._work(seq, member, flags))
        self._ride_along(works, plan)
        if self.invert_in_step:
            self._ask_inverts(works, plan, results)
        release = {m: self._unreleased.pop(m) for m in works if self._unreleased.get(m)}
        stats.rounds += 1
        replies = await self.executor.step(works, release)
        for member, reply in replies.items():
            for work, result in zip(works[member], reply.results, strict=True):
                if work.compute:  # a rider only took its text in: it has no distribution to give
                    results[result.seq_id][member] = result
                elif work.invert is not None:  # the inverse search over a result of an earlier round
                    earlier = results[result.seq_id][member]
                    earlier.candidate_ids, earlier.inverted = result.candidate_ids, result.inverted
            stats.member_seconds[member] = stats.member_seconds.get(member, 0.0) + reply.seconds
            stats.member_batch[member] = max(stats.member_batch.get(member, 0), len(works[member]))

    def _ask_inverts(
        self,
        works: dict[str, list[SeqWork]],
        plan: dict[str, dict[str, WorkFlags]],
        results: dict[str, dict[str, SeqResult]],
    ) -> None:
        """DeePEn in the same round: the main member's work carries the inverse search, and the
        executor hands it the other members' results of this round, so the search runs right after
        the main member's forward instead of in a round of its own. Under the gate the main member
        computed in the first round; it then takes only the search in the second."""
        main = self.ctx.main
        for seq_id, members in plan.items():
            seq = self.running[seq_id]
            if seq.mid_char_owner is not None:
                continue
            spec = seq.strategy.invert_spec(seq, set(results[seq_id]) | set(members))
            if spec is None:
                continue
            if main in members:
                work = next(w for w in works[main] if w.seq_id == seq_id)
                work.invert = spec
            else:
                earlier = results[seq_id][main]  # what the search reads of it, not a full distribution
                spec.main_result = SeqResult(
                    seq_id, top_ids=earlier.top_ids, top_logprobs=earlier.top_logprobs, relative=earlier.relative
                )
                works[main].append(SeqWork(seq_id=seq_id, compute=False, invert=spec))

    def _ride_along(self, works: dict[str, list[SeqWork]], plan: dict[str, dict[str, WorkFlags]]) -> None:
        """A member that runs a forward anyway takes in the text of the other sequences it holds.

        Under `me` (and the gate) a member computes only some sequences each step. Left
        lazy, the others' text would arrive later as wide catch-ups and the member's batch
        would change every step, rebuilding its packed cache; riding along costs a row of
        the same forward, without the output layer. A member that does not run at all this
        step stays lazy: that is what makes `me` fast for a single request. Members with
        weight zero for a sequence never see it.
        """
        for member, member_works in works.items():
            for seq in self.running.values():
                if member in plan.get(seq.seq_id, {}) or seq.weight(member) <= 0:
                    continue
                # Not yet admitted: admitted now with the others, not when first drawn, so the pack forms once.
                if member not in seq.admitted or seq.unsent.get(member):
                    member_works.append(self._work(seq, member, None))

    @staticmethod
    def _work(seq: SequenceState, member: str, flags: WorkFlags | None) -> SeqWork:
        """The member's work for this sequence: its prompt the first time, the text it has not seen,
        and what to return (`flags`; None: nothing, the text only rides along)."""
        first_time = member not in seq.admitted
        seq.admitted.add(member)
        return SeqWork(
            seq_id=seq.seq_id,
            prompt_ids=seq.prompt_ids[member] if first_time else None,
            pieces=seq.unsent.pop(member, []),
            compute=flags is not None,
            full=flags is not None and (flags.full or bool(seq.forced)),  # scoring needs exact log-probs
            relative=flags is not None and flags.relative,
        )

    async def _invert(
        self, seqs: list[SequenceState], results: dict[str, dict[str, SeqResult]], stats: StepStats
    ) -> dict[str, torch.Tensor]:
        if self.invert_in_step:
            return self._inverted_in_step(seqs, results)
        works = []
        for seq in seqs:
            seq.pending_invert = None
            if seq.mid_char_owner is None:
                seq.pending_invert = seq.strategy.invert_work(seq, results[seq.seq_id])
                if seq.pending_invert is not None:
                    works.append(seq.pending_invert)
        if not works:
            return {}
        deepen = self.config.deepen
        started = time.perf_counter()
        stats.rounds += 1
        inverted = await self.executor.invert(self.ctx.main, works, deepen.steps, deepen.learning_rate)
        stats.fusion_seconds += time.perf_counter() - started
        return {w.seq_id: out for w, out in zip(works, inverted, strict=True)}

    def _inverted_in_step(
        self, seqs: list[SequenceState], results: dict[str, dict[str, SeqResult]]
    ) -> dict[str, torch.Tensor]:
        """The inverse searches the main member ran within this step's rounds."""
        inverted = {}
        for seq in seqs:
            seq.pending_invert = None
            main = results[seq.seq_id].get(self.ctx.main)
            if seq.mid_char_owner is None and main is not None and main.inverted is not None:
                assert main.candidate_ids is not None
                # What `decide` reads of the search: its candidates (the target stayed on the member).
                empty = torch.empty(0)
                seq.pending_invert = InvertWork(seq.seq_id, empty, main.candidate_ids, empty)
                inverted[seq.seq_id] = main.inverted
        return inverted

    def _advance(self, seq: SequenceState, decision: Decision, stats: StepStats) -> Delta:
        if seq.forced:
            chosen = seq.forced.popleft()
            index = -1
        else:
            logprobs = decision.logprobs
            if seq.params.ignore_eos:
                # Generating past the end means never choosing it: there is no text to emit for it.
                eos = torch.tensor([c.key == EOS_KEY for c in decision.candidates])
                if eos.any() and not eos.all():
                    logprobs = logprobs.masked_fill(eos, float("-inf"))
            # Only asked for when the choice is greedy: walking the pieces' trie every sampled step would be waste.
            mode = functools.partial(text_greedy, [c.key for c in decision.candidates], logprobs)
            index = sample(logprobs, seq.params, seq.generator, mode if decision.text_level else None)
            chosen = decision.candidates[index]
        seq.tokens += 1
        if decision.fused:
            seq.fused_steps += 1
            stats.fused += 1
        if decision.drawn is not None:
            seq.draws[decision.drawn] += 1
            stats.draws[decision.drawn] += 1
        if seq.options.logprobs is not None:
            seq.new_logprobs.append(self._token_logprob(decision, chosen, index, seq.options.logprobs))
        if seq.options.diagnostics:
            seq.new_diagnostics.append(
                {"step": seq.tokens, "fused": decision.fused, "drawn": decision.drawn,
                 "owner": chosen.owner, "candidates": len(decision.candidates),
                 "piece": chosen.key.decode("utf-8", errors="backslashreplace")}
            )
        if index == -1:
            stop_token = False
        else:
            stop_token = chosen.key == EOS_KEY or (
                chosen.owner == self.ctx.main and chosen.token_id in seq.params.stop_token_ids
            )
        if stop_token and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
        else:
            piece = Piece(chosen.key if chosen.key != EOS_KEY else b"", chosen.owner, chosen.token_id)
            for member in self.ctx.names:
                seq.unsent[member].append(piece)
            if seq.grammar is not None:
                seq.grammar.advance(piece.data)
            before = len(seq.text)
            seq.text += seq.decoder.decode(piece.data)
            seq.mid_char_owner = chosen.owner if seq.decoder.getstate()[0] else None
            stop_at = find_stop(seq.text, seq.params.stop, before)
            if stop_at is not None:
                seq.text = seq.text[:stop_at]
                seq.finish_reason = "stop"
            elif seq.grammar is not None and seq.grammar.complete:
                seq.finish_reason = "stop"  # the grammar admits nothing more: its end is the answer's
            elif seq.tokens >= seq.params.max_tokens:
                seq.finish_reason = "length"
        return self._delta(seq)

    def _delta(self, seq: SequenceState) -> Delta:
        hold = 0 if seq.finish_reason else stop_holdback(seq.text, seq.params.stop)
        end = max(seq.streamed, len(seq.text) - hold)
        delta = Delta(
            seq_id=seq.seq_id,
            text=seq.text[seq.streamed : end],
            finish_reason=seq.finish_reason,
            logprobs=seq.new_logprobs,
            prompt_tokens=len(seq.prompt_ids[self.ctx.main]),
            completion_tokens=seq.tokens,
            diagnostics=seq.new_diagnostics,
        )
        seq.streamed = end
        seq.new_logprobs, seq.new_diagnostics = [], []
        return delta

    @functools.cached_property
    def _eos_text(self) -> str:
        """How an end-of-sequence token is shown in log-probs: the main member's own (as vLLM does)."""
        main = self.ctx.main
        eos_id = min(self.ctx.table(main).eos_ids)
        return str(self.members[main].tokenizer.convert_ids_to_tokens(eos_id))

    def _shown(self, key: bytes) -> tuple[str, bytes]:
        """A candidate key as log-probs report it: its text, and the bytes it adds to the answer
        (an end-of-sequence token is shown as the main member's own and adds none)."""
        if key == EOS_KEY:
            return self._eos_text, b""
        return key.decode("utf-8", errors="backslashreplace"), key

    def _token_logprob(self, decision: Decision, chosen: Candidate, index: int, top_n: int) -> TokenLogprob:
        order = torch.argsort(decision.logprobs, descending=True)[:top_n].tolist()
        logprob = decision.forced_logprob if index == -1 else float(decision.logprobs[index])
        assert logprob is not None
        token, data = self._shown(chosen.key)
        return TokenLogprob(
            token=token,
            data=data,
            logprob=logprob,
            top=[(self._shown(decision.candidates[i].key)[0], float(decision.logprobs[i])) for i in order],
        )
