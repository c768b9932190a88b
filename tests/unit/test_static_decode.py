"""The GPU benchmark's check (bench/gpu_step.py): the member engine's static-cache path against its
dynamic path, as the benchmark runs them (crop of one sequence mid-way, Gemma-3's window crossed):
the same greedy tokens, top 5 and log-probs on tiny models of every packaged architecture. The
CUDA-graph replay runs only where there is a GPU.
"""

from __future__ import annotations

import pytest
import torch

from bench import gpu_step

# llama (SmolLM2), gemma3 (Gemma-3: sliding and full layers, window shrunk to 8), qwen2 (Qwen2.5-Coder)
ARCHS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")


@pytest.mark.parametrize("arch", ARCHS)
def test_static_slots_equal_the_engine_token_for_token(arch: str) -> None:
    model = gpu_step.build(arch, tiny=True, device="cpu", dtype=torch.float32)
    result = gpu_step.check(arch, model, "cpu", graph=False)
    window = result["sliding_window"]
    if window is not None:
        assert min(result["prompt_lengths"]) > window  # the window is crossed
    compared = result["static_vs_engine"]
    assert compared["tokens_equal"] and compared["top5_equal"], result
    assert compared["max_logprob_gap"] < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_graph_replay_equals_eager(arch: str) -> None:
    model = gpu_step.build(arch, tiny=True, device="cuda", dtype=torch.float32)
    result = gpu_step.check(arch, model, "cuda", graph=True)
    assert "graph_error" not in result, result["graph_error"]
    assert result["graph_vs_static"]["tokens_equal"] and result["graph_vs_static"]["max_logprob_gap"] < 1e-4
    assert result["graph_vs_engine"]["tokens_equal"]
