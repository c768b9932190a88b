"""The member side of one step: alignment, one batched forward, compact outputs.

A `MemberWorker` is what a member actor wraps and what the in-process loop calls
directly. Each call carries, per sequence, the text emitted since this member
last saw it (lazy catch-up for `me` and `gate` is the same thing with more text),
and asks for only what the strategy needs back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from consort.runtime import echo_positions
from consort.runtime.alignment import Aligner
from consort.runtime.fusion.base import member_key, table_logprob
from consort.runtime.fusion.deepen import build_invert_work, forced_logprob
from consort.runtime.member import MemberEngine
from consort.runtime.relative import RelativeSpace
from consort.runtime.types import InvertSpec, InvertWork, Piece, SeqResult, SeqWork
from consort.runtime.vocab import TokenTable

_TABLES: dict[int, tuple[Any, frozenset[int], TokenTable]] = {}


def token_table(tokenizer: Any, eos_ids: frozenset[int]) -> TokenTable:
    """One table per tokenizer object: building one for a 262k vocabulary takes seconds."""
    cached = _TABLES.get(id(tokenizer))
    # The tokenizer is kept in the entry, so its id cannot be reused by another object.
    if cached is None or cached[1] != eos_ids:
        cached = (tokenizer, eos_ids, TokenTable.from_tokenizer(tokenizer, eos_ids=eos_ids))
        _TABLES[id(tokenizer)] = cached
    return cached[2]


def inverting_member(works: Mapping[str, Sequence[SeqWork]]) -> str | None:
    """The member of a round whose works carry DeePEn's inverse search: it must get the other
    members' results of the round (see `MemberWorker.finish_inverts`). At most one: the main member."""
    found = [member for member, member_works in works.items() if any(w.invert is not None for w in member_works)]
    if len(found) > 1:
        raise ValueError(f"only the main member runs the inverse search; this round asks it of {found}")
    return found[0] if found else None


