"""Accuracy versus the number of sampled answers, one line per answer-level strategy (issue 15, items 2-4).

    python -m bench.answer_curves --config examples/qwen-coders.yaml --task gsm8k_chat --limit 200 \
        --out results/answer_curves [--samples 1,3,5,10,20] [--parts samples,cot,debate]

In process (no Ray), --chunk question parts in flight (a finished one replaced at once), every
part of a question written to `<out>/<task>.jsonl` as soon as it is done, so an interrupted run
resumes where it stopped (a line per question and part; rerun the same command); `pkill -USR1 -f
'bench\\.answer_curves'` lets the parts in flight finish and stops there. Asking for more
samples than a question's record holds extends it: the extended record is a later line for the same
part, and the later line wins when the log is read. At the end
`<out>/<task>.json` holds the curves and each point's paired sign test against the best member's
greedy answers, and `<out>/<task>.png` draws them, with that greedy accuracy as a dashed line.

What runs per question (M members, N = the largest of --samples):

- samples: each member's greedy answer, and ceil(N / M) answers per member at --temperature.
  `vote` over n answers is the first n in the order the strategy draws them (member i mod M,
  its (i div M)-th sample); `mux` with k answers per member is each member's first k (x = k*M).
  Both are chosen with the strategies' own selection functions (`vote.select_answer`,
  `vote.select_member`) over this one pool, as Agent Forest draws its curves. "vote NAME alone"
  is each member voting over its own first n samples (self-consistency): the bar a mixture of
  members must clear to be worth more than its best member.
- cot: the `vote` strategy with cot_branches = ceil(N / M), run as served; its diagnostics hold
  every branch and its margin. `vote+cot` and `mux+cot` with k branches per member keep the
  branches of first-token rank < k (x = k*M).
- debate: the `debate` strategy with --debate-rounds rounds, run as served; the answer after
  round r is the majority of that round's answers (x = M*(r+1)).

Scoring never feeds selection: GSM8K compares the extracted number with the gold one;
HumanEval runs every distinct completion once in the sandbox, and a strategy is right when
the completion it *selected* (by similarity, `vote_kind` free) passes. Code questions also get
each samples line's twin "... by behaviour": completions vote together when they return the same
on the calls the prompt shows (`consort.runtime.code_behaviour`), run once more in the sandbox
without the task's tests.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from consort.runtime.answers import cut_at_stop
from consort.runtime.config import EnsembleConfig, load_config, members_config
from consort.runtime.cot_decoding import best_paths
from consort.runtime.evaluation.metrics import behaviour_keys, run_code, score_generation
from consort.runtime.evaluation.questions import question_seed
from consort.runtime.evaluation.registry import load_task
from consort.runtime.evaluation.report import sign_test
from consort.runtime.evaluation.specs import GenerationQuestion
from consort.runtime.loop import EnsembleLoop
from consort.runtime.prompts import ChatMessage, Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import Completion, RequestOptions, VoteKind
from consort.runtime.vote import select_answer, select_member
from consort.runtime.vote_groups import alone

PARTS = ("samples", "cot", "debate")


# --- running requests in process ---------------------------------------------------------------


Request = tuple[Prompt, SamplingParams, RequestOptions]


def run_rolling(
    loop: EnsembleLoop,
    items: Sequence[list[Request]],
    window: int,
    admitting: Callable[[], bool] = lambda: True,
) -> Iterator[tuple[int, list[Completion]]]:
    """Each item's completions as soon as all of its requests end, with `window` items in flight.

    A finished item is replaced at once by the next one, so the batch stays full: sampled GSM8K
    answers run from ~100 to 512 tokens, and waiting for a whole chunk's longest answer left the
    batch mostly empty for its last few hundred steps. Once `admitting()` is false no item starts:
    those in flight finish and the iteration ends (a run drains instead of losing their work).
    """
    pending: dict[str, tuple[int, int]] = {}  # seq id -> (item, position in the item)
    done: dict[int, list[Completion | None]] = {}
    next_item = 0

    def admit() -> None:
        nonlocal next_item
        while next_item < len(items) and len(done) < window and admitting():
            done[next_item] = [None] * len(items[next_item])
            for position, (prompt, params, options) in enumerate(items[next_item]):
                pending[loop.core.add(prompt, params, options)] = (next_item, position)
            next_item += 1

    partial: dict[str, Completion] = {}
    admit()
    while done:
        for delta in asyncio.run(loop.core.step()):
            if delta.seq_id not in pending:
                continue
            completion = partial.setdefault(delta.seq_id, Completion())
            completion.add(delta)
            if completion.finished:
                item, position = pending.pop(delta.seq_id)
                done[item][position] = partial.pop(delta.seq_id)
        for item in [i for i, outcomes in done.items() if all(o is not None for o in outcomes)]:
            yield item, [o for o in done.pop(item) if o is not None]
        admit()


def prompt_of(question: GenerationQuestion) -> Prompt:
    if question.chat:
        return Prompt(messages=[ChatMessage(role="user", content=question.prompt)])
    return Prompt(text=question.prompt)


def kind_of(question: GenerationQuestion) -> VoteKind:
    return "free" if question.answer_kind == "code" else question.answer_kind


def params_of(question: GenerationQuestion, temperature: float, seed: int | None) -> SamplingParams:
    return SamplingParams(
        temperature=temperature, max_tokens=question.max_tokens, stop=question.stop, seed=seed
    )


def behaviours(
    questions: Sequence[GenerationQuestion], records: dict[tuple[str, str], dict[str, Any]]
) -> dict[str, dict[str, str | None]]:
    """Code questions: question id -> each distinct sampled text -> its behaviour key on the prompt's example
    calls (`behaviour_keys`: the inputs the prompt shows, never the task's tests). Run at report time,
    once per distinct text, so logs recorded before behaviour voting existed are voted on too."""
    found: dict[str, dict[str, str | None]] = {}
    for q in questions:
        record = records.get((q.id, "samples"))
        if q.answer_kind != "code" or record is None:
            continue
        texts = list(record["correct"])
        found[q.id] = dict(zip(texts, behaviour_keys(q, texts), strict=True))
    return found


def correctness(question: GenerationQuestion, texts: Sequence[str]) -> dict[str, bool]:
    """Whether each distinct text answers `question` (code: run once each in the sandbox)."""
    distinct = list(dict.fromkeys(texts))
    if question.answer_kind == "code":
        return {t: r.passed for t, r in zip(distinct, run_code(question, distinct), strict=True)}
    return {t: score_generation(question, t) for t in distinct}


# --- the parts of one question ------------------------------------------------------------------


def samples_per_member(samples: list[int], names: list[str]) -> int:
    return math.ceil(max(samples) / len(names))


def recorded_samples(record: dict[str, Any]) -> int:
    """Samples per member a `samples` record holds (all members have as many unless one was cut short)."""
    return min(len(entry["samples"]) for entry in record["members"].values())


def part_requests(
    part: str, question: GenerationQuestion, names: list[str], args: argparse.Namespace, have: int = 0
) -> list[tuple[Prompt, SamplingParams, RequestOptions]]:
    """The requests of one part; for `samples` with `have` samples per member already recorded,
    only the missing ones (sample j keeps its seed, so an extended record equals one run at once)."""
    prompt, seed = prompt_of(question), question_seed(args.seed, question.task, question.id)
    per_member = samples_per_member(args.samples, names)
    if part == "samples":
        requests = [] if have else [(prompt, params_of(question, 0.0, seed), alone(names, m)) for m in names]
        for m in names:
            for j in range(have, per_member):
                requests.append(
                    (prompt, params_of(question, args.temperature, seed + 1 + j), alone(names, m))
                )
        return requests
    kind = kind_of(question)
    if part == "cot":
        options = RequestOptions(strategy="vote", vote_kind=kind, cot_branches=per_member)
        return [(prompt, params_of(question, 0.0, seed), options)]
    if part == "debate":
        options = RequestOptions(strategy="debate", vote_kind=kind, debate_rounds=args.debate_rounds)
        return [(prompt, params_of(question, args.debate_temperature, seed), options)]
    raise SystemExit(f"unknown part {part!r}; use {', '.join(PARTS)}")


def part_record(
    part: str, question: GenerationQuestion, names: list[str], outcomes: Sequence[Completion]
) -> dict[str, Any]:
    record: dict[str, Any] = {"task": question.task, "id": question.id, "part": part}
    if part == "samples":
        greedy, sampled = outcomes[: len(names)], outcomes[len(names) :]
        per_member = len(sampled) // len(names)
        record["members"] = {
            m: {
                "greedy": greedy[i].text,
                "samples": [c.text for c in sampled[i * per_member : (i + 1) * per_member]],
            }
            for i, m in enumerate(names)
        }
        texts = [t for entry in record["members"].values() for t in [entry["greedy"], *entry["samples"]]]
    elif part == "cot":
        (outcome,) = outcomes
        (diagnostic,) = outcome.diagnostics
        record["paths"] = diagnostic["cot"]
        texts = [p["text"] for p in record["paths"]]
    else:
        (outcome,) = outcomes
        (diagnostic,) = outcome.diagnostics
        record["rounds"] = [r["answers"] for r in diagnostic["debate"]]
        texts = [t for answers in record["rounds"] for t in answers.values()]
    record["tokens"] = sum(c.completion_tokens for c in outcomes)
    record["correct"] = correctness(question, texts)
    return record


def extend_samples(
    record: dict[str, Any], question: GenerationQuestion, names: list[str], outcomes: Sequence[Completion]
) -> dict[str, Any]:
    """`record` (a samples part) with each member's further samples appended, in member order."""
    per_member = len(outcomes) // len(names)
    extended = copy.deepcopy(record)
    added: list[str] = []
    for i, m in enumerate(names):
        texts = [c.text for c in outcomes[i * per_member : (i + 1) * per_member]]
        extended["members"][m]["samples"].extend(texts)
        added.extend(texts)
    extended["tokens"] += sum(c.completion_tokens for c in outcomes)
    extended["correct"].update(correctness(question, [t for t in added if t not in extended["correct"]]))
    return extended


# --- curves from the records --------------------------------------------------------------------


def _selectable(question: GenerationQuestion, text: str) -> str:
    return cut_at_stop(text, question.stop) if question.answer_kind == "code" else text


BEHAVIOUR_SUFFIX = " by behaviour"


def _keys(key: dict[str, str | None] | None, texts: Sequence[str]) -> list[str | None] | None:
    return None if key is None else [key[t] for t in texts]


def outcomes(
    questions: Sequence[GenerationQuestion],
    records: dict[tuple[str, str], dict[str, Any]],
    names: list[str],
    grid: Sequence[int],
    accuracy: dict[str, float],
    behaviour: dict[str, dict[str, str | None]] | None = None,
) -> dict[str, dict[int, dict[str, bool]]]:
    """Strategy -> {answers drawn per question: {question id: right}}, over the questions each part has.

    behaviour (code): question id -> sampled text -> its behaviour key (`behaviours`); each of the
    samples part's vote and mux lines gets a twin "... by behaviour" that votes on those keys.
    """
    behaviour = behaviour or {}
    m = len(names)
    ks = sorted({max(1, n // m) for n in grid})
    points: dict[str, dict[int, dict[str, bool]]] = {}

    for q in questions:

        def add(strategy: str, x: int, ok: bool, qid: str = q.id) -> None:
            points.setdefault(strategy, {}).setdefault(x, {})[qid] = ok

        kind = kind_of(q)
        samples = records.get((q.id, "samples"))
        if samples is not None:
            correct, members = samples["correct"], samples["members"]
            for name in names:
                add(f"{name} greedy", 1, correct[members[name]["greedy"]])
            recorded = recorded_samples(samples)
            keyed = behaviour.get(q.id)
            # (line suffix, each text's key): the text's own rule, then (code) its behaviour.
            rules: list[tuple[str, dict[str, str | None] | None]] = [("", None)]
            if keyed is not None:
                rules.append((BEHAVIOUR_SUFFIX, keyed))
            for suffix, key in rules:
                for n in grid:
                    if math.ceil(n / m) > recorded:
                        continue  # this question's record has fewer samples: rerun the command to extend it
                    drawn = [members[names[i % m]]["samples"][i // m] for i in range(n)]
                    chosen = select_answer([_selectable(q, t) for t in drawn], kind=kind, keys=_keys(key, drawn))
                    add(f"vote{suffix}", n, correct[drawn[chosen.index]])
                # Each member voting over its own samples (self-consistency): what the ensemble's
                # lines must beat at the same number of answers to be worth more than its best member.
                for name in names:
                    texts = members[name]["samples"]
                    for n in grid:
                        if n <= len(texts):
                            chosen = select_answer(
                                [_selectable(q, t) for t in texts[:n]], kind=kind, keys=_keys(key, texts[:n])
                            )
                            add(f"vote {name} alone{suffix}", n, correct[texts[chosen.index]])
                for k in ks:
                    if k > recorded:
                        continue
                    own = {name: members[name]["samples"][:k] for name in names}
                    mux = select_member(
                        {name: [_selectable(q, t) for t in texts] for name, texts in own.items()},
                        kind=kind,
                        accuracy=accuracy,
                        keys=None if key is None else {name: [key[t] for t in texts] for name, texts in own.items()},
                    )
                    add(f"mux{suffix}", k * m, correct[own[mux.member][mux.index]])
        cot = records.get((q.id, "cot"))
        if cot is not None:
            correct = cot["correct"]
            branches = 1 + max((p["rank"] for p in cot["paths"]), default=-1)
            for k in ks:
                if k > branches:
                    continue  # the part ran with fewer branches per member than this point needs
                paths = [_Path(p) for p in cot["paths"] if p["rank"] < k]
                if not paths:
                    continue
                ballots = sorted(best_paths(paths).values(), key=lambda p: -p.margin)  # type: ignore[arg-type]
                chosen = select_answer([_selectable(q, p.text) for p in ballots], kind=kind)
                add("vote+cot", k * m, correct[ballots[chosen.index].text])
                by_member: dict[str, list[_Path]] = {}
                for path in sorted(paths, key=lambda p: -p.margin):
                    by_member.setdefault(path.member, []).append(path)
                mux = select_member(
                    {
                        name: [_selectable(q, p.text) for p in by_member[name]]
                        for name in names
                        if name in by_member
                    },
                    kind=kind,
                    accuracy={n: a for n, a in accuracy.items() if n in by_member},
                )
                add("mux+cot", k * m, correct[by_member[mux.member][mux.index].text])
        debate = records.get((q.id, "debate"))
        if debate is not None:
            correct = debate["correct"]
            for r, answers in enumerate(debate["rounds"]):
                texts = [answers[name] for name in names if name in answers]
                chosen = select_answer([_selectable(q, t) for t in texts], kind=kind)
                add("debate", len(texts) * (r + 1), correct[texts[chosen.index]])
    return points


def member_rates(
    questions: Sequence[GenerationQuestion], records: dict[tuple[str, str], dict[str, Any]], names: list[str]
) -> dict[str, dict[str, list[int]]]:
    """Member -> {"greedy": [right, answers], "sample": [right, answers]} over the recorded samples
    parts: whether one sampled answer is better or worse than the greedy one is what decides if
    voting over samples can beat greedy decoding at all."""
    rates = {name: {"greedy": [0, 0], "sample": [0, 0]} for name in names}
    for q in questions:
        record = records.get((q.id, "samples"))
        if record is None:
            continue
        for name in names:
            entry = record["members"][name]
            rates[name]["greedy"][0] += record["correct"][entry["greedy"]]
            rates[name]["greedy"][1] += 1
            rates[name]["sample"][0] += sum(record["correct"][t] for t in entry["samples"])
            rates[name]["sample"][1] += len(entry["samples"])
    return rates


def curves(points: dict[str, dict[int, dict[str, bool]]]) -> dict[str, dict[int, float]]:
    """Strategy -> {answers drawn per question: accuracy}, from `outcomes`."""
    return {
        s: {x: sum(oks.values()) / len(oks) for x, oks in sorted(xs.items())} for s, xs in points.items()
    }


def against_best_greedy(points: dict[str, dict[int, dict[str, bool]]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Each point against the best member's greedy answers on the same questions: won/lost and the
    exact sign test (the issue's bar is the best member's greedy accuracy)."""
    greedy = {s: xs[1] for s, xs in points.items() if s.endswith(" greedy")}
    if not greedy:
        return {}
    best_name, best = max(greedy.items(), key=lambda kv: sum(kv[1].values()) / len(kv[1]))
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for strategy, xs in points.items():
        if strategy.endswith(" greedy"):
            continue
        for x, oks in xs.items():
            shared = [q for q in oks if q in best]
            won = sum(1 for q in shared if oks[q] and not best[q])
            lost = sum(1 for q in shared if best[q] and not oks[q])
            out.setdefault(strategy, {})[x] = {
                "against": best_name,
                "questions": len(shared),
                "won": won,
                "lost": lost,
                "p": sign_test(won, lost),
            }
    return out


class _Path:
    """A recorded CoT path, shaped like `cot_decoding.PathScore` for `best_paths`."""

    def __init__(self, entry: dict[str, Any]) -> None:
        self.member: str = entry["member"]
        self.rank: int = entry["rank"]
        self.margin: float = entry["margin"]
        self.text: str = entry["text"]


def chart(
    path: Path,
    task: str,
    lines: dict[str, dict[int, float]],
    questions: int,
    members: list[str],
    answered: dict[str, int],
) -> None:
    """One line per strategy; a line drawn over fewer than `questions` says over how many."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    greedy = {s: v for s, v in lines.items() if s.endswith(" greedy")}
    colours: dict[str, str] = {}
    for strategy, values in lines.items():
        if strategy in greedy:
            continue
        xs = sorted(values)
        label = strategy if answered[strategy] == questions else f"{strategy} ({answered[strategy]} questions)"
        # A "by behaviour" twin keeps its strategy's colour, dashed, so the two selections pair up by eye.
        base = strategy.removesuffix(BEHAVIOUR_SUFFIX)
        style = {"linestyle": "--", "marker": "s"} if base != strategy else {"marker": "o"}
        (line,) = axes.plot(xs, [100 * values[x] for x in xs], label=label, color=colours.get(base), **style)
        colours.setdefault(base, line.get_color())
    if greedy:
        best_name, best = max(greedy.items(), key=lambda kv: kv[1][1])
        axes.axhline(100 * best[1], linestyle="--", color="grey", label=f"best member greedy ({best_name})")
    axes.set_xscale("log")
    axes.set_xticks([1, 2, 3, 5, 10, 20])
    axes.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes.set_xlabel("answers generated per question")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{task}: {questions} questions; members {', '.join(members)}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- the command ----------------------------------------------------------------------------------


def read_log(path: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The records of a JSONL log, the later line winning for the same (question, part).

    A last line with no newline is a record torn mid-write (the run was killed, or the log was
    committed while a ~12 kB line was being flushed): it is cut off the file, so the run redoes
    that part and its next line does not land glued to the torn one.
    """
    records: dict[tuple[str, str], dict[str, Any]] = {}
    if not path.exists():
        return records
    text = path.read_text()
    whole, newline, torn = text.rpartition("\n")
    if torn:
        with path.open("r+") as log:
            log.truncate(len((whole + newline).encode()))
    for line in whole.splitlines():
        if line.strip():
            record = json.loads(line)
            records[(record["id"], record["part"])] = record
    return records


def ensemble(args: argparse.Namespace) -> EnsembleConfig:
    if args.config:
        return load_config(args.config)
    if args.members:
        return members_config(args.members.split(","), "mean")
    raise SystemExit("give --config or --members")


def tie_breaker(config: EnsembleConfig, member_accuracy: str | None) -> dict[str, float]:
    """mux's dev accuracy per member: --member-accuracy (config order) if given, else the config's
    `mux.accuracy`, which is what the served strategy breaks ties with."""
    names = [m.name for m in config.members]
    if not member_accuracy:
        return dict(config.mux.accuracy)
    values = [float(a) for a in member_accuracy.split(",")]
    if len(values) != len(names):
        raise SystemExit(f"--member-accuracy has {len(values)} values for the {len(names)} members {names}")
    return dict(zip(names, values, strict=True))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="ensemble YAML")
    parser.add_argument("--members", help="comma-separated model references, instead of --config")
    parser.add_argument("--task", required=True, choices=["gsm8k_chat", "gsm8k", "humaneval", "mbpp"])
    parser.add_argument("--limit", type=int, help="the first N questions of the eval split")
    parser.add_argument("--samples", default="1,3,5,10,20", help="answers per question on the x axis")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"what to run: {', '.join(PARTS)}")
    parser.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature of vote/mux samples"
    )
    parser.add_argument("--debate-rounds", type=int, default=2)
    parser.add_argument("--debate-temperature", type=float, default=0.0)
    parser.add_argument(
        "--member-accuracy",
        help="mux tie-breaker: dev accuracy per member, config order (default: the config's mux.accuracy)",
    )
    parser.add_argument("--max-tokens", type=int, help="cap every answer's tokens (smoke tests)")
    parser.add_argument("--chunk", type=int, default=2, help="question parts in flight at once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.samples = sorted({int(n) for n in args.samples.split(",")})
    parts = [p for p in args.parts.split(",") if p]
    if unknown := set(parts) - set(PARTS):
        raise SystemExit(f"unknown parts {sorted(unknown)}; use {', '.join(PARTS)}")

    config = ensemble(args)
    names = [m.name for m in config.members]
    accuracy = tie_breaker(config, args.member_accuracy)
    questions = [q for q in load_task(args.task, limit=args.limit) if isinstance(q, GenerationQuestion)]
    if args.max_tokens:
        questions = [
            q.model_copy(update={"max_tokens": min(q.max_tokens, args.max_tokens)}) for q in questions
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"{args.task}.jsonl"
    records = read_log(log_path)
    # (question, part, samples per member already recorded): a samples part recorded with fewer
    # samples than --samples needs is extended, not redone.
    wanted = samples_per_member(args.samples, names)
    todo: list[tuple[GenerationQuestion, str, int]] = []
    for q in questions:
        for p in parts:
            recorded = records.get((q.id, p))
            if recorded is None:
                todo.append((q, p, 0))
            elif p == "samples" and (have := recorded_samples(recorded)) < wanted:
                todo.append((q, p, have))
    print(
        f"{args.task}: {len(questions)} questions, {len(todo)} parts to run ({len(records)} done)", flush=True
    )
    if todo:
        loop = EnsembleLoop.from_config(config, device="cpu")
        # SIGUSR1: start no more parts, finish the --chunk in flight (up to ~20 min of work on this
        # CPU that a kill would throw away), report, exit; the next run resumes after them.
        draining = threading.Event()
        signal.signal(signal.SIGUSR1, lambda *_: draining.set())
        with log_path.open("a") as log:
            items = [part_requests(p, q, names, args, have) for q, p, have in todo]
            rolling = run_rolling(loop, items, args.chunk, admitting=lambda: not draining.is_set())
            for finished, (index, completions) in enumerate(rolling, start=1):
                q, p, have = todo[index]
                if have:
                    record = extend_samples(records[(q.id, p)], q, names, completions)
                else:
                    record = part_record(p, q, names, completions)
                records[(q.id, p)] = record
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(f"  {finished}/{len(todo)}", flush=True)
    # Report what --parts names: other parts' records (e.g. CoT-decoding on fewer questions) stay in
    # the JSONL for the run that asks for them.
    reported = {key: record for key, record in records.items() if key[1] in parts}
    points = outcomes(questions, reported, names, args.samples, accuracy, behaviours(questions, reported))
    lines = curves(points)
    tests = against_best_greedy(points)
    answered = {strategy: max(len(oks) for oks in xs.values()) for strategy, xs in points.items()}
    summary = {
        "task": args.task,
        "questions": len(questions),
        "members": names,
        "mux_tie_breaker": accuracy,
        "questions_per_strategy": answered,
        "right_per_answer": member_rates(questions, reported, names),
        "curves": lines,
        "against_best_greedy": tests,
    }
    (args.out / f"{args.task}.json").write_text(json.dumps(summary, indent=2) + "\n")
    chart(args.out / f"{args.task}.png", args.task, lines, len(questions), names, answered)
    for name, kinds in summary["right_per_answer"].items():
        print(f"  {name:>16}: " + "  ".join(f"{kind} {right}/{n}" for kind, (right, n) in kinds.items()))
    for strategy, values in lines.items():
        print(f"  {strategy:>16}: " + "  ".join(f"{x}: {100 * v:.1f}" for x, v in values.items()))
        for x, test in tests.get(strategy, {}).items():
            print(f"  {'':>16}  {x}: {test['won']}/{test['lost']} against {test['against']} (p={test['p']:.3g})")


if __name__ == "__main__":
    main()
