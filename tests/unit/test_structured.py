"""Structured outputs enforced on the ensemble's choice, for every strategy, on tiny random models
with the real tokenizers (SmolLM2's byte-level BPE and Gemma-3's SentencePiece: different
vocabularies, so the grammar must check pieces as bytes, not one tokenizer's ids)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from consort.runtime import fusion
from consort.runtime.constraints import Constraint
from consort.runtime.constraints.engine import ByteGrammar, compile_grammar
from consort.runtime.errors import InvalidRequest
from consort.runtime.fusion.base import EOS_KEY, Candidate, Decision
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import RequestOptions, SeqResult
from tests.unit.conftest import ALIASES, make_loop

SCHEMAS: dict[str, dict] = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 999},
                    "name": {"type": "string", "maxLength": 6},
                },
                "required": ["id", "name"],
                "additionalProperties": False,
            }
        },
        "required": ["user"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
        "required": ["color", "ok"],
        "additionalProperties": False,
    },
    "array": {
        "type": "array",
        "items": {"type": "integer", "minimum": -5, "maximum": 5},
        "minItems": 1,
        "maxItems": 4,
    },
    "bounded": {
        "type": "object",
        "properties": {
            # A random model never stops adding digits to a free fraction: a step keeps it finite.
            "p": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25},
            "n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20},
        },
        "required": ["p", "n"],
        "additionalProperties": False,
    },
    "required_and_optional": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 5},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
}
PROMPTS = [Prompt(text="Answer in JSON:"), Prompt(messages=[{"role": "user", "content": "Give me JSON."}])]
MAX_TOKENS = 120


@pytest.fixture(scope="module")
def pair(tiny_models):
    """Two members with different tokenizers; SmolLM2 is the main member."""
    return make_loop(tiny_models, [("smol", ALIASES[0]), ("gemma", ALIASES[1])], strategy="mean")


@pytest.fixture(scope="module")
def gemma_main(tiny_models):
    """The same pair with Gemma's 262k-token vocabulary as the main one."""
    return make_loop(
        tiny_models, [("smol", ALIASES[0]), ("gemma", ALIASES[1])], strategy="mean", main="gemma"
    )


def constrained(loop, constraints: list[Constraint], strategy: str, **options) -> list:
    """Every constraint on every prompt, sampled (temperature 1) in one batch."""
    prompts, params = [], []
    for i, constraint in enumerate(constraints):
        for j, prompt in enumerate(PROMPTS):
            prompts.append(prompt)
            params.append(
                SamplingParams(
                    temperature=1.0, max_tokens=MAX_TOKENS, seed=100 * i + j, constraint=constraint
                )
            )
    return loop.generate(prompts, params, RequestOptions(strategy=strategy, **options))


