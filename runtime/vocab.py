"""A tokenizer's vocabulary as bytes: what each token id contributes to the text.

Ensemble members with different tokenizers agree on *bytes*, never on token
strings: `Ġhello` (byte-level BPE) and `▁hello` (SentencePiece) are both
b" hello". A `TokenTable` is built once per tokenizer, is read-only afterwards
and pickles compactly, so the coordinator and every member actor can hold one.

It also defines the *canonical* tokenization of a byte string (`encode`): the
tokenizer's own output, except where the tokenizer cannot give the bytes back
(text that is not valid UTF-8, U+2581 `▁` in a SentencePiece vocabulary, which
its normaliser turns into a space); those bytes become single-byte tokens. With
that rule `decode_bytes(encode(data)) == visible(data)` for every `data`, where
`visible` drops only bytes the vocabulary has no token for at all (SmolLM2 has
none for 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5-0xFF;
its tokenizer silently drops them too). That is what keeps every member on
exactly the ensemble's text.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
from tokenizers import Tokenizer

from consort.runtime.errors import ConsortError

Kind = Literal["byte_level", "sentencepiece"]

_SPACE_MARK = "\u2581"  # SentencePiece's visible space, `▁`
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_FIRST_TOKEN_CACHE_LIMIT = 1 << 16


class VocabError(ConsortError):
    """A tokenizer this module cannot represent exactly, or a token id or text it cannot map."""


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


# str.translate maps each byte-level character to the latin-1 character of its byte, so
# `.encode("latin-1")` yields the token's bytes in one C-level pass per token.
_BYTE_LEVEL_TRANSLATION = {ord(ch): byte for ch, byte in _gpt2_byte_decoder().items()}


def backend_of(tokenizer: Any) -> Tokenizer:
    """The `tokenizers.Tokenizer` behind a Hugging Face tokenizer (or the argument itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise VocabError(
            f"{type(tokenizer).__name__} has no fast (Rust) tokenizer backend; "
            "Consort needs a `tokenizers`-backed tokenizer to align members"
        )
    return backend


def _detect_kind(backend: Tokenizer) -> Kind:
    decoder = backend.decoder
    if decoder is None:
        raise VocabError("tokenizer has no decoder; cannot tell how its tokens map to bytes")
    spec = json.loads(decoder.__getstate__())
    parts = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
    types = {part.get("type") for part in parts}
    if "ByteLevel" in types:
        return "byte_level"
    replaces_mark = any(
        part.get("type") == "Replace" and part.get("pattern", {}).get("String") == _SPACE_MARK
        for part in parts
    )
    if replaces_mark or "Metaspace" in types:
        return "sentencepiece"
    raise VocabError(
        f"unsupported tokenizer decoder {sorted(t for t in types if t)}; "
        "Consort supports byte-level BPE and SentencePiece-style (▁) vocabularies"
    )


def encode_text(backend: Tokenizer, text: str) -> list[int]:
    """The tokenizer's ids for `text`, with no BOS/EOS and special-token strings read as plain text.

    Generated text that happens to spell `<eos>` must not become the control token,
    so special tokens are not matched (the same switch as HF's `split_special_tokens`).
    The flag lives on the shared backend; HF's own `__call__` sets it on every call,
    so restoring it here keeps both consistent. Not safe against another thread
    encoding with the same backend at the same instant.
    """
    previous = backend.encode_special_tokens
    backend.encode_special_tokens = True
    try:
        return backend.encode(text, add_special_tokens=False).ids
    finally:
        backend.encode_special_tokens = previous


class TokenTable:
    """Every token id's bytes, special flags and end-of-sequence ids, plus the canonical encoder."""

    def __init__(
        self,
        token_bytes: list[bytes],
        special: Iterable[int],
        byte_fallback: Iterable[int],
        eos_ids: Iterable[int],
        kind: Kind,
        encoder: Tokenizer | None = None,
        name: str = "",
        added: Iterable[int] = (),
    ) -> None:
        self._bytes = token_bytes
        self._special = frozenset(special)
        self._added = frozenset(added) - self._special
        self._byte_fallback = frozenset(byte_fallback)
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        self.kind: Kind = kind
        self.name = name
        self._encoder = encoder
        self._encoder_json: str | None = None
        self._index()

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_tokenizer(cls, tokenizer: Any, *, eos_ids: Iterable[int] = ()) -> TokenTable:
        """Build the table for a Hugging Face (fast) tokenizer or a `tokenizers.Tokenizer`.

        `eos_ids` adds end ids the tokenizer does not declare (a generation config's list).
        """
        backend = backend_of(tokenizer)
        kind = _detect_kind(backend)
        size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        special = {i for i, token in added.items() if token.special}
        special.update(getattr(tokenizer, "all_special_ids", ()))
        declared_eos = getattr(tokenizer, "eos_token_id", None)
        all_eos = {*eos_ids, *([declared_eos] if isinstance(declared_eos, int) else [])}
        table_bytes: list[bytes] = []
        fallback: list[int] = []
        for token_id in range(size):
            token = backend.id_to_token(token_id)
            if token is None:
                raise VocabError(f"tokenizer has no token for id {token_id} below its size {size}")
            if token_id in special:
                table_bytes.append(b"")
            elif token_id in added:
                # Added tokens are matched on the raw text, so their content is literal text.
                table_bytes.append(added[token_id].content.encode("utf-8"))
            elif kind == "byte_level":
                table_bytes.append(_byte_level_bytes(token))
            else:
                data, is_fallback = _sentencepiece_bytes(token)
                table_bytes.append(data)
                if is_fallback:
                    fallback.append(token_id)
        name = str(getattr(tokenizer, "name_or_path", "") or "")
        table = cls(table_bytes, special, fallback, all_eos, kind, encoder=backend, name=name, added=added)
        table._check_round_trip()
        return table

    def _index(self) -> None:
        by_bytes: dict[bytes, int] = {}
        for token_id, data in enumerate(self._bytes):
            if not data or token_id in self._special:
                continue
            current = by_bytes.get(data)
            # Prefer the ordinary token over a byte-fallback one for the same bytes,
            # then the lower id: that is the one the tokenizer itself produces.
            if current is None or (current in self._byte_fallback and token_id not in self._byte_fallback):
                by_bytes[data] = token_id
        self._by_bytes = by_bytes
        self._single_byte: list[int | None] = [by_bytes.get(bytes([b])) for b in range(256)]
        # Bytes with no token at all (a byte-level vocabulary that never saw byte 0x04 or 0xFF):
        # the tokenizer drops them, and so does the canonical encoding.
        self._missing = bytes(b for b in range(256) if self._single_byte[b] is None)
        self.max_token_bytes = max((len(b) for b in self._bytes), default=0)
        # Added tokens are cut out of the raw text before BPE runs, so one can swallow a boundary
        # any number of tokens back: a re-tokenized window must reach this far behind new text.
        self.max_added_bytes = max((len(self._bytes[i]) for i in self._added), default=0)
        self._first_cache: dict[bytes, int | None] = {}
        self._unnormalized_cache: dict[int, tuple[Tokenizer, Tokenizer]] = {}
        self._sorted_bytes: list[bytes] | None = None
        self._sorted_ids: np.ndarray | None = None
        self._escape = re.compile(
            r"[\udc80-\udcff\u2581]+" if self.kind == "sentencepiece" else r"[\udc80-\udcff]+"
        )
        digest = hashlib.blake2b(digest_size=16)
        for token_id, data in enumerate(self._bytes):
            digest.update(len(data).to_bytes(4, "little"))
            digest.update(data if token_id not in self._special else b"\x00special")
        self.fingerprint = digest.hexdigest()

    def _check_round_trip(self) -> None:
        """Refuse tokenizers that add a dummy prefix space or otherwise do not give text back."""
        for probe in ("a", "Hello world", " x\n\ty"):
            data = probe.encode("utf-8")
            ids = encode_text(self._require_encoder(), probe)
            if self.decode_bytes(ids) != data:
                raise VocabError(
                    f"tokenizer {self.name!r} does not give {probe!r} back exactly "
                    f"(got {self.decode_bytes(ids)!r}); tokenizers that add a dummy prefix "
                    "space are not supported"
                )

    # -- pickling: ship the bytes; rebuild indexes and the encoder only where used ---------------
    def __getstate__(self) -> dict[str, Any]:
        if self._encoder_json is None and self._encoder is not None:
            # Serialising Gemma's tokenizer takes ~0.5 s; a table is shipped more than once.
            self._encoder_json = self._encoder.to_str()
        encoder_json = self._encoder_json
        return {
            "bytes": self._bytes,
            "special": sorted(self._special),
            "added": sorted(self._added),
            "byte_fallback": sorted(self._byte_fallback),
            "eos_ids": sorted(self.eos_ids),
            "kind": self.kind,
            "name": self.name,
            "encoder_json": encoder_json,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._bytes = state["bytes"]
        self._special = frozenset(state["special"])
        self._added = frozenset(state["added"])
        self._byte_fallback = frozenset(state["byte_fallback"])
        self.eos_ids = frozenset(state["eos_ids"])
        self.kind = state["kind"]
        self.name = state["name"]
        self._encoder = None
        self._encoder_json = state["encoder_json"]
        self._index()

    def _require_encoder(self) -> Tokenizer:
        if self._encoder is None:
            if self._encoder_json is None:
                raise VocabError(f"token table {self.name!r} was built without a tokenizer; it cannot encode")
            # Parsing a 262k-token tokenizer takes ~1.5 s: done once, and only where encoding is needed.
            self._encoder = Tokenizer.from_str(self._encoder_json)
        return self._encoder

    # -- lookups -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._bytes)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self._bytes):
            raise VocabError(
                f"token id {token_id} is outside vocabulary {self.name!r} of size {len(self._bytes)}"
            )

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes this token adds to the text (b"" for special tokens)."""
        self._check_id(token_id)
        return self._bytes[token_id]

    def is_special(self, token_id: int) -> bool:
        self._check_id(token_id)
        return token_id in self._special

    def is_byte_fallback(self, token_id: int) -> bool:
        self._check_id(token_id)
        return token_id in self._byte_fallback

    def id_of(self, data: bytes) -> int | None:
        """The single non-special token whose bytes are exactly `data` (ordinary over byte-fallback)."""
        return self._by_bytes.get(data)

    def prefix_ids(self, prefix: bytes) -> np.ndarray:
        """Ids of every non-special token whose bytes start with `prefix`: the tokens that continue
        text ending in `prefix`, whatever comes after it (a byte-fallback duplicate included, as it
        is a way of spelling the same text)."""
        if self._sorted_bytes is None or self._sorted_ids is None:
            # Built on first use: only text-level scoring needs it, and sorting 262k keys takes ~0.2 s.
            order = sorted(
                (data, token_id)
                for token_id, data in enumerate(self._bytes)
                if data and token_id not in self._special
            )
            self._sorted_bytes = [data for data, _ in order]
            self._sorted_ids = np.array([token_id for _, token_id in order], dtype=np.int64)
        start = bisect.bisect_left(self._sorted_bytes, prefix)
        end = bisect.bisect_left(self._sorted_bytes, prefix + b"\xff" * (self.max_token_bytes + 1), lo=start)
        return self._sorted_ids[start:end]

    def byte_id(self, byte: int) -> int:
        """The token standing for exactly one byte (how invalid or escaped bytes are encoded)."""
        token_id = self._single_byte[byte]
        if token_id is None:
            raise VocabError(
                f"vocabulary {self.name!r} has no token for byte 0x{byte:02X} "
                "(no byte fallback); it cannot represent this text exactly"
            )
        return token_id

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        if ids and (min(ids) < 0 or max(ids) >= len(self._bytes)):
            raise VocabError(f"token ids outside vocabulary {self.name!r} of size {len(self._bytes)}")
        table = self._bytes
        return b"".join([table[i] for i in ids])

    # -- encoding ------------------------------------------------------------------------------
    @property
    def missing_bytes(self) -> bytes:
        """Byte values no token of this vocabulary spells (skipped wherever they occur)."""
        return self._missing

    def visible(self, data: bytes) -> bytes:
        """`data` without the bytes this vocabulary has no token for: what its ids can spell."""
        return data.translate(None, self._missing) if self._missing else data

    def encode(self, data: bytes, *, encoder: Tokenizer | None = None) -> list[int]:
        """Canonical ids for these bytes; `decode_bytes` of them is `visible(data)`."""
        return self.encode_spans(data, encoder=encoder)[0]

    def encode_spans(self, data: bytes, *, encoder: Tokenizer | None = None) -> tuple[list[int], list[int]]:
        """Canonical ids for `data` and, for each, the offset in `data` where it ends.

        Valid UTF-8 text goes through the tokenizer. Bytes that are not valid UTF-8
        (and `▁` in a SentencePiece vocabulary, which its normaliser would turn into a
        space) become single-byte tokens. Bytes the vocabulary has no token for are
        skipped, as the tokenizer itself skips them. `encoder` overrides the table's
        own tokenizer (a member passes the one it has loaded).
        """
        backend = encoder if encoder is not None else self._require_encoder()
        text = data.decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        ends: list[int] = []
        position = offset = 0
        for match in self._escape.finditer(text):
            if match.start() > position:
                offset = self._encode_plain(backend, text[position : match.start()], offset, ids, ends)
            for byte in match.group().encode("utf-8", errors="surrogateescape"):
                offset += 1
                if self._single_byte[byte] is not None:
                    ids.append(self.byte_id(byte))
                    ends.append(offset)
            position = match.end()
        if position < len(text):
            self._encode_plain(backend, text[position:], offset, ids, ends)
        return ids, ends

    def _encode_plain(
        self, backend: Tokenizer, text: str, offset: int, ids: list[int], ends: list[int]
    ) -> int:
        """Append the tokenizer's ids for `text` (which starts at byte `offset`); return its end offset."""
        data = text.encode("utf-8")
        new_ids = encode_text(backend, text)
        spelled = self.decode_bytes(new_ids)
        if spelled != self.visible(data) and self.kind == "byte_level" and backend.normalizer is not None:
            # A byte-level vocabulary spells any bytes, but its normalizer may rewrite the text first
            # (Qwen2's NFC turns U+F9D1 into U+516D): text a member generated must keep its own bytes,
            # so it is encoded as it is, without the rewrite.
            new_ids = encode_text(self._unnormalized(backend), text)
            spelled = self.decode_bytes(new_ids)
        if spelled != self.visible(data):
            raise VocabError(
                f"tokenizer {self.name!r} does not reproduce {data[:80]!r} exactly (it gives {spelled[:80]!r})"
            )
        table = self._bytes
        if len(spelled) == len(data):
            for token_id in new_ids:
                offset += len(table[token_id])
                ids.append(token_id)
                ends.append(offset)
            return offset
        # Some bytes were skipped: walk the text to place each token after the gaps.
        missing = self._missing
        cursor = 0
        for token_id in new_ids:
            while data[cursor] in missing:
                cursor += 1
            cursor += len(table[token_id])
            ids.append(token_id)
            ends.append(offset + cursor)
        return offset + len(data)

    def _unnormalized(self, backend: Tokenizer) -> Tokenizer:
        """A copy of `backend` without its normalizer (built once per backend: copying parses the
        whole tokenizer)."""
        copy = self._unnormalized_cache.get(id(backend))
        if copy is None or copy[0] is not backend:
            plain = Tokenizer.from_str(backend.to_str())
            plain.normalizer = None
            copy = (backend, plain)
            self._unnormalized_cache[id(backend)] = copy
        return copy[1]

    def first_token(self, text_bytes: bytes) -> int | None:
        """The first id of this tokenizer's canonical tokenization of `text_bytes`.

        Stands in for a candidate string that is not a single token here. Bytes that
        do not start valid UTF-8 map to their first byte's token. None when the
        vocabulary has a token for none of these bytes (SmolLM2 has none for 0x04).
        """
        if not text_bytes:
            raise VocabError("first_token of empty text")
        if text_bytes in self._first_cache:
            return self._first_cache[text_bytes]
        ids = self.encode(text_bytes)
        token_id = ids[0] if ids else None
        if len(self._first_cache) >= _FIRST_TOKEN_CACHE_LIMIT:
            self._first_cache.clear()
        self._first_cache[text_bytes] = token_id
        return token_id

    def __repr__(self) -> str:
        return f"TokenTable({self.name!r}, kind={self.kind}, vocab_size={self.vocab_size})"


def _byte_level_bytes(token: str) -> bytes:
    try:
        return token.translate(_BYTE_LEVEL_TRANSLATION).encode("latin-1")
    except UnicodeEncodeError as error:
        raise VocabError(f"byte-level token {token!r} has a character outside the byte alphabet") from error


def _sentencepiece_bytes(token: str) -> tuple[bytes, bool]:
    """(bytes, is_byte_fallback) of a SentencePiece token string."""
    if len(token) == 6 and token.startswith("<0x"):
        match = _BYTE_TOKEN.fullmatch(token)
        if match:
            return bytes([int(match.group(1), 16)]), True
    return token.replace(_SPACE_MARK, " ").encode("utf-8"), False


# -- anchors ---------------------------------------------------------------------------------------
def shared_bytes(tables: Sequence[TokenTable], *, include_byte_fallback: bool = False) -> list[bytes]:
    """Byte strings that are one non-special token in every table, sorted (deterministic order)."""
    if not tables:
        return []

    def keys(table: TokenTable) -> set[bytes]:
        return {
            data
            for data, token_id in table._by_bytes.items()
            if include_byte_fallback or token_id not in table._byte_fallback
        }

    common = keys(tables[0])
    for table in tables[1:]:
        common &= keys(table)
    return sorted(common)


def anchors(tables: Sequence[TokenTable], *, include_byte_fallback: bool = False) -> list[list[int]]:
    """DeePEn's anchor tokens: for each table, the ids of the shared byte strings, in the same order.

    `result[t][j]` is table t's id for the j-th shared string. Byte-fallback tokens
    (`<0xE2>`) are left out by default: they are not words the model learnt.
    """
    common = shared_bytes(tables, include_byte_fallback=include_byte_fallback)
    return [[table._by_bytes[data] for data in common] for table in tables]
