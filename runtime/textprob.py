"""The ensemble's probability of given text when members tokenize it differently.

Teacher-forced scoring asks how likely the ensemble is to continue the text with
each next piece. Members with different vocabularies cut the text at different
places, so a piece is taken between consecutive cuts of *any* member (the union
of their token boundaries). For each member, the probability of a piece is
computed from its distribution at its own last token boundary, counting every
one of its tokens consistent with the text (Phan et al., "Exact Byte-Level
Probabilities from Tokenized Language Models"):

- inside one of its tokens, the piece's conditional probability is the ratio of
  two prefix masses, `cover(prefix + piece) / cover(prefix)`, where `cover(x)` is
  the mass of all its tokens whose bytes start with `x` (":" counts ":", ":[",
  ":$"... as the same text so far, never as rivals);
- where its token ends, the conditional is that token's own probability over the
  prefix mass, so that over one of its tokens the factors multiply to exactly
  that token's probability (an ensemble of a model with itself scores as the
  model, and a member alone scores its own tokenization exactly).

The ensemble's conditional for the piece is the weighted mixture of the
members' conditionals. The approximation is the usual one of token-level
ensembles: each member is assumed to follow its canonical tokenization of the
scored text (other tokenizations of the same text are not summed).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from consort.runtime.fusion.base import Candidate
from consort.runtime.types import SeqResult
from consort.runtime.vocab import TokenTable


def char_starts(data: bytes) -> frozenset[int]:
    """Offsets in `data` where a UTF-8 character starts, and its end: where text may be cut."""
    return frozenset(i for i, byte in enumerate(data) if byte & 0xC0 != 0x80) | {len(data)}


@dataclass
class MemberTrack:
    """One member's place in the scored text: where its tokens end, and its distribution at the last end."""

    table: TokenTable
    boundaries: frozenset[int]  # byte offsets where this member's canonical tokens end and the text is cut
    dropped: frozenset[int] = frozenset()  # its token ends that are not cuts (inside a character)
    base: torch.Tensor | None = None  # its log-probs at its last boundary; None: sits out until the next
    prefix: bytes = b""  # the text since that boundary

    def cover(self, prefix: bytes) -> float:
        """Mass of this member's tokens that continue the text through `prefix` (1 at a boundary)."""
        if not prefix:
            return 1.0
        assert self.base is not None
        ids = torch.from_numpy(self.table.prefix_ids(prefix))
        return float(self.base[ids].exp().sum()) if ids.numel() else 0.0

    def conditional(self, piece: bytes, ends_token: bool) -> float:
        """P(the text goes on with `piece` | the text so far), from the distribution at the last boundary."""
        before = self.cover(self.prefix)
        if before <= 0.0:
            return 0.0
        text = self.prefix + piece
        if ends_token:
            token_id = self.table.id_of(text)
            assert token_id is not None, "a boundary ends one of the member's own tokens"
            assert self.base is not None
            return math.exp(float(self.base[token_id])) / before
        return self.cover(text) / before


class TextScorer:
    """Scores a continuation piece by piece (pieces between the union of the members' token
    boundaries); `advance` takes each step's member results and returns the piece's log-probability."""

    def __init__(self, continuation: bytes, tables: Mapping[str, TokenTable], main: str) -> None:
        if not continuation or not tables:
            raise ValueError("nothing to score, or no member to score it")
        cuttable = char_starts(continuation)
        # One member, the lead (the main one when it scores), keeps its cuts inside characters
        # (byte-level tokens of CJK or emoji text): the core lets only the owner of such a piece
        # go on, as in generation. Other members cut only between characters and never inside
        # a lead token that ends inside one, so every piece that ends mid-character is a whole
        # lead token.
        self.lead = main if main in tables else next(iter(tables))
        spans = {name: table.encode_spans(continuation)[1] for name, table in tables.items()}
        lead_ends = spans[self.lead]
        inside_split_tokens: set[int] = set()
        for start, end in zip([0, *lead_ends[:-1]], lead_ends, strict=True):
            if end not in cuttable:
                inside_split_tokens.update(range(start + 1, end))
        self.tracks: dict[str, MemberTrack] = {}
        cuts: set[int] = {len(continuation)}
        for name, table in tables.items():
            ends = set(spans[name]) | {len(continuation)}
            if name == self.lead:
                kept = ends
            else:
                kept = {e for e in ends if e in cuttable and e not in inside_split_tokens}
            self.tracks[name] = MemberTrack(table, frozenset(kept), frozenset(ends - kept))
            cuts |= kept
        self.offsets = sorted(cuts)
        self.continuation = continuation
        self.main = main
        self.position = 0  # byte offset of the next piece
        self._taken = 0
        self.pieces = self._pieces(tables)

    def _pieces(self, tables: Mapping[str, TokenTable]) -> list[Candidate]:
        pieces, start = [], 0
        for end in self.offsets:
            data = self.continuation[start:end]
            owner, token_id = "", -1
            # A piece that is a whole token of a member is fed to it exactly (the main member first).
            for name in sorted(tables, key=lambda n: n != self.main):
                track = self.tracks[name]
                found = track.table.id_of(data)
                if found is not None and end in track.boundaries and self._is_boundary(name, start):
                    owner, token_id = name, found
                    break
            pieces.append(Candidate(data, owner, token_id))
            start = end
        return pieces

    def _is_boundary(self, name: str, offset: int) -> bool:
        return offset == 0 or offset in self.tracks[name].boundaries

    def advance(self, results: Mapping[str, SeqResult], weights: Mapping[str, float]) -> float:
        """The next piece's log-probability: the weighted mixture of the members' conditionals.

        `results` holds this step's full distributions of the members that computed; a member
        not computing at one of its boundaries (gated out) sits out until its next boundary.
        """
        piece = self.pieces[self._taken].key
        end = self.position + len(piece)
        mixture, total_weight = 0.0, 0.0
        for name, track in self.tracks.items():
            if self._is_boundary(name, self.position):
                result = results.get(name)
                track.base = result.logprobs if result is not None else None
                track.prefix = b""
            if any(self.position <= d < end for d in track.dropped):
                # One of its tokens ends inside this piece, where it computed nothing: it cannot
                # say how likely the rest is, and sits out until its next boundary.
                track.base = None
            weight = weights.get(name, 0.0)
            if track.base is None or weight <= 0.0:
                continue
            mixture += weight * track.conditional(piece, ends_token=end in track.boundaries)
            total_weight += weight
            track.prefix += piece
        self.position = end
        self._taken += 1
        if total_weight <= 0.0:
            raise ValueError("no member scored this piece")
        return math.log(mixture / total_weight) if mixture > 0.0 else -math.inf


