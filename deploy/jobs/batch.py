"""`consort batch` / `python -m consort.deploy.jobs.batch`: an OpenAI batch file through a pool of ensembles.

    consort batch --input prompts.jsonl --output results/ --config ensemble.yaml
    ray job submit --working-dir . -- python -m consort.deploy.jobs.batch \\
        --input /data/prompts.jsonl --output /data/results --replicas 4

Ray Data does the distributed work: the requests become a dataset, `map_batches` runs
them through a fixed pool of `config.batch.replicas` actors, each building one ensemble
(`BatchReplica`: a coordinator and its members in their own placement group), and
streams the answers back as they finish. The driver is the only writer: it appends each
answered line to `<output>/output.jsonl` and forces it to disk, so the file is one
OpenAI batch output file, whole at every moment, and it is the run's record of what is
done. Started again after a crash, the run skips every custom_id already in it.
Input and output therefore live where the driver runs (on KubeRay: the head pod's volume).

At the end `<output>/summary.json` holds the run's lines, failures, tokens and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consort.runtime.batch_lines import (
    SUMMARY_FILE,
    BatchOutputError,
    BatchRequest,
    OutputLog,
    Tally,
    read_requests,
)
from consort.runtime.config import EnsembleConfig, default_config, load_config, parse_config
from consort.runtime.errors import ConsortError

PROG = "consort batch"


class CommandLineError(ConsortError):
    """A flag is missing or malformed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line through main's error path, as every other consort error.
        raise CommandLineError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Run an OpenAI batch input file (custom_id, method, url, body per line) through a pool "
        "of ensemble replicas on Ray Data; write the OpenAI batch output file. Run it again to resume.",
    )
    parser.add_argument(
        "--input", required=True, help="the batch input file (.jsonl), on the driver's machine"
    )
    parser.add_argument(
        "--output", required=True, help=f"folder for output.jsonl and {SUMMARY_FILE}; the same folder resumes"
    )
    parser.add_argument(
        "--config", help="ensemble YAML; its batch section sizes the pool (default: the packaged pair)"
    )
    parser.add_argument(
        "--replicas", type=int, help="ensemble replicas in the pool (overrides batch.replicas)"
    )
    parser.add_argument("--address", help="Ray cluster address (inside `ray job submit`: the job's cluster)")
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="run again the lines an earlier run wrote as retryable failures (429, 5xx, a lost replica)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines")
    parser.add_argument(
        "--progress-every", type=float, default=10.0, help="seconds between progress lines on stderr"
    )
    return parser


def _config(args: argparse.Namespace) -> EnsembleConfig:
    config = load_config(args.config) if args.config else default_config()
    if args.replicas is not None:
        if args.replicas < 1:
            raise CommandLineError(f"--replicas must be at least 1, got {args.replicas}")
        data = config.model_dump()
        data["batch"] = {**data["batch"], "replicas": args.replicas}
        config = parse_config(data)
    return config


def replica_cpus(config: EnsembleConfig) -> float:
    """CPU slots one replica holds: its own process and its members."""
    return config.batch.replica_cpus + sum(m.num_cpus for m in config.members)


def build_dataset(requests: Sequence[BatchRequest], config: EnsembleConfig) -> Any:
    """The requests through the replica pool, as a Ray Data dataset of output rows (lazy)."""
    import ray.data

    from consort.deploy.jobs.batch_replica import BatchReplica

    batch = config.batch
    items = [{"custom_id": r.custom_id, "line": r.text} for r in requests]
    # One block a batch: blocks are what Ray Data hands out, so small ones keep every replica fed.
    blocks = max(1, math.ceil(len(items) / batch.batch_size))
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    return dataset.map_batches(
        BatchReplica,
        fn_constructor_kwargs={"config": config.model_dump()},
        batch_size=batch.batch_size,
        batch_format="numpy",
        concurrency=batch.replicas,
        num_cpus=batch.replica_cpus,
        resources=dict(batch.replica_resources) or None,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Answer every line not yet in the output; return the summary (also written beside the output)."""
    config = _config(args)
    requests = read_requests(Path(args.input))
    output = Path(args.output)
    log = OutputLog(output, retry_failed=args.retry_failed)
    try:
        ids = {r.custom_id for r in requests}
        foreign = sorted(log.done - ids)
        if foreign:
            raise BatchOutputError(
                f"{log.path} answers {len(foreign)} custom_id(s) the input does not have (e.g. {foreign[0]!r}): "
                "it belongs to another input; choose another --output folder"
            )
        pending = [r for r in requests if r.custom_id not in log.done]
        tally = Tally(total=len(requests), skipped=len(requests) - len(pending))
        if pending:
            _answer_all(pending, config, args, log, tally)
    finally:
        log.close()
    summary = tally.summary(
        output=str(log.path),
        retried_failures=log.retried,
        replicas=config.batch.replicas,
        strategy=config.strategy,
        members=[m.model for m in config.members],
    )
    temporary = output / f"{SUMMARY_FILE}.tmp"
    temporary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, output / SUMMARY_FILE)
    return summary


def _answer_all(
    pending: list[BatchRequest],
    config: EnsembleConfig,
    args: argparse.Namespace,
    log: OutputLog,
    tally: Tally,
) -> None:
    import ray.data

    from consort.actors.client import connect

    # Inside `ray job submit` RAY_ADDRESS names the job's cluster: join it, never start one.
    connect(
        args.address or os.environ.get("RAY_ADDRESS"), min_cpus=config.batch.replicas * replica_cpus(config)
    )
    ray.data.DataContext.get_current().enable_progress_bars = not args.no_progress
    last = time.monotonic()
    for batch in build_dataset(pending, config).iter_batches(batch_size=None, batch_format="numpy"):
        lines = [str(text) for text in batch["output"]]
        log.append(lines)
        for text, finished_at in zip(lines, batch["finished_at"], strict=True):
            tally.add(json.loads(text), float(finished_at))
        if not args.no_progress and time.monotonic() - last >= args.progress_every:
            last = time.monotonic()
            print(f"{PROG}: {tally.progress()}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `consort batch ...` passes its arguments on behind a "--"
        argv = argv[1:]
    try:
        args = build_parser().parse_args(argv)
        summary = run(args)
    except ConsortError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{PROG}: {summary['lines_this_run']} lines answered ({summary['failed_this_run']} failed, "
        f"{summary['done_before']} done before) in {summary['wall_s']:.1f} s: "
        f"{summary['completion_tokens_per_s']:.1f} completion tokens/s, "
        f"{summary['total_tokens_per_s']:.1f} tokens/s with prompts -> {summary['output']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