# Every token-level strategy, and the answer-level ones that sample answers (each sample is constrained).
STRATEGIES = [*fusion.names("token"), *(s for s in ("vote", "mux") if s in fusion.names())]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_answer_parses_and_validates_on_every_strategy(pair, strategy: str) -> None:
    names = list(SCHEMAS)
    options = {"vote_samples": 2, "vote_kind": "span"} if strategy in ("vote", "mux") else {}
    completions = constrained(
        pair, [Constraint(kind="json_schema", json_schema=SCHEMAS[n]) for n in names], strategy, **options
    )
    for index, completion in enumerate(completions):
        schema = SCHEMAS[names[index // len(PROMPTS)]]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)


def test_main_member_with_a_262k_vocabulary(gemma_main) -> None:
    completions = constrained(
        gemma_main, [Constraint(kind="json_schema", json_schema=SCHEMAS["nested"])], "mean"
    )
    for completion in completions:
        jsonschema.validate(json.loads(completion.text), SCHEMAS["nested"])


def test_json_object_is_an_object(pair) -> None:
    """Any object: a random model's keys and strings may run past max_tokens; what it wrote is still a
    prefix of a JSON object, and whatever ended is one."""
    completions = constrained(pair, [Constraint(kind="json_object")], "mean")
    for completion in completions:
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
        else:
            assert completion.text.startswith("{")
            ByteGrammar.of(Constraint(kind="json_object")).advance(completion.text.encode())


@pytest.mark.parametrize("strategy", ["mean", "me"])
def test_regex_and_choice(pair, strategy: str) -> None:
    choices = ["yes", "no", "a-b (c)", "x.y*"]
    regex = r"[A-Z]{2}-\d{3}"
    completions = constrained(
        pair, [Constraint(kind="regex", regex=regex), Constraint(kind="choice", choices=choices)], strategy
    )
    for completion in completions[: len(PROMPTS)]:
        assert re.fullmatch(regex, completion.text), completion.text
    for completion in completions[len(PROMPTS) :]:
        assert completion.text in choices


@pytest.mark.parametrize(
    "constraint",
    [
        Constraint(kind="json_schema", json_schema={"type": "nonsense"}),
        Constraint(
            kind="json_schema", json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}
        ),
        Constraint(kind="regex", regex="(unclosed"),
    ],
)
def test_an_unusable_schema_or_regex_is_the_requests_error(pair, constraint: Constraint) -> None:
    with pytest.raises(InvalidRequest, match="invalid structured output constraint"):
        compile_grammar(constraint)
    with pytest.raises(InvalidRequest):
        pair.core.add(PROMPTS[0], SamplingParams(constraint=constraint))


def test_constraint_needs_its_payload() -> None:
    with pytest.raises(ValueError):
        Constraint(kind="json_schema")
    with pytest.raises(ValueError):
        Constraint(kind="regex", regex="a", choices=["a"])


def _decision(
    pieces: list[tuple[bytes, str, int]], logprobs: list[float], drawn: str | None = None
) -> Decision:
    candidates = [Candidate(key, owner, token_id) for key, owner, token_id in pieces]
    return Decision(
        candidates, torch.log_softmax(torch.tensor(logprobs), -1), fused=drawn is None, drawn=drawn
    )


def test_the_mask_reads_bytes_across_members_tokens(pair) -> None:
    """A fused distribution over pieces of two vocabularies: what the grammar keeps is decided by the
    bytes each piece spells, and the text may be split between members' tokens in any way."""
    core = pair.core
    grammar = ByteGrammar.of(Constraint(kind="choice", choices=['{"ok"}']))
    grammar.advance(b'{"')  # emitted by one member ...
    smol, gemma = core.ctx.table("smol"), core.ctx.table("gemma")
    ok_gemma = gemma.id_of(b"ok")
    o_smol = smol.id_of(b"o")
    assert ok_gemma is not None and o_smol is not None
    decision = _decision(
        [
            (b"ok", "gemma", ok_gemma),
            (b"o", "smol", o_smol),
            (b"no", "smol", smol.id_of(b"no") or 0),
            (EOS_KEY, "smol", 0),
        ],
        [-1.0, -2.0, -0.1, -0.5],
    )
    results = {"smol": SeqResult("s"), "gemma": SeqResult("s")}
    out = core.constrainer.constrain(grammar, decision, results, {"smol": 1.0, "gemma": 1.0})
    assert [c.key for c in out.candidates] == [b"ok", b"o"]  # ... continued by another member's piece
    assert out.logprobs.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert out.logprobs[0] > out.logprobs[1]  # the kept candidates keep their order
    grammar.advance(b"o")
    grammar.advance(b"k")
    assert not grammar.can_end() and grammar.allows(b'"}') and not grammar.allows(b'"x')
    grammar.advance(b'"}')
    assert grammar.can_end() and grammar.complete


def test_a_step_with_no_allowed_candidate_widens_to_the_members_vocabulary(pair) -> None:
    core = pair.core
    table = core.ctx.table("smol")
    grammar = ByteGrammar.of(Constraint(kind="regex", regex=r"\[[0-9]+\]"))
    full = torch.log_softmax(torch.randn(table.vocab_size, generator=torch.Generator().manual_seed(0)), -1)
    result = SeqResult(
        "s", top_ids=torch.tensor([table.id_of(b"x")]), top_logprobs=torch.tensor([-0.1]), logprobs=full
    )
    decision = _decision([(b"x", "smol", int(result.top_ids[0]))], [0.0], drawn="smol")
    out = core.constrainer.constrain(grammar, decision, {"smol": result}, {"smol": 1.0, "gemma": 1.0})
    assert out.candidates and all(grammar.allows(c.key) for c in out.candidates)
    assert all(c.owner == "smol" for c in out.candidates)
    assert b"[" in [c.key for c in out.candidates]
    # Scored by the member's own full distribution, best first.
    assert out.logprobs[0] == out.logprobs.max()
    assert len(out.candidates) <= core.ctx.config.top_k


def test_finished_grammar_ends_the_answer(pair) -> None:
    completion = pair.generate(
        [PROMPTS[0]],
        SamplingParams(
            temperature=1.0, max_tokens=50, seed=3, constraint=Constraint(kind="choice", choices=["done"])
        ),
    )[0]
    assert completion.text == "done"
    assert completion.finish_reason == "stop"


@pytest.mark.parametrize(("strategy", "full_for"), [("mean", {"smol"}), ("deepen", {"smol"}), ("me", None)])
def test_only_the_member_a_step_speaks_for_sends_its_full_distribution(
    pair, monkeypatch, strategy: str, full_for: set[str] | None
) -> None:
    """Widening scores the main member's tokens (fused steps) or the computing member's (`me`): only that
    member ships its whole vocabulary's distribution; the others send their top-k as usual."""
    executor = pair.core.executor
    step = executor.step
    rounds: list[dict[str, list]] = []

    async def spy(works, release=None):
        rounds.append({m: [w for w in ws if w.compute] for m, ws in works.items()})
        return await step(works, release)

    monkeypatch.setattr(executor, "step", spy)
    constraint = Constraint(kind="json_schema", json_schema=SCHEMAS["enum"])
    params = SamplingParams(temperature=1.0, max_tokens=30, seed=5, constraint=constraint)
    pair.generate([PROMPTS[0]], params, RequestOptions(strategy=strategy))
    computed = [(m, w.full) for works in rounds for m, ws in works.items() for w in ws]
    assert computed
    for member, full in computed:
        computing_alone = full_for is None
        assert full == (computing_alone or member in full_for), (member, full)
    # Without a constraint nobody does (the members share no vocabulary, so mean needs no full average).
    rounds.clear()
    pair.generate(
        [PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=3, seed=5), RequestOptions(strategy=strategy)
    )
    assert not any(w.full for works in rounds for ws in works.values() for w in ws)
