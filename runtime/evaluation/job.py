"""The evaluation job without Ray: its arguments, its output folder, and the loop over tasks.

`consort.deploy.jobs.eval` is the entry point (`consort eval`, `python -m
consort.deploy.jobs.eval`, `ray job submit ... -- python -m consort.deploy.jobs.eval`);
it calls `main` here with the one thing that needs Ray, a function that starts the
ensemble replicas. With `--local` the job runs in this process (`LocalBackend`).

Backends take chunks of questions from a shared queue. Every answered question
is appended to `predictions.jsonl` and flushed; a restart with the same `--out`
reads it back and skips what is answered. `summary.json`, `results.md` and
`results.png` are rewritten at the end of each task.

The strategies to evaluate are the registry's (`fusion.names()`), so a strategy
registered before the job starts is accepted and evaluated like the built-in ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from consort.runtime import fusion
from consort.runtime.config import EnsembleConfig, default_config, load_config, parse_config
from consort.runtime.errors import ConfigError, ConsortError
from consort.runtime.evaluation import questions as answering
from consort.runtime.evaluation.backend import Backend, LocalBackend
from consort.runtime.evaluation.calibration import CalibrationResult, joint_weights, write_config
from consort.runtime.evaluation.errors import ResultsError
from consort.runtime.evaluation.registry import TASKS, get_task, load_task
from consort.runtime.evaluation.report import PredictionStore, markdown_table, summarize, write_outputs

MEMBERS = "members"  # a pseudo-strategy: accepted in --strategies; each member alone is always evaluated
RUN_FILE = "run.json"
CALIBRATION_DIR = "calibration"

StartBackends = Callable[[EnsembleConfig, argparse.Namespace], list[Backend]]
"""Starts the ensemble replicas a run without `--local` talks to (the Ray entry point supplies it)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so a bad flag is one line like every other error."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see --help)")


def allowed_strategies() -> list[str]:
    """What --strategies accepts: the registered strategies (now, not at import) and `members`."""
    return [MEMBERS, *fusion.names()]


