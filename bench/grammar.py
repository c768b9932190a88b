"""Per-step cost of a grammar mask on the ensemble's candidates, for each grammar engine.

    python -m bench.grammar [--candidates 64] [--repeats 3] [--engines llguidance,xgrammar]

xgrammar is not a dependency: for the comparison, `pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi`
(its torch, transformers, numpy and pydantic requirements are already there; triton is not needed on CPU).

What one constrained step costs the ensemble (runtime/constraints): check every candidate
piece of the step (a union of members' top-k, as bytes) against the grammar without
moving it, then advance the grammar by the chosen piece. When no candidate fits, the
step falls back to a mask over one member's whole vocabulary; that cost is reported
apart, per vocabulary (SmolLM2's 49,152 and Gemma-3's 262,144 tokens).

The walk: a fixed JSON document valid for a nested schema, cut into SmolLM2's tokens (the
chosen pieces); each step's candidates are the true next piece plus random vocabulary
pieces of both tokenizers. Reported: median milliseconds per step over the walk (best of
`--repeats` runs), and the member step it is measured against (docs/benchmarks.md:
SmolLM2 ≈ 75 ms, Gemma-3 ≈ 117 ms per decode step on this CPU). The target is ≤ 10 %.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from consort.runtime import models
from consort.runtime.vocab import TokenTable

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 5},
    },
    "required": ["name", "age", "role", "address", "scores"],
    "additionalProperties": False,
}
DOCUMENT = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "address": {"city": "London", "zip": "12345"},
    "scores": [0.5, 0.25, 1],
}
MEMBER_STEP_MS = {"smollm2-135m-instruct": 75.0, "gemma3-270m": 117.0}


class Engine:
    """One engine's operations, as the constraint layer uses them."""

    name: str
    start: Callable[[], None]
    allows: Callable[[bytes], bool]
    advance: Callable[[bytes], None]
    vocab_mask: Callable[[str], Any]


def llguidance_engine(tokenizers: dict[str, Any], tables: dict[str, TokenTable]) -> Engine:
    from consort.runtime.constraints.engine import ByteGrammar, member_tokenizer
    from consort.runtime.constraints.spec import Constraint

    spec = Constraint(kind="json_schema", json_schema=SCHEMA)
    member_toks = {alias: member_tokenizer(table) for alias, table in tables.items()}
    engine = Engine()
    engine.name = "llguidance"
    state: dict[str, Any] = {}

    def start() -> None:
        state["g"] = ByteGrammar.of(spec)
        state["members"] = {a: state["g"].member_matcher(t) for a, t in member_toks.items()}

    engine.start = start
    engine.allows = lambda piece: state["g"].allows(piece)

    def advance(piece: bytes) -> None:
        state["g"].advance(piece)

    engine.advance = advance
    engine.vocab_mask = lambda alias: state["g"].vocab_mask(state["members"][alias])
    return engine


def xgrammar_engine(tokenizers: dict[str, Any], tables: dict[str, TokenTable]) -> Engine:
    import xgrammar as xgr

    infos = {alias: xgr.TokenizerInfo.from_huggingface(tok) for alias, tok in tokenizers.items()}
    compilers = {alias: xgr.GrammarCompiler(info) for alias, info in infos.items()}
    started = time.perf_counter()
    compiled = {alias: c.compile_json_schema(json.dumps(SCHEMA)) for alias, c in compilers.items()}
    print(
        f"xgrammar: compiling the schema for both vocabularies {(time.perf_counter() - started) * 1e3:.0f} ms"
    )
    main = next(iter(tokenizers))
    engine = Engine()
    engine.name = "xgrammar"
    state: dict[str, Any] = {}

    def start() -> None:
        state["m"] = {alias: xgr.GrammarMatcher(c) for alias, c in compiled.items()}
        state["bitmask"] = {alias: xgr.allocate_token_bitmask(1, infos[alias].vocab_size) for alias in infos}

    def allows(piece: bytes) -> bool:
        matcher = state["m"][main]
        if matcher.accept_string(piece):
            matcher.rollback(1)
            return True
        return False

    def advance(piece: bytes) -> None:
        for matcher in state["m"].values():
            matcher.accept_string(piece)

    def vocab_mask(alias: str) -> Any:
        state["m"][alias].fill_next_token_bitmask(state["bitmask"][alias])
        return state["bitmask"][alias]

    engine.start, engine.allows, engine.advance, engine.vocab_mask = start, allows, advance, vocab_mask
    return engine


