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

* `engine`: `MemberEngine.step` (runtime/member.py, the eager path Consort runs today: dynamic
  caches, packed rows, position masks, exact top-k to the host) at batch 1/4/16/32.
* `static_eager` / `graph`: a static KV cache with one slot per sequence (the token at position p of
  the sequence in slot b lives in column p of row b; a crop moves the slot's position back, no
  copy), the decode step as one forward over all slots with masks computed from the slots'
  positions (causal, and Gemma-3's sliding window, measured in positions), top-k and the log-softmax
  normaliser on the device, then copied to the host as the engine does. `graph` captures that step
  as one CUDA graph per batch bucket (manual `torch.cuda.CUDAGraph`, as gpt-fast and vLLM do) and
  replays it: no compile step or Triton needed on the lent machine, no recompiles, and the replay
  runs the eager step's own kernels (no compiler in between), so it matches the uncaptured step.
* `check`: greedy tokens, in float32, of the engine, the static step and its graph replay, over
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
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from consort.runtime.member import MemberEngine

CONFIGS = Path(__file__).resolve().parent / "configs"
ARCHITECTURES = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
PAIR = ("smollm2-135m", "gemma3-270m")  # the default ensemble
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
            both = ["sliding_attention", "full_attention"] if "sliding_attention" in kinds else ["full_attention"] * 2
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


def engine_of(model: Any, device: str) -> MemberEngine:
    config = model.config
    stand_in = SimpleNamespace(pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id)
    return MemberEngine(model, stand_in, name=config.model_type, device=device)


def prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- the static-cache decode step --------------------------------------------------------------------


class SlotLayer(CacheLayerMixin):
    """One layer's K/V for a fixed number of slots of `max_len` positions each, allocated once.

    The token at position p of the sequence in slot b lives in column p of row b: no padding, no
    holes. A decode step writes each slot's new K/V at that slot's own position (`positions`, one
    device tensor shared by every layer), so a step's shapes never change and it can be captured.
    """

    is_compileable = True
    is_croppable = True
    is_sliding = False  # windowing is the mask's job: a sliding layer keeps every position (exact crops)

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.positions = positions
        self.rows = torch.arange(keys.shape[0], device=keys.device)
        self.max_len = keys.shape[2]
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("slot layers are allocated up front, never lazily")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if key_states.shape[2] != 1:
            raise ValueError("the static step feeds one token per slot; prefill and catch-up run eagerly")
        assert self.keys is not None and self.values is not None
        self.keys[self.rows, :, self.positions] = key_states[:, :, 0]
        self.values[self.rows, :, self.positions] = value_states[:, :, 0]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_len, 0

    def get_seq_length(self) -> int:
        raise RuntimeError("slot positions differ per row: the static step always passes position_ids")

    def get_max_length(self) -> int:
        return self.max_len


class StaticDecoder:
    """Decode steps over `batch` slots with a static KV cache; eager, or replayed as a CUDA graph.

    Prefill runs eagerly, one sequence at a time, into a dynamic cache whose K/V is then copied
    into the slot. The step's inputs are device buffers (`ids`, `positions`) updated in place, and
    the step ends by writing its greedy token into `ids` and advancing `positions` (gpt-fast style);
    a crop, or the ensemble's own token, is a write into those buffers before the next step.
    """

    def __init__(self, model: Any, batch: int, max_len: int, device: str, top_k: int = TOP_K) -> None:
        self.model = model
        self.device = device
        self.config = model.config.get_text_config(decoder=True)
        dtype = next(model.parameters()).dtype
        heads = self.config.num_key_value_heads
        head_dim = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.columns = torch.arange(max_len, device=device)
        layers = [
            SlotLayer(
                torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device),
                torch.zeros(batch, heads, max_len, head_dim, dtype=dtype, device=device),
                self.positions,
            )
            for _ in range(self.config.num_hidden_layers)
        ]
        self.cache = Cache(layers=layers)
        self.top_k = min(top_k, self.config.vocab_size)
        self.top_values = torch.zeros(batch, self.top_k, device=device)
        self.top_ids = torch.zeros(batch, self.top_k, dtype=torch.long, device=device)
        self.window = getattr(self.config, "sliding_window", None)
        self.layer_types = getattr(self.config, "layer_types", None)
        self.graph: torch.cuda.CUDAGraph | None = None

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fill a slot with a prompt's K/V; returns the next token's top-k log-probs and ids, on the
        host (the greedy token, the first id, is placed in `ids`)."""
        cache = DynamicCache()
        input_ids = torch.tensor([tokens], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits
        for layer, source in zip(self.cache.layers, cache.layers, strict=True):
            assert layer.keys is not None and layer.values is not None
            layer.keys[slot, :, : len(tokens)] = source.keys[0]
            layer.values[slot, :, : len(tokens)] = source.values[0]
        values, ids = logits[0, -1].float().log_softmax(-1).topk(self.top_k)
        self.positions[slot] = len(tokens)
        self.ids[slot, 0] = ids[0]
        return values.cpu(), ids.cpu()

    def crop(self, slot: int, tokens: list[int], keep: int) -> None:
        """Keep the first `keep` tokens of a slot: re-run the last kept one at the next step."""
        self.positions[slot] = keep - 1
        self.ids[slot, 0] = tokens[keep - 1]

    def _masks(self) -> torch.Tensor | dict[str, torch.Tensor]:
        query = self.positions[:, None]
        causal = self.columns[None, :] <= query  # [B, L]: this step's own column included
        full = causal[:, None, None, :]
        if self.layer_types is None:
            if self.window is not None:
                return (causal & (query - self.columns[None, :] < self.window))[:, None, None, :]
            return full
        masks = {}
        for kind in set(self.layer_types):
            if kind == "sliding_attention":
                masks[kind] = (causal & (query - self.columns[None, :] < self.window))[:, None, None, :]
            else:
                masks[kind] = full
        return masks

    def _step(self) -> None:
        logits = self.model(
            input_ids=self.ids,
            position_ids=self.positions[:, None],
            attention_mask=self._masks(),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        last = logits[:, -1, :].float()
        values, ids = last.topk(self.top_k, dim=-1)
        self.top_values.copy_(values - last.logsumexp(dim=-1, keepdim=True))
        self.top_ids.copy_(ids)
        self.ids.copy_(ids[:, :1])
        self.positions.add_(1)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record the step as a CUDA graph (after warm-up runs on a side stream, which leave the
        slots' positions and next tokens as they were)."""
        saved_positions, saved_ids = self.positions.clone(), self.ids.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.positions.copy_(saved_positions)
        self.ids.copy_(saved_ids)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph
        self.positions.copy_(saved_positions)
        self.ids.copy_(saved_ids)

    @torch.inference_mode()
    def step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step over every slot; the top-k log-probs and ids, on the host (as the engine)."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        return self.top_values.cpu(), self.top_ids.cpu()


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
        return {"tokens_equal": self.tokens == other.tokens, "top5_equal": self.top5 == other.top5,
                "max_logprob_gap": max(gaps)}


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
    decoder = StaticDecoder(model, len(rows), max(len(r) for r in rows) + before + after + 2, device)
    out = Greedy.empty(len(rows))
    texts = [list(tokens) for tokens in rows]
    for i, tokens in enumerate(rows):
        texts[i].append(out.add(i, *decoder.prefill(i, tokens)))
    if graph:
        decoder.capture()
    for step in range(1, before + after):
        if step == before:
            decoder.crop(0, texts[0], len(texts[0]) - crop)
        values, ids = decoder.step()
        for i in range(len(rows)):
            texts[i].append(out.add(i, values[i], ids[i]))
    return out


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
        try:
            replayed = greedy_static(model, rows, before, after, crop, device, graph=True)
        except RuntimeError as error:  # a capture that fails is a finding: recorded, the rest goes on
            result["graph_error"] = f"{type(error).__name__}: {error}"
            return result
        result["graph_vs_engine"] = replayed.compare(engine)
        result["graph_vs_static"] = replayed.compare(static)
        if replayed.tokens != engine.tokens:
            result["graph_tokens"] = replayed.tokens
    return result


