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

from consort.runtime.alignment import Aligner
from consort.runtime.fusion.base import member_key
from consort.runtime.fusion.deepen import build_invert_work
from consort.runtime.member import MemberEngine
from consort.runtime.relative import RelativeSpace
from consort.runtime.types import InvertWork, Piece, SeqResult, SeqWork
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

    # -- configuration -------------------------------------------------------------------------
    def set_anchors(self, anchor_ids: Sequence[int], temperature: float, relative_top_k: int) -> int:
        embeddings = self.engine.model.get_input_embeddings().weight.detach()
        self._space = RelativeSpace(embeddings, anchor_ids, temperature)
        self._relative_top_k = relative_top_k
        return self._space.num_anchors

    # -- sequences -----------------------------------------------------------------------------
    def release(self, seq_ids: Sequence[str]) -> None:
        for seq_id in seq_ids:
            self.engine.remove(seq_id)
            self._aligners.pop(seq_id, None)
            self._prompt_len.pop(seq_id, None)

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
            if work.prompt_ids is not None:
                result.prompt_tokens = self._admit(work.seq_id, work.prompt_ids)
            if work.pieces:
                self._catch_up(work.seq_id, work.pieces)
            results[work.seq_id] = result
        computing = [w for w in works if w.compute]
        if computing:
            outputs = self.engine.step(
                [w.seq_id for w in computing],
                top_k=self.top_k,
                full={w.seq_id for w in computing if w.full},
                echo={w.seq_id for w in computing if w.echo},
                echo_top_k=max((w.echo_top_k for w in computing), default=0),
                kv_only=[w.seq_id for w in works if not w.compute],
                echo_masses={
                    w.seq_id: [(j, torch.from_numpy(self.table.prefix_ids(text))) for j, text in w.echo_prefixes]
                    for w in computing
                    if w.echo and w.echo_prefixes
                },
            )
            for work in computing:
                out, result = outputs[work.seq_id], results[work.seq_id]
                result.top_ids, result.top_logprobs, result.logprobs = out.top_ids, out.top_logprobs, out.logprobs
                if work.echo:
                    result.echo_ids = self.engine.token_ids(work.seq_id)
                    result.echo_logprobs, result.echo_top = out.echo_logprobs, out.echo_top
                    result.echo_masses = out.echo_masses
                if work.relative:
                    result.relative = self.project(out.top_ids, out.top_logprobs)
                    # What the main member needs to map this member's candidates into its vocabulary.
                    top = out.top_ids[: self._relative_top_k].tolist()
                    result.top_keys = [member_key(self.table, token_id) for token_id in top]
        return [results[w.seq_id] for w in works]

    def finish_inverts(
        self, works: Sequence[SeqWork], results: Sequence[SeqResult], peers: Mapping[str, Sequence[SeqResult]]
    ) -> None:
        """DeePEn within the step, on the main member: for each work that carries `invert`, the
        inverse search from this member's result (this round's, or the one the spec carries from an
        earlier round) and the other members' results of the same round (`peers`), written into
        this member's result (`candidate_ids`, `inverted`)."""
        by_peer = {name: {r.seq_id: r for r in replies} for name, replies in peers.items()}
        for work, result in zip(works, results, strict=True):
            spec = work.invert
            if spec is None:
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
            (result.inverted,) = self.invert([invert], steps=spec.steps, learning_rate=spec.learning_rate)
            result.candidate_ids = invert.candidate_ids

    # -- DeePEn --------------------------------------------------------------------------------
    def project(self, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> torch.Tensor:
        if self._space is None:
            raise RuntimeError(f"member {self.name!r} has no anchors; the deepen strategy sets them at start-up")
        k = self._relative_top_k
        return self._space.project(top_ids[:k], top_logprobs[:k])

    def invert(self, works: Sequence[InvertWork], *, steps: int, learning_rate: float) -> list[torch.Tensor]:
        if self._space is None:
            raise RuntimeError(f"member {self.name!r} has no anchors; the deepen strategy sets them at start-up")
        return [
            self._space.invert(
                w.target, w.candidate_ids, w.initial_logprobs, steps=steps, learning_rate=learning_rate
            )
            for w in works
        ]
