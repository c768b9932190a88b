"""The ensemble's step loop, shared by the in-process loop and the Ray coordinator.

Like vLLM's engine core: `step()` schedules the sequences that advance now,
executes the members that must work (through an `Executor`: direct calls in one
process, actor calls on Ray), lets each sequence's strategy fuse or select,
samples, and updates every sequence's text. Results do not depend on which
executor runs the members.
"""

from __future__ import annotations

import codecs
import itertools
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from runtime import fusion
from runtime.config import EnsembleConfig
from runtime.errors import ConfigError, InvalidRequest, PromptTooLong
from runtime.fusion.base import (
    EOS_KEY,
    Candidate,
    Decision,
    EnsembleContext,
    Strategy,
    WorkFlags,
    single_member,
)
from runtime.prompts import Prompt, prompt_ids
from runtime.sampling import SamplingParams, find_stop, make_generator, sample, stop_holdback
from runtime.vocab import TokenTable, anchors
from runtime.worker import InvertWork, Piece, SeqResult, SeqWork


@dataclass
class MemberReply:
    """One member's results in a round, and its round trip as the executor saw it."""

    results: list[SeqResult]
    seconds: float


class Executor(Protocol):
    """Runs member work in rounds, one concurrent round per phase of a step: in process, or on
    member actors (a round is then one compiled-graph execution or one call per member)."""

    async def step(self, works: Mapping[str, list[SeqWork]]) -> dict[str, MemberReply]: ...

    async def invert(self, member: str, works: list[InvertWork], steps: int, learning_rate: float) -> list[torch.Tensor]: ...

    async def release(self, seq_ids: Mapping[str, list[str]]) -> None: ...


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
    vote_kind: str | None = None  # vote: number | choice | span | free (default: the config's)
    vote_choices: int | None = None  # vote with kind=choice: how many options the question has


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


@dataclass
class SequenceState:
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
    fused_steps: int = 0
    draws: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def weight(self, member: str) -> float:
        return self.weights[member]


@dataclass
class VoteGroup:
    """A `vote` request: several complete answers, sampled across members, then one is chosen."""

    parent_id: str
    children: list[str]
    kind: str
    n_choices: int | None
    texts: dict[str, str] = field(default_factory=dict)
    finish: dict[str, str] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0