@dataclass(frozen=True)
class TextPlan:
    """Text-level scoring from ONE forward per member over its own tokens of the text.

    With every member's distribution at every one of its token boundaries at hand (an echo
    pass), the text is cut wherever any member's tokens end, inside characters too, and each
    member's conditional for each piece is exact under its canonical tokenization: no member
    ever sits out. `queries` says which prefix masses a member must report from its pass;
    `conditionals` turns its reply into one log-probability per piece; `mix` fuses members.
    """

    continuation: bytes
    cuts: tuple[int, ...]  # end offset of every piece
    ends: dict[str, tuple[int, ...]]  # each member's token end offsets

    @classmethod
    def build(cls, continuation: bytes, tables: Mapping[str, TokenTable]) -> TextPlan:
        if not continuation:
            raise ValueError("nothing to score")
        ends = {name: tuple(table.encode_spans(continuation)[1]) for name, table in tables.items()}
        for name, member_ends in ends.items():
            if not member_ends or member_ends[-1] != len(continuation):
                raise ValueError(f"member {name!r} cannot spell the whole text to score")
        cuts = sorted({e for member_ends in ends.values() for e in member_ends})
        return cls(continuation, tuple(cuts), ends)

    @property
    def pieces(self) -> list[bytes]:
        starts = [0, *self.cuts[:-1]]
        return [self.continuation[s:e] for s, e in zip(starts, self.cuts, strict=True)]

    def _spans(self, member: str) -> list[tuple[int, int, int]]:
        """(piece start, piece end, index of the member's token holding the piece) for each piece."""
        ends = self.ends[member]
        out, token = [], 0
        for start, end in zip([0, *self.cuts[:-1]], self.cuts, strict=True):
            while ends[token] <= start:
                token += 1
            out.append((start, end, token))
        return out

    def _token_start(self, member: str, token: int) -> int:
        return 0 if token == 0 else self.ends[member][token - 1]

    def queries(self, member: str) -> list[tuple[int, bytes]]:
        """(token index, text) pairs whose prefix mass the member's pass must report: the text from
        the start of one of its tokens to each cut inside that token."""
        out = []
        for _, end, token in self._spans(member):
            if end != self.ends[member][token]:
                out.append((token, self.continuation[self._token_start(member, token) : end]))
        return out

    def conditionals(self, member: str, token_logprobs: Sequence[float], masses: Sequence[float]) -> list[float]:
        """Log P(piece | text before it) for each piece, from the member's own log-prob of each of its
        tokens and the masses of `queries(member)`, in that order."""
        out, asked, before = [], iter(masses), 0.0
        for start, end, token in self._spans(member):
            if start == self._token_start(member, token):
                before = 0.0  # at its own boundary: nothing of the token is written yet
            if end == self.ends[member][token]:
                now = float(token_logprobs[token])
            else:
                now = float(next(asked))
            out.append(now - before)
            before = now
        return out


def mix(conditionals: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> list[float]:
    """The ensemble's log-probability of each piece: the weighted mixture of the members' conditionals."""
    total = sum(weights[name] for name in conditionals)
    rows = torch.tensor([list(values) for values in conditionals.values()], dtype=torch.float64)
    scale = torch.tensor([weights[name] / total for name in conditionals], dtype=torch.float64)
    return torch.logsumexp(rows + scale.log()[:, None], dim=0).tolist()


def text_greedy(keys: Sequence[bytes], logprobs: torch.Tensor) -> int:
    """The greedy choice among pieces of text from different vocabularies: the most probable *text*.

    Pieces nest (":" and ":[" ; " tele" and " television"), so the most probable single piece
    is not the most probable text: a member whose large vocabulary spreads its mass over
    variants (" Television", " televisions") would lose to one that puts it on a single token.
    Walking the pieces as a byte trie, at each node the text goes on to the child holding the
    most probability below it, or stops at the node when the piece ending there holds more than
    any child does. With one vocabulary this is a different rule from the argmax, so it is used
    only where vocabularies differ; sampling draws from the mixture itself, which is exact.
    """
    probs = logprobs.double().exp().tolist()
    alive = [i for i, p in enumerate(probs) if p > 0.0]
    if not alive:
        raise ValueError("no candidate is possible")
    node = b""
    while True:
        exact = next((i for i in alive if keys[i] == node), None)
        children: dict[int, list[int]] = {}
        for i in alive:
            if len(keys[i]) > len(node):
                children.setdefault(keys[i][len(node)], []).append(i)
        if not children:
            assert exact is not None
            return exact
        byte, group = max(children.items(), key=lambda kv: (sum(probs[i] for i in kv[1]), -kv[0]))
        if exact is not None and probs[exact] >= sum(probs[i] for i in group):
            return exact
        node, alive = node + bytes([byte]), group