def build_parser() -> argparse.ArgumentParser:
    strategies = fusion.names()
    p = _Parser(prog="consort eval", description="Evaluate each member alone and each ensemble strategy.")
    p.add_argument("--task", help=f"one task: {', '.join(TASKS)}")
    p.add_argument("--tasks", help="comma-separated tasks (instead of --task)")
    p.add_argument("--limit", type=int, help="first N questions of each task (default: all)")
    p.add_argument(
        "--split",
        choices=["eval", "dev"],
        default="eval",
        help="answer the tasks' eval questions (the reported test slices) or their dev split (for tuning)",
    )
    p.add_argument(
        "--strategies",
        default=",".join(strategies),
        help=f"comma list of {', '.join(strategies)}, {MEMBERS} (each member alone is always included)",
    )
    p.add_argument("--out", default="results/eval", help="output folder (reused to resume)")
    p.add_argument("--config", help="ensemble YAML (default: the packaged SmolLM2 + Gemma-3 pair)")
    p.add_argument(
        "--calibrate", action="store_true", help="fit member weights on each task's dev split first"
    )
    p.add_argument("--calibrate-limit", type=int, default=100, help="dev questions used to calibrate")
    p.add_argument("--calibrate-step", type=float, default=0.1, help="grid step on the weight simplex")
    p.add_argument("--calibrate-metric", choices=["accuracy", "loglik"], default="accuracy")
    p.add_argument(
        "--calibrate-mode",
        choices=["mixture", "exact"],
        default="mixture",
        help="mixture: one pass, every grid point scored offline; exact: run mean at every grid point",
    )
    p.add_argument("--write-config", help="write the config with calibrated weights to this YAML")
    p.add_argument("--replicas", type=int, default=1, help="ensemble replicas on Ray (ignored with --local)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampled answers (vote, me draws)")
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument("--address", help="Ray address (default: the job's cluster, or a new local Ray)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences the core steps together")
    p.add_argument("--chunk-size", type=int, default=16, help="questions handed to a replica at a time")
    p.add_argument(
        "--mc-vote",
        choices=["loglik", "letter"],
        default="loglik",
        help="vote on multiple choice: majority of the members' log-likelihood picks, or sampled letters",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def strategy_names(text: str) -> list[str]:
    """The strategies a comma list asks for, in registry order; `members` adds nothing (members always run)."""
    asked = [s.strip() for s in text.split(",") if s.strip()]
    allowed = allowed_strategies()
    unknown = [s for s in asked if s not in allowed]
    if unknown:
        raise ConfigError(f"unknown strategy {unknown[0]!r}; choose from {', '.join(allowed)}")
    return [s for s in fusion.names() if s in asked]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    args.argv = list(argv)
    if args.task and args.tasks:
        raise ConfigError("give --task or --tasks, not both")
    names = [t.strip() for t in (args.tasks or args.task or "").split(",") if t.strip()]
    if not names:
        raise ConfigError("no task given; use --task T or --tasks T1,T2")
    for name in names:
        get_task(name)
    args.task_names = list(dict.fromkeys(names))
    args.strategy_names = strategy_names(args.strategies)
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, not {args.limit}")
    for flag in ("replicas", "max_batch", "chunk_size", "calibrate_limit"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.calibrate and args.split == "dev":
        raise ConfigError(
            "--calibrate fits weights on the dev split; it cannot then be evaluated on it (--split eval)"
        )
    if args.write_config and not args.calibrate:
        raise ConfigError("--write-config needs --calibrate")
    return args


def user_config(args: argparse.Namespace) -> EnsembleConfig:
    return load_config(args.config) if args.config else default_config()


def eval_config(args: argparse.Namespace) -> EnsembleConfig:
    config = user_config(args)
    # Scoring batches are bounded by max_batch; the queue must hold a whole wave.
    return parse_config(
        {
            **config.model_dump(),
            "max_batch": args.max_batch,
            "max_queue": max(config.max_queue, 2 * args.max_batch),
        }
    )


def _config_fingerprint(config: EnsembleConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    for member in data["members"]:
        member.pop("weight", None)  # calibration sets them; the calibration files are reused on restart
    return data


def _fingerprint(config: EnsembleConfig, args: argparse.Namespace) -> dict[str, Any]:
    """What must not change between a run and its restart (tasks and limit may: that extends the run)."""
    return {
        "config": _config_fingerprint(config),
        "seed": args.seed,
        "mc_vote": args.mc_vote,
        "calibrate": args.calibrate,
        # A folder holds one split: dev answers (for tuning) never mix with the reported test slices.
        "split": args.split,
    }


def same_run(previous: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    """Whether a restart continues the run that wrote `previous`. The stored config is read again
    by today's code first: a config field or job option added since then, at its default, is the
    same run (runs take hours and outlive releases); any other difference is not."""
    if previous is None or previous == current:
        return previous is not None
    try:
        # Runs from before `--split` answered the eval split.
        upgraded = {
            "split": "eval",
            **previous,
            "config": _config_fingerprint(parse_config(previous["config"])),
        }
    except (ConfigError, KeyError, TypeError):
        return False
    return upgraded == current


def check_run_file(out: Path, fingerprint: dict[str, Any]) -> None:
    path = out / RUN_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        if not same_run(previous.get("fingerprint"), fingerprint):
            raise ResultsError(
                f"{out} holds results of a different configuration (see {path}); use another --out or remove it"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": fingerprint}, indent=2) + "\n")


def start_backends(
    config: EnsembleConfig, args: argparse.Namespace, remote: StartBackends | None
) -> list[Backend]:
    if args.local:
        return [LocalBackend.start(config)]
    if remote is None:
        raise ConfigError("this evaluation runs only with --local here; on Ray use `consort eval`")
    return remote(config, args)


def progress(total: int, desc: str, disabled: bool) -> Any:
    from tqdm import tqdm

    # Explicit disable=: the consort CLI sets TQDM_DISABLE to hide model-loading bars, not this one.
    return tqdm(
        total=total,
        desc=desc,
        unit="q",
        disable=disabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 10.0,
    )


def check_chat_support(backends: Sequence[Backend], tasks: Sequence[str]) -> None:
    """Refuse chat tasks on a backend that would send their messages as raw text."""
    chat = [t for t in tasks if get_task(t).chat]
    if chat and not all(getattr(b, "chat_prompts", False) for b in backends):
        raise ConfigError(
            f"{', '.join(chat)} prompts are chat messages, which this backend sends as raw text; run it with --local"
        )


async def calibrate_task(
    backends: Sequence[Backend], task: str, out: Path, args: argparse.Namespace
) -> CalibrationResult:
    from consort.runtime.evaluation.fit_weights import calibrate

    path = out / CALIBRATION_DIR / f"{task}.json"
    if path.exists():
        return CalibrationResult.model_validate_json(path.read_text())
    spec = get_task(task)
    questions = load_task(task, split="dev", limit=args.calibrate_limit)
    started = time.perf_counter()
    print(
        f"calibrating {task} on {len(questions)} dev questions ({args.calibrate_mode})",
        file=sys.stderr,
        flush=True,
    )
    result = await calibrate(
        backends,
        spec,
        questions,
        step=args.calibrate_step,
        metric=args.calibrate_metric,
        mode=args.calibrate_mode,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.model_dump_json(indent=2) + "\n")
    print(
        f"calibrated {task}: weights {result.weights} (dev accuracy {result.best.accuracy:.3f}, "
        f"gold log-prob {result.best.gold_logprob:.4f}) in {time.perf_counter() - started:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return result


async def evaluate_task(
    backends: Sequence[Backend],
    store: PredictionStore,
    task: str,
    weights: list[float],
    args: argparse.Namespace,
    attempt: str,
) -> list[str]:
    """Answer the task's questions not yet in the store; returns the ids of this run's questions."""
    spec = get_task(task)
    questions = load_task(task, split=args.split, limit=args.limit)
    members = [m.name for m in backends[0].config.members]
    done = store.answered(task, args.strategy_names, members)
    todo = [q for q in questions if q.id not in done]
    queue: asyncio.Queue[list[Any]] = asyncio.Queue()
    for i in range(0, len(todo), args.chunk_size):
        queue.put_nowait(todo[i : i + args.chunk_size])
    bar = progress(len(todo), task, args.no_progress)

    async def worker(backend: Backend) -> None:
        while not queue.empty():
            chunk = queue.get_nowait()
            started = time.perf_counter()
            timing: dict[str, float] = {}
            if spec.kind == "multiple_choice":
                records = await answering.multiple_choice(
                    backend,
                    spec,
                    chunk,
                    args.strategy_names,
                    weights,
                    seed=args.seed,
                    mc_vote=args.mc_vote,
                    timing=timing,
                )
            else:
                records = await answering.generation(
                    backend, chunk, args.strategy_names, weights, seed=args.seed, timing=timing
                )
            seconds = (time.perf_counter() - started) / len(chunk)
            for record in records:
                record["attempt"] = attempt
                # Per question: the chunk's time shared equally (its questions were batched together).
                record["seconds"] = round(seconds, 3)
                record["phase_seconds"] = {k: round(v / len(chunk), 3) for k, v in timing.items()}
                store.append(record)
            bar.update(len(chunk))

    try:
        await asyncio.gather(*(worker(b) for b in backends))
    finally:
        bar.close()
    return [q.id for q in questions]


async def run(args: argparse.Namespace, remote: StartBackends | None = None) -> dict[str, Any]:
    out = Path(args.out)
    config = eval_config(args)
    check_run_file(out, _fingerprint(config, args))
    store = PredictionStore(out)
    attempt = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    backends = start_backends(config, args, remote)
    try:
        check_chat_support(backends, args.task_names)
    except ConfigError:
        for backend in backends:
            backend.close()
        raise
    members = [m.name for m in config.members]
    ids: dict[str, list[str]] = {}
    calibrations: list[CalibrationResult] = []
    summary: dict[str, Any] = {}
    try:
        for task in args.task_names:
            weights = list(config.weights)
            if args.calibrate:
                result = await calibrate_task(backends, task, out, args)
                calibrations.append(result)
                weights = result.weights
            ids[task] = await evaluate_task(backends, store, task, weights, args, attempt)
            summary = summarize(store.records.values(), list(ids), members, args.strategy_names, ids)
            summary["command"] = ["consort", "eval", *args.argv]
            summary["calibration"] = {c.task: c.weights for c in calibrations}
            write_outputs(out, summary)
    finally:
        store.close()
        for backend in backends:
            backend.close()
    if args.write_config and calibrations:
        chosen = (
            calibrations[0] if len(calibrations) == 1 else joint_weights(calibrations, args.calibrate_metric)
        )
        # The user's config, not this job's batch settings, gets the weights.
        path = write_config(user_config(args), chosen, args.write_config)
        print(f"wrote {path} (weights {chosen.weights})", file=sys.stderr)
    return summary


def main(argv: Sequence[str] | None = None, remote: StartBackends | None = None) -> int:
    """Run `consort eval` with `argv`; errors are one line on stderr and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]  # `consort eval -- ...`: the CLI passes the separator through
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parse_args(argv)
        summary = asyncio.run(run(args, remote))
    except ConsortError as error:
        print(f"consort eval: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if summary.get("tasks"):
        print(markdown_table(summary), end="")
    print(f"results in {args.out}")
    return 0