# -- timing --------------------------------------------------------------------------------------------


def time_engine(model: Any, device: str, batch: int, warmup: int, steps: int) -> float:
    engine = engine_of(model, device)
    config = model.config.get_text_config(decoder=True)
    rows = prompts(config.vocab_size, [64] * batch, seed=2)
    ids = [f"s{i}" for i in range(batch)]
    for seq_id, tokens in zip(ids, rows, strict=True):
        engine.add(seq_id, tokens)

    def one() -> None:
        results = engine.step(ids, top_k=TOP_K)
        for seq_id in ids:
            engine.extend(seq_id, [int(results[seq_id].top_ids[0])])

    try:
        for _ in range(warmup + 1):  # the first is the prefill
            one()
        sync(device)
        started = time.perf_counter()
        for _ in range(steps):
            one()
        sync(device)
        return 1000 * (time.perf_counter() - started) / steps
    finally:
        for seq_id in ids:
            engine.remove(seq_id)


def static_decoder(model: Any, device: str, batch: int, steps: int, graph: bool) -> StaticDecoder:
    config = model.config.get_text_config(decoder=True)
    rows = prompts(config.vocab_size, [64] * batch, seed=2)
    decoder = StaticDecoder(model, batch, 64 + 2 * steps + 16, device)
    for i, tokens in enumerate(rows):
        decoder.prefill(i, tokens)
    if graph:
        decoder.capture()
    return decoder