@dataclass
class StepStats:
    """What one step did, for metrics and benchmarks."""

    sequences: int = 0
    member_seconds: dict[str, float] = field(default_factory=dict)
    member_batch: dict[str, int] = field(default_factory=dict)
    fusion_seconds: float = 0.0
    fused: int = 0
    draws: dict[str, int] = field(default_factory=lambda: defaultdict(int))


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
        self.default_strategy = config.strategy
        self.waiting: deque[SequenceState] = deque()
        self.running: dict[str, SequenceState] = {}
        self.last_stats = StepStats()
        self._counter = itertools.count()
        self.groups: dict[str, VoteGroup] = {}
        self._parent_of: dict[str, str] = {}
        self.embedder: Any = None  # loaded on the first free-text vote

    @property
    def anchor_count(self) -> int:
        assert self.ctx.anchors is not None
        return len(next(iter(self.ctx.anchors.values())))

    def strategy(self, name: str) -> Strategy:
        if name not in self._strategies:
            self._strategies[name] = fusion.create(name, self.ctx)
        return self._strategies[name]

    # -- admission -----------------------------------------------------------------------------
    def resolve_weights(self, weights: list[float] | None) -> dict[str, float]:
        names = self.ctx.names
        if weights is None:
            return dict(zip(names, self.config.weights, strict=True))
        if len(weights) != len(names):
            raise ConfigError(f"{len(weights)} weights given for {len(names)} members ({', '.join(names)})")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ConfigError("weights must be non-negative and not all zero")
        return dict(zip(names, weights, strict=True))

    def add(
        self,
        prompt: Prompt,
        params: SamplingParams,
        options: RequestOptions | None = None,
        seq_id: str | None = None,
    ) -> str:
        """Validate and queue one sequence; errors here are the request's, raised before it runs."""
        options = options or RequestOptions()
        strategy_name = options.strategy or self.default_strategy
        if strategy_name == "vote":
            return self._add_vote(prompt, params, options, seq_id)
        strategy = self.strategy(strategy_name)
        gate = options.gate if options.gate is not None else (self.config.gate.threshold if self.config.gate else None)
        if gate is not None and strategy_name not in ("mean", "deepen"):
            raise ConfigError(f"gate applies to mean and deepen, not {strategy_name!r}")
        if gate is not None and not 0 < gate <= 1:
            raise InvalidRequest(f"gate threshold must be in (0, 1], got {gate}")
        if params.max_tokens > self.config.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens={params.max_tokens} is above this ensemble's limit of {self.config.max_tokens_limit}"
            )
        ids = {name: prompt_ids(self.members[name].tokenizer, prompt) for name in self.ctx.names}
        for name, member_ids in ids.items():
            limit = self.ctx.max_context[name]
            if len(member_ids) + params.max_tokens > limit:
                raise PromptTooLong(
                    f"prompt is {len(member_ids)} tokens for member {name!r} and max_tokens is {params.max_tokens}, "
                    f"over its context of {limit} tokens; shorten the prompt or lower max_tokens"
                )
        seed = params.seed
        seq = SequenceState(
            seq_id=seq_id or f"seq-{next(self._counter)}-{uuid.uuid4().hex[:8]}",
            params=params,
            strategy=strategy,
            weights=self.resolve_weights(options.weights),
            gate=gate,
            prompt_ids=ids,
            generator=make_generator(seed),
            draw_generator=make_generator(None if seed is None else seed + 7919),
            options=options,
        )
        self.waiting.append(seq)
        return seq.seq_id

    def _add_vote(
        self, prompt: Prompt, params: SamplingParams, options: RequestOptions, seq_id: str | None
    ) -> str:
        """Agent Forest: sample N answers spread over the members (or with a token-level strategy), pick one."""
        vote = self.config.vote
        samples = options.vote_samples or vote.samples
        kind = options.vote_kind or vote.kind
        if kind not in ("number", "choice", "span", "free"):
            raise InvalidRequest(f"vote kind must be number, choice, span or free, not {kind!r}")
        if kind == "choice" and not options.vote_choices:
            raise InvalidRequest("vote with kind=choice needs the number of choices")
        temperature = params.temperature if params.temperature > 0 else vote.temperature
        parent = seq_id or f"vote-{next(self._counter)}-{uuid.uuid4().hex[:8]}"
        weights = self.resolve_weights(options.weights)
        voters = [n for n in self.ctx.names if weights[n] > 0]
        children = []
        for i in range(samples):
            if vote.base == "member":
                child_options = RequestOptions(
                    strategy="me", weights=[1.0 if n == voters[i % len(voters)] else 0.0 for n in self.ctx.names]
                )
            else:
                child_options = RequestOptions(strategy=vote.base, weights=options.weights, gate=options.gate)
            child_params = params.model_copy(
                update={"temperature": temperature, "seed": None if params.seed is None else params.seed + i}
            )
            children.append(self.add(prompt, child_params, child_options, seq_id=f"{parent}/{i}"))
        group = VoteGroup(parent, children, kind, options.vote_choices)
        group.prompt_tokens = len(self.waiting[-1].prompt_ids[self.ctx.main])
        self.groups[parent] = group
        for child in children:
            self._parent_of[child] = parent
        return parent

    def _collect_votes(self, deltas: list[Delta]) -> list[Delta]:
        """Hold the children's deltas back; when a group's answers are all in, emit the chosen one."""
        from runtime.vote import default_embedder, select_answer

        out = []
        for delta in deltas:
            parent = self._parent_of.get(delta.seq_id)
            if parent is None:
                out.append(delta)
                continue
            group = self.groups[parent]
            group.texts[delta.seq_id] = group.texts.get(delta.seq_id, "") + delta.text
            if delta.finish_reason:
                group.finish[delta.seq_id] = delta.finish_reason
                group.tokens[delta.seq_id] = delta.completion_tokens
            if len(group.finish) == len(group.children):
                answers = [group.texts.get(c, "") for c in group.children]
                if group.kind == "free" and self.embedder is None and len(answers) > 1:
                    self.embedder = default_embedder()
                result = select_answer(
                    answers, kind=group.kind, n_choices=group.n_choices,  # type: ignore[arg-type]
                    embedder=self.embedder,
                )
                chosen = group.children[result.index]
                out.append(
                    Delta(
                        seq_id=parent,
                        text=answers[result.index],
                        finish_reason=group.finish[chosen],
                        prompt_tokens=group.prompt_tokens,
                        completion_tokens=group.tokens[chosen],
                        diagnostics=[{"vote": result.model_dump(), "answers": answers}],
                    )
                )
                for child in group.children:
                    self._parent_of.pop(child, None)
                del self.groups[parent]
        return out

    def add_scoring(self, context: Prompt, continuation: str, options: RequestOptions | None = None) -> str:
        """Queue a teacher-forced sequence: the continuation, in the main member's tokens, scored piece by piece.

        Its deltas carry each piece's log-probability under the request's strategy;
        `me` is scored as the weighted mixture it samples from, i.e. as `mean`.
        """
        if not continuation:
            raise InvalidRequest("the continuation to score is empty")
        options = options or RequestOptions()
        strategy = "mean" if options.strategy == "me" else options.strategy
        options = RequestOptions(
            strategy=strategy, weights=options.weights, gate=options.gate, logprobs=max(options.logprobs or 0, 1)
        )
        main = self.ctx.main
        ids = self.members[main].tokenizer(continuation, add_special_tokens=False)["input_ids"]
        table = self.ctx.table(main)
        pieces = deque(Candidate(table.token_bytes(i), main, i) for i in ids)
        seq_id = self.add(context, SamplingParams(temperature=0.0, max_tokens=len(ids), ignore_eos=True), options)
        self.waiting[-1].forced = pieces
        return seq_id

    def prompt_tokens(self, seq_id: str) -> int:
        if seq_id in self.groups:
            return self.groups[seq_id].prompt_tokens
        seq = self.running.get(seq_id) or next((s for s in self.waiting if s.seq_id == seq_id), None)
        return len(seq.prompt_ids[self.ctx.main]) if seq else 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    async def abort(self, seq_ids: Sequence[str]) -> None:
        """Drop sequences (a caller went away) and free their state in every member."""
        drop = set(seq_ids)
        for parent in [i for i in drop if i in self.groups]:
            group = self.groups.pop(parent)
            drop.update(group.children)
            for child in group.children:
                self._parent_of.pop(child, None)
        self.waiting = deque(s for s in self.waiting if s.seq_id not in drop)
        await self._release([self.running.pop(i) for i in list(drop) if i in self.running])

    # -- the step ------------------------------------------------------------------------------
    async def step(self) -> list[Delta]:
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
            if seq.mid_char_owner is not None:
                owner = seq.mid_char_owner
                decision = single_member(self.ctx, owner, results[seq.seq_id][owner], seq.forced[0] if seq.forced else None)
            else:
                decision = seq.strategy.decide(seq, results[seq.seq_id], inverted.get(seq.seq_id))
            deltas.append(self._advance(seq, decision, stats))
        stats.fusion_seconds += time.perf_counter() - started
        await self._release([s for s in seqs if s.finish_reason is not None])
        self.last_stats = stats
        return self._collect_votes(deltas) if self.groups else deltas

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
                works[member].append(self._work(seq, member, flags))
        self._ride_along(works, plan)
        replies = await self.executor.step(works)
        for member, reply in replies.items():
            for work, result in zip(works[member], reply.results, strict=True):
                if work.compute:  # a rider only took its text in: it has no distribution to give
                    results[result.seq_id][member] = result
            stats.member_seconds[member] = stats.member_seconds.get(member, 0.0) + reply.seconds
            stats.member_batch[member] = max(stats.member_batch.get(member, 0), len(works[member]))

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
        inverted = await self.executor.invert(self.ctx.main, works, deepen.steps, deepen.learning_rate)
        stats.fusion_seconds += time.perf_counter() - started
        return {w.seq_id: out for w, out in zip(works, inverted, strict=True)}

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
            index = sample(logprobs, seq.params, seq.generator)
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
            before = len(seq.text)
            seq.text += seq.decoder.decode(piece.data)
            seq.mid_char_owner = chosen.owner if seq.decoder.getstate()[0] else None
            stop_at = find_stop(seq.text, seq.params.stop, before)
            if stop_at is not None:
                seq.text = seq.text[:stop_at]
                seq.finish_reason = "stop"
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
        if seq.finish_reason:
            delta.completion_tokens = len(
                self.members[self.ctx.main].tokenizer(seq.text, add_special_tokens=False)["input_ids"]
            )
        return delta

    @staticmethod
    def _token_logprob(decision: Decision, chosen: Candidate, index: int, top_n: int) -> TokenLogprob:
        def show(data: bytes) -> str:
            return "" if data == EOS_KEY else data.decode("utf-8", errors="backslashreplace")

        order = torch.argsort(decision.logprobs, descending=True)[:top_n].tolist()
        logprob = decision.forced_logprob if index == -1 else float(decision.logprobs[index])
        assert logprob is not None
        return TokenLogprob(
            token=show(chosen.key),
            data=chosen.key,
            logprob=logprob,
            top=[(show(decision.candidates[i].key), float(decision.logprobs[i])) for i in order],
        )

    async def _release(self, seqs: list[SequenceState]) -> None:
        by_member: dict[str, list[str]] = defaultdict(list)
        for seq in seqs:
            self.running.pop(seq.seq_id, None)
            for member in seq.admitted:
                by_member[member].append(seq.seq_id)
        if by_member:
            await self.executor.release(by_member)
