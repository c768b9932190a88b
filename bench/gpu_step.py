"""A member's decode step on a GPU: the eager engine against a static KV cache replayed as CUDA graphs,
and two members sharing one GPU (two processes, with and without MPS, or one process).

    python -m bench.gpu_step --out $OUT            # on the lent GPU machine (about 5-8 minutes on an H200)
    python -m bench.gpu_step --tiny --out /tmp/b   # on a CPU: tiny shapes, the CUDA-only parts skipped

Needs only torch and transformers (the GPU machine has no Ray and no package index): run it from the
source tree, whose `consort/` folder reaches `runtime/` without installing anything. The models are
the packaged members' architectures at full size (configs in bench/configs/, copied from the
converted models' config.json), randomly initialised: a step's speed does not depend on the weights'
values. No tokenizer is needed: prompts are random token ids.

What it measures, per architecture (SmolLM2-135M llama, Gemma-3-270M gemma3, Qwen2.5-Coder-0.5B and
-1.5B qwen2):

* `engine`: `MemberEngine.step` with its default dynamic caches (runtime/member.py, the eager path
  Consort runs on CPUs: dynamic caches, packed rows, position masks, exact top-k to the host) at batch
  1/4/16/32.
* `static_eager` / `graph`: `MemberEngine.step` in static mode (runtime/static_cache.py): a static KV
  cache with one slot per sequence (the token at position p of the sequence in slot b lives in column
  p of row b; a crop moves the slot's length back, no copy), the decode step as one forward over a
  batch bucket of slots with masks computed from the slots' positions (causal, and Gemma-3's sliding
  window, measured in positions), then the engine's own outputs (top-k and log-softmax normaliser on
  the device, copied to the host). `graph` replays that step as one CUDA graph per batch and length
  bucket (manual `torch.cuda.CUDAGraph`, as gpt-fast and vLLM do): no compile step or Triton needed
  on the lent machine, no recompiles, and the replay runs the eager step's own kernels, so it matches
  the uncaptured step. A rehearsal before each measurement captures every graph it will replay.
* `check`: greedy tokens, in float32, of the dynamic engine, the static one and its graph replay, over
  ragged prompts (Gemma-3's longer than its sliding window, so the window is crossed) and a crop of
  one sequence mid-way (the alignment's case); they must agree token for token.

And for the default pair (SmolLM2 + Gemma-3) on one device (`sharing`): each alone, both stepped in
turn in one process (the in-process ensemble, one GPU), and two processes stepping at once, without
and (when `nvidia-cuda-mps-control` exists) with CUDA MPS, for the engine and for the graph path.

Everything is written to one JSON file, `<out>/gpu_step.json` (`--out`, else $OUT, else ./bench_out),
with a `skipped` list saying what did not run and why (no CUDA, no MPS, the time budget).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

from consort.runtime.member import MemberEngine
from consort.runtime.static_cache import StaticCacheOptions

CONFIGS = Path(__file__).resolve().parent / "configs"
ARCHITECTURES = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
PAIR = ("smollm2-135m", "gemma3-270m")  # the default ensemble
PROMPT = 64  # prompt tokens of the timed sequences
BATCHES = (1, 4, 16, 32)
TOP_K = 64
# Targets of issue 19 for a member's decode step (ms at batch 1), and batch 32 against batch 1.
TARGET_B1_MS = {"smollm2-135m": 3.0, "gemma3-270m": 3.0, "qwen2.5-coder-1.5b": 5.0}
TARGET_B32_OVER_B1 = 2.0


# -- models ----------------------------------------------------------------------------------------


def load_config(arch: str, tiny: bool) -> Any:
    raw = json.loads((CONFIGS / f"{arch}.json").read_text())
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    if tiny:  # the shapes of runtime/testing/tiny.py: 2 layers, width 64; the vocabulary stays full
        config.num_hidden_layers = 2
        config.hidden_size = 64
        config.intermediate_size = 128
        config.num_attention_heads = 4
        config.num_key_value_heads = 2
        config.head_dim = 16
        if getattr(config, "layer_types", None) is not None:
            kinds = set(config.layer_types)
            both = (
                ["sliding_attention", "full_attention"]
                if "sliding_attention" in kinds
                else ["full_attention"] * 2
            )
            config.layer_types = both
        if getattr(config, "sliding_window", None):
            config.sliding_window = 8  # crossed by the check's prompts
        if hasattr(config, "max_window_layers"):
            config.max_window_layers = 2
    return config


def build(arch: str, tiny: bool, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    config = load_config(arch, tiny)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def engine_of(model: Any, device: str, static_cache: StaticCacheOptions | None = None) -> MemberEngine:
    config = model.config
    stand_in = SimpleNamespace(pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    return MemberEngine(model, stand_in, name=config.model_type, device=device, static_cache=static_cache)


def static_engine(model: Any, device: str, batch: int, longest: int, graph: bool) -> MemberEngine:
    """`MemberEngine` in static mode: `batch` slots (one batch bucket), each holding `longest` tokens
    from the start, so no capacity growth (a copy and a recapture) falls inside a measurement."""
    options = StaticCacheOptions(max_slots=batch, max_len=longest, initial_len=longest, cuda_graphs=graph)
    return engine_of(model, device, options)


def prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- greedy equality -----------------------------------------------------------------------------------


def check_lengths(arch: str, config: Any) -> list[int]:
    window = getattr(config, "sliding_window", None)
    base = (window + 4) if window and "gemma" in arch else 12
    return [base + 5 * i for i in range(3)]


@dataclass
class Greedy:
    """Per sequence and step: the greedy token, the top-5 ids and their log-probs."""

    tokens: list[list[int]]
    top5: list[list[list[int]]]
    logprobs5: list[list[list[float]]]

    @classmethod
    def empty(cls, rows: int) -> Greedy:
        return cls([[] for _ in range(rows)], [[] for _ in range(rows)], [[] for _ in range(rows)])

    def add(self, row: int, values: torch.Tensor, ids: torch.Tensor) -> int:
        self.tokens[row].append(int(ids[0]))
        self.top5[row].append([int(i) for i in ids[:5]])
        self.logprobs5[row].append([float(v) for v in values[:5]])
        return int(ids[0])

    def compare(self, other: Greedy) -> dict[str, Any]:
        gaps = [
            abs(a - b)
            for mine, theirs in zip(self.logprobs5, other.logprobs5, strict=True)
            for step_a, step_b in zip(mine, theirs, strict=True)
            for a, b in zip(step_a, step_b, strict=True)
        ]
        return {
            "tokens_equal": self.tokens == other.tokens,
            "top5_equal": self.top5 == other.top5,
            "max_logprob_gap": max(gaps),
        }


def greedy_engine(engine: MemberEngine, rows: list[list[int]], before: int, after: int, crop: int) -> Greedy:
    ids = [f"r{i}" for i in range(len(rows))]
    for seq_id, tokens in zip(ids, rows, strict=True):
        engine.add(seq_id, tokens)
    out = Greedy.empty(len(rows))
    try:
        for step in range(before + after):
            if step == before:
                engine.crop(ids[0], len(engine.token_ids(ids[0])) - crop)
            results = engine.step(ids, top_k=TOP_K)
            for i, seq_id in enumerate(ids):
                engine.extend(seq_id, [out.add(i, results[seq_id].top_logprobs, results[seq_id].top_ids)])
    finally:
        for seq_id in ids:
            engine.remove(seq_id)
    return out


def greedy_static(
    model: Any, rows: list[list[int]], before: int, after: int, crop: int, device: str, graph: bool
) -> Greedy:
    longest = max(len(r) for r in rows) + before + after + 2
    return greedy_engine(static_engine(model, device, len(rows), longest, graph), rows, before, after, crop)


def check(arch: str, model: Any, device: str, graph: bool) -> dict[str, Any]:
    """The engine, the static step and (on CUDA) its graph give the same greedy tokens."""
    config = model.config.get_text_config(decoder=True)
    rows = prompts(config.vocab_size, check_lengths(arch, config), seed=1)
    before, after, crop = 6, 6, 3
    engine = greedy_engine(engine_of(model, device), rows, before, after, crop)
    static = greedy_static(model, rows, before, after, crop, device, graph=False)
    result: dict[str, Any] = {
        "prompt_lengths": [len(r) for r in rows],
        "sliding_window": getattr(config, "sliding_window", None),
        "crop": {"slot": 0, "after_step": before, "tokens": crop},
        "engine_tokens": engine.tokens,
        "static_vs_engine": static.compare(engine),
    }
    if static.tokens != engine.tokens:
        result["static_tokens"] = static.tokens
    if graph:
        longest = max(len(r) for r in rows) + before + after + 2
        graphed = static_engine(model, device, len(rows), longest, graph=True)
        try:
            replayed = greedy_engine(graphed, rows, before, after, crop)
        except RuntimeError as error:  # a failure is a finding: recorded, the rest goes on
            result["graph_error"] = f"{type(error).__name__}: {error}"
            return result
        if graphed.graph_error is not None:  # the engine fell back to eager steps: same numbers, no graphs
            result["graph_error"] = graphed.graph_error
        result["graph_captures"] = graphed.stats.graph_captures
        result["graph_replays"] = graphed.stats.graph_replays
        result["graph_vs_engine"] = replayed.compare(engine)
        result["graph_vs_static"] = replayed.compare(static)
        if replayed.tokens != engine.tokens:
            result["graph_tokens"] = replayed.tokens
    return result


# -- timing --------------------------------------------------------------------------------------------


def decoding(engine: MemberEngine, batch: int, total: int, seed: int) -> Callable[[], None]:
    """A callable taking one greedy decode step of `batch` sequences (64-token prompts, prefilled here).

    A static engine first rehearses `total` steps and crops its sequences back (a crop only moves the
    slots' lengths), so the CUDA graph of every length bucket the measured steps reach is captured
    before they run.
    """
    ids = [f"s{i}" for i in range(batch)]
    for seq_id, tokens in zip(ids, prompts(engine.vocab_size, [PROMPT] * batch, seed=seed), strict=True):
        engine.add(seq_id, tokens)

    def one() -> None:
        results = engine.step(ids, top_k=TOP_K)
        for seq_id in ids:
            engine.extend(seq_id, [int(results[seq_id].top_ids[0])])

    one()  # the prefill
    if engine.kv_cache == "static":
        for _ in range(total):
            one()
        for seq_id in ids:
            engine.crop(seq_id, PROMPT + 1)
    return one


def time_engine(
    model: Any, device: str, batch: int, warmup: int, steps: int, static: bool = False, graph: bool = False
) -> float:
    """ms per decode step of `MemberEngine` at this batch: dynamic caches, or static slots (eager or graphs)."""
    total = warmup + steps
    if static:
        engine = static_engine(model, device, batch, PROMPT + total + 4, graph)
    else:
        engine = engine_of(model, device)
    one = decoding(engine, batch, total, seed=2)
    for _ in range(warmup):
        one()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        one()
    sync(device)
    ms = 1000 * (time.perf_counter() - started) / steps
    if graph and engine.graph_error is not None:
        raise RuntimeError(f"CUDA graph capture failed, the steps ran eagerly: {engine.graph_error}")
    return ms


def time_static(model: Any, device: str, batch: int, warmup: int, steps: int, graph: bool) -> float:
    return time_engine(model, device, batch, warmup, steps, static=True, graph=graph)


# -- sharing one device --------------------------------------------------------------------------------


def share_worker(args: argparse.Namespace) -> None:
    """One member in its own process: build, warm up, say ready, wait for go, step, write ms/step."""
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = build(args.share_worker, args.tiny, device, dtype)
    with torch.inference_mode():
        run = stepper(model, device, args.mode, args.steps)
        for _ in range(args.warmup):
            run()
        sync(device)
        sync_dir = Path(args.sync_dir)
        (sync_dir / f"ready-{args.share_worker}").write_text("1")
        deadline = time.monotonic() + 120
        while not (sync_dir / "go").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the benchmark never said go")
            time.sleep(0.005)
        started = time.perf_counter()
        for _ in range(args.steps):
            run()
        sync(device)
        ms = 1000 * (time.perf_counter() - started) / args.steps
    Path(args.result).write_text(
        json.dumps({"arch": args.share_worker, "mode": args.mode, "ms_per_step": ms})
    )


def stepper(model: Any, device: str, mode: str, steps: int) -> Callable[[], None]:
    """A callable that takes one batch-1 decode step of `model` the way `mode` says (engine: dynamic
    caches; static_eager, graph: static slots), good for 10 + 2 × `steps` calls."""
    total = 2 * steps + 20
    if mode == "engine":
        engine = engine_of(model, device)
    else:
        engine = static_engine(model, device, 1, PROMPT + total + 4, graph=mode == "graph")
    return decoding(engine, 1, total, seed=3)


def run_pair(args: argparse.Namespace, mode: str, env: dict[str, str]) -> dict[str, Any]:
    """The pair as two processes stepping at the same time on one device."""
    with tempfile.TemporaryDirectory() as sync_dir:
        procs = []
        for arch in PAIR:
            command = [
                sys.executable,
                "-m",
                "bench.gpu_step",
                "--share-worker",
                arch,
                "--mode",
                mode,
                "--steps",
                str(args.share_steps),
                "--warmup",
                "10",
                "--sync-dir",
                sync_dir,
                "--result",
                str(Path(sync_dir) / f"{arch}.json"),
                "--device",
                args.device,
            ] + (["--tiny"] if args.tiny else [])
            procs.append(subprocess.Popen(command, env=env, cwd=Path(__file__).resolve().parents[1]))
        deadline = time.monotonic() + 180
        while not all((Path(sync_dir) / f"ready-{arch}").exists() for arch in PAIR):
            failed = [p.returncode for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"share workers did not get ready (exit codes {failed})")
            time.sleep(0.05)
        (Path(sync_dir) / "go").write_text("1")
        codes = [p.wait(timeout=300) for p in procs]
        if any(codes):
            raise RuntimeError(f"share workers failed with exit codes {codes}")
        return {
            arch: json.loads((Path(sync_dir) / f"{arch}.json").read_text())["ms_per_step"] for arch in PAIR
        }


def in_process_pair(models: dict[str, Any], device: str, mode: str, steps: int) -> dict[str, float]:
    """Both members in one process, stepped one after the other (the in-process ensemble's step)."""
    with torch.inference_mode():
        runs = {arch: stepper(models[arch], device, mode, steps) for arch in PAIR}
        alone = {}
        for arch, run in runs.items():
            for _ in range(10):
                run()
            sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                run()
            sync(device)
            alone[arch] = 1000 * (time.perf_counter() - started) / steps
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            for run in runs.values():
                run()
        sync(device)
        both = 1000 * (time.perf_counter() - started) / steps
    return {**{f"{arch}_alone_ms": ms for arch, ms in alone.items()}, "both_in_turn_ms": both}


class MPS:
    """A private CUDA MPS control daemon (its own pipe and log folders), stopped on exit."""

    def __init__(self, control: str) -> None:
        self.control = control
        self.folder = Path(tempfile.mkdtemp(prefix="mps-"))
        self.env = {
            **os.environ,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.folder / "pipe"),
            "CUDA_MPS_LOG_DIRECTORY": str(self.folder / "log"),
        }

    def __enter__(self) -> MPS:
        (self.folder / "pipe").mkdir()
        (self.folder / "log").mkdir()
        subprocess.run([self.control, "-d"], env=self.env, check=True, timeout=30)
        time.sleep(1.0)
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run([self.control], input=b"quit\n", env=self.env, check=False, timeout=30)
        time.sleep(1.0)
        shutil.rmtree(self.folder, ignore_errors=True)


# -- the run ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    started: float = field(default_factory=time.monotonic)
    data: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def meta(args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {
        "command": " ".join(["python -m bench.gpu_step", *sys.argv[1:]]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "tiny": args.tiny,
        "cpu_threads": torch.get_num_threads(),
        "dtype_timing": "bfloat16" if args.device.startswith("cuda") else "float32",
        "dtype_check": "float32",
        "batches": list(args.batches),
        "steps": args.steps,
    }
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    info["mps_control"] = shutil.which("nvidia-cuda-mps-control")
    return info


def bench_architecture(arch: str, args: argparse.Namespace, report: Report) -> dict[str, Any]:
    device, cuda = args.device, args.device.startswith("cuda")
    out: dict[str, Any] = {}
    model = build(arch, args.tiny, device, torch.float32)
    config = model.config.get_text_config(decoder=True)
    out["shape"] = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": config.num_hidden_layers,
        "hidden": config.hidden_size,
        "vocab": config.vocab_size,
        "layer_types": sorted(set(getattr(config, "layer_types", None) or ["full_attention"])),
    }
    out["check"] = check(arch, model, device, graph=cuda)
    if "graph_error" in out["check"]:
        out["graph_error"] = out["check"]["graph_error"]
    if cuda:
        model = model.to(torch.bfloat16)
    timing: dict[str, dict[str, float]] = {"engine": {}, "static_eager": {}}
    if cuda:
        timing["graph"] = {}
    for batch in args.batches:
        if report.elapsed() > args.budget_s:
            report.skipped.append(
                f"{arch} batch {batch} and after: past the time budget ({args.budget_s:g} s)"
            )
            break
        timing["engine"][str(batch)] = time_engine(model, device, batch, args.warmup, args.steps)
        timing["static_eager"][str(batch)] = time_static(
            model, device, batch, args.warmup, args.steps, graph=False
        )
        if cuda and "graph_error" not in out:
            try:
                timing["graph"][str(batch)] = time_static(
                    model, device, batch, args.warmup, args.steps, graph=True
                )
            except RuntimeError as error:
                out["graph_error"] = f"batch {batch}: {type(error).__name__}: {error}"
        print(
            f"{arch} batch {batch}: " + ", ".join(f"{k} {v[str(batch)]:.2f} ms" for k, v in timing.items()),
            flush=True,
        )
    out["timing_ms_per_step"] = timing
    best = timing.get("graph") or timing["static_eager"]
    if "1" in best:
        targets: dict[str, Any] = {}
        if arch in TARGET_B1_MS:
            targets["b1_ms"] = {
                "value": best["1"],
                "target": TARGET_B1_MS[arch],
                "met": best["1"] <= TARGET_B1_MS[arch],
            }
        if "32" in best:
            ratio = best["32"] / best["1"]
            targets["b32_over_b1"] = {
                "value": ratio,
                "target": TARGET_B32_OVER_B1,
                "met": ratio <= TARGET_B32_OVER_B1,
            }
        out["targets_on_" + ("graph" if "graph" in timing else "static_eager")] = targets
    del model
    if cuda:
        torch.cuda.empty_cache()
    return out


def bench_sharing(args: argparse.Namespace, report: Report) -> dict[str, Any]:
    device, cuda = args.device, args.device.startswith("cuda")
    modes = ["engine", "graph"] if cuda else ["engine", "static_eager"]
    dtype = torch.bfloat16 if cuda else torch.float32
    out: dict[str, Any] = {"pair": list(PAIR), "batch": 1, "steps": args.share_steps}
    if not cuda:
        out["note"] = "CPU: the code path only; these figures say nothing about sharing a GPU"
    models = {arch: build(arch, args.tiny, device, dtype) for arch in PAIR}
    for mode in modes:
        try:
            out[f"in_process_{mode}"] = in_process_pair(models, device, mode, args.share_steps)
        except RuntimeError as error:
            report.errors.append(f"sharing, in process ({mode}): {type(error).__name__}: {error}")
    del models
    if cuda:
        torch.cuda.empty_cache()
    control = shutil.which("nvidia-cuda-mps-control")
    for mode in modes:
        if report.elapsed() > args.budget_s:
            report.skipped.append(f"sharing, two processes ({mode}): past the time budget")
            continue
        try:
            out[f"two_processes_{mode}"] = run_pair(args, mode, dict(os.environ))
        except (RuntimeError, subprocess.SubprocessError) as error:
            report.errors.append(f"sharing, two processes ({mode}): {type(error).__name__}: {error}")
        if not cuda:
            continue
        if control is None:
            report.skipped.append(f"sharing with MPS ({mode}): no nvidia-cuda-mps-control on this machine")
            continue
        try:
            with MPS(control) as mps:
                out[f"two_processes_mps_{mode}"] = run_pair(args, mode, mps.env)
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            report.errors.append(f"sharing with MPS ({mode}): {type(error).__name__}: {error}")
    if not cuda:
        report.skipped.append("sharing with MPS: no CUDA device")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "./bench_out"), help="folder of gpu_step.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of the script)")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per measurement")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--share-steps", type=int, default=200)
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="start nothing new after this many seconds"
    )
    parser.add_argument("--no-sharing", action="store_true")
    # A sharing worker (started by the benchmark itself).
    parser.add_argument("--share-worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="engine", help=argparse.SUPPRESS)
    parser.add_argument("--sync-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.share_worker:
        share_worker(args)
        return
    args.batches = [int(b) for b in str(args.batches).split(",")]
    report = Report()
    report.data["meta"] = meta(args)
    cuda = args.device.startswith("cuda")
    if not cuda:
        report.skipped.append("CUDA graphs (capture, replay, graph-vs-eager tokens): no CUDA device")
    report.data["architectures"] = {}
    for arch in args.archs.split(","):
        if report.elapsed() > args.budget_s:
            report.skipped.append(f"{arch}: past the time budget ({args.budget_s:g} s)")
            continue
        try:
            report.data["architectures"][arch] = bench_architecture(arch, args, report)
        except (RuntimeError, ValueError, NotImplementedError, torch.cuda.OutOfMemoryError) as error:
            # Recorded, not hidden: the JSON says which architecture failed and how; the others still run.
            report.errors.append(f"{arch}: {type(error).__name__}: {error}")
        write(args, report)
    if args.no_sharing:
        report.skipped.append("sharing: --no-sharing")
    else:
        try:
            report.data["sharing"] = bench_sharing(args, report)
        except (RuntimeError, OSError, subprocess.SubprocessError) as error:
            report.errors.append(f"sharing: {type(error).__name__}: {error}")
    path = write(args, report)
    print(
        f"wrote {path} in {report.elapsed():.0f} s; skipped: {report.skipped or 'nothing'}; errors: {report.errors or 'none'}"
    )


def write(args: argparse.Namespace, report: Report) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_step.json"
    body = {**report.data, "seconds": report.elapsed(), "skipped": report.skipped, "errors": report.errors}
    path.write_text(json.dumps(body, indent=1))
    return path


if __name__ == "__main__":
    main()
