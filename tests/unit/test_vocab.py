"""TokenTable: token bytes, lookups, canonical encoding and DeePEn anchors, on both real tokenizers."""

from __future__ import annotations

import pickle
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from consort.runtime import models as consort_models
from consort.runtime.vocab import TokenTable, VocabError, anchors, shared_bytes

SMOLLM2, GEMMA = consort_models.PAIR_MEMBERS
ALIASES = [SMOLLM2, GEMMA]
SETTINGS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# Pieces that stress tokenizers: whitespace runs, scripts, emoji with modifiers, combining marks.
FRAGMENTS = [
    " ",
    "  ",
    "   ",
    "\n",
    "\n\n",
    "\t",
    "\t\t",
    " \n ",
    "日本語",
    "中文",
    "한국어",
    "🙂",
    "👍🏽",
    "e\u0301",
    "ñ",
    "ß",
    "12345",
    "3.14",
    "Hello",
    " world",
    "x",
    "()",
    "{",
    "}",
    "->",
    "'s",
    "Ω",
]
text_strategy = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(st.characters(codec="utf-8"), max_size=6)), max_size=12
).map("".join)


def plain_ids(tokenizer: Any, text: str) -> list[int]:
    """A fresh tokenization, special-token strings read as text (what generated text must get)."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def representable(table: TokenTable, text: str) -> bool:
    """Text the tokenizer itself gives back exactly (SentencePiece turns a literal `▁` into a space)."""
    return not (table.kind == "sentencepiece" and "\u2581" in text)


# -- construction ------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", ALIASES)
def test_build_is_fast_and_sized_like_the_tokenizer(alias: str, tokenizers: dict[str, Any]) -> None:
    # CPU time, not wall time: shared CI machines are often oversubscribed.
    started = time.process_time()
    table = TokenTable.from_tokenizer(tokenizers[alias])
    assert time.process_time() - started < 2.0
    assert table.vocab_size == len(tokenizers[alias])
    assert tokenizers[alias].eos_token_id in table.eos_ids


def test_kinds(tables: dict[str, TokenTable]) -> None:
    assert tables[SMOLLM2].kind == "byte_level"
    assert tables[GEMMA].kind == "sentencepiece"


def test_extra_eos_ids(tokenizers: dict[str, Any]) -> None:
    table = TokenTable.from_tokenizer(tokenizers[GEMMA], eos_ids=[106])
    assert table.eos_ids == {1, 106}


# -- token bytes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("alias", "token", "expected"),
    [
        (SMOLLM2, "Ġhello", b" hello"),
        (SMOLLM2, "ĊĊ", b"\n\n"),
        (SMOLLM2, "ðŁ", b"\xf0\x9f"),  # half an emoji: tokens may end mid-character
        (GEMMA, "▁hello", b" hello"),
        (GEMMA, "▁▁", b"  "),
        (GEMMA, "<0xE2>", b"\xe2"),
        (GEMMA, "\n\n", b"\n\n"),  # an added (non-special) token: literal text
        (GEMMA, "<b>", b"<b>"),
    ],
)
def test_token_bytes(
    alias: str, token: str, expected: bytes, tokenizers: dict[str, Any], tables: dict
) -> None:
    token_id = tokenizers[alias].convert_tokens_to_ids(token)
    assert tables[alias].token_bytes(token_id) == expected
    assert not tables[alias].is_special(token_id)


@pytest.mark.parametrize("alias", ALIASES)
def test_special_tokens_have_no_bytes(alias: str, tokenizers: dict[str, Any], tables: dict) -> None:
    tok, table = tokenizers[alias], tables[alias]
    for token_id in tok.all_special_ids:
        assert table.is_special(token_id)
        assert table.token_bytes(token_id) == b""
    assert table.is_special(tok.eos_token_id)


def test_gemma_byte_fallback_flags(tokenizers: dict[str, Any], tables: dict) -> None:
    table = tables[GEMMA]
    fallback = tokenizers[GEMMA].convert_tokens_to_ids("<0x41>")
    assert table.is_byte_fallback(fallback)
    assert not table.is_byte_fallback(tokenizers[GEMMA].convert_tokens_to_ids("A"))
    assert not tables[SMOLLM2].is_byte_fallback(0)


@pytest.mark.parametrize("alias", ALIASES)
def test_out_of_range_ids_are_refused(alias: str, tables: dict[str, TokenTable]) -> None:
    table = tables[alias]
    for bad in (-1, table.vocab_size):
        with pytest.raises(VocabError):
            table.token_bytes(bad)
        with pytest.raises(VocabError):
            table.is_special(bad)
        with pytest.raises(VocabError):
            table.decode_bytes([0, bad])


# -- lookups -------------------------------------------------------------------------------------
def test_id_of_prefers_ordinary_tokens(tokenizers: dict[str, Any], tables: dict[str, TokenTable]) -> None:
    tok, table = tokenizers[GEMMA], tables[GEMMA]
    assert table.id_of(b"\n") == 107  # the added "\n" token, not <0x0A>
    assert table.id_of(b"A") == tok.convert_tokens_to_ids("A")
    assert table.id_of(b"\xe2") == tok.convert_tokens_to_ids("<0xE2>")  # only byte fallback exists
    assert table.id_of(b" hello") == tok.convert_tokens_to_ids("▁hello")
    assert table.id_of(b"") is None
    assert table.id_of(b"no such token in any vocabulary \x00") is None
    assert tables[SMOLLM2].id_of(b" hello") == tokenizers[SMOLLM2].convert_tokens_to_ids("Ġhello")


@pytest.mark.parametrize("alias", ALIASES)
def test_id_of_inverts_token_bytes(alias: str, tables: dict[str, TokenTable]) -> None:
    table = tables[alias]
    for token_id in range(0, table.vocab_size, 97):
        data = table.token_bytes(token_id)
        if data and not table.is_special(token_id):
            assert table.token_bytes(table.id_of(data)) == data


@pytest.mark.parametrize("alias", ALIASES)
def test_every_byte_has_a_token_or_is_declared_missing(alias: str, tables: dict[str, TokenTable]) -> None:
    table = tables[alias]
    for byte in range(256):
        if byte in table.missing_bytes:
            with pytest.raises(VocabError):
                table.byte_id(byte)
        else:
            assert table.token_bytes(table.byte_id(byte)) == bytes([byte])


def test_missing_bytes(tables: dict[str, TokenTable]) -> None:
    assert tables[GEMMA].missing_bytes == b""  # byte fallback covers all 256
    # SmolLM2's byte-level BPE never learnt these bytes; its tokenizer drops them.
    assert set(tables[SMOLLM2].missing_bytes) == {4, 6, 19, 20, 22, 29, 192, 193, 241, 242, *range(245, 256)}
    assert tables[SMOLLM2].visible(b"a\x04b\xff") == b"ab"


# -- decoding and canonical encoding --------------------------------------------------------------
@pytest.mark.parametrize("alias", ALIASES)
@SETTINGS
@given(text=text_strategy)
def test_decode_bytes_matches_the_tokenizer(alias: str, text: str, tokenizers: dict, tables: dict) -> None:
    tok, table = tokenizers[alias], tables[alias]
    ids = plain_ids(tok, text)
    if representable(table, text):
        assert table.decode_bytes(ids) == table.visible(text.encode("utf-8"))
    assert table.decode_bytes(ids).decode("utf-8", errors="replace") == tok.decode(ids)


@pytest.mark.parametrize("alias", ALIASES)
@SETTINGS
@given(text=text_strategy)
def test_encode_is_the_tokenizer_on_valid_text(alias: str, text: str, tokenizers: dict, tables: dict) -> None:
    tok, table = tokenizers[alias], tables[alias]
    ids = table.encode(text.encode("utf-8"))
    assert table.decode_bytes(ids) == table.visible(text.encode("utf-8"))
    if not table.missing_bytes:
        assert tok.decode(ids) == text
    if representable(table, text):
        assert ids == plain_ids(tok, text)


@pytest.mark.parametrize("alias", ALIASES)
@SETTINGS
@given(data=st.binary(max_size=24))
def test_encode_round_trips_any_bytes(alias: str, data: bytes, tables: dict[str, TokenTable]) -> None:
    table = tables[alias]
    assert table.decode_bytes(table.encode(data)) == table.visible(data)


@pytest.mark.parametrize("alias", ALIASES)
def test_special_token_strings_stay_text(alias: str, tokenizers: dict, tables: dict[str, TokenTable]) -> None:
    text = "say <eos> or <|im_end|> or <start_of_turn> <bos>"
    backend = tokenizers[alias].backend_tokenizer
    for setting in (False, True):
        backend.encode_special_tokens = setting
        ids = tables[alias].encode(text.encode())
        assert not any(tables[alias].is_special(i) for i in ids)
        assert tables[alias].decode_bytes(ids) == text.encode()
        assert backend.encode_special_tokens is setting  # the shared tokenizer's setting is left alone


def test_gemma_literal_space_mark_is_encoded_as_bytes(tables: dict[str, TokenTable]) -> None:
    table = tables[GEMMA]
    ids = table.encode("a▁b".encode())
    assert table.decode_bytes(ids) == "a▁b".encode()
    assert [table.is_byte_fallback(i) for i in ids] == [False, True, True, True, False]


# -- first token ---------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", ALIASES)
@SETTINGS
@given(text=text_strategy.filter(bool))
def test_first_token_is_the_tokenizers_first(alias: str, text: str, tokenizers: dict, tables: dict) -> None:
    table = tables[alias]
    if representable(table, text):
        assert table.first_token(text.encode()) == plain_ids(tokenizers[alias], text)[0]


@pytest.mark.parametrize("alias", ALIASES)
def test_first_token_of_broken_utf8_is_its_first_byte(alias: str, tables: dict[str, TokenTable]) -> None:
    table = tables[alias]
    assert table.first_token(b"\xf0\x9f") == table.byte_id(0xF0)
    assert table.first_token(b"\x9f\x99\x82 ok") == table.byte_id(0x9F)
    with pytest.raises(VocabError):
        table.first_token(b"")


def test_first_token_examples(tokenizers: dict[str, Any], tables: dict[str, TokenTable]) -> None:
    assert tables[SMOLLM2].first_token(b" hello world") == tokenizers[SMOLLM2].convert_tokens_to_ids("Ġhello")
    assert tables[GEMMA].first_token(b" hello world") == tokenizers[GEMMA].convert_tokens_to_ids("▁hello")


# -- pickling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", ALIASES)
def test_pickle_round_trip(alias: str, tables: dict[str, TokenTable]) -> None:
    table = tables[alias]
    copy = pickle.loads(pickle.dumps(table))
    assert copy.fingerprint == table.fingerprint
    assert copy.vocab_size == table.vocab_size and copy.eos_ids == table.eos_ids
    assert all(copy.token_bytes(i) == table.token_bytes(i) for i in range(0, table.vocab_size, 101))
    assert copy.id_of(b" the") == table.id_of(b" the")
    if alias == SMOLLM2:  # rebuilding Gemma's encoder costs ~2 s; the mechanism is the same
        assert copy.first_token(b" tokenizer") == table.first_token(b" tokenizer")


def test_fingerprints_differ(tables: dict[str, TokenTable]) -> None:
    assert tables[SMOLLM2].fingerprint != tables[GEMMA].fingerprint


# -- anchors -------------------------------------------------------------------------------------
def test_default_pair_shares_about_46k_anchor_tokens(tables: dict[str, TokenTable]) -> None:
    pair = [tables[SMOLLM2], tables[GEMMA]]
    smollm2_ids, gemma_ids = anchors(pair)
    assert 40_000 <= len(smollm2_ids) == len(gemma_ids) <= 52_000
    for a, b in zip(smollm2_ids, gemma_ids, strict=True):
        assert pair[0].token_bytes(a) == pair[1].token_bytes(b) != b""
        assert not pair[0].is_special(a) and not pair[1].is_special(b)
        assert not pair[1].is_byte_fallback(b)
    assert len(set(smollm2_ids)) == len(smollm2_ids) and len(set(gemma_ids)) == len(gemma_ids)


def test_anchors_with_byte_fallback_add_the_raw_bytes(tables: dict[str, TokenTable]) -> None:
    pair = [tables[SMOLLM2], tables[GEMMA]]
    with_bytes = shared_bytes(pair, include_byte_fallback=True)
    assert set(shared_bytes(pair)) < set(with_bytes)
    assert b"\xe2" in with_bytes


def test_anchors_of_one_table_are_its_ordinary_tokens(tables: dict[str, TokenTable]) -> None:
    table = tables[SMOLLM2]
    (ids,) = anchors([table])
    assert len(ids) == sum(1 for i in range(table.vocab_size) if not table.is_special(i))
    assert anchors([]) == []


# -- unsupported tokenizers are refused loudly ------------------------------------------------------
def _metaspace_tokenizer() -> Tokenizer:
    vocab = {"<unk>": 0, "▁": 1, "a": 2, "b": 3, "▁a": 4, "▁b": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("▁", "a"), ("▁", "b")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    return tok


def test_dummy_prefix_tokenizers_are_refused() -> None:
    with pytest.raises(VocabError, match="dummy prefix"):
        TokenTable.from_tokenizer(_metaspace_tokenizer())


def test_unknown_decoders_are_refused() -> None:
    tok = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.decoder = decoders.WordPiece()
    with pytest.raises(VocabError, match="unsupported tokenizer decoder"):
        TokenTable.from_tokenizer(tok)


QWEN = "qwen2.5-coder-0.5b-instruct"


@pytest.fixture(scope="module")
def qwen_table() -> TokenTable:
    if not (consort_models.resolve(QWEN) / "tokenizer_config.json").exists():
        pytest.skip("the converted Qwen2.5-Coder-0.5B is not in this machine's cache")
    return TokenTable.from_tokenizer(consort_models.load_tokenizer(QWEN))


def test_text_a_normalizer_would_rewrite_keeps_its_bytes(qwen_table: TokenTable) -> None:
    """Qwen2's tokenizer applies NFC: U+F9D1 becomes U+516D and 'A' + combining acute becomes 'Á'.
    Generated text must be encoded as it is, or the member would continue different text (and the
    alignment refused it: a random-weight SmolLM2 emitted U+F9D1 under `me`)."""
    for text in ["\uf9d1", "a\uf9d1b 六", "A\u0301 e\u0301", "x\u212b"]:
        data = text.encode("utf-8")
        ids = qwen_table.encode(data)
        assert qwen_table.decode_bytes(ids) == data
    assert qwen_table.encode("六".encode()) != qwen_table.encode("\uf9d1".encode())
    assert qwen_table.encode(b"hello world") == [14990, 1879]  # NFC text: the tokenizer's own ids


@SETTINGS
@given(text=text_strategy)
def test_qwen_round_trips_any_text(text: str, qwen_table: TokenTable) -> None:
    data = (text + "\uf9d1e\u0301").encode("utf-8")
    assert qwen_table.decode_bytes(qwen_table.encode(data)) == data