def time_static(model: Any, device: str, batch: int, warmup: int, steps: int, graph: bool) -> float:
    decoder = static_decoder(model, device, batch, warmup + steps, graph)
    for _ in range(warmup):
        decoder.step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        decoder.step()
    sync(device)
    return 1000 * (time.perf_counter() - started) / steps


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
    Path(args.result).write_text(json.dumps({"arch": args.share_worker, "mode": args.mode, "ms_per_step": ms}))


def stepper(model: Any, device: str, mode: str, steps: int) -> Any:
    """A callable that takes one batch-1 decode step of `model` the way `mode` says."""
    config = model.config.get_text_config(decoder=True)
    if mode == "engine":
        engine = engine_of(model, device)
        engine.add("s", prompts(config.vocab_size, [64], seed=3)[0])

        def engine_step() -> None:
            result = engine.step(["s"], top_k=TOP_K)["s"]
            engine.extend("s", [int(result.top_ids[0])])

        engine_step()  # prefill
        return engine_step
    decoder = static_decoder(model, device, 1, steps + 64, graph=mode == "graph")
    return decoder.step


def run_pair(args: argparse.Namespace, mode: str, env: dict[str, str]) -> dict[str, Any]:
    """The pair as two processes stepping at the same time on one device."""
    with tempfile.TemporaryDirectory() as sync_dir:
        procs = []
        for arch in PAIR:
            command = [
                sys.executable, "-m", "bench.gpu_step", "--share-worker", arch, "--mode", mode,
                "--steps", str(args.share_steps), "--warmup", "10", "--sync-dir", sync_dir,
                "--result", str(Path(sync_dir) / f"{arch}.json"), "--device", args.device,
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
        return {arch: json.loads((Path(sync_dir) / f"{arch}.json").read_text())["ms_per_step"] for arch in PAIR}


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
            report.skipped.append(f"{arch} batch {batch} and after: past the time budget ({args.budget_s:g} s)")
            break
        timing["engine"][str(batch)] = time_engine(model, device, batch, args.warmup, args.steps)
        timing["static_eager"][str(batch)] = time_static(model, device, batch, args.warmup, args.steps, graph=False)
        if cuda and "graph_error" not in out:
            try:
                timing["graph"][str(batch)] = time_static(model, device, batch, args.warmup, args.steps, graph=True)
            except RuntimeError as error:
                out["graph_error"] = f"batch {batch}: {type(error).__name__}: {error}"
        print(f"{arch} batch {batch}: " + ", ".join(f"{k} {v[str(batch)]:.2f} ms" for k, v in timing.items()), flush=True)
    out["timing_ms_per_step"] = timing
    best = timing.get("graph") or timing["static_eager"]
    if "1" in best:
        targets: dict[str, Any] = {}
        if arch in TARGET_B1_MS:
            targets["b1_ms"] = {"value": best["1"], "target": TARGET_B1_MS[arch], "met": best["1"] <= TARGET_B1_MS[arch]}
        if "32" in best:
            ratio = best["32"] / best["1"]
            targets["b32_over_b1"] = {"value": ratio, "target": TARGET_B32_OVER_B1, "met": ratio <= TARGET_B32_OVER_B1}
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "./bench_out"), help="folder of gpu_step.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check of the script)")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per measurement")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--share-steps", type=int, default=200)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start nothing new after this many seconds")
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
    print(f"wrote {path} in {report.elapsed():.0f} s; skipped: {report.skipped or 'nothing'}; errors: {report.errors or 'none'}")


def write(args: argparse.Namespace, report: Report) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu_step.json"
    body = {**report.data, "seconds": report.elapsed(), "skipped": report.skipped, "errors": report.errors}
    path.write_text(json.dumps(body, indent=1))
    return path


if __name__ == "__main__":
    main()