def walk(
    engine: Engine, pieces: list[bytes], noise: list[list[bytes]], aliases: list[str]
) -> dict[str, float]:
    """One constrained generation of the document: median ms per step of check + advance, and of each mask."""
    started = time.perf_counter()
    engine.start()
    request = (time.perf_counter() - started) * 1e3
    steps, masks = [], {a: [] for a in aliases}
    for piece, others in zip(pieces, noise, strict=True):
        started = time.perf_counter()
        allowed = [engine.allows(c) for c in [*others, piece]]
        assert allowed[-1], f"{engine.name} refused a piece of the valid document: {piece!r}"
        engine.advance(piece)
        steps.append(time.perf_counter() - started)
        for alias in aliases:
            started = time.perf_counter()
            engine.vocab_mask(alias)
            masks[alias].append(time.perf_counter() - started)
    out = {"check+advance": statistics.median(steps) * 1e3, "request": request}
    out.update({f"mask {a}": statistics.median(v) * 1e3 for a, v in masks.items()})
    return out


def constrain_costs(
    tables: dict[str, TokenTable], pieces: list[bytes], noise: list[list[bytes]]
) -> dict[str, float]:
    """The whole constraint step as the core runs it (runtime/constraints/apply.py, Python included):
    a fused decision of candidates from both vocabularies, kept where allowed, or widened to the
    main member's vocabulary, scored by both members' full distributions."""
    from types import SimpleNamespace

    import torch

    from consort.runtime.constraints.apply import Constrainer
    from consort.runtime.constraints.engine import ByteGrammar
    from consort.runtime.constraints.spec import Constraint
    from consort.runtime.fusion.base import Candidate, Decision
    from consort.runtime.types import SeqResult

    aliases = list(tables)
    ctx = SimpleNamespace(table=tables.__getitem__, main=aliases[0], config=SimpleNamespace(top_k=64))
    constrainer = Constrainer(ctx)  # type: ignore[arg-type]
    for alias in aliases:
        constrainer.tokenizer(alias)
    generator = torch.Generator().manual_seed(0)
    results = {}
    for alias, table in tables.items():
        full = torch.log_softmax(torch.randn(table.vocab_size, generator=generator), -1)
        top = torch.topk(full, 64)
        results[alias] = SeqResult("s", top_ids=top.indices, top_logprobs=top.values, logprobs=full)
    weights = dict.fromkeys(aliases, 1.0)
    timings: dict[str, list[float]] = {"kept": [], "widened": []}
    grammar = ByteGrammar.of(Constraint(kind="json_schema", json_schema=SCHEMA))
    for piece, others in zip(pieces, noise, strict=True):
        for case, keys in (("kept", [*others, piece]), ("widened", others)):
            keys = [k for k in keys if case == "kept" or not grammar.allows(k)]
            decision = Decision(
                [Candidate(k, aliases[0], 0) for k in keys],
                torch.log_softmax(torch.randn(len(keys)), -1),
                fused=True,
            )
            started = time.perf_counter()
            constrainer.constrain(grammar, decision, results, weights)
            timings[case].append(time.perf_counter() - started)
        grammar.advance(piece)
    return {case: statistics.median(values) * 1e3 for case, values in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--candidates", type=int, default=64, help="candidate pieces checked per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="llguidance,xgrammar")
    args = parser.parse_args()
    aliases = list(MEMBER_STEP_MS)
    tokenizers = {alias: models.load_tokenizer(alias) for alias in aliases}
    tables = {alias: TokenTable.from_tokenizer(tok) for alias, tok in tokenizers.items()}
    main_table = tables[aliases[0]]
    text = json.dumps(DOCUMENT, separators=(",", ":")).encode()
    ids = main_table.encode(text)
    pieces = [main_table.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text
    rng = random.Random(0)
    vocab = [
        t.token_bytes(i)
        for t in tables.values()
        for i in range(t.vocab_size)
        if not t.is_special(i) and t.token_bytes(i)
    ]
    noise = [rng.sample(vocab, args.candidates - 1) for _ in pieces]
    costs = constrain_costs(tables, pieces, noise)
    print(
        f"runtime/constraints (llguidance), whole step in Python: {costs['kept']:.2f} ms when a candidate fits, "
        f"{costs['widened']:.2f} ms when the step widens to the main member's vocabulary"
    )
    build = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine}
    for name in args.engines.split(","):
        started = time.perf_counter()
        engine = build[name](tokenizers, tables)
        setup = (time.perf_counter() - started) * 1e3
        runs = [walk(engine, pieces, noise, aliases) for _ in range(args.repeats)]
        best = {key: min(run[key] for run in runs) for key in runs[0]}
        step = best["check+advance"]
        share = ", ".join(f"{step / ms:.1%} of a {a} step" for a, ms in MEMBER_STEP_MS.items())
        print(
            f"{name}: setup {setup:.0f} ms (once per ensemble{', and per schema' if name == 'xgrammar' else ''}); "
            f"per request {best['request']:.1f} ms; {len(pieces)} steps, {args.candidates} candidates each"
        )
        print(f"  check+advance {step:.3f} ms/step ({share})")
        for alias in aliases:
            ms = best[f"mask {alias}"]
            print(
                f"  fallback mask over {alias}'s vocabulary {ms:.3f} ms ({ms / MEMBER_STEP_MS[alias]:.1%} of its step)"
            )


if __name__ == "__main__":
    main()