class MemberWorker:
    """One member: its engine, its per-sequence text alignment, and its relative space."""

    def __init__(self, name: str, engine: MemberEngine, *, top_k: int = 64, window_tokens: int = 8) -> None:
        self.name = name
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.table = token_table(self.tokenizer, frozenset(engine.eos_token_ids))
        self.top_k = top_k
        self._window_tokens = window_tokens
        self._aligners: dict[str, Aligner] = {}
        self._prompt_len: dict[str, int] = {}
        self._space: RelativeSpace | None = None
        self._relative_top_k = 16
        self._main = False  # DeePEn's main member: it runs the inverse search
        # The main member's whole distribution at each sequence's latest computed position: DeePEn's
        # search starts from its log-probs of every candidate, which the top-k it ships does not hold.
        self._rows: dict[str, torch.Tensor] = {}

    # -- configuration -------------------------------------------------------------------------
    def set_anchors(
        self, anchor_ids: Sequence[int], temperature: float, relative_top_k: int, main: bool = False
    ) -> int:
        embeddings = self.engine.model.get_input_embeddings().weight.detach()
        self._space = RelativeSpace(embeddings, anchor_ids, temperature)
        self._relative_top_k = relative_top_k
        self._main = main
        return self._space.num_anchors

    # -- sequences -----------------------------------------------------------------------------
    def release(self, seq_ids: Sequence[str]) -> None:
        for seq_id in seq_ids:
            self.engine.remove(seq_id)
            self._aligners.pop(seq_id, None)
            self._prompt_len.pop(seq_id, None)
            self._rows.pop(seq_id, None)

    @property
    def held_sequences(self) -> int:
        return len(self._aligners)

    def _admit(self, seq_id: str, ids: list[int]) -> int:
        self.engine.add(seq_id, ids)
        self._aligners[seq_id] = Aligner(self.tokenizer, self.table, window_tokens=self._window_tokens)
        self._prompt_len[seq_id] = len(ids)
        return len(ids)

    def _catch_up(self, seq_id: str, pieces: Sequence[Piece]) -> None:
        aligner = self._aligners[seq_id]
        for piece in pieces:
            if piece.owner == self.name and piece.token_id is not None:
                edit = aligner.append_own(piece.token_id)
            else:
                edit = aligner.append(piece.data)
            base = self._prompt_len[seq_id]
            if base + edit.keep < len(self.engine.token_ids(seq_id)):
                self.engine.crop(seq_id, base + edit.keep)
            if edit.feed:
                self.engine.extend(seq_id, edit.feed)

    # -- the step ------------------------------------------------------------------------------
    def step(self, works: Sequence[SeqWork]) -> list[SeqResult]:
        results: dict[str, SeqResult] = {}
        for work in works:
            result = SeqResult(seq_id=work.seq_id)
            if work.prompt_ids is not None and work.echo_pieces is None:  # an echo of pieces admits itself
                result.prompt_tokens = self._admit(work.seq_id, work.prompt_ids)
            if work.pieces:
                self._catch_up(work.seq_id, work.pieces)
            results[work.seq_id] = result
        for work in works:
            if work.echo_pieces is not None:
                results[work.seq_id].positions = self._echo_positions(work)
        computing = [w for w in works if w.compute and w.echo_pieces is None]
        if computing:
            outputs = self.engine.step(
                [w.seq_id for w in computing],
                top_k=self.top_k,
                full={w.seq_id for w in computing if w.full or (self._main and w.relative)},
                echo={w.seq_id for w in computing if w.echo},
                echo_top_k=max((w.echo_top_k for w in computing), default=0),
                kv_only=[w.seq_id for w in works if not w.compute],
                echo_masses={
                    w.seq_id: [(j, torch.from_numpy(self.table.prefix_ids(text))) for j, text in w.echo_prefixes]
                    for w in computing
                    if w.echo and w.echo_prefixes
                },
            )
            relatives = []
            for work in computing:
                out, result = outputs[work.seq_id], results[work.seq_id]
                result.top_ids, result.top_logprobs, result.logprobs = out.top_ids, out.top_logprobs, out.logprobs
                if self._main and work.relative:
                    self._rows[work.seq_id] = out.logprobs
                    if not work.full:
                        result.logprobs = None  # kept here for the search; the coordinator did not ask for it
                if work.echo:
                    result.echo_ids = self.engine.token_ids(work.seq_id)
                    result.echo_logprobs, result.echo_top = out.echo_logprobs, out.echo_top
                    result.echo_masses = out.echo_masses
                if work.relative:
                    relatives.append(result)
            self._add_relatives(relatives)
        return [results[w.seq_id] for w in works]

    def _add_relatives(self, results: Sequence[SeqResult]) -> None:
        """DeePEn: each result's relative vector (all of them in one batched projection), and the keys
        of its top tokens, which the main member needs to map this member's candidates into its vocabulary."""
        if not results:
            return
        vectors = self.project_many([(r.top_ids, r.top_logprobs) for r in results])
        for result, vector in zip(results, vectors, strict=True):
            result.relative = vector.clone()  # its own memory: a row view would ship the whole batch's
            top = result.top_ids[: self._relative_top_k].tolist()
            result.top_keys = [member_key(self.table, token_id) for token_id in top]

    def _echo_positions(self, work: SeqWork) -> list[SeqResult | None]:
        """Echo under DeePEn: this member's result before each piece (see runtime/echo_positions.py).
        Inside a character split by the main member's token only the main member computes (it is
        the one whose work carries the inverse search)."""
        pieces = work.echo_pieces or []
        if work.prompt_ids is None:
            raise ValueError(f"sequence {work.seq_id}: an echo of pieces needs its context as prompt_ids")
        states = echo_positions.prefix_states(self.tokenizer, self.table, self.name, pieces, self._window_tokens)
        inside = echo_positions.mid_character(pieces)
        wanted = [work.invert is not None or not mid for mid in inside]
        outputs = echo_positions.positions(
            self.engine, work.seq_id, work.prompt_ids, states, wanted, top_k=self.top_k, full=work.full
        )
        results: list[SeqResult | None] = []
        for out in outputs:
            if out is None:
                results.append(None)
                continue
            results.append(
                SeqResult(work.seq_id, top_ids=out.top_ids, top_logprobs=out.top_logprobs, logprobs=out.logprobs)
            )
        if work.relative:
            self._add_relatives([r for r in results if r is not None])
        return results

    def finish_inverts(
        self, works: Sequence[SeqWork], results: Sequence[SeqResult], peers: Mapping[str, Sequence[SeqResult]]
    ) -> None:
        """DeePEn within the step, on the main member: for each work that carries `invert`, the
        inverse search from this member's result (this round's, or the one the spec carries from an
        earlier round) and the other members' results of the same round (`peers`), written into
        this member's result (`candidate_ids`, `inverted`)."""
        by_peer = {name: {r.seq_id: r for r in replies} for name, replies in peers.items()}
        # Batched by search settings (the ensemble's, unless a request chose its own).
        searches: dict[tuple[int, float], list[tuple[SeqResult, InvertWork]]] = {}
        for work, result in zip(works, results, strict=True):
            spec = work.invert
            if spec is None:
                continue
            if work.echo_pieces is not None:
                self._finish_echo_inverts(work, spec, result, by_peer)
                continue
            own = spec.main_result if spec.main_result is not None else result
            answers: dict[str, SeqResult] = {self.name: own}
            keys: dict[str, list[bytes | None]] = {}
            for name in spec.members:
                if name == self.name:
                    continue
                peer = by_peer.get(name, {}).get(work.seq_id)
                if peer is None or peer.top_keys is None:
                    raise RuntimeError(
                        f"member {self.name!r}: sequence {work.seq_id} needs member {name!r}'s relative vector "
                        "and top keys for the inverse search, and this round did not bring them"
                    )
                if len(peer.top_keys) < min(spec.top_k, peer.top_ids.numel()):
                    raise RuntimeError(
                        f"member {name!r} sent {len(peer.top_keys)} top keys, the inverse search uses {spec.top_k}: "
                        "the members' relative_top_k differ from the ensemble's"
                    )
                answers[name], keys[name] = peer, peer.top_keys[: spec.top_k]
            weights = dict(zip(spec.members, spec.weights, strict=True))
            invert = build_invert_work(work.seq_id, self.name, self.table, weights, answers, keys, spec.top_k)
            searches.setdefault((spec.steps, spec.learning_rate), []).append((result, invert))
        for (steps, learning_rate), group in searches.items():
            searched = self.invert([w for _, w in group], steps=steps, learning_rate=learning_rate)
            for (result, invert), inverted in zip(group, searched, strict=True):
                result.inverted, result.candidate_ids = inverted, invert.candidate_ids

    def _finish_echo_inverts(
        self, work: SeqWork, spec: InvertSpec, result: SeqResult, by_peer: Mapping[str, Mapping[str, SeqResult]]
    ) -> None:
        """The inverse search before every piece of an echo, and each piece's fused log-probability
        (what `deepen` gives a forced piece when stepping). Inside a character this member's token
        split, the piece's log-probability is this member's own, as stepping gives it there."""
        assert result.positions is not None and work.echo_pieces is not None
        peers = {}
        for name in spec.members:
            if name == self.name:
                continue
            peer = by_peer.get(name, {}).get(work.seq_id)
            if peer is None or peer.positions is None:
                raise RuntimeError(
                    f"member {self.name!r}: the echo {work.seq_id} needs member {name!r}'s results before every "
                    "piece, and this round did not bring them"
                )
            peers[name] = peer.positions
        weights = dict(zip(spec.members, spec.weights, strict=True))
        inverts: list[tuple[SeqResult, Piece, InvertWork]] = []
        for i, (own, piece) in enumerate(zip(result.positions, work.echo_pieces, strict=True)):
            assert own is not None
            answers = {self.name: own} | {name: positions[i] for name, positions in peers.items()}
            present = {name: answer for name, answer in answers.items() if answer is not None}
            if len(present) < len(answers):  # inside a character: only this member went on
                own.forced_logprob = table_logprob(self.table, own, piece.data)
                continue
            keys = {name: (answer.top_keys or [])[: spec.top_k] for name, answer in present.items() if name != self.name}
            work_i = build_invert_work(work.seq_id, self.name, self.table, weights, present, keys, spec.top_k)
            inverts.append((own, piece, work_i))
        searched = self.invert([w for _, _, w in inverts], steps=spec.steps, learning_rate=spec.learning_rate)
        for (own, piece, invert), inverted in zip(inverts, searched, strict=True):
            own.candidate_ids, own.inverted = invert.candidate_ids, inverted
            assert piece.token_id is not None
            own.forced_logprob = forced_logprob(invert.candidate_ids, inverted, own, piece.token_id, self.table.vocab_size)
        for own in result.positions:
            if own is not None:
                own.logprobs = None  # used here; the whole vocabulary at every position need not travel

    # -- DeePEn --------------------------------------------------------------------------------
    def project_many(self, tops: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Relative vectors [B, A] of (top ids, top log-probs) distributions, cut to relative_top_k."""
        space = self._relative_space()
        k = self._relative_top_k
        return space.project_many([ids[:k] for ids, _ in tops], [values[:k] for _, values in tops])

    def invert(self, works: Sequence[InvertWork], *, steps: int, learning_rate: float) -> list[torch.Tensor]:
        space = self._relative_space()
        return space.invert_many(
            [w.target for w in works],
            [w.candidate_ids for w in works],
            [self._initial(w) for w in works],
            steps=steps,
            learning_rate=learning_rate,
        )

    def _relative_space(self) -> RelativeSpace:
        if self._space is None:
            raise RuntimeError(f"member {self.name!r} has no anchors; the deepen strategy sets them at start-up")
        return self._space

    def _initial(self, work: InvertWork) -> torch.Tensor:
        """Where the search starts: this member's own log-probs of the candidates, renormalised.
        Whoever built the work may have known only its top-k (the coordinator, in the two-round
        path); this member holds its whole distribution at the sequence's latest position."""
        row = self._rows.get(work.seq_id)
        if row is None:
            return work.initial_logprobs
        return torch.log_softmax(row[work.candidate_ids].float(), -1)
